"""Read stage: one planned item -> its bytes, or an error naming why it could not be read."""

from __future__ import annotations

from .retry import is_transient, with_retries
from .storage import Storage


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
