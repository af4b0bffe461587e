"""Checks before a run: every location it touches, the checkpoint, and the device, before Ray
starts work and before anything is deleted or written.

Each failure is a :class:`PreflightError` whose message is one line naming the manifest field,
the URI and the cause in words (credentials rejected, no such bucket, endpoint unreachable, a
detection checkpoint). Storage checks use :meth:`Storage.for_checks` (a 5 s connect timeout and
one retry), so a wrong endpoint is found in seconds, not after the SDK's retry ladder.
"""

from __future__ import annotations

import os
import posixpath
import socket
import uuid

from .manifest import Manifest
from .inputs.files import GLOB_CHARS, glob_base
from .storage import Storage, protocol_of, storage_error_cause, strip_protocol


class PreflightError(RuntimeError):
    """The run cannot start: the message names the field, the location and the cause."""


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = strip_protocol(uri).partition("/")
    return bucket, key


def _listed_base(path: str) -> str:
    """What a listing of ``path`` starts from: a glob's folder before its first wildcard, else the path."""
    return glob_base(path) if GLOB_CHARS & set(path) else path


def _fail(field: str, uri: str, exc: BaseException | str) -> PreflightError:
    cause = exc if isinstance(exc, str) else storage_error_cause(exc)
    return PreflightError(f"{field} {uri!r}: {cause}")


def check_listable(field: str, uri: str, storage: Storage) -> None:
    """The bucket exists and the credentials may list under the prefix (one key asked for)."""
    if protocol_of(uri) == "file":
        path = strip_protocol(uri)
        base = _listed_base(path)
        if not os.path.exists(base or "."):
            raise _fail(field, uri, "no such file or folder")
        if not os.access(base or ".", os.R_OK):
            raise _fail(field, uri, "permission denied")
        return
    if protocol_of(uri) not in ("s3", "s3a"):
        return
    bucket, key = _bucket_key(uri)
    try:
        storage.fs(uri).call_s3("list_objects_v2", Bucket=bucket, Prefix=_listed_base(key), MaxKeys=1)
    except Exception as e:  # noqa: BLE001 - the cause, in words
        raise _fail(field, uri, e) from None


def check_readable(field: str, uri: str, storage: Storage, missing: str = "not found") -> None:
    """The object exists and can be read (a HEAD request; a folder such as a CLIP model: listed).
    ``missing``: what to say when it is not there."""
    if protocol_of(uri) == "file":
        path = strip_protocol(uri)
        if not os.path.exists(path):
            raise _fail(field, uri, missing)
        if not os.access(path, os.R_OK):
            raise _fail(field, uri, "permission denied")
        return
    if protocol_of(uri) not in ("s3", "s3a"):
        return
    fs = storage.fs(uri)
    bucket, key = _bucket_key(uri)
    name = key.rstrip("/")
    try:  # a listing first: unlike a HEAD, its error has a body that says what is wrong
        page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=name, MaxKeys=1)  # the key itself sorts first
        if [o["Key"] for o in page.get("Contents", ())] == [name]:
            fs.call_s3("head_object", Bucket=bucket, Key=name)  # may read it, not only list it
            return
        folder = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=name + "/", MaxKeys=1)  # a folder (CLIP)
    except Exception as e:  # noqa: BLE001
        raise _fail(field, uri, e) from None
    if not folder.get("KeyCount"):
        raise _fail(field, uri, missing)


def check_writable(field: str, uri: str, storage: Storage) -> None:
    """A probe object is put under the output and deleted: the bucket exists and takes writes."""
    name = f"_probe-{uuid.uuid4().hex[:12]}"
    if protocol_of(uri) == "file":
        path = strip_protocol(uri)
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, name)
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as e:
            raise _fail(field, uri, f"cannot write there ({e.strerror or e})") from None
        return
    if protocol_of(uri) not in ("s3", "s3a"):
        return
    fs = storage.fs(uri)
    bucket, key = _bucket_key(uri)
    probe = posixpath.join(key.rstrip("/"), name) if key.strip("/") else name
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=probe, Body=b"")
        fs.call_s3("delete_object", Bucket=bucket, Key=probe)
    except Exception as e:  # noqa: BLE001
        raise _fail(field, uri, e) from None


def _error_code(exc: BaseException) -> tuple[str, str]:
    """The S3 error code and HTTP status behind ``exc`` (s3fs wraps botocore's ClientError in an
    OSError), else ('', '')."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            return (str(response["Error"].get("Code", "")),
                    str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")))
        e = e.__cause__ or e.__context__
    return "", ""


def check_uploads(field: str, uri: str, storage: Storage) -> None:
    """S3: what a run does with multipart uploads besides creating them (s3:PutObject) is allowed.
    Each file is staged as a multipart upload left open until the driver completes it, so a run
    lists the open uploads under the output (s3:ListBucketMultipartUploads: its start aborts those
    a killed run left) and aborts some (s3:AbortMultipartUpload: at its start, and at its end when
    a writer died). The listing is asked for (one upload); the abort is asked of an upload id that
    does not exist, which changes nothing: refused (403) when not allowed, else NoSuchUpload. A
    store that does not implement the listing (501 NotImplemented) is named as such."""
    if protocol_of(uri) not in ("s3", "s3a"):
        return
    fs = storage.fs(uri)
    bucket, key = _bucket_key(uri)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    asks = (("ListMultipartUploads", "s3:ListBucketMultipartUploads on the bucket",
             lambda: fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, MaxUploads=1)),
            ("AbortMultipartUpload", "s3:AbortMultipartUpload on the output's keys",
             lambda: fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=f"{prefix}_probe-{uuid.uuid4().hex[:12]}",
                                UploadId=f"fastsam-batch-preflight-{uuid.uuid4().hex}")))
    for call, permission, ask in asks:
        try:
            ask()
        except Exception as e:  # noqa: BLE001 - the cause, in words
            code, status = _error_code(e)
            if code in ("AccessDenied", "AllAccessDisabled"):
                raise _fail(field, uri, f"access denied to {call} ({status} {code}): the credentials need {permission} "
                            "(a run stages each file as a multipart upload and aborts those left open; README, "
                            "\"S3 permissions\")") from None
            if call == "AbortMultipartUpload":
                continue  # NoSuchUpload: allowed (or a store's own answer to an id it never gave: no refusal)
            if code in ("NotImplemented", "501") or status == "501":
                raise _fail(field, uri, f"the store does not implement {call} ({status} {code}), which a run needs: "
                            "it stages each file as a multipart upload and lists and aborts those left open; use a "
                            "store that implements S3 multipart uploads in full") from None
            raise _fail(field, uri, e) from None


def check_output_placement(address: str | None, output_uri: str) -> None:
    """A local ``output.uri`` cannot be written through a Ray client connection (``ray://``): its
    writer actors run on the driver's node, which for a client is a cluster node (the head), not
    the machine the driver's process runs on, so their files would land on another machine's disk
    and the driver could not make them visible. Checked on the address's form, before any work."""
    if not address or not address.startswith("ray://") or protocol_of(output_uri) != "file":
        return
    raise PreflightError(
        f"output.uri {output_uri!r}: a local output cannot be written through a Ray client connection "
        f"(runtime.ray_address / RAY_ADDRESS {address!r}): the writer actors run on a cluster node, not on this "
        "machine; use an object-store output (s3://...), or run the driver inside the cluster (RAY_ADDRESS=HEAD:6379 "
        "on a node of it, or `ray job submit`)")


def check_locations(m: Manifest, storage: Storage, probe_output: bool = True) -> None:
    """Every storage location of the run, in the order a user would fix them (``probe_output``: with
    the probe put under the output, the one check that writes)."""
    quick = storage.for_checks()
    check_listable("input.uri", m.input.uri, quick)
    check_readable("model.checkpoint", m.model.checkpoint, quick,
                   "file not found (weights are never downloaded from a hub)")
    p = m.prompts
    for field, uri in (("prompts.table", p.table), ("prompts.coco", p.coco), ("prompts.clip", p.clip)):
        if uri:
            check_readable(field, uri, quick)
    if probe_output:
        check_writable("output.uri", m.output.uri, quick)
        check_uploads("output.uri", m.output.uri, quick)


def check_ray_address(address: str | None) -> None:
    """A cluster address the job can join, and reachable (a 5 s TCP connect), before Ray is asked to
    (which retries for minutes). ``None`` or ``auto``: nothing to check."""
    if not address or address == "auto":
        return
    field = "runtime.ray_address / RAY_ADDRESS"
    if address.startswith(("http://", "https://")):
        raise PreflightError(f"{field} {address!r}: that is the dashboard / Jobs API address, which `ray job submit "
                             "--address` takes; to join a cluster give HEAD:6379 (or ray://HEAD:10001 with ray[client])")
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise PreflightError(f"{field} {address!r}: not HOST:PORT (e.g. head:6379, or ray://head:10001)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise PreflightError(f"{field} {address!r}: cannot reach {host}:{port} ({e.strerror or e})") from None
    if "://" not in address and auth_refused(hostport):
        raise PreflightError(
            f"{field} {address!r}: the cluster refused this machine's token (InvalidAuthToken): it uses token "
            f"authentication; export RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, a file named by "
            f"RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token), as on its nodes (cluster/README.md, step 2)")


# Asks the cluster's GCS for its id, as joining it does first, in a process of its own: a token the
# cluster refuses is answered at once; anything else (no answer within the limit) is left to Ray.
_AUTH_PROBE = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1])
except Exception as e:
    sys.exit(3 if "InvalidAuthToken" in str(e) or type(e).__name__ == "AuthenticationError" else 0)
"""


def auth_refused(hostport: str, timeout_s: float = 20.0) -> bool:
    """Whether the GCS at ``hostport`` refuses this process's Ray token (or its lack of one): Ray's own
    join would retry for about half a minute printing a line a second, then fail in general words."""
    import subprocess
    import sys

    try:
        r = subprocess.run([sys.executable, "-c", _AUTH_PROBE, hostport], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 3


def check_device(device: str, cluster_gpus: float, embedded: bool) -> str | None:
    """``model.device`` against the GPUs Ray sees: ``cuda`` without any is refused (a run would wait
    for GPUs forever); ``auto`` without any runs on the CPU, and the returned line says so."""
    where = "this machine (torch sees no CUDA device)" if embedded else "the Ray cluster"
    if device.startswith("cuda") and cluster_gpus <= 0:
        raise PreflightError(f"model.device {device!r}: no GPU in {where}; use 'auto' or 'cpu' to run on the CPU")
    if device == "auto" and cluster_gpus <= 0:
        return f"model.device 'auto': no GPU in {where}, the model runs on the CPU"
    return None
