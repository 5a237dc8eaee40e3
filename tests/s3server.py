"""A real S3-API server for tests: moto's standalone server (``moto[server]``) on a free 127.0.0.1 port.

It is ``moto_server``'s own application and request handler, run with one
change: requests are answered one at a time. moto checks a conditional PUT's
precondition (``If-Match``, ``If-None-Match``) and stores the object in two
steps, so two concurrent conditional PUTs on one key could both succeed (seen
here: 79 of 80 concurrent compare-and-swap increments survived), where S3
makes each one atomic. Serialising requests restores that guarantee, which
the store's claims rely on.

The server runs in its own process group and is stopped by the context
manager whatever happens. It holds everything in memory, so each server starts
empty; each test takes a bucket of its own.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from tests.servers import _stop as stop
from tests.servers import free_port

MOTO = Path(sys.executable).with_name("moto_server")

_SERVE = """
import sys, threading
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()

def one_at_a_time(environ, start_response):
    with lock:
        return list(app(environ, start_response))

run_simple(sys.argv[1], int(sys.argv[2]), one_at_a_time, threaded=True, request_handler=MotoRequestHandler)
"""

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "vigil-test",
    "AWS_SECRET_ACCESS_KEY": "vigil-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""moto accepts any credentials; botocore needs some to sign requests."""


@dataclass
class S3Server:
    """A running S3-API server at ``endpoint``."""

    endpoint: str

    def env(self) -> dict[str, str]:
        """What a client process needs to reach the server (plus ``VIGIL_STORE`` naming a bucket)."""
        return {**CREDENTIALS, "VIGIL_STORE_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint}

    def new_bucket(self) -> str:
        """Create an empty bucket; returns ``s3://<bucket>/vigil``, a store URL inside it."""
        import s3fs

        name = f"vigil-{secrets.token_hex(4)}"
        fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                               secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
        fs.mkdir(name)
        return f"s3://{name}/vigil"


@contextmanager
def s3_server(timeout: float = 60.0) -> Iterator[S3Server]:
    """Start moto's S3-API server on a free port of 127.0.0.1; stop it on exit."""
    if not MOTO.exists():
        raise RuntimeError(f"{MOTO} is missing: the test extra installs moto[server]")
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="vigil-moto-", suffix=".log")[1])
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", _SERVE, "127.0.0.1", str(port)], stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MOTO_PORT": str(port)})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{endpoint}/moto-api/", timeout=1.0).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not answer within {timeout}s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield S3Server(endpoint)
    finally:
        stop(proc)
        log.unlink(missing_ok=True)
