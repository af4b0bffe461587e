"""The committed index saved during a run (issue 23), so that a run killed at a billion images does
not leave its next start every file it published to read again.

:class:`IndexCheckpoints` is told of each file the run publishes; in a thread of its own, every
``runtime.index_save_interval_s`` (or as soon as :data:`.index.MEMORY_ROWS` rows wait) it reads
those files back (a few columns, as a start reads them: :func:`.resume.iter_files`; a file whose
listing entry after the read is not the one before is left out) and saves them as deltas of the
index under ``_index/`` of at most that many rows each, so that a delta is built and later loaded
in memory whole within that bound (:func:`.saved_index.save_delta`, each write only while the run
holds its lease). A start takes the deltas with the full save (:func:`.saved_index.load_index`);
the run's own end takes them in place of reading back what it wrote
(:func:`.resume.refresh_committed`), then its full save replaces them.
A delta that fails (the storage) is a warning, and its files wait for the next; a lease taken over
stops the deltas (the run finds that out itself).
"""

from __future__ import annotations

import logging
import threading
import time

from . import index
from .index import FileGroup
from .lease import LeaseLost
from .resume import CommittedFileError
from .storage import Storage, join_uri

_log = logging.getLogger(__name__)


class IndexCheckpoints:
    """The deltas of one run (see the module). ``interval_s`` None: none (the index is saved at the
    run's end only). ``published`` is called from the driver's publishing thread; ``close`` once,
    at the end, returns the deltas written (their header paths)."""

    def __init__(self, output_uri: str, storage: Storage, fence, interval_s: float | None,
                 max_rows: int | None = None):
        self.output_uri, self.storage, self.fence, self.interval_s = output_uri, storage, fence, interval_s
        self.max_rows = max_rows if max_rows is not None else index.MEMORY_ROWS
        self.heads: list[str] = []
        self._pending: dict[str, tuple[int, int]] = {}  # file name -> (publish number, rows), in publish order
        self._rows = 0  # rows of the pending files
        self._seq = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lost = False
        self._failed = False  # the last delta tried failed (the next waits for the interval)
        self._useless = False  # the storage's entries do not tell content: no delta is of use
        self._thread: threading.Thread | None = None

    def published(self, name: str, rows: int) -> None:
        """File ``name`` (under the output) was published with ``rows`` rows (a name published again,
        rewritten, is read again)."""
        if self.interval_s is None or self._useless:
            return
        with self._lock:
            self._seq += 1
            old = self._pending.pop(name, None)
            self._rows += rows - (old[1] if old else 0)
            self._pending[name] = (self._seq, rows)
            full = self._rows >= self.max_rows
        if full:
            self._wake.set()

    def start(self) -> "IndexCheckpoints":
        if self.interval_s is not None:
            self._thread = threading.Thread(target=self._loop, name="index-checkpoints", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set() and not self._lost and not self._useless:
            self._wake.wait(timeout=max(0.0, last + self.interval_s - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            timely = time.monotonic() >= last + self.interval_s
            with self._lock:
                # (after a failed save, the next waits for the interval whatever the rows)
                by_rows = self._rows >= self.max_rows and not self._failed
                due = self._pending and (timely or by_rows)
            if due:
                # by rows: only deltas of max_rows (the rest waits for more, or for the interval)
                self.save_pending(full_only=not timely, stoppable=True)
                if timely or self._failed:
                    last = time.monotonic()
            elif timely:
                last = time.monotonic()  # nothing published this interval

    def save_pending(self, full_only: bool = False, stoppable: bool = False) -> str | None:
        """The files published (up to now: not those published while this runs) and not yet in a
        delta, read back and saved in the caller's thread, in deltas of at most ``max_rows`` rows (a
        file of more is a delta of its own); ``full_only``: only deltas of ``max_rows`` rows (the
        rest stays pending); ``stoppable``: stops between deltas once :meth:`stop` is called.
        Returns the last delta's header path; None where none was written (a failure is a warning,
        and the files stay pending; the lease lost; none pending)."""
        head = None
        with self._lock:
            upto = self._seq
        while not (stoppable and self._stop.is_set()):
            with self._lock:
                if self._lost or self._useless:
                    return head
                taken, rows, waiting = {}, 0, 0
                for name, (seq, n) in self._pending.items():  # in publish order
                    if seq > upto:
                        continue
                    waiting += n
                    if not taken or rows + n <= self.max_rows:
                        taken[name] = (seq, n)
                        rows += n
                if not taken or (full_only and waiting < self.max_rows):
                    return head
            saved = self._save(taken)
            if saved is False:
                return head
            with self._lock:
                for name, (seq, n) in taken.items():
                    if self._pending.get(name, (None,))[0] == seq:  # (published again since: read again next time)
                        del self._pending[name]
                        self._rows -= n
                if saved:
                    self.heads.append(saved)
                    head = saved
        return head

    def _save(self, taken: dict[str, tuple[int, int]]) -> str | bool | None:
        """One delta of the files ``taken``: its header path; None where none of them could be read
        (no delta: they are read as any file no save covers); False where it failed (or the lease is
        lost): a warning, and they stay pending."""
        from .resume import iter_files, local_paths
        from .saved_index import save_delta

        paths = local_paths(self.output_uri, [join_uri(self.output_uri, name) for name in taken])
        try:
            # each file's listing entry asked for before it is read (what a start checks it against)
            try:
                files = list(iter_files(self.output_uri, self.storage, paths))
            except CommittedFileError:  # one gone or rewritten as it was read: the others still saved
                files = [f for f in self._map(self._read_or_none, paths) if f is not None]
            files = self._unchanged(files)
            head = save_delta(self.output_uri, self.storage, FileGroup.of(files), fence=self.fence) if files else None
        except LeaseLost:
            with self._lock:
                self._lost = True
            return False
        except Exception as e:  # noqa: BLE001 - a delta is only a saving: its files wait for the next
            _log.warning("the committed index was not saved under %s during the run (%s: %s): its files are in the "
                         "next save", join_uri(self.output_uri, "_index"), type(e).__name__, e)
            self._failed = True
            return False
        self._failed = False
        return head

    def _map(self, fn, items: list) -> list:
        """``fn`` of each item, in threads as many as the output's reads take (resume.read_threads)."""
        from concurrent.futures import ThreadPoolExecutor

        from .resume import read_threads

        if len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(len(items), read_threads(self.output_uri))) as pool:
            return list(pool.map(fn, items))

    def _unchanged(self, files: list) -> list:
        """The files read whose listing entry after the read is the one asked for before it (one
        rewritten while it was read is left out: its rows and entry might not be of one content).
        Where the storage's entries do not tell content (:func:`.resume.stamp_tells_content`: no
        ETag), no start could trust a delta: none is made again in this run (said once)."""
        from .resume import listing_stamp, stamp_tells_content

        fs = self.storage.fs(self.output_uri)

        def now(f) -> str | None:
            try:
                return listing_stamp(fs.info(f.part, refresh=True))  # (not a listing cached meanwhile)
            except OSError:
                return None

        if files and not all(stamp_tells_content(f.stamp) for f in files):
            self._useless = True
            _log.info("the committed index is not saved during this run: the storage's listing entries of %s do not "
                      "tell a file's content apart (no ETag), so no start could use it", self.output_uri)
            return []
        stamps = self._map(now, files)
        return [f for f, stamp in zip(files, stamps) if stamp == f.stamp]

    def _read_or_none(self, path: str):
        """A file's rows; None where it cannot be read (left out of the delta, and no longer pending:
        a start or the run's end reads it, as any file no save covers)."""
        from .resume import read_file_rows

        try:
            return read_file_rows(path, self.storage.fs(self.output_uri))
        except CommittedFileError as e:
            _log.info("not in the index delta: %s", e)
            return None

    def stop(self) -> None:
        """Stops the thread (a delta being saved is finished first); no more deltas unless flushed."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self, flush: bool = False) -> list[str]:
        """:meth:`stop`; with ``flush`` the files still pending are saved as more deltas. Returns the
        deltas written."""
        self.stop()
        if flush and self.interval_s is not None:
            self.save_pending()
        return list(self.heads)
