"""The start after a killed run, with and without the index deltas a run saves as it goes (issue 23).

A committed output of N rows (benchmarks/scale.py's synthetic rows, ``--rows-per-file`` a file,
made once under ``--work``), as a first run killed before its end leaves it. Each step in a fresh
process of its own, this tree's code:

- ``no save``: nothing under ``_index/`` (the run was killed before v. deltas existed, or with
  ``runtime.index_save_interval_s: null``): the next start (``resume.read_committed``) reads every
  committed file.
- ``deltas``: what checkpoints.IndexCheckpoints does during the run, timed as one pass (every file
  told as published, ``save_pending``: read back, saved as deltas of at most 2^21 rows): the work
  the run's driver thread spreads over the run; then the next start, which takes every file from
  the deltas.
- ``full save``: the index saved whole (as a run's end saves it), and a start with it (the bound).

Per step: wall seconds and CPU seconds of the process (and of the plan pool's processes, where the
start uses one). Prints a table and writes JSON. ``--s3``: the output copied to a moto S3 server
started here (its own process, on this machine's cores too), and every step against it over HTTP:
each file read is requests to a storage server (on this machine: no network latency), whose CPU
over each timed part is recorded too.

    PYTHONPATH=. .venv/bin/python benchmarks/deltas.py --rows 1000000 3000000 [--rows-per-file 4000]
        [--s3] [--work /tmp/deltas] [--out benchmarks/out/deltas.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

STEP = r"""
import json, os, resource, sys, time
from fastsam_batch.lease import Lease
from fastsam_batch.storage import Storage

out, step = sys.argv[1], sys.argv[2]
storage = Storage(json.loads(sys.argv[3]))


def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


SERVER = int(os.environ.get("BENCH_SERVER_PID") or 0)  # a storage server's process (--s3): its CPU too


def server_cpu():
    from scale import proc_cpu_s  # benchmarks/scale.py

    return proc_cpu_s(SERVER) if SERVER else 0.0


from fastsam_batch.resume import list_parts_stamped, read_committed
t0, c0, s0 = time.perf_counter(), cpu(), server_cpu()
if step == "start":
    c = read_committed(out, storage)
    rows = c.rows
    c.close()
elif step == "deltas":
    from fastsam_batch.checkpoints import IndexCheckpoints
    lease = Lease(storage, out, "bench-deltas")
    lease.acquire(break_lease=True)
    cp = IndexCheckpoints(out, storage, lease.fence(), interval_s=3600)
    import pyarrow.parquet as pq
    rows = 0
    fs = storage.fs(out)
    for p in sorted(list_parts_stamped(out, storage)):
        with fs.open(p, "rb") as f:
            n = pq.ParquetFile(f).metadata.num_rows
        rows += n
        cp.published(p.rsplit("/", 1)[-1], n)
    t0, c0, s0 = time.perf_counter(), cpu(), server_cpu()  # (the files' row counts above: what the run's stats give it)
    cp.save_pending()
    assert not cp._pending, "files left pending"
    lease.release()
elif step == "full":
    from fastsam_batch.saved_index import save_index
    lease = Lease(storage, out, "bench-deltas")
    lease.acquire(break_lease=True)
    c = read_committed(out, storage)
    rows = c.rows
    t0, c0, s0 = time.perf_counter(), cpu(), server_cpu()
    save_index(out, storage, c, fence=lease.fence())
    c.close()
    lease.release()
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": cpu() - c0, "rows": rows,
                  **({"storage_server_cpu_s": round(server_cpu() - s0, 2)} if SERVER else {})}))
"""


def step(out: str, name: str, options: dict) -> dict:
    """One step in a process of its own; with a moto server, the server's CPU over the timed part."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]),
           "BENCH_SERVER_PID": str(options.get("moto_pid") or "")}
    r = subprocess.run([sys.executable, "-c", STEP, out, name,
                        json.dumps({k: v for k, v in options.items() if k != "moto_pid"})],
                       env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"step {name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000])
    ap.add_argument("--rows-per-file", type=int, default=4000)
    ap.add_argument("--s3", action="store_true", help="the output on a moto S3 server started here")
    ap.add_argument("--work", type=Path, default=Path("/tmp/deltas"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "deltas.json")
    a = ap.parse_args()
    from fastsam_batch.storage import Storage

    moto, options = None, {}
    if a.s3:
        from bench import moto_server  # benchmarks/bench.py

        moto, endpoint = moto_server()
        options = {"endpoint_url": endpoint, "key": "k", "secret": "s", "moto_pid": moto.pid}
    storage = Storage({k: v for k, v in options.items() if k != "moto_pid"})
    results = []
    try:
        for n in a.rows:
            results.append(measure(a, n, storage, options))
    finally:
        if moto is not None:
            moto.terminate()
    for r in results:
        n = r["rows"]
        print(f"{n:>10,} rows ({r['files']} files, {r['deltas']} deltas): "
              + "  ".join(f"{k} {r[k]['wall_s']:.1f} s wall / {r[k]['cpu_s']:.1f} s CPU"
                          for k in ("start_no_save", "make_deltas", "start_with_deltas", "full_save",
                                    "start_with_full_save")), flush=True)
    if len(results) >= 2:
        lo, hi = results[0], results[-1]
        dn = hi["rows"] - lo["rows"]
        slopes = {k: 1e6 * (hi[k]["cpu_s"] - lo[k]["cpu_s"]) / dn
                  for k in ("start_no_save", "make_deltas", "start_with_deltas", "start_with_full_save")}
        print("CPU us a row, " + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items()))
    else:
        slopes = {}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                 "storage": "moto S3 (HTTP, this machine)" if a.s3 else "local disk",
                                 "results": results, "cpu_us_a_row": slopes}, indent=2))
    print(f"wrote {a.out}")


def measure(a, n: int, storage, options: dict) -> dict:
    """The steps on an output of ``n`` committed rows (made once under ``--work``; with ``--s3``
    copied to a bucket of the moto server first)."""
    from scale import make

    path, _ = make(a.work, n, "list", rows_per_file=a.rows_per_file)
    local = Path(json.loads(path.read_text())["output"]["uri"])
    shutil.rmtree(local / "_index", ignore_errors=True)
    out = f"s3://bench-deltas/{n}" if options else str(local)
    fs = storage.fs(out)
    if options:
        if not fs.exists("bench-deltas"):
            fs.mkdir("bench-deltas")
        fs.put([str(p) for p in local.glob("part-*.parquet")], out + "/")
    index = out.rstrip("/") + "/_index"

    def clear_index() -> None:
        if fs.exists(index):
            fs.rm(index, recursive=True)

    r = {"rows": n, "rows_per_file": a.rows_per_file, "files": len(list(local.glob("part-*.parquet")))}
    r["start_no_save"] = step(out, "start", options)
    r["make_deltas"] = step(out, "deltas", options)
    r["deltas"] = len(fs.glob(index + "/*.delta.json"))
    r["start_with_deltas"] = step(out, "start", options)
    clear_index()
    r["full_save"] = step(out, "full", options)
    r["start_with_full_save"] = step(out, "start", options)
    clear_index()
    for k in ("start_no_save", "make_deltas", "start_with_deltas", "full_save", "start_with_full_save"):
        assert k == "make_deltas" or k == "full_save" or r[k]["rows"] == n, (k, r[k])
    return r


if __name__ == "__main__":
    main()
