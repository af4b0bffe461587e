"""Fault injection for the tests, kept out of the product: every Python process the tests start
(``fastsam-batch`` runs, the Ray workers they start, ``ray.cluster_utils.Cluster`` nodes) has this
folder on ``PYTHONPATH`` (conftest.py puts it there), so Python imports this module at start-up. It
does nothing unless one of these is set in the process's environment:

- ``FASTSAM_BATCH_TEST_SLOW=<stage>:<text>:<seconds>``: work on an image whose id contains
  ``<text>`` in ``<stage>`` (``decode``, or ``segment``: a batch or an image alone) takes that long,
  as a pathological file would: the sleep is inside the run's own watchdog (watchdog.Watchdog.watch),
  where the real work is. With ``FASTSAM_BATCH_TEST_SLOW_MARK=<file>`` that file is created first, so
  a test can wait for a run to be inside such an image instead of guessing when it is. With
  ``FASTSAM_BATCH_TEST_SLOW_UNTIL=<file>`` the work ends as soon as that file exists (at the latest
  after the seconds): a test holds a run open until what it waits for has happened, then lets it end.
- ``FASTSAM_BATCH_CRASH_ONCE=<path>``: the first segmentation call that finds no file at ``<path>``
  creates it and ends its own process mid-batch (exit 137), as a dying GPU worker would; exactly once
  per path, whichever process gets there first.
- ``FASTSAM_BATCH_TEST_READS=<file>``: each committed file the process reads back
  (``resume.read_file_rows``: a start's index, the end's refresh, the index deltas) appends a line
  ``<path>`` to that file, so a test can count how often a run read each of its committed files.

The modules are patched as they are imported (an import hook), so a process that never imports them
pays nothing but this file.
"""

from __future__ import annotations

import os

SLOW = os.environ.get("FASTSAM_BATCH_TEST_SLOW")
CRASH_ONCE = os.environ.get("FASTSAM_BATCH_CRASH_ONCE")
READS = os.environ.get("FASTSAM_BATCH_TEST_READS")


def _slow_watchdog(module) -> None:
    import time
    from contextlib import contextmanager
    from pathlib import Path

    stage, text, seconds = SLOW.split(":")
    watch = module.Watchdog.watch

    @contextmanager
    def slowed(self, name: str, ids: list[str], limit_s):
        with watch(self, name, ids, limit_s):
            if name.partition("-")[0] == stage and any(text in i for i in ids):
                mark = os.environ.get("FASTSAM_BATCH_TEST_SLOW_MARK")
                if mark:
                    Path(mark).touch()
                until = os.environ.get("FASTSAM_BATCH_TEST_SLOW_UNTIL")
                if until:
                    deadline = time.monotonic() + float(seconds)
                    while time.monotonic() < deadline and not Path(until).exists():
                        time.sleep(0.05)
                else:
                    time.sleep(float(seconds))
            yield

    module.Watchdog.watch = slowed


def _crash_once(module) -> None:
    call = module.SegmentActor.__call__

    def crashing(self, batch):
        try:
            fd = os.open(CRASH_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return call(self, batch)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(137)

    module.SegmentActor.__call__ = crashing


def _count_reads(module) -> None:
    read = module.read_file_rows

    def counted(path, *a, **k):
        fd = os.open(READS, os.O_CREAT | os.O_WRONLY | os.O_APPEND)
        try:  # one write of one short line: whole, whichever threads and processes append at once
            os.write(fd, f"{path}\n".encode())
        finally:
            os.close(fd)
        return read(path, *a, **k)

    module.read_file_rows = counted


PATCHES = {}
if SLOW:
    PATCHES["fastsam_batch.watchdog"] = _slow_watchdog
if CRASH_ONCE:
    PATCHES["fastsam_batch.segment"] = _crash_once
if READS:
    PATCHES["fastsam_batch.resume"] = _count_reads


if PATCHES:
    import importlib.abc
    import importlib.machinery
    import sys

    class _Patcher(importlib.abc.MetaPathFinder):
        """Finds nothing itself: for a module named in PATCHES, wraps the real loader so that the
        patch runs once the module has been executed."""

        def find_spec(self, name, path, target=None):
            if name not in PATCHES:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            loader, patch = spec.loader, PATCHES[name]

            class Loader(importlib.abc.Loader):
                def create_module(self, spec):
                    return loader.create_module(spec)

                def exec_module(self, module):
                    loader.exec_module(module)
                    patch(module)

            spec.loader = Loader()
            return spec

    sys.meta_path.insert(0, _Patcher())
