"""A time limit per image for decoding and segmentation, so that one pathological file cannot stall
a run.

Python cannot stop a thread that is inside a C decoder or a torch kernel, so the limit is enforced
the way a supervisor would: a watchdog thread in the worker notes the images being worked on in a
"poison" file on the node, then ends the worker process. Ray Data replaces the worker and retries
its batch; the retried batch finds those images in the poison file and gives them a ``timeout``
error row instead of trying again. For segmentation a batch that runs out of time is first redone
one image at a time, each with its own limit, so that only the image that is really too slow
becomes an error row. The poison file is per run (its id) and per node, under the node's
temporary folder.
"""

from __future__ import annotations

import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path


def poison_path(run_id: str) -> Path:
    base = Path(os.environ.get("FASTSAM_BATCH_CACHE", Path(tempfile.gettempdir()) / "fastsam-batch-cache"))
    return base / "poison" / f"{run_id or 'run'}.txt"


class Watchdog:
    """``with watchdog.watch(stage, ids, limit_s):`` ends this process if the block outlasts
    ``limit_s``, after recording ``stage`` and ``ids`` in the run's poison file on this node."""

    def __init__(self, run_id: str):
        self.path = poison_path(run_id)
        self._lock = threading.Lock()
        self._seen: dict[str, set[str]] | None = None
        self._mtime = 0.0

    @contextmanager
    def watch(self, stage: str, ids: list[str], limit_s: float | None):
        if not limit_s:
            yield
            return
        done = threading.Event()

        def guard():
            if not done.wait(limit_s):
                self._record(stage, ids)
                os._exit(3)  # noqa: SLF001 - the only way to stop code stuck in C; Ray replaces the worker

        t = threading.Thread(target=guard, name=f"fastsam-batch-watchdog-{stage}", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()

    def _record(self, stage: str, ids: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for i in ids:
                f.write(f"{stage}\t{i}\n")
            f.flush()
            os.fsync(f.fileno())

    def poisoned(self, stage: str) -> set[str]:
        """Image ids recorded for ``stage`` on this node (re-read when the file changes)."""
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime
            except FileNotFoundError:
                return set()
            if self._seen is None or mtime != self._mtime:
                seen: dict[str, set[str]] = {}
                for line in self.path.read_text().splitlines():
                    s, _, i = line.partition("\t")
                    seen.setdefault(s, set()).add(i)
                self._seen, self._mtime = seen, mtime
            return self._seen.get(stage, set())
