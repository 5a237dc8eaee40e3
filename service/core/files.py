"""Atomic file writes: a reader never sees half a file.

Everything Vigil keeps on disk (prediction log segments, feedback, job results,
the deploy config and rollback state) is written through :func:`atomic_write`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None], durable: bool = False) -> None:
    """Write through a temporary file in the same directory and rename it into place.

    Readers never see half a file: the temporary name starts with a dot (which
    every reader of Vigil's directories skips) and is removed if ``write`` fails.
    ``durable`` also syncs the file to disk before the rename, for state that
    must survive a power cut rather than just a crash.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`atomic_write` for text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
