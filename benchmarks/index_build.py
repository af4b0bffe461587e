"""The committed index alone (issue 23): built from N synthetic rows, then queried, in this process.

For each N: files of 1,000 random rows (random 128-bit keys, 2% of them repeated in a second
file; no Parquet, no hashing: the index's own cost) given one at a time to
``Committed.from_files``, then ``replaced`` (one file gone, one added: what a run's end does), the
scans (images, errors by reason, ok rows, duplicates), the rows by container, and 100,000 lookups;
each step's CPU seconds, and the process's anonymous and file-backed resident memory (RssAnon,
RssFile from /proc/self/status, sampled every 10 ms by a thread; their peaks over the step).
Run each N in a process of its own (``--rows`` one value) so that peaks do not carry over.

    .venv/bin/python benchmarks/index_build.py --rows 10000000 [--index-rows 2097152] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile")}


class Peaks:
    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            for k, v in _status().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.01)

    def reset(self) -> dict[str, float]:
        for k, v in _status().items():
            self.peak[k] = max(self.peak[k], v)
        out = {f"peak_{k}_mb": round(v / 1024, 1) for k, v in self.peak.items()}
        self.peak = {"RssAnon": 0, "RssFile": 0}
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--index-rows", type=int, default=None, help="the index's memory bound (default: MEMORY_ROWS)")
    ap.add_argument("--out", default=None, help="a JSON file the result is appended to (one line)")
    args = ap.parse_args()
    from fastsam_batch.index import Committed, FileRows, duplicate_rows

    n, per = args.rows, 1000
    z, ok = np.zeros(per, np.uint64), np.ones(per, bool)
    ok[::50] = False
    reason = np.where(ok, -1, 0).astype(np.int16)
    units = (np.arange(per) % 7).astype(np.uint64)

    def files():
        rng = np.random.default_rng(1)
        prev = None
        for j in range(n // per):
            hi = rng.integers(0, 2**63, per).astype(np.uint64)
            lo = rng.integers(0, 2**63, per).astype(np.uint64)
            if prev is not None and j % 50 == 1:  # 2% of the files repeat the rows of the file before (a run's duplicates)
                hi[:], lo[:] = prev
            prev = (hi.copy(), lo.copy())
            yield FileRows(f"out/part-{j:09d}.parquet", hi, lo, z, ok, reason, ["read_failed"], units, {"fp": per})

    peaks = Peaks()
    result = {"rows": n, "index_rows": args.index_rows, "steps": {}}
    base = peaks.reset()
    result["start"] = base

    def step(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        result["steps"][name] = {"wall_s": round(time.perf_counter() - t0, 2),
                                 "cpu_s": round(time.process_time() - c0, 2), **peaks.reset()}
        print(name, result["steps"][name], flush=True)
        return out

    c = step("from_files", lambda: Committed.from_files(files(), memory_rows=args.index_rows))
    extra = FileRows("out/part-x.parquet", np.arange(per, dtype=np.uint64), np.arange(per, dtype=np.uint64), z, ok,
                     reason, ["read_failed"], units, {"fp": per})
    c = step("replaced", lambda: c.replaced(["out/part-000000003.parquet"], [extra]))
    step("scans", lambda: (c.images, c.errors_by_reason(), c.ok_rows, duplicate_rows(c)))
    step("unit_rows", lambda: c.unit_rows("s", "v"))
    ids = [f"img/{i:010d}.jpg" for i in range(100_000)]
    def lookups():
        for a in range(0, len(ids), 1000):
            c.lookup(ids[a:a + 1000], ["v"] * 1000)

    step("lookup_100k", lookups)
    result["on_disk"] = c.on_disk
    result["images"] = c.images
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
