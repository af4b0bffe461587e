"""Planning's per-row work spread over local processes (issue 23: a billion images).

What costs per row when a run is planned, once the planning loop works on Arrow batches
(:class:`.inputs.UnitBatch`), is hashing: each listed id (BLAKE2b, 128 bits) and each committed
row's id, one Python call each; and reading the committed files. Both are independent per batch
or per file, so a :class:`PlanPool` (a ``spawn`` process pool on the driver's machine: a fresh
interpreter, never a fork of a driver with Ray's threads) does them, while the driver keeps what
needs one order: the plan, the counts. Lookups in the committed index go to the pool too when the
index is a file (past its memory bound: the processes map the same file, read-only); an index in
memory is looked up on the driver. A list's repeat check, which needs every id seen before, is
split by key range instead (:class:`SplitRepeatCheck`: a process per range, each with the state
of its range; an id's repeats are all in its range).

Results come back in the order the work was given. The rows of the tasks in flight (given, under
way, or done and waiting to be taken) are bounded, all :meth:`PlanPool.ordered` of a pool together
(a list's hashing and the plan's lookups share one pool): ``window_rows``
(:data:`WINDOW_ROWS` a process), plus one task per ordered() (so that nested ones cannot stall);
a list's split repeat check holds up to ``lists.SPLIT_WINDOW + 1`` batches more, and a local
folder's walk (:func:`.inputs.files.file_batches`, by :meth:`PlanPool.submit`) tasks of its own,
apart from the window: those of its first ``files.WALK_AHEAD`` x processes pieces, and those
already started when the walk pushed them back. Committed files
are read in groups of about ``resume.SPREAD_ROWS`` rows (estimated from the files read so far).
A pool of one process, or :data:`PROCESSES_ENV` set to 1, means no pool: the same functions run on
the driver; so does a plan of under :data:`POOL_AFTER_ROWS` rows (the spawns would cost more than
they save), and the default starts none on a machine (or container quota) of under
:data:`MIN_CORES` cores.

On an error or Ctrl-C the processes are terminated at once, all together (:meth:`PlanPool.close`,
:meth:`SplitRepeatCheck.close` with ``abort``); they start with SIGINT blocked (the driver blocks
it while they start: :func:`_sigint_held`, a Ctrl-C then held, not lost) and then ignore it, so a
Ctrl-C prints no traceback of theirs.

The worker processes import :mod:`.index` (numpy), pyarrow and what the worker functions need:
:func:`read_files` reads committed files with :func:`.resume.iter_files` (fsspec, threads for
storage latency inside each process), and a list's ``lists.hash_and_carry`` imports the inputs
package (fsspec, PIL by way of .decode, the schema).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from .sizing import CGROUP_CPU_MAX, count_from_env, usable_cpus

PROCESSES_ENV = "FASTSAM_BATCH_PLAN_PROCESSES"
MAX_PROCESSES = 8  # the default's cap (issue 23's driver has 8 cores)
MIN_CORES = 4  # the default starts no pool below this many usable cores (2 processes on 2 cores
# were slower in wall than 1: benchmarks/RESULTS.md, 2026-12-01)
LIMIT_PROCESSES = 64  # the most $FASTSAM_BATCH_PLAN_PROCESSES may ask for


def processes_asked() -> int | None:
    """``$FASTSAM_BATCH_PLAN_PROCESSES`` checked (an integer, 1 to :data:`LIMIT_PROCESSES`), or None
    when not set. Raises ValueError, one line, otherwise: called by preflight, before any work."""
    return count_from_env(PROCESSES_ENV, LIMIT_PROCESSES,
                          "processes that planning spreads hashing and lookups over; 1: none")


def plan_processes(cpu_max: str = CGROUP_CPU_MAX) -> int:
    """Processes for planning: ``$FASTSAM_BATCH_PLAN_PROCESSES``, else the usable cores
    (:func:`fastsam_batch.sizing.usable_cpus`: affinity and cgroup quota), at most :data:`MAX_PROCESSES`, and 1 (no
    pool: everything on the driver) below :data:`MIN_CORES` of them."""
    n = processes_asked()
    if n is not None:
        return n
    cores = usable_cpus(cpu_max)
    return 1 if cores < MIN_CORES else min(MAX_PROCESSES, cores)


POOL_AFTER_ROWS = 1 << 18  # rows (estimated: :meth:`PlanPool.ordered`'s ``size``) done on the driver
# before the pool starts: a plan of fewer starts no process (its spawns cost a few CPU-seconds,
# about what the pool saves on this many rows); rows of each ordered() counted apart
WINDOW_ROWS = 1 << 17  # rows in flight in the pool per process, all ordered() windows together


class PlanPool:
    """A process pool started on first use (``spawn``), closed by :meth:`close` (its processes
    ended; tasks not started cancelled). ``after_rows``: the first items of each :meth:`ordered`,
    up to that many rows, are done on the driver (a small plan starts no process).
    ``window_rows``: the rows of the tasks given and not yet taken back, all :meth:`ordered` of
    this pool together (default :data:`WINDOW_ROWS` a process); each ordered() may still give one
    task past it (two nested ones, a list's hashing under the plan's lookups, cannot stall)."""

    def __init__(self, processes: int, after_rows: int | None = None, window_rows: int | None = None):
        self.processes = processes
        self.after_rows = POOL_AFTER_ROWS if after_rows is None else after_rows
        self.window_rows = WINDOW_ROWS * processes if window_rows is None else window_rows
        self.in_flight = 0  # rows of the tasks given to the processes and not yet taken back
        self._pool = None

    @property
    def active(self) -> bool:
        return self.processes > 1

    def _executor(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_start)
        return self._pool

    def ordered(self, items: Iterable, task: Callable, size: Callable | None = None) -> Iterator[tuple]:
        """(item, ``fn(*args)``) for each item, in the items' order, where ``task(item)`` gives
        ``(fn, args)`` (``fn`` a module-level function: it is pickled by name). ``size(item)``:
        its rows (or an estimate; default 1), for the driver's first rows (``after_rows``) and the
        pool's window (``window_rows``). Items are taken from ``items`` as room in the window frees
        up; on an error, or the generator closed, the tasks not started are cancelled.
        ``task(item)`` may give None: no work, the result None."""
        import itertools
        from collections import deque

        size = size or (lambda item: 1)
        source = iter(items)
        inline = 0
        for item in source:
            if self.active and inline >= self.after_rows:
                source = itertools.chain([item], source)
                break
            inline += size(item)
            t = task(item)
            yield item, (t[0](*t[1]) if t is not None else None)
        else:
            return

        pending: deque = deque()  # (item, future or None, rows)
        try:
            while True:
                while not pending or self.in_flight < self.window_rows:
                    item = next(source, _END)
                    if item is _END:
                        break
                    t = task(item)
                    if t is None and not pending:  # no work, none before it: given at once
                        yield item, None
                        continue
                    rows = size(item)
                    if t is None:  # no work: held, in order, behind the tasks before it
                        self.in_flight += rows
                        pending.append((item, None, rows))
                        continue
                    future = self.submit(t[0], *t[1])
                    self.in_flight += rows
                    pending.append((item, future, rows))
                if not pending:
                    return
                item, future, rows = pending.popleft()
                try:
                    result = future.result() if future is not None else None
                finally:
                    self.in_flight -= rows
                yield item, result
        finally:
            for _, f, rows in pending:
                self.in_flight -= rows
                if f is not None:
                    f.cancel()

    def submit(self, fn: Callable, *args):
        """``fn(*args)`` in a process of the pool (started on first use; ``fn`` a module-level
        function): a Future. Outside :meth:`ordered`'s window: the caller bounds what it submits."""
        pool = self._executor()
        if self._spawned():
            return pool.submit(fn, *args)
        # a process started by this submit does not run the driver's script, and starts with
        # Ctrl-C held off (no traceback of its own while it imports)
        with _main_hidden(), _sigint_held():
            return pool.submit(fn, *args)

    def _spawned(self) -> bool:
        """Whether every process of the pool has started (a submit may start one until then)."""
        started = getattr(self._pool, "_processes", None)
        return started is not None and len(started) >= self.processes

    def close(self, abort: bool = False) -> None:
        """The pool's processes ended: waited for (``abort`` False), or, on an error or Ctrl-C,
        terminated at once (all together), their tasks' results not wanted."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        if not abort:
            pool.shutdown(wait=True, cancel_futures=True)
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())
        _no_broken_pipe_signal()
        pool.shutdown(wait=False, cancel_futures=True)
        _end_processes(procs)


_END = object()


def _no_broken_pipe_signal() -> None:
    """SIGPIPE ignored (Python's default; the CLI sets it back to the system's for `| head`):
    the executor's threads still write to the pipes of processes terminated here (its shutdown
    sentinels), and a broken pipe must be an error they handle, not a signal that kills the driver
    before it says why it stopped."""
    import signal
    import threading

    if hasattr(signal, "SIGPIPE") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def _end_processes(procs, grace_s: float = 5.0) -> None:
    """Processes terminated together (SIGTERM to each, then one shared wait of ``grace_s``; those
    still running killed). Waited for by their sentinels (closed when a process ends), not by
    join: a pool's own thread may reap them meanwhile, and a join that loses that race would
    think them alive."""
    import time
    from multiprocessing.connection import wait

    def running() -> list:
        out = []
        for p in procs:
            with contextlib.suppress(Exception):
                if p.pid is not None and not wait([p.sentinel], 0):
                    out.append(p)
        return out

    for p in running():
        with contextlib.suppress(Exception):
            p.terminate()
    deadline = time.monotonic() + grace_s
    left = running()
    while left and time.monotonic() < deadline:
        wait([p.sentinel for p in left], max(0.0, deadline - time.monotonic()))
        left = running()
    for p in left:
        with contextlib.suppress(Exception):
            p.kill()
    if left:
        wait([p.sentinel for p in left], 5)
    for p in procs:  # reaped (a zombie no longer), where a pool's thread has not already
        with contextlib.suppress(Exception):
            p.join(0)


@contextlib.contextmanager
def _sigint_held():
    """Ctrl-C held off while processes start: SIGINT blocked in this thread (a process started now
    inherits the mask through fork and exec: it starts with SIGINT blocked, never unblocks it, and
    sets it ignored first thing, :func:`_worker_start`; so no KeyboardInterrupt traceback of its
    own while it imports), and the handler swapped for one that notes it (another thread may take
    it meanwhile). Afterwards the handler is restored and a Ctrl-C that came meanwhile is given to
    it: held, not lost. Only in the main thread (elsewhere signals cannot be set; nothing done)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    came: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # one held is taken now ...
        signal.signal(signal.SIGINT, old)  # ... by the note (signal() runs pending handlers first)
        if came:
            if callable(old):
                old(signal.SIGINT, None)  # Python's own: KeyboardInterrupt
            elif old == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


def _worker_start() -> None:
    """A pool process ignores Ctrl-C (SIGINT reaches the whole process group): the driver stops the
    plan and closes the pool, and no process prints a traceback of its own."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _main_hidden():
    """While a ``spawn`` process starts: the driver's ``__main__`` not named in what it is sent, so
    that it does not run the driver's script again (multiprocessing does, to find functions
    defined there; ours are all in this module) - a script that plans without an ``if __name__ ==
    "__main__"`` guard would plan again in every process."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


# ---------------------------------------------------------------------------------------------
# Worker functions (run in the pool's processes, or on the driver without one)


def hash_ids(ids) -> tuple[np.ndarray, np.ndarray]:
    """:func:`.index.id_keys` of an Arrow string array (or a list)."""
    from .index import id_keys

    return id_keys(ids if isinstance(ids, list) else ids.to_pylist())


_MAPPED: dict[tuple[str, int], object] = {}  # a process's mapped committed index, by (file, rows)


def mapped_index(path: str, rows: int):
    """A read-only :class:`.index.Committed` over the records file of a committed index on disk
    (lookups only: no file names, no scratch folder of its own). One kept per process."""
    from .index import ROW, Committed

    key = (path, rows)
    c = _MAPPED.get(key)
    if c is None:
        _MAPPED.clear()  # the index of an earlier plan, if any: unmapped
        c = _MAPPED[key] = Committed(rows=rows, records=np.memmap(path, ROW, "r", shape=(rows,)))
    return c


def look_up(ids, hi, lo, etags, sizes, index: tuple[str, int] | None):
    """Hashes ``ids`` when ``hi``/``lo`` are None, and looks the keys up in the mapped index
    (``index``: its records file and rows; None: no lookup) with the :func:`.index.version_key`
    of each source version (``etag/size``, Arrow columns): (hi, lo, :class:`.index.Lookups` or None)."""
    if hi is None:
        hi, lo = hash_ids(ids)
    if index is None:
        return hi, lo, None
    from .index import version_keys_arrow

    return hi, lo, mapped_index(*index).lookup_keys(hi, lo, version_keys_arrow(source_versions(etags, sizes)))


def source_versions(etags, sizes):
    """:func:`.resume.source_version` of each unit, ``etag/size``, as an Arrow string column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(etags, pc.cast(sizes, pa.string()), "/")


def read_files(output_uri: str, storage, paths: list[str], stamps: dict[str, str]):
    """Committed files read with :func:`.resume.iter_files`, as one :class:`.index.FileGroup`
    (their records made and sorted here, not on the driver); None on any error (the driver reads
    those files again itself, to raise the error as it always has: an exception's cause does not
    cross processes)."""
    from .index import FileGroup
    from .resume import iter_files, read_threads

    try:
        return FileGroup.of(list(iter_files(output_uri, storage, paths, read_threads(output_uri, pool_process=True),
                                            stamps=stamps)))
    except Exception:  # noqa: BLE001 - read again on the driver, which raises it
        return None


# ---------------------------------------------------------------------------------------------
# The listing's repeat check split by key range over processes of its own


class SplitRepeatCheck:
    """:class:`.index.KeyRuns` (the listing's repeat check) split by key range over ``parts``
    processes, each holding the keys of its range (the top bits of ``hi``, uniform: the keys are
    hashes) in a KeyRuns of its own (``memory_keys / parts`` in memory, spilling to its own scratch
    folder). A key's repeats all fall in its range, so each process answers for its keys exactly as
    one KeyRuns would; batches are answered in the order given, up to ``window`` in flight
    (:meth:`submit`, then :meth:`result` of the oldest). ``seed``: keys already seen (a check that
    began on the driver), given to the processes first."""

    def __init__(self, parts: int, memory_keys: int, seed: tuple[np.ndarray, np.ndarray] | None = None):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs, self.pending = [], [], []
        try:
            for _ in range(parts):
                here, there = ctx.Pipe()
                proc = ctx.Process(target=_repeat_worker, args=(there, max(1, memory_keys // parts)), daemon=True)
                self.conns.append(here)
                self.procs.append(proc)  # known before it starts: a Ctrl-C held in start() ends it too
                try:
                    with _main_hidden(), _sigint_held():
                        proc.start()
                finally:
                    there.close()
            if seed is not None and len(seed[0]):
                self.submit(*seed)
                self.result()
        except BaseException:
            self.close(abort=True)
            raise

    def _split(self, hi: np.ndarray) -> list[np.ndarray]:
        n = len(self.conns)
        which = ((hi >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32)  # the top 32 bits scaled to [0, n)
        order = np.argsort(which, kind="stable")  # each range's keys in their order in the batch
        bounds = np.searchsorted(which[order], np.arange(n + 1, dtype=np.uint64))
        return [order[bounds[p]:bounds[p + 1]] for p in range(n)]

    def submit(self, hi: np.ndarray, lo: np.ndarray) -> None:
        hi, lo = np.asarray(hi, np.uint64), np.asarray(lo, np.uint64)
        slices = self._split(hi)
        for conn, at in zip(self.conns, slices):
            conn.send((hi[at], lo[at]))
        self.pending.append((len(hi), slices))

    def result(self) -> np.ndarray:
        """The mask of new keys of the oldest batch submitted (as :meth:`.index.KeyRuns.add`)."""
        n, slices = self.pending.pop(0)
        new = np.zeros(n, bool)
        for conn, at in zip(self.conns, slices):
            try:
                answer = conn.recv()
            except EOFError:
                raise RuntimeError("the listing's repeat check: a process of it ended unexpectedly") from None
            if isinstance(answer, str):  # its error, as text (an exception may not pickle)
                raise RuntimeError(f"the listing's repeat check: {answer}")
            new[at] = answer
        return new

    def close(self, abort: bool = False, wait_s: float = 30.0) -> None:
        """The processes ended. ``abort`` False (the check done): each told to end (the sends in a
        thread, waited for ``wait_s`` at most: a process that does not read cannot block this),
        and waited for, ``wait_s`` in all; those still running then are terminated. ``abort`` (an
        error, Ctrl-C, the listing closed early): all terminated at once. The scratch folders of
        processes terminated (their spilled runs, which they could not remove) are removed here."""
        import threading
        import time

        procs, conns = self.procs, self.conns
        self.conns, self.procs, self.pending = [], [], []
        if not abort:
            def stop() -> None:
                for conn in conns:
                    with contextlib.suppress(OSError, ValueError):
                        conn.send(None)
            sender = threading.Thread(target=stop, name="fastsam-split-close", daemon=True)
            sender.start()
            deadline = time.monotonic() + wait_s
            sender.join(wait_s)
            for proc in procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        ended = [p for p in procs if p.is_alive()]
        _end_processes(ended)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()
        for proc in ended:
            _remove_scratch_of(proc.pid)


def _remove_scratch_of(pid: int | None) -> None:
    """The key-run scratch folders of a process (``fastsam-keys-<pid>-*`` under
    :func:`.index.scratch_dir`, as its KeyRuns named them), removed: it was terminated."""
    import glob
    import shutil

    from .index import SCRATCH_PREFIX, scratch_dir

    if pid is None:
        return
    for path in glob.glob(os.path.join(glob.escape(scratch_dir()), f"{SCRATCH_PREFIX}{pid}-*")):
        shutil.rmtree(path, ignore_errors=True)


def _repeat_worker(conn, memory_keys: int) -> None:
    """A process of :class:`SplitRepeatCheck`: a KeyRuns of its range, a batch at a time, in order."""
    from .index import KeyRuns

    _worker_start()  # Ctrl-C ignored, as in the pool's processes
    runs = KeyRuns(memory_keys)
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg is None:
                return
            try:
                conn.send(runs.add(*msg))
            except Exception as e:  # noqa: BLE001 - sent to the driver, which raises it
                conn.send(f"{type(e).__name__}: {e}")
                return
    finally:
        runs.close()
