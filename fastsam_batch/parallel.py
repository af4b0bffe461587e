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

Results come back in the order the work was given; at most ``window`` tasks are in flight (given,
under way, or done and waiting to be taken), so memory stays bounded by the batch size. A pool of
one process, or :data:`PROCESSES_ENV` set to 1, means no pool: the same functions run on the driver.

The worker functions import only :mod:`.index` (numpy) and pyarrow, except :func:`read_files`,
which reads committed files with :func:`.resume.iter_files` (threads for storage latency inside
each process).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np

PROCESSES_ENV = "FASTSAM_BATCH_PLAN_PROCESSES"
MAX_PROCESSES = 8  # the default's cap (issue 23's driver has 8 cores)


def plan_processes() -> int:
    """Processes for planning: ``$FASTSAM_BATCH_PLAN_PROCESSES``, else the cores this process may
    run on, at most :data:`MAX_PROCESSES`. 1: none (everything on the driver)."""
    text = os.environ.get(PROCESSES_ENV, "").strip()
    if text:
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"${PROCESSES_ENV}={text!r}: not an integer (processes that planning "
                             "spreads hashing and lookups over; 1: none)") from None
        return max(1, n)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_PROCESSES, cores))


POOL_AFTER = 2  # items (batches, groups of files) done on the driver before the pool starts


class PlanPool:
    """A process pool started on first use (``spawn``), closed by :meth:`close` (its processes
    ended; tasks not started cancelled). ``after``: the first items of each :meth:`ordered` are
    done on the driver (a small plan starts no process)."""

    def __init__(self, processes: int, after: int | None = None):
        self.processes = processes
        self.after = POOL_AFTER if after is None else after
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

    def ordered(self, items: Iterable, task: Callable, window: int | None = None) -> Iterator[tuple]:
        """(item, ``fn(*args)``) for each item, in the items' order, where ``task(item)`` gives
        ``(fn, args)`` (``fn`` a module-level function: it is pickled by name). Items are taken
        from ``items`` as room in the window frees up; on an error, or the generator closed, the
        tasks not started are cancelled. ``task(item)`` may give None: no work, the result None."""
        import itertools
        from collections import deque

        source = iter(items)
        inline = 0
        for item in source:
            if self.active and inline >= self.after:
                source = itertools.chain([item], source)
                break
            t = task(item)
            yield item, (t[0](*t[1]) if t is not None else None)
            inline += 1
        else:
            return

        window = window or 2 * self.processes
        pool = self._executor()
        pending: deque = deque()
        try:
            while True:
                while len(pending) < window:
                    item = next(source, _END)
                    if item is _END:
                        break
                    t = task(item)
                    if t is None:
                        pending.append((item, None))
                        continue
                    with _main_hidden():  # a process started by this submit does not run the driver's script
                        pending.append((item, pool.submit(t[0], *t[1])))
                if not pending:
                    return
                item, future = pending.popleft()
                yield item, (future.result() if future is not None else None)
        finally:
            for _, f in pending:
                if f is not None:
                    f.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


_END = object()


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
    return hi, lo, mapped_index(*index).lookup_keys(hi, lo, version_keys_of(source_versions(etags, sizes)))


def source_versions(etags, sizes):
    """:func:`.resume.source_version` of each unit, ``etag/size``, as an Arrow string column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(etags, pc.cast(sizes, pa.string()), "/")


def version_keys_of(versions) -> np.ndarray:
    """:func:`.index.version_keys` of an Arrow string array, each distinct version hashed once."""
    from .index import version_keys

    d = versions.combine_chunks().dictionary_encode() if hasattr(versions, "combine_chunks") \
        else versions.dictionary_encode()
    return version_keys(d.dictionary.to_pylist())[d.indices.to_numpy(zero_copy_only=False)]


def read_files(output_uri: str, storage, paths: list[str], stamps: dict[str, str]):
    """Committed files read with :func:`.resume.iter_files`, as one :class:`.index.FileGroup`
    (their records made and sorted here, not on the driver); None on any error (the driver reads
    those files again itself, to raise the error as it always has: an exception's cause does not
    cross processes)."""
    from .index import FileGroup
    from .resume import iter_files

    try:
        return FileGroup.of(list(iter_files(output_uri, storage, paths, stamps=stamps)))
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
                with _main_hidden():
                    proc.start()
                there.close()
                self.conns.append(here)
                self.procs.append(proc)
            if seed is not None and len(seed[0]):
                self.submit(*seed)
                self.result()
        except BaseException:
            self.close()
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

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.conns, self.procs, self.pending = [], [], []


def _repeat_worker(conn, memory_keys: int) -> None:
    """A process of :class:`SplitRepeatCheck`: a KeyRuns of its range, a batch at a time, in order."""
    import signal

    from .index import KeyRuns

    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
