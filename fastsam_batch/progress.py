"""Progress while a run works: counts from what is committed (never from what is scheduled).

On a terminal, one live line redrawn in place: images done / planned, images/s, ETA, error rows,
masks. Otherwise (logs, CI, Kubernetes) one plain line every ``runtime.progress_interval_s``
seconds. A resumed run starts at the images already done.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .summary import RunSummary


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(summary: RunSummary, done_at_start: int, elapsed: float) -> str:
    """``12,345 / 100,000 images (12.3%)  41.2 images/s  ETA 35m28s  errors 3  masks 1,234,567``;
    for containers, whose images are counted as they are read: ``12,345 images, 3 / 10 shards done``."""
    planned = max(summary.images_planned, 1)
    done = summary.images_ok + summary.images_error
    rate = (done - done_at_start) / elapsed if elapsed > 0 else 0.0
    if summary.units_planned:
        units = summary.units_done + summary.units_skipped_done
        left = summary.units_planned - units
        eta = _duration(left * elapsed / max(summary.units_done, 1e-9)) if summary.units_done and left else (
            "-" if left else "0s")
        what = "shards" if summary.input_format == "tar" else "files"
        return (f"{done:,} images, {units:,} / {summary.units_planned:,} {what} done  {rate:.2f} images/s  ETA {eta}  "
                f"errors {summary.images_error:,}  masks {summary.masks_written:,}")
    left = summary.images_planned - done
    eta = _duration(left / rate) if rate > 0 and left > 0 else "-" if left > 0 else "0s"
    return (f"{done:,} / {summary.images_planned:,} images ({100 * done / planned:.1f}%)  {rate:.2f} images/s  "
            f"ETA {eta}  errors {summary.images_error:,}  masks {summary.masks_written:,}")


class Progress:
    """Call :meth:`tick` often (the writer's loop does, about twice a second); it draws or logs
    when due. :meth:`close` ends a live line."""

    def __init__(self, summary: RunSummary, interval_s: float, out: TextIO | None = None,
                 live: bool | None = None, log=None):
        self.summary = summary
        self.interval_s = interval_s
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self.log = log or (lambda line: print(line, file=self.out, flush=True))
        self.start = time.monotonic()
        self.done_at_start = summary.images_ok + summary.images_error
        self.last = self.start
        self.drawn = 0

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last < (0.5 if self.live else self.interval_s):
            return
        self.last = now
        line = progress_line(self.summary, self.done_at_start, now - self.start)
        if self.live:
            self.out.write("\r" + line.ljust(self.drawn))
            self.out.flush()
            self.drawn = len(line)
        else:
            self.log(f"progress: {line}")

    def close(self) -> None:
        if self.live and self.drawn:
            self.out.write("\r" + " " * self.drawn + "\r")
            self.out.flush()
            self.drawn = 0
