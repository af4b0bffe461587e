"""Progress while a run works: images segmented (their rows have reached the writer) with those
committed beside them, never what is merely scheduled.

On a terminal, one live line redrawn in place (every half second): images segmented / planned,
committed, images/s, ETA, error rows, masks. Otherwise (logs, CI, Kubernetes) plain lines: one at
the start, one as soon as the first image is segmented (within a second of its rows reaching the
writer: the writer's loop ticks twice a second), then one every ``runtime.progress_interval_s``
seconds, and one at the end. A resumed run starts at the images already done.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from .summary import RunSummary


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(summary: RunSummary, done_at_start: int, elapsed: float, waiting: int = 0) -> str:
    """``12,345 / 100,000 images segmented (12.3%), 12,000 committed  41.2 images/s  ETA 35m28s  errors 3
    masks 1,234,567``; for containers, whose images are counted as they are read: ``12,345 images
    segmented, 12,000 committed, 3 / 10 shards done ...``. ``waiting``: rows segmented and not yet
    committed (the writer's pending rows); errors and masks count committed rows."""
    planned = max(summary.images_planned, 1)
    committed = summary.images_ok + summary.images_error
    done = committed + waiting
    rate = (done - done_at_start) / elapsed if elapsed > 0 else 0.0
    tail = f"errors {summary.images_error:,}  masks {summary.masks_written:,}"
    if summary.units_planned:
        units = summary.units_done + summary.units_skipped_done
        left = summary.units_planned - units
        eta = _duration(left * elapsed / max(summary.units_done, 1e-9)) if summary.units_done and left else (
            "-" if left else "0s")
        what = "shards" if summary.input_format == "tar" else "files"
        return (f"{done:,} images segmented, {committed:,} committed, {units:,} / {summary.units_planned:,} {what} done  "
                f"{rate:.2f} images/s  ETA {eta}  {tail}")
    left = summary.images_planned - done
    eta = _duration(left / rate) if rate > 0 and left > 0 else "-" if left > 0 else "0s"
    return (f"{done:,} / {summary.images_planned:,} images segmented ({100 * done / planned:.1f}%), {committed:,} "
            f"committed  {rate:.2f} images/s  ETA {eta}  {tail}")


class Progress:
    """Call :meth:`tick` often (the writer's loop does, about twice a second); it draws or logs
    when due. :meth:`close` ends a live line, or logs the last line. ``waiting``: how many rows
    the writer holds uncommitted (segmented, not yet in a file)."""

    def __init__(self, summary: RunSummary, interval_s: float, out: TextIO | None = None,
                 live: bool | None = None, log=None, waiting: Callable[[], int] | None = None):
        self.summary = summary
        self.interval_s = interval_s
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self.log = log or (lambda line: print(line, file=self.out, flush=True))
        self.waiting = waiting or (lambda: 0)
        self.start = time.monotonic()
        self.done_at_start = summary.images_ok + summary.images_error
        self.last = self.start
        self.drawn = 0
        self.first_seen = False
        if not self.live:
            self._emit(self.start)

    def _line(self, now: float) -> str:
        return progress_line(self.summary, self.done_at_start, now - self.start, self.waiting())

    def _emit(self, now: float) -> None:
        line = self._line(now)
        if self.live:
            self.out.write("\r" + line.ljust(self.drawn))
            self.out.flush()
            self.drawn = len(line)
        else:
            self.log(f"progress: {line}")

    def tick(self) -> None:
        now = time.monotonic()
        first = not self.first_seen and (
            self.waiting() > 0 or self.summary.images_ok + self.summary.images_error > self.done_at_start)
        if first:
            self.first_seen = True  # the first image segmented: said at once
        elif now - self.last < (0.5 if self.live else self.interval_s):
            return
        self.last = now
        self._emit(now)

    def skipped(self, images: int) -> None:
        """``images`` found already done after the start (planning goes on during the run): done, but
        not by this run (not in its rate)."""
        self.done_at_start += images

    def close(self) -> None:
        if self.live and self.drawn:
            self.out.write("\r" + " " * self.drawn + "\r")
            self.out.flush()
            self.drawn = 0
        elif not self.live:
            self._emit(time.monotonic())  # the last line: where the run ended
