"""Plan stage: the work units of an input (see :mod:`.inputs`) kept in parts as they come.

The planned units go, in parts of ``runtime.plan_part_rows``, to Parquet files under
``<output>/_plan/`` (see :class:`PlanParts`), which the Ray workers read: the driver holds one part
at a time, however long the listing.
"""

from __future__ import annotations

import copy
import io
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from typing import Any

from .retry import with_retries
from .storage import Storage, join_uri, protocol_of, strip_protocol

PLAN_DIR = "_plan"
PLAN_FIELDS = ("image_id", "uri", "size", "etag", "kind", "extra", "prompts", "source_version", "done")
_DEFAULTS = {"size": 0, "kind": "object"}


def chunked(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for it in items:
        chunk.append(it)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class PlanParts:
    """The planned items of a run, written in parts as they come.

    The first part stays in memory; when a second one comes, every part goes to a Parquet file
    under ``<output>/_plan/<run id>/`` instead (the workers read them; the driver keeps only their
    names). So a small job writes no plan file, and a job of any size holds one part on the driver.
    """

    def __init__(self, output_uri: str, storage: Storage, part_rows: int):
        self.output_uri = output_uri
        self.storage = storage
        self.part_rows = part_rows
        self.folder = join_uri(output_uri, f"{PLAN_DIR}/{uuid.uuid4().hex[:12]}")
        self.in_memory: list[dict] = []
        self.files: list[str] = []
        self.count = 0

    def add(self, items: list[dict]) -> None:
        for part in chunked(items, self.part_rows):
            self.count += len(part)
            if not self.files and not self.in_memory:
                self.in_memory = part
                continue
            if self.in_memory:
                self._write(self.in_memory)
                self.in_memory = []
            self._write(part)

    def add_table(self, table) -> None:
        """As :meth:`add`, the items as an Arrow table (columns of :data:`PLAN_FIELDS`; those
        missing take their defaults): the same parts, cut from the table without a dict per item
        (the one part kept in memory excepted)."""
        for a in range(0, table.num_rows, self.part_rows):
            part = table.slice(a, self.part_rows)
            self.count += part.num_rows
            if not self.files and not self.in_memory:
                self.in_memory = part.to_pylist()
                continue
            if self.in_memory:
                self._write(self.in_memory)
                self.in_memory = []
            self._write_table(part)

    def _write(self, part: list[dict]) -> None:
        import pyarrow as pa

        self._write_table(pa.table({k: [it.get(k, _DEFAULTS.get(k, "")) for it in part] for k in PLAN_FIELDS}))

    def _write_table(self, part) -> None:
        import pyarrow.parquet as pq

        from .write import put_atomic

        table = plan_table(part)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        uri = join_uri(self.folder, f"part-{len(self.files):06d}.parquet")
        put_atomic(self.storage, uri, buf.getvalue())
        self.files.append(uri)

    def remove(self) -> None:
        """Deletes this run's plan files (at the end of the run)."""
        if self.files:
            remove_plan_files(self.output_uri, self.storage, self.folder)
            if protocol_of(self.output_uri) == "file":  # no empty folder left behind (S3 has none)
                try:
                    os.rmdir(strip_protocol(join_uri(self.output_uri, PLAN_DIR)))
                except OSError:
                    pass


def plan_table(part):
    """``part``'s columns of :data:`PLAN_FIELDS`, in that order, those missing filled with their
    defaults (as :meth:`PlanParts._write` fills an item's missing keys)."""
    import pyarrow as pa

    n = part.num_rows
    cols = {}
    for k in PLAN_FIELDS:
        if k in part.column_names:
            cols[k] = part.column(k)
        elif k == "size":
            cols[k] = pa.array([0] * n, pa.int64())
        else:
            cols[k] = pa.array([_DEFAULTS.get(k, "")] * n, pa.string())
    return pa.table(cols)


class PlanWave:
    """Some of a :class:`PlanParts`' files, as the run reads a plan (job._segment_waves)."""

    def __init__(self, files: list[str]):
        self.files = list(files)
        self.in_memory: list[dict] = []
        self.count = 0  # not known without reading them (not needed: the files are read by the workers)


class PlanCount:
    """In place of :class:`PlanParts` for a dry run: the planned items counted, nothing written."""

    def __init__(self):
        self.count = 0
        self.files: list[str] = []
        self.in_memory: list[dict] = []

    def add(self, items: list[dict]) -> None:
        self.count += len(items)

    def add_table(self, table) -> None:
        self.count += table.num_rows

    def remove(self) -> None:
        pass


class StreamedPlan:
    """Planning in a thread of its own, so that the run segments the first plan parts while the rest
    of the input is listed (issue 23: the first row of a long list in seconds, not after the whole plan).

    ``work(summary, stop)`` plans (job.plan_job) into ``parts`` (a :class:`PlanParts`, whose files the
    run reads as they appear), counting into a summary of its own (a copy of the run's): the run's
    summary is touched only by the thread that calls :meth:`sync` and :meth:`finish`, which add to it
    what planning counted since (counters by difference, other fields copied), so no count is lost
    between two threads. ``stop`` set: planning ends at its next batch and returns what it planned.
    SIGINT is blocked in the thread (a Ctrl-C is the main thread's; the plan's process pool, started
    from this thread, inherits the mask)."""

    def __init__(self, parts: "PlanParts", summary: Any, work: Callable[[Any, threading.Event], Any]):
        self.parts, self.summary, self.work = parts, summary, work
        self.own = copy.deepcopy(summary)  # the planner's counts
        self.seen = copy.deepcopy(summary)  # what of them the run's summary has
        self.stop = threading.Event()
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fastsam-batch-plan", daemon=True)

    def start(self) -> "StreamedPlan":
        self.thread.start()
        return self

    def _run(self) -> None:
        import signal

        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.result = self.work(self.own, self.stop)
        except BaseException as e:  # noqa: BLE001 - handed to the run's thread (check, finish)
            self.error = e
        finally:
            self.done.set()

    def check(self) -> None:
        """Raises planning's error, if it failed."""
        if self.error is not None:
            raise self.error

    def wait(self, parts: int, watch: Callable[[], None] = lambda: None) -> None:
        """Until more than ``parts`` plan files exist or planning has ended; ``watch`` is called while
        waiting (it raises to stop: the lease lost). Raises planning's error."""
        while len(self.parts.files) <= parts and not self.done.wait(0.1):
            watch()
        self.check()

    def sync(self, counted: tuple[str, ...] = ("images_planned", "images_skipped_done", "images_ok",
                                                "images_error", "units_planned", "units_skipped_done")) -> int:
        """Adds to the run's summary what planning counted since the last call, of ``counted``;
        returns how many of those were images found already done (ok or error rows: progress counts
        them as done at the start)."""
        done = 0
        for name in counted:
            now = getattr(self.own, name)
            delta = now - getattr(self.seen, name)
            if delta:
                setattr(self.summary, name, getattr(self.summary, name) + delta)
                setattr(self.seen, name, now)
                done += delta if name in ("images_ok", "images_error") else 0
        return done

    def finish(self) -> Any:
        """Planning's result once it has ended; every field of its summary added to the run's.
        Raises planning's error."""
        self.thread.join()
        self.check()
        for f in fields(self.own):
            now, seen = getattr(self.own, f.name), getattr(self.seen, f.name)
            if now == seen:
                continue
            if isinstance(now, (int, float)) and not isinstance(now, bool):
                setattr(self.summary, f.name, getattr(self.summary, f.name) + now - seen)
            else:
                setattr(self.summary, f.name, copy.deepcopy(now))
            setattr(self.seen, f.name, copy.deepcopy(now))
        return self.result

    def close(self) -> None:
        """Planning stopped and waited for (an error or Ctrl-C in the run): its processes ended."""
        self.stop.set()
        self.thread.join()


def read_plan_part(uri: str, storage: Storage) -> list[dict]:
    import pyarrow.parquet as pq

    data, _ = with_retries(lambda: storage.read_bytes(uri))
    return pq.read_table(io.BytesIO(data)).to_pylist()


def remove_plan_files(output_uri: str, storage: Storage, folder: str | None = None) -> None:
    """Deletes ``folder`` (default: every run's plan files, left by runs that were cut short)."""
    target = folder or join_uri(output_uri, PLAN_DIR)
    fs = storage.fs(target)
    path = strip_protocol(target)
    try:
        fs.invalidate_cache(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
