"""Retrying transient storage errors with backoff; permanent ones fail at once.

Under botocore's own retries (``retries: standard``, set in :mod:`.storage`) and s3fs's, this is
the last layer: a file put that still fails with a transient error (503 SlowDown, 500, a reset
connection, a timeout) is tried again after an exponential, jittered delay. Object reads are
retried by this layer alone, within one budget (READ_ATTEMPTS, READ_BUDGET_S). Permanent errors (403 access denied, 404 not found, a bad request) are raised at once, so
a missing object becomes its error row without waiting.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

TRANSIENT_ERRNOS = {errno.EBUSY, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN,
                    getattr(errno, "EREMOTEIO", 121)}
# Exceptions of botocore, aiohttp and fsspec that mean "the request did not get through", by name
# (matching names keeps those packages optional here).
TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                   "ServerDisconnectedError", "ClientConnectionError", "ClientOSError", "ClientPayloadError",
                   "ServerTimeoutError", "FSTimeoutError", "IncompleteRead", "ResponseParserError", "HTTPClientError",
                   "ProtocolError", "RemoteDisconnected"}
TRANSIENT_CODES = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttl", "503", "500")


def is_transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    for exc in (e, e.__cause__, e.__context__):
        if exc is None:
            continue
        if isinstance(exc, TimeoutError | ConnectionError):
            return True
        if type(exc).__name__ in TRANSIENT_NAMES:
            return True
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return True
        if type(exc).__name__ == "ClientError" and any(c in str(exc) for c in TRANSIENT_CODES):
            return True
    return False


# The retry budget of one object read (an image, or a container stream that stopped making
# progress): at most READ_ATTEMPTS requests, none started after READ_BUDGET_S seconds. Reads are
# retried here only: the S3 client of the readers makes one attempt per call (Storage.read_fs), so
# the budget is not multiplied by botocore's and s3fs's own retries. A request in flight is bounded
# by the readers' connect and read timeouts (10 s and 30 s; Storage.read_fs): the worst case of an
# object that never answers is the budget plus one request's timeouts.
READ_ATTEMPTS = 8
READ_BUDGET_S = 60.0


def backoff(attempt: int, base_delay: float = 0.2, max_delay: float = 8.0) -> float:
    """The jittered wait after the ``attempt``-th failure (0-based)."""
    return min(max_delay, base_delay * 2**attempt) * random.uniform(0.5, 1.0)


def with_retries(fn: Callable[[], T], attempts: int = 5, base_delay: float = 0.2, max_delay: float = 8.0,
                 sleep: Callable[[float], None] = time.sleep, budget_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> tuple[T, int]:
    """``(fn(), retries needed)``; re-raises a permanent error at once, a transient one after ``attempts``
    (or, with ``budget_s``, when the next attempt would start later than that after the first)."""
    start = clock()
    for attempt in range(attempts):
        try:
            return fn(), attempt
        except Exception as e:  # noqa: BLE001 - classified below
            if attempt == attempts - 1 or not is_transient(e):
                raise
            delay = backoff(attempt, base_delay, max_delay)
            if budget_s is not None and clock() + delay - start > budget_s:
                raise
            sleep(delay)
    raise AssertionError("unreachable")
