"""Run fingerprints and resuming: what is already committed under ``output.uri``.

Every row carries the fingerprint of the run that wrote it: a hash of everything that decides
its masks (checkpoint SHA-256, model settings, prompt rules, mask rules, decode limits, tool version).
Re-running a job reads only the ``image_id``, ``status`` and ``run_fingerprint`` columns of the
committed Parquet files; images that already have a row are skipped. Rows of another fingerprint mean
another configuration wrote there: that run is refused unless ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from . import __version__
from .manifest import Manifest
from .index import (Committed, Duplicates, FileGroup, FileRows, Lookup, duplicate_rows, id_key, id_keys,  # noqa: F401
                    key_bytes, rows_in_other_files, rows_outside, stale_unit_rows, superseded_parts, unit_key,
                    version_key, version_keys_arrow)
from .schema import error_reason
from .storage import Storage, protocol_of
from .write import PART_PREFIX

_log = logging.getLogger(__name__)


def run_fingerprint(m: Manifest, checkpoint_sha256: str, prompt_sources: dict | None = None) -> tuple[str, dict]:
    """(fingerprint, the material it hashes). The device is left out on purpose: cpu and cuda
    runs of the same settings may finish each other's work (fp16 is in, as ``model.half``).
    ``prompt_sources``: SHA-256 of the prompt table / COCO file and of the CLIP folder."""
    material = {
        "tool_version": __version__,
        "checkpoint_sha256": checkpoint_sha256,
        "model": m.model.model_dump(include={"imgsz", "conf", "iou", "max_det", "half"}),
        "prompts": m.prompts.model_dump(exclude={"table", "coco", "clip"}),
        "prompt_sources": prompt_sources or {},
        "mask_rules": m.mask_rules.model_dump(),
        "decode": {"max_pixels": m.input.max_pixels},
    }
    # Like the device, `auto` decoding is left out (a CPU and a GPU run may finish each other's work);
    # a reduced or device decode asked for explicitly is in. Exact decoding keeps the fingerprints it
    # always had.
    if m.input.decode in ("reduced", "device") and not (prompt_sources or {}).get("clip_sha256"):
        material["decode"][m.input.decode] = True
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]
    return digest, material


def source_version(item: dict) -> str:
    """What identifies the content of a planned object: its ETag (S3) or modification time (local), and size."""
    return f"{item.get('etag', '')}/{item.get('size', 0)}"


def _names_starting(output_uri: str, storage: Storage, prefix: str) -> list[str]:
    """Paths of the files directly under ``output_uri`` whose names start with ``prefix``."""
    fs = storage.fs(output_uri)
    fs.invalidate_cache(output_uri)  # s3fs caches listings: the writers have added files since
    try:
        names = fs.ls(output_uri, detail=False)
    except FileNotFoundError:
        return []
    return sorted(p for p in names if p.rsplit("/", 1)[-1].startswith(prefix))


def list_parts(output_uri: str, storage: Storage) -> list[str]:
    return _names_starting(output_uri, storage, PART_PREFIX)


def listing_stamp(entry: dict) -> str:
    """What tells a listed file's content apart from an earlier one under the same name: its size and
    ETag (S3), or its size, modification time, inode and status-change time (local: a rewrite is a
    rename onto it: a new inode, and on Linux a ctime that ``utime`` cannot set back; fsspec gives
    the birth time instead where the system has one, as macOS does)."""
    tag = entry.get("ETag") or entry.get("etag")
    if tag:
        return f"{entry.get('size')}/{str(tag).strip(chr(34))}"
    return (f"{entry.get('size')}/{entry.get('mtime') or entry.get('LastModified') or ''}/{entry.get('ino') or ''}/"
            f"{entry.get('created') or ''}")


def stamp_tells_content(stamp: str) -> bool:
    """Whether a :func:`listing_stamp` is one a later run may trust across runs (the saved index,
    :mod:`.saved_index`): an ETag (a hash of the content), or a local file's size, modification
    time, inode and ctime all known. A store's entry without an ETag (a time of a second's
    resolution, no inode) is not: such files are read again at each start."""
    fields = stamp.split("/")
    return all(fields) and len(fields) in (2, 4)


def list_parts_stamped(output_uri: str, storage: Storage) -> dict[str, str]:
    """The committed files as :func:`local_paths` names them -> their :func:`listing_stamp` (one listing)."""
    fs = storage.fs(output_uri)
    fs.invalidate_cache(output_uri)  # s3fs caches listings: the writers have added files since
    try:
        entries = fs.ls(output_uri, detail=True)
    except FileNotFoundError:
        return {}
    found = {e["name"]: listing_stamp(e) for e in entries if e["name"].rsplit("/", 1)[-1].startswith(PART_PREFIX)}
    names = sorted(found)
    return dict(zip(local_paths(output_uri, names), (found[n] for n in names)))


def local_paths(output_uri: str, paths: list[str]) -> list[str]:
    """Paths as the filesystem of ``output_uri`` takes them (local: without ``file://``)."""
    return paths if protocol_of(output_uri) != "file" else [p.split("://", 1)[-1] for p in paths]


READ_THREADS = 16  # committed files read at once from object storage (its latency)
# ... from a local path, where a read waits for no network: more threads only contend for the GIL
# (1M rows in 1,000-row files on this 2-core machine's disk: 1 thread 6.2 s of CPU, 6.2 s wall; 2:
# 6.9 s, 5.5 s; 16: 11.2 s, 8.8 s). A local path on a network mount (NFS, EFS, FSx) waits like
# object storage: $FASTSAM_BATCH_READ_THREADS sets the count for it.
LOCAL_READ_THREADS = 2
READ_THREADS_ENV = "FASTSAM_BATCH_READ_THREADS"
LIMIT_READ_THREADS = 64


def read_threads_asked() -> int | None:
    """``$FASTSAM_BATCH_READ_THREADS`` checked (an integer, 1 to :data:`LIMIT_READ_THREADS`), or
    None when not set. Raises ValueError, one line, otherwise (preflight calls it before any work)."""
    from .sizing import count_from_env

    return count_from_env(READ_THREADS_ENV, LIMIT_READ_THREADS,
                          "committed files read at once by each process; default 16 from object storage, 2 from "
                          "a local path, 1 from a local path in a process of planning's pool")


def read_threads(output_uri: str, pool_process: bool = False) -> int:
    """Threads reading committed files at once: ``$FASTSAM_BATCH_READ_THREADS`` if set (each
    process), else :data:`READ_THREADS` from object storage and :data:`LOCAL_READ_THREADS` from a
    local path (one in a process of planning's pool, which has a core of its own to keep busy)."""
    asked = read_threads_asked()
    if asked is not None:
        return asked
    if protocol_of(output_uri) != "file":
        return READ_THREADS
    return 1 if pool_process else LOCAL_READ_THREADS


def _hashed(column, fn, dtype) -> np.ndarray:
    """``fn`` of each row's value, computed once per distinct value (a dictionary encoding)."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    d = arr.dictionary_encode()
    values = np.array([fn(v) for v in d.dictionary.to_pylist()] + [fn(None)], dtype)
    indices = d.indices.fill_null(len(d.dictionary)) if d.indices.null_count else d.indices
    return values[indices.to_numpy(zero_copy_only=False)]


def read_file_rows(path: str, fs, stamp: str | None = None) -> FileRows:
    """The hashed columns of one committed file: only ``image_id``, ``run_fingerprint``, ``status``,
    ``error``, ``source_version`` and ``shard`` are read; the ids are hashed a row at a time
    (BLAKE2b), the versions and containers a column at a time (:func:`.index.version_keys_arrow`),
    the errors' reasons once per distinct value. ``stamp``: its listing entry
    (:func:`listing_stamp`); without it, asked for before the read (a change in between is then
    seen as a change by the next refresh)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        if stamp is None:
            fs.invalidate_cache(path)
            stamp = listing_stamp(fs.info(path))
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            cols = ["image_id", "run_fingerprint", "status", "error"] + [x for x in ("source_version", "shard")
                                                                          if x in names]
            t = pf.read(columns=cols, use_threads=False)  # files are read in parallel: no threads inside one
    except Exception as e:  # noqa: BLE001 - named with the file, the cause kept (storage_error_cause reads it)
        raise CommittedFileError(f"committed file {path} could not be read: {type(e).__name__}: {e}") from e
    n = t.num_rows
    hi, lo = id_keys(t.column("image_id").to_pylist())
    # version and container keys hashed from the columns' buffers (unit_key(s) is version_key(s or ""))
    versions = version_keys_arrow(t.column("source_version")) if "source_version" in cols else np.zeros(n, np.uint64)
    units = version_keys_arrow(t.column("shard")) if "shard" in cols else np.zeros(n, np.uint64)
    ok = np.asarray(pc.equal(t.column("status"), "ok").combine_chunks().fill_null(False)
                    .to_numpy(zero_copy_only=False), bool)
    reasons: list[str] = []

    def code(error):
        reason = error_reason(error) or "error"
        if reason not in reasons:
            reasons.append(reason)
        return reasons.index(reason)

    reason_of = np.where(ok, -1, _hashed(t.column("error"), code, np.int16)).astype(np.int16)
    counts = pc.value_counts(t.column("run_fingerprint").combine_chunks()).to_pylist()
    return FileRows(path, hi, lo, versions, ok, reason_of, reasons, units,
                    {v["values"]: v["counts"] for v in counts}, stamp)


def iter_files(output_uri: str, storage: Storage, paths: list[str], threads: int | None = None,
               stamps: dict[str, str] | None = None) -> Iterator[FileRows]:
    """:func:`read_file_rows` of each of ``paths`` (as :func:`local_paths` gives them), read in
    parallel (``threads`` at once, default :func:`read_threads`) and given in their order, one at a
    time (a :class:`.index.Committed` built from them never holds them all); ``stamps``: their listing entries where the listing gave them. At most
    ``4 x threads`` reads are queued, under way or read and waiting to be given at a time (the
    window is checked before each submit, so one slow read holds back at most that many), and on an error (or Ctrl-C,
    or the generator closed) those queued are cancelled: only the reads under way are waited for."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    if not paths:
        return
    fs = storage.fs(output_uri)
    stamps = stamps or {}
    threads = read_threads(output_uri) if threads is None else threads
    if len(paths) == 1 or threads <= 1:
        for p in paths:
            yield read_file_rows(p, fs, stamps.get(p))
        return
    pool = ThreadPoolExecutor(min(threads, len(paths)), thread_name_prefix="read-committed")
    pending: dict = {}  # future -> its index
    done: dict[int, FileRows] = {}  # read, waiting for the files before them
    try:
        todo = iter(enumerate(paths))
        window = 4 * threads
        given = 0
        while given < len(paths):
            # the window checked before each submit: reads started (queued, under way, or read and
            # waiting) never exceed it. The file to give next is always among them: every read before
            # ``given + window`` is started, and fewer than ``window`` are held after ``given``.
            while len(pending) + len(done) < window:
                nxt = next(todo, None)
                if nxt is None:
                    break
                pending[pool.submit(read_file_rows, nxt[1], fs, stamps.get(nxt[1]))] = nxt[0]
            if given not in done:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    done[pending.pop(f)] = f.result()
            while given in done:
                yield done.pop(given)
                given += 1
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


class CommittedFileError(OSError):
    """A committed file that could not be read (corrupt, unreadable, gone since it was listed)."""


def read_committed(output_uri: str, storage: Storage) -> Committed:
    """Image ids, statuses, fingerprints and source versions of the committed rows (a few columns
    read, files in parallel, kept as hashes: see :class:`.index.Committed`; the files the index saved
    under ``_index/`` covers, unchanged since, taken from it: :mod:`.saved_index`). A run reads this once,
    at its start; later steps keep it current with :func:`refresh_committed` and
    :func:`apply_rewrites`, which read only the files added since."""
    from .saved_index import load_index

    listed = list_parts_stamped(output_uri, storage)
    saved = load_index(output_uri, storage, listed)
    if saved is None:
        return Committed.from_files(iter_files_spread(output_uri, storage, list(listed), stamps=listed))
    base, drop, read, deltas = saved  # the saves' rows of files listed as they saw them kept; the rest read
    try:
        return base.replaced(drop, _chained(deltas, iter_files_spread(output_uri, storage, read, stamps=listed)))
    except CommittedFileError:
        raise
    except OSError as e:  # the save's records gone during the pass (a local save is read in place, and
        # a run's end deletes the save before it, e.g. under a `plan` or an export): the files read instead
        _log.warning("the committed index saved under %s could not be read to its end (%s: %s): every committed "
                     "file is read", output_uri, type(e).__name__, e)
    finally:
        base.close()
    listed = list_parts_stamped(output_uri, storage)
    return Committed.from_files(iter_files_spread(output_uri, storage, list(listed), stamps=listed))


def _chained(groups: Iterable, files: Iterator) -> Iterator:
    """``groups`` then ``files`` (a generator of files being read: closed with this one, so that its
    queued reads are cancelled when :meth:`.index.Committed.replaced` stops early)."""
    try:
        yield from groups
        yield from files
    finally:
        files.close()


SPREAD_FILES = 64  # committed files read by a task of planning's process pool, at most (threads inside it)
SPREAD_ROWS = 1 << 16  # rows a task reads, about: its files chosen by the rows per file read so far


def iter_files_spread(output_uri: str, storage: Storage, paths: list[str], stamps: dict[str, str] | None = None,
                      processes: int | None = None, group: int = SPREAD_FILES, after_rows: int | None = None,
                      group_rows: int = SPREAD_ROWS) -> Iterator:
    """:func:`iter_files` for :meth:`.index.Committed.replaced`, the files read (their ids hashed,
    their rows made into sorted records: :class:`.index.FileGroup`) by a :class:`.parallel.PlanPool`
    of ``processes`` (default :func:`.parallel.plan_processes`), in their order: the per-row work
    of reading the committed rows spread over the machine's cores. A task reads up to ``group``
    files, fewer where the files read so far hold more than ``group_rows / group`` rows each (a
    task's rows, and the pool's window of rows in flight, bounded by rows, estimated). The first
    files, up to ``after_rows`` rows (default :data:`.parallel.POOL_AFTER_ROWS`), are read here,
    so an output of few rows starts no process. A group whose read fails in a process is read
    again here, which raises its error as :func:`iter_files` does (an exception's cause does not
    cross processes)."""
    from .parallel import PlanPool, plan_processes, read_files

    stamps = stamps or {}
    pool = PlanPool(processes if processes is not None else plan_processes(), after_rows)
    if not pool.active:
        yield from iter_files(output_uri, storage, paths, stamps=stamps)
        return
    read = [0, 0]  # files, rows read so far (in the order given back)

    def per_file() -> float:
        return read[1] / read[0] if read[0] else group_rows / group

    def groups() -> Iterator[list[str]]:
        at = 0
        while at < len(paths):
            n = max(1, min(group, int(group_rows // max(per_file(), 1.0))))
            yield paths[at:at + n]
            at += n

    finished = False
    try:
        with contextlib.closing(pool.ordered(
                groups(), lambda g: (read_files, (output_uri, storage, g, {p: stamps[p] for p in g if p in stamps})),
                size=lambda g: max(1, round(len(g) * per_file())))) as ordered:
            for g, files in ordered:
                if files is None:
                    _log.warning("planning: reading %d committed files (from %s) as a group failed; reading "
                                 "them again one by one, to report the error", len(g), g[0])
                    files = FileGroup.of(list(iter_files(output_uri, storage, g, stamps=stamps)))
                read[0] += len(g)
                read[1] += len(files.records)
                yield files
        finished = True
    finally:
        pool.close(abort=not finished)


def refresh_committed(committed: Committed, output_uri: str, storage: Storage,
                      reread: Iterable[str] = (), deltas: Sequence[str] = ()) -> Committed:
    """``committed`` brought up to date with the output as listed now: the files it does not know
    (this run's commits; another run's last commit that landed after a takeover) read, those gone
    dropped, and those it knows read again where their listing entry (size, ETag or mtime) changed:
    a file's name is a hash of the ids it holds, so a commit of exactly an earlier file's ids (a
    ``--retry-errors`` run; a previous lease holder's commit in flight at a takeover) rewrites it
    under its own name. ``reread``: names of files read again whatever their entry (the files
    this run wrote: a storage whose entry did not change, e.g. an mtime of coarse resolution).
    ``deltas``: the run's own index deltas (:mod:`.saved_index`, header paths): a file to read that
    one of them holds as it is listed now is taken from it instead. One listing, and reads of those
    files only."""
    now = list_parts_stamped(output_uri, storage)
    again = set(reread)
    known = set(committed.parts)
    read = [p for p, stamp in now.items()
            if p not in known or committed.stamps.get(p) != stamp or p.rsplit("/", 1)[-1] in again]
    gone = [p for p in committed.parts if p not in now]
    if not read and not gone:
        return committed
    from .saved_index import DeltaGroups

    saved = DeltaGroups(output_uri, storage, list(deltas), {p: now[p] for p in read})  # (none: no I/O, empty)
    files = iter_files(output_uri, storage, [p for p in read if p not in saved.covered], stamps=now)
    return committed.replaced(gone, _chained(saved, files))


def apply_rewrites(committed: Committed, output_uri: str, storage: Storage,
                   rewrites: dict[str, str | None]) -> Committed:
    """``committed`` after :func:`.repair.drop_rows` rewrote files (``rewrites``: old file -> the file
    of its kept rows, or None where none were kept): the old files' rows dropped, the new files read."""
    if not rewrites:
        return committed
    new = sorted({p for p in rewrites.values() if p})
    return committed.replaced(set(rewrites), iter_files(output_uri, storage, new))


UNITS_DIR = "_units"  # records of completed containers: _units/<hash>.json


def write_units_record(output_uri: str, storage: Storage, fingerprint: str, units: list[tuple[str, str, int]],
                       fence) -> str:
    """Records containers (shard URI, version, rows given) whose every row is committed: a resumed
    run skips them without reading them again. Written after the commit that completed them, only
    while ``fence`` (lease.LeaseFence) passes; its name is a hash of its content. Returns its URI."""
    import json as _json

    from .storage import join_uri
    from .write import put_atomic

    body = _json.dumps({"run_fingerprint": fingerprint,
                        "units": [{"uri": u, "source_version": v, "rows": n} for u, v, n in sorted(units)]})
    name = hashlib.sha256(body.encode()).hexdigest()[:20]
    uri = join_uri(output_uri, UNITS_DIR, f"{name}.json")
    fence.check(storage)
    put_atomic(storage, uri, body.encode())
    return uri


def read_units_records(output_uri: str, storage: Storage) -> tuple[dict[str, dict[tuple[str, str], int]], list[str]]:
    """(shard URI -> {(version, fingerprint): rows} of its complete versions, the record files)."""
    from .storage import join_uri

    folder = join_uri(output_uri, UNITS_DIR)
    fs = storage.fs(folder)
    fs.invalidate_cache(folder)
    try:
        files = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return {}, []
    complete: dict[str, dict[tuple[str, str], int]] = {}
    for f in files:
        with fs.open(f, "rb") as fh:
            record = json.loads(fh.read())
        for u in record["units"]:
            complete.setdefault(u["uri"], {})[(u["source_version"], record["run_fingerprint"])] = u["rows"]
    return complete, files
