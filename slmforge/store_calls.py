"""Calls to the store: the one error type and the one retry layer.

A store call either succeeds, is retried by tenacity while its fault may pass (judged by the
exception's type and HTTP status, never its text), or ends in a `StoreError` naming what was
being done. botocore's and s3fs's own retries are off (see `slmforge.storage.ArtifactStore`), so
this is the only place that decides.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from typing import TypeVar

import tenacity

T = TypeVar("T")


class StoreError(RuntimeError):
    """The store cannot be reached or holds something unusable; the message names the URL/key.

    `transient`: the store client gave up on faults that a later attempt may not meet (a connection
    that kept dropping, 5xx): a whole-stage retry may help. False: retrying cannot fix it (403,
    a missing bucket, a damaged output)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


# A 404 or 403 does not go away by asking again; a dropped connection, a timeout, a 5xx or a
# throttling answer (429, 503 SlowDown) may.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN}


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError (s3fs raises it as the cause of an OSError)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _transient(exc: BaseException) -> bool:
    """Whether a store call that raised `exc` is worth repeating, judged by type (and HTTP status)."""
    chain = []
    while exc is not None and len(chain) < 5:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        if isinstance(e, _PERMANENT):
            return False
        status = _http_status(e)
        if status is not None:
            return status >= 500 or status in (408, 429)
        if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if _botocore_transient is not None and isinstance(e, _botocore_transient):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


try:  # s3fs's client: its connection and timeout errors are not builtin ConnectionErrors
    from botocore.exceptions import ConnectionError as _BotoConnectionError
    from botocore.exceptions import HTTPClientError as _BotoHTTPClientError

    _botocore_transient: tuple | None = (_BotoConnectionError, _BotoHTTPClientError)
except ImportError:  # pragma: no cover - botocore comes with s3fs, a dependency
    _botocore_transient = None


# Defaults of `with_retries`: 5 tries, waits of 1, 2, 4, 8 s (+ up to 1 s of jitter each) between
# them, so an outage of several seconds is ridden out and a store that stays down fails in ~15-20 s.
STORE_ATTEMPTS = 5
STORE_BASE_DELAY = 1.0


def with_retries(fn: Callable[[], T], what: str, attempts: int | None = None, base_delay: float | None = None) -> T:
    """Run a store call; transient faults are retried by tenacity (bounded exponential backoff with
    jitter), anything else fails at once. Either way the error is a StoreError naming `what`.
    The one retry layer for the store: botocore's and s3fs's own are off (see ArtifactStore)."""
    attempts = attempts or STORE_ATTEMPTS
    base_delay = STORE_BASE_DELAY if base_delay is None else base_delay
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(_transient), stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=base_delay, max=30 * base_delay)
        + tenacity.wait_random(0, base_delay),
        reraise=True)
    try:
        return retrying(fn)
    except Exception as exc:  # noqa: BLE001 - wrapped with what was being done
        if not _transient(exc):
            raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from exc
        raise StoreError(f"{what}: still failing after {attempts} attempts: {type(exc).__name__}: {exc}",
                         transient=True) from exc
