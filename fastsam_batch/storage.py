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

    def __init__(self, options: dict[str, Any] | None = None, quick: bool = False):
        self._options = dict(options or {})
        self._fs_cache: dict[str, fsspec.AbstractFileSystem] = {}
        self.failed_attempts = 0  # S3 attempts that failed transiently in this process
        self.quick = quick  # short timeouts and one retry: for the checks before a run (preflight.py)

    def __getstate__(self):
        return {"_options": self._options}

    def __setstate__(self, state):
        self._options = state["_options"]
        self._fs_cache = {}
        self.failed_attempts = 0
        self.quick = False

    def for_checks(self) -> "Storage":
        """The same locations and credentials, failing in seconds: an unreachable endpoint is found
        by a 5 s connect timeout and one retry, not the SDK's retry ladder (minutes)."""
        return Storage(self._options, quick=True)

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
            if self.quick:
                opts["config_kwargs"] = {**opts["config_kwargs"], "connect_timeout": 5, "read_timeout": 30,
                                         "retries": {"max_attempts": 2, "mode": "standard"}}
                opts["skip_instance_cache"] = True
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

    def read_fs(self, uri: str) -> fsspec.AbstractFileSystem:
        """The filesystem the readers of input objects use: on S3 one attempt per request (botocore's
        and s3fs's own retries off, unless ``storage_options.config_kwargs`` sets ``retries``), with
        a 10 s connect and a 30 s read timeout (unless config_kwargs sets them), so that a read is
        retried by one layer within one budget (retry.READ_ATTEMPTS, READ_BUDGET_S) and no attempt
        waits on a silent server for longer than those timeouts."""
        protocol = protocol_of(uri)
        if protocol not in ("s3", "s3a") or "retries" in (self._options.get("config_kwargs") or {}):
            return self.fs(uri)
        key = f"{protocol}:read"
        if key not in self._fs_cache:
            opts = self.options_for(protocol)
            opts["config_kwargs"] = {"connect_timeout": 10, "read_timeout": 30, **opts["config_kwargs"],
                                     "retries": {"total_max_attempts": 1, "mode": "standard"}}
            fs = fsspec.filesystem(protocol, **opts)
            fs.retries = 1  # s3fs's own loop around each call
            self._count_failed_attempts(fs)
            self._fs_cache[key] = fs
        return self._fs_cache[key]

    def read_bytes(self, uri: str) -> bytes:
        return self.fs(uri).cat_file(uri)


def storage_error_cause(exc: BaseException) -> str:
    """What went wrong with a storage request, in words, from the exception and those it came from
    (s3fs turns botocore's errors into OSErrors): rejected credentials, no such bucket, an endpoint
    that cannot be reached. Never includes a secret."""
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = response["Error"].get("Code", "")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
            if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidClientTokenId", "ExpiredToken",
                        "InvalidToken", "AuthorizationHeaderMalformed"):
                return f"credentials rejected by the endpoint ({status} {code})"
            if code in ("AccessDenied", "403", "AllAccessDisabled"):
                return f"access denied ({status}{'' if code == str(status) else ' ' + code}): the credentials lack the permission"
            if code == "NoSuchBucket":
                bucket = response["Error"].get("BucketName")
                return f"no such bucket{f' {bucket!r}' if bucket else ''} ({status} NoSuchBucket)"
            return f"{status} {code}: {response['Error'].get('Message', '')}".strip()
        name = type(e).__name__
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ProxyConnectionError"):
            url = getattr(e, "kwargs", {}).get("endpoint_url", "")
            hint = "" if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") else \
                " (AWS_ENDPOINT_URL is not set: is the storage somewhere other than AWS?)"
            return f"cannot reach {url or 'the storage endpoint'}{hint}"
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return ("no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an AWS profile or a "
                    "role; or storage_options.anon: true for public buckets)")
    if isinstance(exc, PermissionError):
        return f"permission denied ({exc.strerror or exc})"
    if isinstance(exc, FileNotFoundError):
        return "not found"
    return f"{type(exc).__name__}: {exc}"


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
