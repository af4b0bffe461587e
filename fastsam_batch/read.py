"""Read stage: one planned object -> its bytes, or an error naming why it could not be read; and
the streaming read of a container object (tar shard) that its input form parses."""

from __future__ import annotations

import io
import time

from .retry import READ_ATTEMPTS, READ_BUDGET_S, backoff, is_transient, with_retries
from .storage import Storage, protocol_of, strip_protocol


def read_item(uri: str, storage: Storage, attempts: int = READ_ATTEMPTS,
              budget_s: float = READ_BUDGET_S) -> tuple[bytes | None, str | None, int]:
    """(data, None, retries) or (None, "read_failed: ...", retries). Never raises for a per-object
    problem. Transient errors are retried with backoff within one budget (at most ``attempts``
    requests, none started after ``budget_s`` s; see :mod:`.retry`), by this layer alone (the S3
    client makes one attempt per request: Storage.read_fs); permanent ones are not retried.
    ``retries``: failed attempts before the answer."""
    tried = 0
    before = storage.failed_attempts

    def read() -> bytes:
        nonlocal tried
        tried += 1
        return storage.read_fs(uri).cat_file(uri)

    try:
        data, retries = with_retries(read, attempts, budget_s=budget_s)
        # Attempts the S3 client retried by itself (a user's config_kwargs) count too (Storage.failed_attempts).
        return data, None, max(retries, storage.failed_attempts - before)
    except FileNotFoundError:
        return None, "read_failed: object not found (deleted after listing?)", tried - 1
    except PermissionError as e:
        return None, f"read_failed: access denied: {e}", tried - 1
    except Exception as e:  # noqa: BLE001 - one bad object is one error row
        if is_transient(e):
            return None, (f"read_failed: {type(e).__name__}: {e} (still failing after {tried} attempts, "
                          f"retry budget {attempts} attempts / {budget_s:g} s)"), tried - 1
        return None, f"read_failed: {type(e).__name__}: {e}", tried - 1


class ObjectStream(io.RawIOBase):
    """An object read front to back in one streaming GET (a tar shard, never held whole). When the
    connection breaks, reading goes on from the byte where it broke with a ranged GET (``If-Match``
    the ETag planned, so a changed object is an error, not a mix of two versions); the bytes read
    are never read twice. Retries share one budget per stall: after ``attempts`` failed requests in
    a row, or ``budget_s`` s without a byte read, the read fails (an open and the reads after it
    are one budget, not one each). Local and other fsspec files are plain sequential reads."""

    def __init__(self, uri: str, storage: Storage, etag: str = "", attempts: int = READ_ATTEMPTS,
                 budget_s: float = READ_BUDGET_S):
        super().__init__()
        self.uri, self.storage, self.etag, self.attempts, self.budget_s = uri, storage, etag, attempts, budget_s
        self.fs = storage.read_fs(uri)
        self.s3 = protocol_of(uri) in ("s3", "s3a") and hasattr(self.fs, "call_s3")
        self.pos = 0
        self.retries = 0
        self.body = None

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def _open(self):
        if not self.s3:
            f = self.fs.open(strip_protocol(self.uri), "rb")
            f.seek(self.pos)
            return f
        bucket, _, key = strip_protocol(self.uri).partition("/")
        extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        if self.etag and not self.etag.startswith("mtime:"):
            extra["IfMatch"] = f'"{self.etag}"'
        try:
            return self.fs.call_s3("get_object", Bucket=bucket, Key=key, **extra)["Body"]
        except OSError as e:
            if "PreconditionFailed" in str(e) or "412" in str(e):
                raise OSError(f"{self.uri} changed while it was read (its ETag is no longer {self.etag})") from None
            raise

    def _read(self, n: int) -> bytes:
        if self.body is None:
            self.body = self._open()
        if self.s3:
            from fsspec.asyn import sync

            return sync(self.fs.loop, self.body.read, n)
        return self.body.read(n)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            chunks = []
            while chunk := self.read(1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        failures, stalled_since = 0, time.monotonic()
        while True:
            try:
                data = self._read(n)
                self.pos += len(data)
                return data
            except Exception as e:  # noqa: BLE001 - a broken stream is resumed where it broke
                self._close_body()
                failures += 1
                delay = backoff(failures - 1)
                if (not is_transient(e) or failures >= self.attempts
                        or time.monotonic() + delay - stalled_since > self.budget_s):
                    raise
                self.retries += 1
                time.sleep(delay)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _close_body(self) -> None:
        body, self.body = self.body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - closing a broken stream
                pass

    def close(self) -> None:
        self._close_body()
        super().close()
