"""The listing's repeat check (`index.KeyRuns`, what `SeenIds` is) alone: N distinct random keys
added in batches of 65,536 (a list batch), CPU seconds per million keys for each tenth of them, so
the growth with N (merges of geometric runs, spills past 8M keys, searches over more runs) can be
extrapolated. The repeat check is one of the serial steps planning keeps on the driver (issue 23).

    .venv/bin/python benchmarks/keyruns.py [--keys 40000000] [--out benchmarks/out/keyruns.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from fastsam_batch.index import KeyRuns

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=40_000_000)
    ap.add_argument("--batch", type=int, default=1 << 16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "keyruns.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="keyruns-") as spill:
        runs = KeyRuns(spill_dir=spill)
        tenth = max(args.batch, args.keys // 10)
        marks, spent, done, since = [], 0.0, 0, 0.0
        while done < args.keys:
            n = min(args.batch, args.keys - done)
            hi, lo = rng.integers(0, 2**63, n, dtype=np.uint64), rng.integers(0, 2**63, n, dtype=np.uint64)
            t = time.process_time()
            new = runs.add(hi, lo)
            spent += time.process_time() - t
            assert new.all()
            done += n
            if done % tenth < n or done == args.keys:
                marks.append({"keys": done, "cpu_s": round(spent, 2),
                              "us_per_key_here": round((spent - since) / tenth * 1e6, 3),
                              "runs_in_memory": len(runs.mem), "runs_on_disk": len(runs.disk)})
                print(marks[-1], flush=True)
                since = spent
        runs.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"keys": args.keys, "batch": args.batch, "marks": marks}, indent=1))


if __name__ == "__main__":
    main()
