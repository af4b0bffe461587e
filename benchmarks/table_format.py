"""Plain Parquet files published one by one (this tool) against a Delta Lake table's transactional
appends (``deltalake``, delta-rs), for the decision in ARCHITECTURE.md (issue 23).

The same staged files (Parquet of the output schema, ``--rows`` rows each, made once) are made
visible ``--files`` times, one file a commit, as the driver publishes them:
- plain: ``os.replace`` of a staged temporary file into ``part-<hash>.parquet`` (writers.publish);
- delta: the file moved into the table's folder, then one transaction adding it
  (``DeltaTable.create_write_transaction`` with one ``AddAction``: the driver commits names, the
  bytes were written elsewhere), its log entry ``_delta_log/<version>.json`` and, every 100
  commits, a checkpoint written by delta-rs.
Measured: commits a second, the driver's CPU per commit, the files under the table; and what a
reader without Delta support sees after one repair (a file rewritten without a row: a Delta
remove + add), i.e. whether ``*.parquet`` still reads the output. Local disk only (S3 commits add
a conditional PUT each, not measured here). ``deltalake`` is not a dependency of the project:

    pip install --target /tmp/dl deltalake
    PYTHONPATH=/tmp/dl:. .venv/bin/python benchmarks/table_format.py [--files 300] [--rows 200]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "table_format.json")
    args = ap.parse_args()

    import numpy as np
    from deltalake import DeltaTable, write_deltalake
    from deltalake.transaction import AddAction

    from fastsam_batch.write import parquet_file_bytes, part_name
    from test_file_size import REALISTIC, photos

    import pyarrow as pa

    rng = np.random.default_rng(1)
    table = photos(0, args.rows, rng, alphabet=REALISTIC)
    ids = table.schema.get_field_index("image_id")

    def file_of(i: int):  # file i: the same rows under ids of its own
        t = table.set_column(ids, "image_id", pa.array([f"f{i:05d}/{k:04d}" for k in range(args.rows)]))
        return t, parquet_file_bytes(t, "zstd")

    files = [file_of(i) for i in range(args.files)]
    data = files[0][1]
    work = Path(tempfile.mkdtemp(prefix="fsb-table-"))
    results = {"files": args.files, "rows_per_file": args.rows, "file_bytes": len(data)}
    try:
        # plain: a staged temporary file, os.replace'd
        plain = work / "plain"
        plain.mkdir()
        t0, c0 = time.perf_counter(), cpu_s()
        for i, (t, b) in enumerate(files):
            tmp = plain / f"_tmp-{i}"
            tmp.write_bytes(b)
            os.replace(tmp, plain / part_name(t.column("image_id").to_pylist()))
        results["plain"] = {"s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0}
        # delta: the same bytes put beside the table, then one transaction per file adding it
        delta = work / "delta"
        write_deltalake(str(delta), table.slice(0, 0), mode="append")
        dt = DeltaTable(str(delta))
        schema = dt.schema()
        staged = []
        for t, b in files:
            name = part_name(t.column("image_id").to_pylist())
            (delta / name).write_bytes(b)
            staged.append((name, len(b)))
        t0, c0 = time.perf_counter(), cpu_s()
        for name, size in staged:
            add = AddAction(name, size, {}, int(time.time() * 1000), True,
                            json.dumps({"numRecords": args.rows}))
            dt.create_write_transaction([add], mode="append", schema=schema)
        results["delta"] = {"s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0,
                            "log_files": len(list((delta / "_delta_log").iterdir())),
                            "version": DeltaTable(str(delta)).version()}
        # a repair as Delta makes it: the first file rewritten without a row (remove + add in one commit)
        dt = DeltaTable(str(delta))
        t0 = time.perf_counter()
        try:
            dt.delete("image_id = 'f00000/0000'")  # delta-rs rewrites the file: a remove and an add
            results["delta"]["delete_one_row_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - reported
            results["delta"]["delete_one_row_error"] = f"{type(e).__name__}: {e}"
        import duckdb

        n_delta = DeltaTable(str(delta)).to_pyarrow_dataset().count_rows()
        n_glob = duckdb.connect().execute(f"select count(*) from read_parquet('{delta}/*.parquet')").fetchall()[0][0]
        results["readers_after_one_row_deleted"] = {
            "delta_reader_rows": n_delta, "plain_parquet_glob_rows": n_glob,
            "expected": args.files * args.rows - 1}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for k in ("plain", "delta"):
        r = results[k]
        r["commits_per_s"] = args.files / r["s"]
        r["cpu_ms_per_commit"] = 1000 * r["cpu_s"] / args.files
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
