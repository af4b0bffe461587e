"""One writer per output: a run holds a lease on ``output.uri`` while it works.

The lease is a small object, ``<output.uri>/_lease.json``: the run's id, host, pid (with the pid's
start time, the kernel's boot id and the pid namespace), when the run started and its last heartbeat. A run creates it atomically before any
work (a local exclusive create; on S3 a conditional PUT with ``If-None-Match: *``), renews it every
``runtime.lease_heartbeat_s`` (on S3 a PUT with ``If-Match`` on the ETag it last wrote, so a lease
taken over is never overwritten by its old holder), and deletes it at the end, also on errors and
Ctrl-C. A second run on the same output is refused at once with who holds it and since when,
unless the lease is stale: no heartbeat for ``runtime.lease_stale_s`` by the second run's clock, or
a holder whose process is gone, judged only where its pid means the same as here (same host name,
boot id and pid namespace: containers sharing a host name are not confused); or unless
``--break-lease`` is given. A renewal retried by the S3 client after its first attempt landed finds
its own record and keeps the lease. Taking over
is a compare-and-swap on what was read (S3: ``If-Match``; locally under an exclusive ``flock``).

Fencing: before each Parquet file it commits, and before every rewrite or delete of committed
files (repair.py) and every record, the run reads the lease and goes on only while it names its
run (:class:`LeaseFence`), so a run whose lease was taken over stops committing; a heartbeat that
finds the lease taken over stops the writer at once (:meth:`Lease.check_held`).
A commit already past that check when the lease changes hands can still land; the new run removes
such rows where it wrote the same images (see job.py). Limits are in ARCHITECTURE.md.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from .storage import Storage, join_uri, protocol_of, strip_protocol

LEASE_NAME = "_lease.json"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where /proc is absent: with
    the pid it tells a live process from a recycled pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[inode]``, Linux): pids mean the same only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


BOOT_ID = _read_text("/proc/sys/kernel/random/boot_id")  # this boot of this kernel (Linux)


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run: it must not commit anything more."""


@dataclass
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    pid_start: str | None
    started_at: float
    heartbeat_at: float
    tool_version: str = ""
    boot_id: str | None = None  # the kernel boot it ran in, and its pid namespace: a pid is looked up on
    pid_ns: str | None = None  # this machine only when both are this process's own (see stale_reason)

    @classmethod
    def parse(cls, data: bytes) -> "LeaseRecord":
        """A record as read back; fields this version does not know are ignored (a newer writer's)."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise TypeError("a lease record is a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (f"run {self.run_id} on {self.host} (pid {self.pid}), started {_iso(self.started_at)}, "
                f"last heartbeat {max(0, now - self.heartbeat_at):.0f} s ago")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def _token(data: bytes) -> str:
    """What a compare-and-swap compares where the store gives no ETag: the content's hash."""
    import hashlib

    return hashlib.sha256(data).hexdigest()


class _Conflict(Exception):
    """A conditional write found the lease not as expected."""


class _Backend:
    """Atomic create / read / compare-and-swap / delete of one small object."""

    def __init__(self, storage: Storage, uri: str):
        self.storage, self.uri = storage, uri

    # Best effort for stores without conditional writes: write, then read back.
    def create(self, data: bytes) -> str:
        fs = self.storage.fs(self.uri)
        if fs.exists(self.uri):
            raise _Conflict()
        fs.pipe_file(self.uri, data)
        return self.read()[1]

    def read(self) -> tuple[bytes, str] | None:
        fs = self.storage.fs(self.uri)
        try:
            data = fs.cat_file(self.uri)
        except FileNotFoundError:
            return None
        return data, _token(data)

    def replace(self, data: bytes, token: str) -> str:
        got = self.read()
        if got is None or got[1] != token:
            raise _Conflict()
        self.storage.fs(self.uri).pipe_file(self.uri, data)
        return self.read()[1]

    def delete(self, token: str) -> None:
        got = self.read()
        if got is not None and got[1] == token:
            self.storage.fs(self.uri).rm(self.uri)


class _LocalBackend(_Backend):
    """Exclusive create, and read-compare-write under an exclusive flock of a side file: atomic among
    processes of one host (on a shared network filesystem only as far as its locks are)."""

    def __init__(self, storage: Storage, uri: str):
        super().__init__(storage, uri)
        self.path = strip_protocol(uri)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)

    def _locked(self):
        import fcntl

        class _Lock:
            def __enter__(s):
                s.fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
                fcntl.flock(s.fd, fcntl.LOCK_EX)

            def __exit__(s, *exc):
                fcntl.flock(s.fd, fcntl.LOCK_UN)
                os.close(s.fd)

        return _Lock()

    def create(self, data: bytes) -> str:
        with self._locked():
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise _Conflict() from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return _token(data)

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _token(data)

    def replace(self, data: bytes, token: str) -> str:
        with self._locked():
            got = self.read()
            if got is None or got[1] != token:
                raise _Conflict()
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
            return _token(data)

    def delete(self, token: str) -> None:
        with self._locked():
            got = self.read()
            if got is not None and got[1] == token:
                os.unlink(self.path)


class _S3Backend(_Backend):
    """Conditional PUTs: ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to renew or take over
    (AWS S3 since 2024, MinIO, moto). A store that answers 501 to them falls back to the best effort."""

    def __init__(self, storage: Storage, uri: str):
        super().__init__(storage, uri)
        self.fs = storage.fs(uri)
        self.bucket, _, self.key = strip_protocol(uri).partition("/")
        self.conditional = True

    def _put(self, data: bytes, **cond) -> str:
        try:
            r = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **cond)
        except Exception as e:  # noqa: BLE001 - s3fs translates botocore's errors; the cause keeps the code
            cause = e.__cause__ if getattr(e, "__cause__", None) is not None else e
            code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
            if isinstance(e, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict",
                                                          "412", "409"):
                raise _Conflict() from None
            if code in ("NotImplemented", "501"):
                self.conditional = False
                raise NotImplementedError from None
            raise
        return r["ETag"]

    def create(self, data: bytes) -> str:
        if self.conditional:
            try:
                return self._put(data, IfNoneMatch="*")
            except NotImplementedError:
                pass
        return super().create(data)

    def read(self) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync

        async def get():
            try:
                r = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            except FileNotFoundError:
                return None
            async with r["Body"] as stream:
                return await stream.read(), r["ETag"]

        return sync(self.fs.loop, get)  # content and ETag of one and the same version

    def replace(self, data: bytes, token: str) -> str:
        if self.conditional:
            try:
                return self._put(data, IfMatch=token)
            except NotImplementedError:
                pass
        return super().replace(data, token)

    def delete(self, token: str) -> None:
        got = self.read()
        if got is not None and got[1] == token:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)


def _backend(storage: Storage, uri: str) -> _Backend:
    protocol = protocol_of(uri)
    if protocol == "file":
        return _LocalBackend(storage, uri)
    if protocol in ("s3", "s3a"):
        return _S3Backend(storage, uri)
    return _Backend(storage, uri)


def _retried(fn):
    """``fn()`` with the storage retries of reads and puts (transient errors only; see retry.py)."""
    from .retry import with_retries

    return with_retries(fn)[0]


class Lease:
    """This run's lease on an output (see the module's docstring)."""

    def __init__(self, storage: Storage, output_uri: str, run_id: str, stale_s: float = 120.0,
                 heartbeat_s: float = 15.0, tool_version: str = ""):
        self.uri = join_uri(output_uri, LEASE_NAME)
        self.backend = _backend(storage, self.uri)
        self.run_id, self.stale_s, self.heartbeat_s = run_id, stale_s, heartbeat_s
        pid = os.getpid()
        now = time.time()
        self.record = LeaseRecord(run_id, socket.gethostname(), pid, _process_start(pid), now, now, tool_version,
                                  BOOT_ID, _pid_namespace())
        self.token: str | None = None
        self.taken_over: LeaseRecord | None = None  # the stale or broken lease this run replaced
        self.lost: LeaseRecord | None = None  # set when another run took this lease over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _data(self) -> bytes:
        return json.dumps(asdict(self.record), sort_keys=True).encode()

    def acquire(self, break_lease: bool = False) -> None:
        """Takes the lease, or raises :class:`LeaseHeld` naming its holder."""
        for _ in range(5):
            try:
                self.token = _retried(lambda: self.backend.create(self._data()))
                return
            except _Conflict:
                pass
            got = _retried(self.backend.read)
            if got is None:
                continue  # released in between: create again
            data, token = got
            try:
                held = LeaseRecord.parse(data)
            except (ValueError, TypeError):  # unreadable: a broken write; treat as stale
                held = LeaseRecord("unknown", "unknown", 0, None, 0.0, 0.0)
            if held.run_id == self.run_id:  # our own create, answered with an error and retried
                self.token = token
                return
            why = self.stale_reason(held)
            if not why and not break_lease:
                raise LeaseHeld(self._held_by(held))
            try:
                self.token = _retried(lambda: self.backend.replace(self._data(), token))
                self.taken_over = held
                return
            except _Conflict:
                continue  # someone else changed it meanwhile: look again
        raise LeaseHeld(f"output.uri: could not take the lease {self.uri}: it keeps changing hands")

    def _held_by(self, held: LeaseRecord) -> str:
        return (f"output.uri is being written by {held.describe()} (lease {self.uri}). Wait for it to end, or, "
                f"if that run is gone, run again with --break-lease (a lease without a heartbeat for "
                f"runtime.lease_stale_s = {self.stale_s:g} s is taken over by itself)")

    def check_free(self, break_lease: bool = False) -> None:
        """Raises :class:`LeaseHeld` where :meth:`acquire` would refuse (a live run holds the lease),
        reading only: the quick check a run makes before its slow ones (the checkpoint), so that a
        held output is refused at once and a run that fails those checks has written nothing."""
        if break_lease:
            return
        got = _retried(self.backend.read)
        if got is None:
            return
        try:
            held = LeaseRecord.parse(got[0])
        except (ValueError, TypeError):
            return  # unreadable: acquire treats it as stale
        if held.run_id != self.run_id and not self.stale_reason(held):
            raise LeaseHeld(self._held_by(held))

    def stale_reason(self, held: LeaseRecord, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        if now - held.heartbeat_at > self.stale_s:
            return f"no heartbeat for {now - held.heartbeat_at:.0f} s"
        if self.same_pid_space(held) and _process_start(held.pid) != held.pid_start:
            return f"its process {held.pid} on this host is gone"
        return None

    def same_pid_space(self, held: LeaseRecord) -> bool:
        """Whether the holder's pid can be looked up here: the same host name is not enough (containers
        with host networking share it), so the same kernel boot and the same pid namespace too."""
        mine = self.record
        return bool(held.pid and held.host == mine.host and held.boot_id and held.pid_ns
                    and held.boot_id == mine.boot_id and held.pid_ns == mine.pid_ns)

    def renew(self) -> bool:
        """One heartbeat; False (and ``lost`` set) when another run has taken the lease over."""
        with self._lock:
            if self.token is None or self.lost is not None:
                return False
            self.record.heartbeat_at = time.time()
            try:
                self.token = self.backend.replace(self._data(), self.token)
                return True
            except _Conflict:
                got = self.backend.read()
                try:
                    held = LeaseRecord.parse(got[0]) if got else LeaseRecord("none", "", 0, None, 0, 0)
                except (ValueError, TypeError):
                    held = LeaseRecord("unknown", "", 0, None, 0, 0)
                if held.run_id == self.run_id:
                    # Our own write: a conditional PUT that landed, its answer lost, and retried by the
                    # client (the retry found the ETag changed, by us). Still ours: go on from it.
                    self.token = got[1]
                    return True
                self.lost = held
                return False

    def check_held(self) -> None:
        """Raises :class:`LeaseLost` once a heartbeat has found the lease taken over (the writer
        calls it while it waits, so a run stops at once, not at its next commit)."""
        if self.lost is not None:
            raise LeaseLost(f"the lease on this output now names {self.lost.run_id}, not this run ({self.run_id}): "
                            "nothing more is committed")

    def start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    if not self.renew():
                        return
                except Exception:  # noqa: BLE001 - storage unreachable for a moment: try again next beat
                    continue

        self._thread = threading.Thread(target=beat, name="fastsam-batch-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            if self.token is not None and self.lost is None:
                try:
                    self.backend.delete(self.token)
                except Exception:  # noqa: BLE001 - a lease left behind goes stale by itself
                    pass
            self.token = None

    def fence(self) -> "LeaseFence":
        return LeaseFence(self.uri, self.run_id)


class LeaseFence:
    """What a writer checks before each commit: the lease still names this run."""

    def __init__(self, lease_uri: str, run_id: str):
        self.lease_uri, self.run_id = lease_uri, run_id

    def check(self, storage: Storage) -> None:
        got = _retried(_backend(storage, self.lease_uri).read)
        holder = None
        if got is not None:
            try:
                holder = json.loads(got[0]).get("run_id")
            except ValueError:
                holder = None
        if holder != self.run_id:
            raise LeaseLost(f"the lease on this output now names {holder or 'no run'}, not this run "
                            f"({self.run_id}): nothing more is committed")
