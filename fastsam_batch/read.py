"""Read stage: one planned object -> its bytes, or an error naming why it could not be read; and
the streaming read of a container object (tar shard) that its input form parses."""

from __future__ import annotations

import io

from .retry import is_transient, with_retries
from .storage import Storage, protocol_of, strip_protocol


def read_item(uri: str, storage: Storage, attempts: int = 5) -> tuple[bytes | None, str | None, int]:
    """(data, None, retries) or (None, "read_failed: ...", retries). Never raises for a per-object
    problem. Transient errors are retried with backoff (see :mod:`.retry`); permanent ones are not.
    ``retries``: failed attempts before the answer, ours and the S3 client's own."""
    retries = 0
    before = storage.failed_attempts

    def read() -> bytes:
        return storage.read_bytes(uri)

    try:
        data, retries = with_retries(read, attempts)
        # Attempts the S3 client retried by itself count too (see Storage.failed_attempts).
        return data, None, retries + (storage.failed_attempts - before)
    except FileNotFoundError:
        return None, "read_failed: object not found (deleted after listing?)", retries
    except PermissionError as e:
        return None, f"read_failed: access denied: {e}", retries
    except Exception as e:  # noqa: BLE001 - one bad object is one error row
        if is_transient(e):
            return None, f"read_failed: {type(e).__name__}: {e} (still failing after {attempts} attempts)", attempts - 1
        return None, f"read_failed: {type(e).__name__}: {e}", 0


class ObjectStream(io.RawIOBase):
    """An object read front to back in one streaming GET (a tar shard, never held whole). When the
    connection breaks, reading goes on from the byte where it broke with a ranged GET (``If-Match``
    the ETag planned, so a changed object is an error, not a mix of two versions), up to
    ``attempts`` times in all; the bytes read are never read twice. Local and other fsspec files
    are plain sequential reads."""

    def __init__(self, uri: str, storage: Storage, etag: str = "", attempts: int = 5):
        super().__init__()
        self.uri, self.storage, self.etag, self.attempts = uri, storage, etag, attempts
        self.fs = storage.fs(uri)
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
            self.body, opened = with_retries(self._open, self.attempts)
            self.retries += opened
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
        for attempt in range(self.attempts):
            try:
                data = self._read(n)
                self.pos += len(data)
                return data
            except Exception as e:  # noqa: BLE001 - a broken stream is resumed where it broke
                self._close_body()
                if attempt == self.attempts - 1 or not is_transient(e):
                    raise
                self.retries += 1
        raise AssertionError("unreachable")

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
