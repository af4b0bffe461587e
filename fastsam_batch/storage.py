"""Object storage access through fsspec: local paths, s3:// (s3fs) and anything fsspec knows.

Credentials come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_REGION) or the manifest's
``storage_options``. :class:`Storage` carries them to Ray workers inside the task closure and
never prints them: its repr and :meth:`describe` redact every secret.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec

SECRET_KEYS = frozenset({"key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "password"})
_ENV_FOR_S3 = {
    "key": "AWS_ACCESS_KEY_ID",
    "secret": "AWS_SECRET_ACCESS_KEY",
    "token": "AWS_SESSION_TOKEN",
}


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def redact(options: Any) -> Any:
    """A copy of ``options`` with every secret value replaced by ``***``."""
    if isinstance(options, dict):
        return {k: ("***" if str(k).lower() in SECRET_KEYS or "secret" in str(k).lower() else redact(v)) for k, v in options.items()}
    if isinstance(options, list):
        return [redact(v) for v in options]
    return options


class Storage:
    """Resolved storage options for one protocol family, picklable, never printing secrets."""

    def __init__(self, options: dict[str, Any] | None = None):
        self._options = dict(options or {})
        self._fs_cache: dict[str, fsspec.AbstractFileSystem] = {}
        self.failed_attempts = 0  # S3 attempts that failed transiently in this process

    def __getstate__(self):
        return {"_options": self._options}

    def __setstate__(self, state):
        self._options = state["_options"]
        self._fs_cache = {}
        self.failed_attempts = 0

    def __repr__(self) -> str:
        return f"Storage({redact(self._options)!r})"

    def describe(self) -> dict[str, Any]:
        return redact(self._options)

    def options_for(self, protocol: str) -> dict[str, Any]:
        opts = dict(self._options)
        if protocol in ("s3", "s3a"):
            for k, env in _ENV_FOR_S3.items():
                if k not in opts and os.environ.get(env):
                    opts[k] = os.environ[env]
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            client_kwargs = dict(opts.get("client_kwargs") or {})
            if "endpoint_url" not in opts and "endpoint_url" not in client_kwargs and endpoint:
                opts["endpoint_url"] = endpoint
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region and "region_name" not in client_kwargs:
                client_kwargs["region_name"] = region
            if client_kwargs:
                opts["client_kwargs"] = client_kwargs
            # botocore retries 5xx, throttling and dropped connections itself, with backoff; give it
            # room (its default is 4 retries in the legacy mode). A user's config_kwargs wins.
            opts.setdefault("config_kwargs", {"retries": {"max_attempts": 8, "mode": "standard"}})
            return opts
        # Local and other filesystems get no S3-specific options.
        return {k: v for k, v in opts.items() if k not in ("endpoint_url", "client_kwargs", "config_kwargs", "key", "secret", "token", "anon")}

    def fs(self, uri: str) -> fsspec.AbstractFileSystem:
        protocol = protocol_of(uri)
        if protocol not in self._fs_cache:
            fs = fsspec.filesystem(protocol, **self.options_for(protocol))
            if protocol in ("s3", "s3a"):
                self._count_failed_attempts(fs)
            self._fs_cache[protocol] = fs
        return self._fs_cache[protocol]

    def _count_failed_attempts(self, fs) -> None:
        """Count S3 request attempts that failed transiently (5xx, throttling, dropped connections),
        including those botocore retries by itself, in ``self.failed_attempts``."""

        def on_attempt(response=None, caught_exception=None, **_):
            status = getattr(response[0], "status_code", 0) if response else 0
            if caught_exception is not None or status >= 500 or status == 429:
                self.failed_attempts += 1

        try:
            fs.connect()
            fs.s3.meta.events.register("needs-retry.s3", on_attempt)
        except Exception:  # noqa: BLE001 - counting is best effort; the filesystem works without it
            pass

    def read_bytes(self, uri: str) -> bytes:
        return self.fs(uri).cat_file(uri)


def strip_protocol(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


def join_uri(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def to_uri(protocol: str, path: str) -> str:
    """fsspec returns paths without protocol; put it back for non-local filesystems."""
    if protocol == "file":
        return os.path.abspath(path) if not path.startswith("/") else path
    return f"{protocol}://{path}"
