"""Writer throughput with 1, 2 and 4 writer actors (issue 23: writers that scale with the cluster).

Output rows of realistic photos (2250 x 1500, about 100 non-empty masks each, blob-like shapes with
wavy edges in boxes of log-uniform sizes 24-900 px: one run a column, compressed by pycocotools, as
the run's rows are; ``--pool`` distinct photos, cycled under new ids, so no two rows of a file share
their masks) are put in Ray's object store as blocks of ``--block`` rows (what the segmentation
actors hand on), then written by the run's own code: pipeline.WriterPool with K writer actors (the
driver routes the blocks' references and publishes, writers encode and stage) into a local folder,
or into a moto S3 server (``--s3``). Measured per K: wall time from the first block routed to the
last file published, rows/s, MB/s of Parquet published, the driver's CPU seconds, the writers' CPU
seconds (rows a writer-CPU-second: what the work costs a row; time a writer spends waiting uses no
CPU, so it does not show there) and how many of the machine's cores were busy (/proc/stat); and, as the
before, the one writer on the driver (write.Committer + ParquetWriter, the blocks fetched to the
driver). Prints a table and writes JSON.

With ``--deltas S``, each K runs four times, without, with, with and without the run's index deltas
beside the publishing (checkpoints.IndexCheckpoints every S seconds: the driver reads back what it
published, in its own threads, as a run does): what that read-back costs the driver's publishing.

    PYTHONPATH=. .venv/bin/python benchmarks/writers.py [--rows 12000] [--pool 1500] [--writers 1 2 4]
        [--target-mb 16] [--s3] [--deltas S] [--out benchmarks/out/writers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
H, W = 1500, 2250


def photo_masks(rng, n: int = 100) -> list[dict]:
    """``n`` masks of one photo as output rows' mask structs: each a blob in a box of log-uniform size,
    its top and bottom edges per column wavy, encoded by pycocotools from its run lengths."""
    import numpy as np
    from pycocotools import mask as mask_utils

    out = []
    for _ in range(n):
        bw, bh = np.exp(rng.uniform(np.log(24), np.log(900), 2)).astype(int)
        x0, y0 = int(rng.integers(0, W - bw)), int(rng.integers(0, H - bh))
        cols = np.arange(bw)
        t = (cols + 0.5) / bw * 2 - 1
        half = np.sqrt(np.clip(1 - t * t, 0, 1)) * bh / 2
        waves = [rng.uniform(0.02, 0.12) * np.sin(cols / bw * rng.uniform(3, 20) + rng.uniform(0, 6)) for _ in range(2)]
        top = np.clip((bh / 2 - half * (1 + waves[0])).astype(int), 0, bh - 1) + y0
        bottom = np.clip((bh / 2 + half * (1 + waves[1])).astype(int), 0, bh) + y0
        bottom = np.maximum(bottom, top + 1)
        # column-major run lengths over the whole image: zeros up to the first column, then per column
        # zeros above the blob, its ones, zeros below
        counts, zeros = [], x0 * H
        for a, b in zip(top.tolist(), bottom.tolist()):
            counts += [zeros + a, b - a]
            zeros = H - b
        counts.append(zeros + (W - x0 - bw) * H)
        rle = mask_utils.frPyObjects({"size": [H, W], "counts": counts}, H, W)
        area = int(mask_utils.area(rle))
        out.append({"counts": rle["counts"].decode(), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "area": area, "score": float(rng.uniform(0.4, 1)), "stability_score": float(rng.uniform(0.5, 1)),
                    "prompt_index": None, "prompt_kind": None, "prompt_id": None, "category_id": None,
                    "prompt_score": None})
    return out


def pool_rows(n: int, seed: int = 23):
    """``n`` distinct photos' rows (the output schema, rows.output_table)."""
    import numpy as np

    from fastsam_batch.rows import output_table

    rng = np.random.default_rng(seed)
    ids = [f"pool/{i:06d}.jpg" for i in range(n)]
    batch = {"image_id": ids, "uri": [f"s3://bucket/{i}" for i in ids], "width": [W] * n, "height": [H] * n,
             "read_ms": [3.0] * n, "decode_ms": [20.0] * n}
    masks = [photo_masks(rng) for _ in range(n)]
    return output_table(batch, masks, [None] * n, [{"model": 50.0}] * n, model="FastSAM-x.pt", sha256="0" * 64,
                        fingerprint="f" * 24)


def blocks_of(pool, rows: int, block: int):
    """Tables of ``block`` rows, ``rows`` in all, cycling ``pool`` under new image ids."""
    import pyarrow as pa

    out, made = [], 0
    while made < rows:
        k = min(block, rows - made)
        idx = [(made + j) % pool.num_rows for j in range(k)]
        t = pool.take(pa.array(idx))
        t = t.set_column(t.schema.get_field_index("image_id"), "image_id",
                         pa.array([f"img/{made + j:09d}.jpg" for j in range(k)]))
        out.append(t)
        made += k
    return out


class _Bundles:
    """A stand-in for the Ray Data dataset the run consumes: its output blocks' references, as
    RefBundles give them (pipeline.WriterPool.run calls ``_execute_to_iterator``)."""

    def __init__(self, refs, sizes):
        from types import SimpleNamespace

        self.bundles = [SimpleNamespace(blocks=[SimpleNamespace(ref=r, metadata=SimpleNamespace(num_rows=n))],
                                        slices=None) for r, n in zip(refs, sizes)]

    def _execute_to_iterator(self):
        return iter(self.bundles), None, None


def manifest(out: str, writers: int, target_mb: float):
    from fastsam_batch.manifest import parse_manifest

    return parse_manifest({"name": "bench-writers", "input": {"uri": "/nonexistent"},
                           "model": {"checkpoint": "/nonexistent.pt"},
                           "output": {"uri": out, "writers": writers, "target_file_mb": target_mb,
                                      "commit_interval_s": 3600}})


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy_s() -> float:
    """CPU seconds this machine's cores have spent on anything but idling, so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def with_writers(refs, sizes, out: str, k: int, target_mb: float, storage, deltas_s: float | None = None) -> dict:
    """``deltas_s``: as a run does, the driver also reads back what it publishes and saves it as
    index deltas (checkpoints.IndexCheckpoints, every ``deltas_s`` seconds), beside the publishing."""
    from fastsam_batch.pipeline import WriterPool
    from fastsam_batch.writers import Ledger, publish

    files: list[dict] = []
    checkpoints = lease = None
    on_commit = files.append
    if deltas_s is not None:
        from fastsam_batch.checkpoints import IndexCheckpoints
        from fastsam_batch.lease import Lease

        lease = Lease(storage, out, "bench-writers")
        lease.acquire()
        checkpoints = IndexCheckpoints(out, storage, lease.fence(), interval_s=deltas_s)

        def on_commit(stats: dict) -> None:
            files.append(stats)
            checkpoints.published(stats["file"], stats["rows"])
    ledger = Ledger(lambda s: publish(storage, s), on_commit)
    pool = WriterPool(manifest(out, k, target_mb), storage, k, ledger, local_output=not out.startswith("s3://"),
                      run_id="bench")
    pool.start()  # the actors up before the clock starts (a run starts them while Ray Data starts its own)
    import ray
    from scale import proc_cpu_s  # benchmarks/scale.py

    pids = ray.get([h.pid.remote() for h in pool.handles])
    w0 = [proc_cpu_s(p) for p in pids]  # the writers run on this machine (one node)
    t0, c0, m0 = time.perf_counter(), cpu_s(), machine_busy_s()
    if checkpoints is not None:
        checkpoints.start()
    pool.run(_Bundles(refs, sizes), keep=True)  # every file published; the writers kept to read their CPU
    wall, cpu, busy = time.perf_counter() - t0, cpu_s() - c0, machine_busy_s() - m0
    writers_cpu = [proc_cpu_s(p) - c for p, c in zip(pids, w0)]
    pool.stop(clean=pool.died > 0)  # as run() itself stops them when it does not keep them
    r = {"files": len(files), "rows": sum(f["rows"] for f in files), "wall_s": wall, "driver_cpu_s": cpu,
         "writers_cpu_s": writers_cpu, "machine_busy_s": busy, "bytes": published_bytes(out, storage, files)}
    if checkpoints is not None:
        checkpoints.stop()
        r["deltas_saved"] = len(checkpoints.close(flush=False))
        lease.release()
    return r


def on_driver(refs, out: str, target_mb: float, storage) -> dict:
    """main's one writer on the driver: the blocks fetched to it, cut, encoded and put there (since
    2026-12-02 one block after another in one thread: the figures of RESULTS.md before that date
    fetched the blocks in a thread of their own beside the encoding)."""
    import ray

    from fastsam_batch.write import Committer, ParquetWriter

    files: list[dict] = []
    c = Committer(ParquetWriter(out, storage, "zstd"), None, 3600, on_commit=files.append,
                  target_file_bytes=int(target_mb * (1 << 20)))
    t0, c0, m0 = time.perf_counter(), cpu_s(), machine_busy_s()
    for r in refs:  # (the old driver loop took blocks in a thread of their own; the cutting is the same)
        c.add(ray.get(r))
    c.flush()
    wall, cpu, busy = time.perf_counter() - t0, cpu_s() - c0, machine_busy_s() - m0
    return {"files": len(files), "rows": sum(f["rows"] for f in files), "wall_s": wall, "driver_cpu_s": cpu,
            "writers_cpu_s": [], "machine_busy_s": busy, "bytes": published_bytes(out, storage, files)}


def published_bytes(out: str, storage, files: list[dict]) -> int:
    fs = storage.fs(out)
    fs.invalidate_cache()
    return sum(fs.size(f"{out.rstrip('/')}/{f['file']}") for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--pool", type=int, default=1500)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--target-mb", type=float, default=16)
    ap.add_argument("--s3", action="store_true", help="write to a moto S3 server (started here) instead of a folder")
    ap.add_argument("--deltas", type=float, default=None, metavar="S",
                    help="each K also run with the index deltas saved every S seconds beside the publishing")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "writers.json")
    args = ap.parse_args()

    import ray

    from fastsam_batch.storage import Storage

    t0 = time.perf_counter()
    pool = pool_rows(args.pool)
    blocks = blocks_of(pool, args.rows, args.block)
    made_s = time.perf_counter() - t0
    per_row = sum(len(m["counts"]) for ms in pool.column("masks").to_pylist()[:50] for m in ms) / 50
    print(f"{args.pool} distinct photos made in {made_s:.0f} s; {args.rows} rows in blocks of {args.block}; "
          f"masks' counts {per_row / 100:.0f} characters on average; Arrow {pool.nbytes / pool.num_rows / 1e3:.1f} KB a row")
    work = Path(tempfile.mkdtemp(prefix="fsb-writers-"))
    moto = None
    storage = Storage()
    base = str(work)
    if args.s3:
        from bench import moto_server  # benchmarks/bench.py

        moto, endpoint = moto_server()
        storage = Storage({"key": "k", "secret": "s", "endpoint_url": endpoint})
        storage.fs("s3://bench").mkdir("bench")
        base = "s3://bench"
    ray.init(address="local", include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}})
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_avg_at_start": os.getloadavg()},
               "rows": args.rows, "pool": args.pool, "block": args.block, "target_mb": args.target_mb,
               "store": "s3 (moto, this machine)" if args.s3 else "local disk", "runs": []}
    try:
        refs = [ray.put(b) for b in blocks]
        sizes = [b.num_rows for b in blocks]
        del blocks
        plans = [("driver (main)", None, None)]
        for k in args.writers:  # with --deltas: without, with, with, without (ABBA: the machine's drift
            # falls on both alike; each is reported, and their means)
            plans += [(f"{k} writer{'s' if k > 1 else ''}" + ("+deltas" if d is not None else ""), k, d)
                      for d in ([None] if args.deltas is None else [None, args.deltas, args.deltas, None])]
        for i, (name, k, deltas_s) in enumerate(plans):
            out = f"{base}/{i}-{name.split()[0]}-{k or 0}" + ("-deltas" if deltas_s is not None else "")
            r = on_driver(refs, out, args.target_mb, storage) if k is None else \
                with_writers(refs, sizes, out, k, args.target_mb, storage, deltas_s)
            assert r["rows"] == args.rows, r
            # what the writers' work costs a row (CPU only: time a writer spends waiting uses none), and
            # how busy the machine's cores were meanwhile
            wcpu = sum(r["writers_cpu_s"]) or r["driver_cpu_s"]
            r.update(name=name, writers=k, deltas_every_s=deltas_s, rows_per_s=r["rows"] / r["wall_s"], mb_per_s=r["bytes"] / r["wall_s"] / 1e6,
                     rows_per_writer_cpu_s=r["rows"] / wcpu, cores_busy=r["machine_busy_s"] / r["wall_s"],
                     load_avg=os.getloadavg()[0])
            results["runs"].append(r)
            print(f"{name:>21}: {r['rows_per_s']:8.0f} rows/s  {r['mb_per_s']:6.1f} MB/s  ({r['files']} files, "
                  f"{r['bytes'] / 1e6:.0f} MB, {r['wall_s']:.1f} s; driver CPU {r['driver_cpu_s']:.1f} s; writers' CPU "
                  f"{sum(r['writers_cpu_s']):.1f} s, {r['rows_per_writer_cpu_s']:.0f} rows a writer-CPU-second; "
                  f"cores busy {r['cores_busy']:.2f} of {os.cpu_count()}; load {r['load_avg']:.1f}"
                  + (f"; {r['deltas_saved']} deltas" if deltas_s is not None else "") + ")", flush=True)
        if args.deltas is not None:
            for k in args.writers:
                mine = [r for r in results["runs"] if r["writers"] == k]
                means = {d: sum(r["rows_per_s"] for r in mine if (r["deltas_every_s"] is not None) == d)
                         / sum(1 for r in mine if (r["deltas_every_s"] is not None) == d) for d in (False, True)}
                results.setdefault("mean_rows_per_s", {})[str(k)] = {"without": means[False], "with_deltas": means[True]}
                print(f"{k} writer(s): mean {means[False]:.0f} rows/s without deltas, {means[True]:.0f} with "
                      f"({means[True] / means[False] - 1:+.1%})", flush=True)
    finally:
        ray.shutdown()
        if moto is not None:
            moto.terminate()
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
