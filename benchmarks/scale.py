"""`fastsam-batch plan` against an output already holding N committed rows (issue 23).

For each N and input kind (``--kinds``): N synthetic committed rows (the output schema, 1,000 rows a
file by default: ``--rows-per-file``, of this run's fingerprint) and an input of N + 1,000 images (the
N done, 1,000 new). 1,000 rows a file is the old writer's cut and the pessimistic case; with files
cut by bytes (``output.target_file_mb``, 128 MiB by default) a full file of ~100-mask photos holds
about 3,000-6,000 rows (manifest.py), so a billion-image output's are nearer ``--rows-per-file 4000``:

- ``list``: a Parquet list (``uri``, ``image_id``);
- ``inventory``: an S3 Inventory report (Parquet data files of 1,000,000 rows with bucket, key, size
  and a distinct ETag each, and its manifest.json) on a moto S3 server started here;
- ``inventory-csv``: the same report as CSV (gzip'd data files of 1,000,000 rows, every field quoted,
  keys URL-encoded with their slashes as %2F), against the same committed output as ``inventory``;
- ``files``: N + 1,000 empty files on local disk, 10,000 a folder, each with a modification time of
  its own (this costs an inode a file: mind the disk's, ``df -i``).

-> `fastsam-batch plan --json` in a process of its own, its wall time, CPU time (user + system),
peak RSS (its rusage's maximum resident set size, as GNU time reports it) and the peaks of its
anonymous and file-backed resident memory (sampled; the committed index past its bound is a mapped
file, whose pages count in RSS but may be reclaimed) (the machine is shared, so CPU time is the
steadier number), for the code before (``--before``: a commit, exported with
``git archive``) and this tree's, in the same run. Prints a table and writes JSON.

    .venv/bin/python benchmarks/scale.py [--rows 200000 2000000] [--kinds list inventory inventory-csv files]
                                         [--before 3388a75] [--before-timeout 300] [--processes 1 2]
                                         [--out benchmarks/out/scale.json] [--work DIR] [--index-rows N]
                                         [--rows-per-file 1000] [--saved]

``--saved``: this tree's plans run again with the committed index saved under the output
(``_index/``, as a run's end leaves it), the files it covers not read.

Nothing is downloaded; the fixture checkpoint stands in for the model (planning never runs it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CHECKPOINT = ROOT / "tests" / "fixtures" / "fastsam-fixture.pt"
NEW = 1000  # images in the list without a row


FILES_A_FOLDER = 10_000  # ``files``: images a folder
REPORT_ROWS = 1_000_000  # ``inventory``: rows a data file of the report
MTIME0 = 1_700_000_000  # ``files``: the first file's modification time; each next one a second later


def _files_tag(rows_per_file: int) -> str:
    """How an output's (and its manifest's) name tells its rows a file: nothing for 1,000 (the
    earlier runs' outputs, kept in ``--work``, stay valid)."""
    return "" if rows_per_file == 1000 else f"-r{rows_per_file}"


def manifest(work: Path, n: int, kind: str = "list", storage_options: dict | None = None,
             rows_per_file: int = 1000) -> dict:
    src = {"list": {"uri": str(work / f"list-{n}.parquet"), "format": "list"},
           "inventory": {"uri": f"s3://inv-{n}/manifest.json", "format": "s3_inventory"},
           "inventory-csv": {"uri": f"s3://inv-{n}/csv/manifest.json", "format": "s3_inventory"},
           "files": {"uri": str(work / f"files-{n}") + "/"}}[kind]
    outputs = "inventory" if kind == "inventory-csv" else kind  # the same images, the same output
    m = {"name": f"scale-{kind}-{n}", "input": src,
         "output": {"uri": str(work / f"out-{outputs}-{n}{_files_tag(rows_per_file)}")},
         "model": {"checkpoint": str(CHECKPOINT), "device": "cpu"}}
    if storage_options:
        m["storage_options"] = storage_options
    return m


def fingerprint(m: dict) -> str:
    from fastsam_batch.manifest import parse_manifest
    from fastsam_batch.resume import run_fingerprint

    sha = hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest()
    return run_fingerprint(parse_manifest(m), sha)[0]


def image_ids(kind: str, lo: int, hi: int) -> list[str]:
    """The ids of images ``lo`` to ``hi``: for files their paths under the folder."""
    if kind == "files":
        return [f"d{i // FILES_A_FOLDER:05d}/{i:010d}.jpg" for i in range(lo, hi)]
    return [f"img/{i:010d}.jpg" for i in range(lo, hi)]


def versions(kind: str, lo: int, hi: int) -> list[str]:
    """Their source versions (resume.source_version: ``etag/size``) as each kind's listing gives them:
    a list without etag or size columns ``/0``; the report's ETag and size; a local file's
    modification time, size 0."""
    if kind == "list":
        return ["/0"] * (hi - lo)
    if kind in ("inventory", "inventory-csv"):
        return [f"{etag(i)}/{size(i)}" for i in range(lo, hi)]
    return [f"mtime:{float(MTIME0 + i)}/0" for i in range(lo, hi)]


def etag(i: int) -> str:
    return hashlib.md5(str(i).encode()).hexdigest()


def size(i: int) -> int:
    return 100_000 + i % 900_000


def make_input(work: Path, n: int, kind: str) -> None:
    """The input of ``n`` + NEW images (made once, kept in ``work``; an inventory's report kept there
    and put on the S3 server by :func:`put_inventory`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = n + NEW
    if kind == "list":
        ids = image_ids(kind, 0, total)
        pq.write_table(pa.table({"uri": [f"/data/{i}" for i in ids], "image_id": ids}), work / f"list-{n}.parquet")
    elif kind == "inventory":
        report = work / f"inventory-{n}"
        report.mkdir(exist_ok=True)
        for j, lo in enumerate(range(0, total, REPORT_ROWS)):
            hi = min(lo + REPORT_ROWS, total)
            pq.write_table(pa.table({"bucket": ["photos"] * (hi - lo), "key": image_ids(kind, lo, hi),
                                     "size": pa.array([size(i) for i in range(lo, hi)], pa.int64()),
                                     "e_tag": [etag(i) for i in range(lo, hi)]}),
                           report / f"data-{j:04d}.parquet", compression="snappy")
    elif kind == "inventory-csv":
        import gzip
        from urllib.parse import quote_plus

        report = work / f"inventory-csv-{n}"
        report.mkdir(exist_ok=True)
        for j, lo in enumerate(range(0, total, REPORT_ROWS)):
            hi = min(lo + REPORT_ROWS, total)
            with gzip.open(report / f"data-{j:04d}.csv.gz", "wt", compresslevel=6) as f:
                f.writelines(f'"photos","{quote_plus(key, safe="")}","{size(i)}","{etag(i)}"\n'
                             for i, key in zip(range(lo, hi), image_ids(kind, lo, hi)))
        (report / ".complete").write_text("")
    else:
        root = work / f"files-{n}"
        for folder in range(0, total, FILES_A_FOLDER):
            d = root / f"d{folder // FILES_A_FOLDER:05d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(folder, min(folder + FILES_A_FOLDER, total)):
                fd = os.open(d / f"{i:010d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644)
                os.utime(fd, ns=((MTIME0 + i) * 10**9,) * 2)
                os.close(fd)


def put_inventory(work: Path, n: int, storage, kind: str = "inventory") -> None:
    """The report of :func:`make_input` and its manifest.json into bucket ``inv-<n>`` (a CSV one
    under ``csv/``)."""
    fs = storage.fs("s3://")
    bucket = f"inv-{n}"
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    csv = kind == "inventory-csv"
    files = sorted((work / f"{kind}-{n}").glob("data-*.csv.gz" if csv else "data-*.parquet"))
    at = f"{bucket}/csv" if csv else bucket
    for f in files:
        fs.put_file(str(f), f"{at}/data/{f.name}")
    form = {"fileFormat": "CSV", "fileSchema": "Bucket, Key, Size, ETag"} if csv else {"fileFormat": "Parquet"}
    fs.pipe_file(f"{at}/manifest.json", json.dumps({
        "sourceBucket": "photos", "destinationBucket": f"arn:aws:s3:::{bucket}", **form,
        "files": [{"key": f"{'csv/' if csv else ''}data/{f.name}", "size": f.stat().st_size} for f in files]}).encode())


def make(work: Path, n: int, kind: str = "list", storage_options: dict | None = None,
         rows_per_file: int = 1000) -> tuple[Path, float]:
    """The input and the committed output of ``n`` rows (made once, kept in ``work``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastsam_batch.schema import OUTPUT_SCHEMA

    m = manifest(work, n, kind, storage_options, rows_per_file)
    path = work / f"manifest-{kind}-{n}{_files_tag(rows_per_file)}.json"
    out = Path(m["output"]["uri"])
    done = out / ".complete"
    t0 = time.perf_counter()
    if kind == "inventory-csv" and not (work / f"inventory-csv-{n}" / ".complete").exists():
        make_input(work, n, kind)  # (its output may be the Parquet report's, made already)
    if not done.exists():
        out.mkdir(parents=True, exist_ok=True)
        if kind != "inventory-csv":
            make_input(work, n, kind)
        fp = fingerprint(m)
        k = rows_per_file
        base = {f.name: pa.nulls(k, f.type) for f in OUTPUT_SCHEMA}
        fill = {"status": pa.array(["ok"] * k), "masks": pa.array([[]] * k, OUTPUT_SCHEMA.field("masks").type),
                "num_masks": pa.array([0] * k, pa.int32()), "num_prompt_errors": pa.array([0] * k, pa.int32()),
                "prompts": pa.array([[]] * k, OUTPUT_SCHEMA.field("prompts").type),
                "model": pa.array(["fastsam-fixture.pt"] * k), "checkpoint_sha256": pa.array(["0" * 64] * k),
                "run_fingerprint": pa.array([fp] * k),
                "width": pa.array([640] * k, pa.int32()), "height": pa.array([480] * k, pa.int32())}
        base.update(fill)
        for s in range(0, n, k):
            chunk = image_ids(kind, s, min(s + k, n))
            cols = {name: (col if len(chunk) == k else col.slice(0, len(chunk))) for name, col in base.items()}
            cols["image_id"] = pa.array(chunk)
            cols["uri"] = pa.array([f"/data/{i}" for i in chunk])
            cols["source_version"] = pa.array(versions(kind, s, s + len(chunk)))
            name = hashlib.sha256("\n".join(chunk).encode()).hexdigest()[:20]
            pq.write_table(pa.table(cols, schema=OUTPUT_SCHEMA), out / f"part-{name}.parquet", compression="zstd")
        done.write_text("")
    path.write_text(json.dumps(m))
    return path, time.perf_counter() - t0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (planning's process pool), from /proc's children lists."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return out


def _is_pool(pid: int) -> bool:
    """A process of planning's pool (multiprocessing's spawned workers and resource tracker)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing" in f.read()
    except OSError:
        return False


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one process so far (/proc/<pid>/stat), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _status(pid: int) -> dict[str, int]:
    """kB fields of /proc/<pid>/status (RssAnon, RssFile, RssShmem, VmHWM); {} once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                    if k in ("RssAnon", "RssFile", "RssShmem", "VmHWM")}
    except (OSError, ValueError):
        return {}


def plan(code: Path, manifest_path: Path, timeout: float, index_rows: int | None = None,
         processes: int | None = None) -> dict:
    """``fastsam-batch plan --json`` with the package from ``code``, in a process of its own: wall
    time, CPU time (user + system) and peak RSS from its rusage (``wait4``: what GNU time reports),
    and its anonymous and file-backed resident memory (RssAnon, RssFile from /proc/<pid>/status)
    sampled every 20 ms, their peaks kept: mapped files' pages (the committed index past its bound)
    count in RSS, but as file pages the kernel may reclaim; anonymous memory is what must stay
    bounded. ``index_rows``: $FASTSAM_BATCH_INDEX_ROWS for it (the index's memory bound);
    ``processes``: $FASTSAM_BATCH_PLAN_PROCESSES (planning's process pool; the CPU time from wait4
    includes the pool's processes, which the plan process waits for; the plan process's own is
    sampled from /proc, and the RSS of it and its pool's processes summed at each sample: not the
    short-lived GPU probe of the actor sizing, another child, about 400 MB while it imports torch)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    if index_rows:
        env["FASTSAM_BATCH_INDEX_ROWS"] = str(index_rows)
    if processes:
        env["FASTSAM_BATCH_PLAN_PROCESSES"] = str(processes)
    # the command as installed (console_main: no abort at exit), or main() for a commit before it
    prog = ("import sys; from fastsam_batch import cli; "
            "cli.console_main() if hasattr(cli, 'console_main') else sys.exit(cli.main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", prog, "plan", "--json", str(manifest_path)]
    # `python -c` puts the working directory first on sys.path: run in ``code`` so that its package is the one imported
    where = subprocess.run([sys.executable, "-c", "import fastsam_batch; print(fastsam_batch.__file__)"], env=env,
                           cwd=code, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(code)), (where, code)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, cwd=code, stdout=out, stderr=err, text=True)
        peak = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0, "tree_anon": 0, "tree_rss": 0, "tree_processes": 0}
        own_cpu = 0.0
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            for k, v in _status(p.pid).items():
                if k in peak:
                    peak[k] = max(peak[k], v)
            own_cpu = proc_cpu_s(p.pid) or own_cpu
            tree = [p.pid] + [q for q in _tree(p.pid)[1:] if _is_pool(q)]  # not the sizing's GPU probe
            tree = [_status(q) for q in tree]
            peak["tree_anon"] = max(peak["tree_anon"], sum(t.get("RssAnon", 0) for t in tree))
            peak["tree_rss"] = max(peak["tree_rss"], sum(t.get("RssAnon", 0) + t.get("RssFile", 0)
                                                         + t.get("RssShmem", 0) for t in tree))
            peak["tree_processes"] = max(peak["tree_processes"], len(tree))
            if time.perf_counter() - t0 > timeout:
                p.kill()
                os.wait4(p.pid, 0)
                return {"wall_s": None, "timed_out_after_s": timeout, "package": where}
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode:
        raise RuntimeError(f"plan failed ({p.returncode}): {stderr[-2000:]}")
    d = json.loads(stdout[stdout.index("{"):])
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "peak_rss_anon_mb": round(peak["RssAnon"] / 1024, 1),
            "peak_rss_file_mb": round(peak["RssFile"] / 1024, 1), "peak_rss_shmem_mb": round(peak["RssShmem"] / 1024, 1),
            "plan_process_cpu_s": round(own_cpu, 2), "peak_tree_rss_mb": round(peak["tree_rss"] / 1024, 1),
            "peak_tree_anon_mb": round(peak["tree_anon"] / 1024, 1), "processes_seen": peak["tree_processes"],
            "plan_processes_env": processes, "index_rows": index_rows, "images_to_do": d["images_to_do"],
            "images_done": d["images_done"], "duplicates_in_input": d["duplicates_in_input"], "package": where}


SAVE = """
import sys, time
from fastsam_batch.lease import Lease
from fastsam_batch.resume import read_committed
from fastsam_batch.saved_index import save_index
from fastsam_batch.storage import Storage
uri = sys.argv[1]
s = Storage()
lease = Lease(s, uri, "scale-benchmark-save")
lease.acquire()
t0 = time.perf_counter()
c = read_committed(uri, s)
t1 = time.perf_counter()
save_index(uri, s, c, fence=lease.fence())
print(round(t1 - t0, 2), round(time.perf_counter() - t1, 2))
c.close()
lease.release()
"""


def save_index_of(output: Path) -> dict:
    """The committed index of ``output`` saved under ``_index/`` as a run's end saves it (this tree's
    code, in a process of its own, under a lease of its own): seconds to read it, and to save it."""
    import shutil

    shutil.rmtree(output / "_index", ignore_errors=True)
    r = subprocess.run([sys.executable, "-c", SAVE, str(output)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                       cwd=ROOT, capture_output=True, text=True, check=True)
    read_s, save_s = (float(x) for x in r.stdout.split()[-2:])
    return {"read_s": read_s, "save_s": save_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[200_000, 2_000_000])
    ap.add_argument("--kinds", nargs="+", default=["list"], choices=["list", "inventory", "inventory-csv", "files"],
                    help="input kinds, each with its own committed output")
    ap.add_argument("--before", default="3388a75", help="the commit to compare with ('' to skip)")
    ap.add_argument("--before-timeout", type=float, default=300, help="seconds before a `before` plan is stopped")
    ap.add_argument("--before-rows-max", type=int, default=2_000_000, help="larger N: `before` not run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "scale.json"))
    ap.add_argument("--work", default=None, help="where the synthetic outputs go (kept; default: a temp folder)")
    ap.add_argument("--index-rows", type=int, default=None,
                    help="$FASTSAM_BATCH_INDEX_ROWS for this tree's plan (the committed index's memory bound)")
    ap.add_argument("--rows-per-file", type=int, default=1000,
                    help="rows a committed file (1,000: the pessimistic case; 4,000: about what 128 MiB files of "
                         "~100-mask photos hold)")
    ap.add_argument("--processes", type=int, nargs="+", default=[None],
                    help="$FASTSAM_BATCH_PLAN_PROCESSES for this tree's plan, one run each (default: unset)")
    ap.add_argument("--saved", action="store_true",
                    help="this tree's plans again with the committed index saved under the output's _index/ (as "
                         "a run's end leaves it; the other plans run without one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fastsam-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    codes = {"after": ROOT}
    if args.before:
        before = work / f"code-{args.before}"
        if not before.exists():
            before.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "fastsam_batch"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        codes = {"before": before, "after": ROOT}
    results = {"cpus": os.cpu_count(), "before_commit": args.before, "rows_per_file": args.rows_per_file,
               "after_commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True).stdout.strip(), "rows": {}}
    moto, options, storage = None, None, None
    if {"inventory", "inventory-csv"} & set(args.kinds):  # the report on a moto S3 server of this run's own
        from bench import moto_server  # benchmarks/bench.py

        from fastsam_batch.storage import Storage

        moto, endpoint = moto_server()
        options = {"endpoint_url": endpoint, "key": "k", "secret": "s"}
        storage = Storage(options)
    print(f"{'committed rows':>15s} {'input':>9s} {'code':>9s} {'plan wall s':>12s} {'CPU s':>8s} {'plan proc':>9s} "
          f"{'peak RSS MB':>12s} {'anon MB':>8s} {'file MB':>8s} {'tree MB':>8s} {'to do':>7s} {'done':>10s}")
    runs = [(label, code, None) for label, code in codes.items() if label == "before"] + \
        [("after" + (f"-p{p}" if p else ""), ROOT, p) for p in args.processes]
    try:
        for n in args.rows:
            for kind in args.kinds:
                report = kind.startswith("inventory")
                mpath, made_s = make(work, n, kind, options if report else None, args.rows_per_file)
                if report:
                    put_inventory(work, n, storage, kind)
                key = str(n) if kind == "list" else f"{kind}-{n}"  # a list's as in earlier runs' JSON
                row = results["rows"][key] = {"kind": kind, "committed": n, "made_s": round(made_s, 1)}
                output = Path(json.loads(mpath.read_text())["output"]["uri"])
                for label, code, processes in runs + [("saved" + (f"-p{p}" if p else ""), ROOT, p)
                                                      for p in (args.processes if args.saved else [])]:
                    if label == "before" and n > args.before_rows_max:
                        continue
                    if label.startswith("saved") and "index_saved" not in row:
                        row["index_saved"] = save_index_of(output)
                    elif not label.startswith("saved"):
                        import shutil

                        shutil.rmtree(output / "_index", ignore_errors=True)  # (a save from an earlier run)
                    r = row[label] = plan(code, mpath, args.before_timeout if label == "before" else 3600,
                                          args.index_rows if label != "before" else None, processes)
                    if r.get("wall_s") is None:
                        print(f"{n:15,d} {kind:>9s} {label:>9s} {'> %d' % r['timed_out_after_s']:>12s} {'':>12s} "
                              "(stopped)", flush=True)
                        continue
                    assert (r["images_to_do"], r["images_done"]) == (NEW, n), r
                    print(f"{n:15,d} {kind:>9s} {label:>9s} {r['wall_s']:12.1f} {r['cpu_s']:8.1f} "
                          f"{r['plan_process_cpu_s']:9.1f} {r['peak_rss_mb']:12.0f} {r['peak_rss_anon_mb']:8.0f} "
                          f"{r['peak_rss_file_mb']:8.0f} {r['peak_tree_rss_mb']:8.0f} {r['images_to_do']:7,d} "
                          f"{r['images_done']:10,d}", flush=True)
                out = Path(args.out)  # written after each: a long one cut short keeps the others
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1))
    finally:
        if moto is not None:
            moto.terminate()
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
