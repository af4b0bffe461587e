"""Read stage: one planned item -> its bytes, or an error naming why it could not be read."""

from __future__ import annotations

from .storage import Storage


def read_item(uri: str, storage: Storage) -> tuple[bytes | None, str | None]:
    """(data, None) or (None, "read_failed: ..."). Never raises for a per-object problem."""
    try:
        return storage.read_bytes(uri), None
    except FileNotFoundError:
        return None, "read_failed: object not found (deleted after listing?)"
    except PermissionError as e:
        return None, f"read_failed: access denied: {e}"
    except Exception as e:  # noqa: BLE001 - one bad object is one error row
        return None, f"read_failed: {type(e).__name__}: {e}"
