"""Listing benchmark: a prefix of many keys listed one page after another (``list_workers: 1``, the
only way before) vs in parallel (sub-prefixes and key ranges, ``list_workers: 16``), on a moto S3
server in a process of its own, filled directly (100,000 PUTs over HTTP would take minutes).

    .venv/bin/python benchmarks/listing.py                  # 100,000 keys, two layouts, moto as is
    .venv/bin/python benchmarks/listing.py --latency-ms 30  # each request answered 30 ms late (as S3)

Layouts: ``folders`` (imgs/000/000000.jpg ..., 100 sub-prefixes) and ``flat`` (imgs/000000.jpg ...,
one prefix). Both listings must give the same keys (checked). Prints a table and writes
benchmarks/out/listing.json. moto answers a LIST by walking every key of the bucket under one
Python lock, so on moto parallel requests mostly queue: the latency run shows what a store that
answers requests concurrently (S3) does with them.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVER = r"""
import sys, time
from moto.server import DomainDispatcherApplication, create_backend_app
from moto.s3.models import s3_backends
from werkzeug.serving import make_server

port, keys, latency = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
backend = s3_backends["123456789012"]["global"]
for bucket, layout in (("folders", "imgs/{f:03d}/{i:06d}.jpg"), ("flat", "imgs/{i:06d}.jpg")):
    backend.create_bucket(bucket, "us-east-1")
    for i in range(keys):
        backend.put_object(bucket, layout.format(f=i // 1000, i=i), b"\xff\xd8")
app = DomainDispatcherApplication(create_backend_app)

def slow(environ, start_response):
    time.sleep(latency)
    return app(environ, start_response)

print("ready", flush=True)
make_server("127.0.0.1", port, slow if latency else app, threaded=True).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "listing.json"))
    args = ap.parse_args()

    from fastsam_batch.inputs.files import iter_s3, iter_s3_parallel
    from fastsam_batch.storage import Storage

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(args.keys), str(args.latency_ms / 1000)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        t0 = time.perf_counter()
        assert server.stdout.readline().strip() == "ready"
        fill_s = time.perf_counter() - t0
        storage = Storage({"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"})
        fs = storage.fs("s3://folders/")
        results = {"keys": args.keys, "workers": args.workers, "latency_ms": args.latency_ms, "fill_s": fill_s,
                   "layouts": {}}
        for layout in ("folders", "flat"):
            row = {}
            keys = {}
            for name, listing in (("sequential", lambda: iter_s3(fs, f"{layout}/imgs/")),
                                  ("parallel", lambda: iter_s3_parallel(fs, f"{layout}/imgs/", args.workers))):
                t0 = time.perf_counter()
                got = [p for p, _ in listing()]
                row[f"{name}_s"] = time.perf_counter() - t0
                keys[name] = got
            assert len(keys["parallel"]) == len(set(keys["parallel"])), "a key listed twice"
            assert set(keys["parallel"]) == set(keys["sequential"]) and len(keys["sequential"]) == args.keys
            row["speedup"] = row["sequential_s"] / row["parallel_s"]
            results["layouts"][layout] = row
            print(f"{layout:8s} {args.keys:,} keys: sequential {row['sequential_s']:6.2f} s, parallel "
                  f"({args.workers} workers) {row['parallel_s']:6.2f} s, x{row['speedup']:.2f}  (same keys)", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    finally:
        server.kill()


if __name__ == "__main__":
    main()
