"""Request ids that say who served a request and when: ``<worker token><serving time><counter>``, in hex.

Every worker process draws a random token when it starts (:func:`new_token`)
and registers it in the store before it serves. Its request ids are that
token, the serving time in milliseconds and a per-process counter::

    ids = RequestIds(new_token())
    rid = ids.next()                    # 'a3f09c11d2e4' + '18f3a2b4c01' + '00002a'
    parse_request_id(rid)               # RequestId(token='a3f09c11d2e4', millis=1716..., counter=42)

So whoever receives feedback for an id knows at once which worker's log
segments, and which hour of them, can hold its prediction, and can refuse an
id no worker issued. Making one costs a clock read and a format: no system
call (``time.time`` reads the vDSO clock) and no kernel randomness.
"""

from __future__ import annotations

import itertools
import secrets
import time
from typing import NamedTuple

TOKEN_DIGITS = 12
"""Hex digits of a worker token: 48 random bits, so two of a fleet's processes practically never share one."""
MILLIS_DIGITS = 11
"""Hex digits of the serving time in milliseconds (enough until the year 2527)."""
COUNTER_DIGITS = 6
"""Fewest hex digits of the counter (it grows longer past 16.7 million requests of one process)."""
_HEX = frozenset("0123456789abcdef")


class RequestId(NamedTuple):
    """What a request id says: the worker that served it, when, and its place in that worker's sequence."""

    token: str
    millis: int
    counter: int

    @property
    def seconds(self) -> float:
        """Serving time, Unix seconds."""
        return self.millis / 1000


def new_token() -> str:
    """A worker token: random, drawn once per process."""
    return secrets.token_hex(TOKEN_DIGITS // 2)


class RequestIds:
    """One worker's request ids: its token, the serving time and a counter."""

    def __init__(self, token: str) -> None:
        self.token = token
        self._ids = itertools.count()
        self._clock = time.time_ns

    def next(self) -> str:
        """A new request id (unique per process by the counter, across processes by the token)."""
        return "%s%011x%06x" % (self.token, self._clock() // 1_000_000, next(self._ids))


def parse_request_id(text: str) -> RequestId | None:
    """The parts of an id :class:`RequestIds` made, or None when ``text`` cannot be one."""
    if len(text) < TOKEN_DIGITS + MILLIS_DIGITS + COUNTER_DIGITS or not _HEX.issuperset(text):
        return None
    middle = TOKEN_DIGITS + MILLIS_DIGITS
    return RequestId(text[:TOKEN_DIGITS], int(text[TOKEN_DIGITS:middle], 16), int(text[middle:], 16))
