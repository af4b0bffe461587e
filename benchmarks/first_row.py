"""Time to the first committed row of a long `list` input (issue 23: "the first row of a
10-million-image list is committed within a minute").

`fastsam-batch run` on a Parquet list of N images into a fresh output, on this machine's embedded
Ray with the fixture checkpoint: the seconds from the command's start to the line saying
segmentation starts on the first plan files (a streamed plan), to the line saying the plan is made
(if it comes first), to the first output file published (a `part-*.parquet` directly under the output), and
the command's peak RSS by then; then the run is stopped with Ctrl-C (SIGINT) and its exit waited
for. The listed images need not exist: a missing one is an error row, committed like any other
(what is timed is planning and the way to the first commit, not segmentation). Prints the figures
and writes JSON.

    .venv/bin/python benchmarks/first_row.py --list /path/list-10000000.parquet [--work DIR]
        [--out benchmarks/out/first_row.json] [--timeout 3600]

The list is any Parquet list with `uri` and `image_id` columns (benchmarks/scale.py makes them:
list-<N>.parquet under its --work folder). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "tests" / "fixtures" / "fastsam-fixture.pt"


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", required=True, help="a Parquet list (uri, image_id)")
    ap.add_argument("--work", default=None, help="where the output goes (default: a temp folder; removed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "first_row.json"))
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(args.list).metadata.num_rows
    work = Path(args.work or tempfile.mkdtemp(prefix="fastsam-first-row-"))
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    manifest = work / "job.json"
    manifest.write_text(json.dumps({
        "name": "first-row", "input": {"uri": str(Path(args.list).resolve()), "format": "list"},
        "output": {"uri": str(out), "commit_interval_s": 5},
        "model": {"checkpoint": str(CHECKPOINT), "device": "cpu"}}))
    exe = Path(sys.executable).with_name("fastsam-batch")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    # SIGINT caught while it starts: a benchmark started from a background shell ignores SIGINT,
    # and the run would inherit that (and not stop on the Ctrl-C below)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([str(exe), "run", str(manifest)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak, first = 0.0, None
    while proc.poll() is None and time.monotonic() - t0 < args.timeout:
        peak = max(peak, rss_mb(proc.pid))
        if out.is_dir() and any(p.name.startswith("part-") and p.suffix == ".parquet" for p in out.iterdir()):
            first = time.monotonic() - t0
            break
        time.sleep(0.2)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    planned = next((t for t, line in lines if line.startswith("planned ")), None)
    # a streamed plan: segmentation starts on the first plan files, the plan is logged at its end
    started = next((t for t, line in lines if line.startswith("planning ")), None)
    result = {"list_rows": rows, "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
              "planned_s": None if planned is None else round(planned, 1),
              "segmentation_started_s": None if started is None else round(started, 1),
              "first_committed_s": None if first is None else round(first, 1),
              "peak_rss_mb_until_then": round(peak), "exit": proc.returncode,
              "log": [f"{t:7.1f}s {line}" for t, line in lines][:40]}
    print(f"{rows:,} listed: segmentation started at {result['segmentation_started_s']} s (streamed plan), "
          f"plan made at {result['planned_s']} s, first file committed at "
          f"{result['first_committed_s']} s, driver peak RSS {result['peak_rss_mb_until_then']} MB; "
          f"stopped with Ctrl-C: exit {proc.returncode}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"written: {args.out}")
    if args.work is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
