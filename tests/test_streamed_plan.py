"""The plan streams into the run (issue 23): segmentation starts on the first plan parts while the
rest of the input is still being listed; every image gets exactly one row, the real ones their
ground truth's masks.

The listing is held by the test, not timed: the input is a folder of two lists on the moto S3 server,
read through the fault proxy, which holds the request that reads the second list until the test lets
it go. While it is held the plan cannot end; rows committed meanwhile can only come from plan parts
segmented before the plan ended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from conftest import CHECKPOINT, make_bucket, save_shapes
from s3_fault_proxy import FaultProxy

# The plan's parts are given to the plan a listing chunk (job.LIST_CHUNK, 1,000 listed rows) at a
# time, so the first list has more rows than one chunk: its first chunk is on file (20 parts of 50,
# past job.STREAM_AFTER_FILES) before the second list is read.
FIRST_LIST = 1_010
SECOND_LIST = 12
PART_ROWS = 50


def _held_listing(s3_env, fs, tmp_path, bucket: str):
    """Two lists under s3://<bucket>/lists/ (real images first and last; between them ids whose
    objects do not exist: error rows, quick on a CPU), a job over them, and the proxy rule that holds
    the second list's read (not its listing or HEAD). A list without an id column: an image's id is
    its URI without the scheme."""
    make_bucket(s3_env, bucket)
    names = save_shapes(tmp_path / "imgs", range(8600, 8604))
    for n in names:
        fs.put_file(str(tmp_path / "imgs" / n), f"{bucket}/imgs/{n}")
    first = [f"{bucket}/imgs/{n}" for n in names[:2] + [f"missing-{i:05d}.png" for i in range(FIRST_LIST - 2)]]
    second = [f"{bucket}/imgs/{n}" for n in [f"late-{i:03d}.png" for i in range(SECOND_LIST - 2)] + names[2:]]
    for key, ids in (("lists/a.csv", first), ("lists/b.csv", second)):
        fs.pipe_file(f"{bucket}/{key}", ("uri\n" + "".join(f"s3://{i}\n" for i in ids)).encode())
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump({
        "name": "streamed", "input": {"uri": f"s3://{bucket}/lists/", "format": "list"},
        "model": {"checkpoint": str(CHECKPOINT), "imgsz": 320, "conf": 0.4, "device": "cpu"},
        "output": {"uri": f"s3://{bucket}/masks/", "commit_interval_s": 1},
        "runtime": {"batch_size": 2, "plan_part_rows": PART_ROWS, "num_actors": 1},
        # the held read is not timed out (and retried, held again) while the test waits on the run
        "storage_options": {"config_kwargs": {"read_timeout": 900, "retries": {"max_attempts": 8, "mode": "standard"}}},
    }))

    def holds(method, path, headers):
        return "hold" if method == "GET" and path.split("?")[0].endswith("/lists/b.csv") else None

    return m, first, second, [f"{bucket}/imgs/{n}" for n in names], holds


def _start(m, s3_env, endpoint: str, tmp_path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | s3_env | {
        "AWS_ENDPOINT_URL": endpoint, "FASTSAM_BATCH_CACHE": str(tmp_path / "cache"),
        "FASTSAM_BATCH_PLAN_PROCESSES": "1"}  # planned in order on the driver, on any machine
    # Python's SIGINT handler in the run: a test run started in the background by a shell ignores
    # SIGINT, and the run would inherit that (exec keeps an ignored signal ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([str(Path(sys.executable).with_name("fastsam-batch")), "run", str(m)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_for(proc, fs, condition, what: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        fs.invalidate_cache()
        if condition():
            return
        time.sleep(0.5)


def _committed(fs, bucket: str) -> list[str]:
    fs.invalidate_cache()
    if not fs.glob(f"{bucket}/masks/part-*.parquet"):
        return []
    return pads.dataset(f"{bucket}/masks/", format="parquet", filesystem=fs).to_table(
        columns=["image_id"]).column("image_id").to_pylist()


def _stop(proc) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def test_a_long_list_is_segmented_while_it_is_still_planned(s3_env, s3fs_client, tmp_path):
    fs = s3fs_client
    m, first, second, real, holds = _held_listing(s3_env, fs, tmp_path, "streamed")
    with FaultProxy(s3_env["AWS_ENDPOINT_URL"], [None], rule=holds) as proxy:
        proc = _start(m, s3_env, proxy.url, tmp_path)
        try:  # a committed file, while the second list is held: the plan has not ended
            _wait_for(proc, fs, lambda: fs.glob("streamed/masks/part-*.parquet"), "a file committed, the plan held")
            assert proxy.injected["hold"] >= 1 and not proxy.released.is_set()
            early = _committed(fs, "streamed")
            assert early and set(early) <= set(first)
        except BaseException:  # the test failed: the run is stopped before its proxy goes
            proxy.release()
            _stop(proc)
            raise
        proxy.release()
        out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, out + err
    assert "segmentation starts while the rest is planned" in out, out
    assert "more plan files" in out, out  # the rest, planned once the second list was read: a second wave
    assert f"planned {FIRST_LIST + SECOND_LIST} images from s3://streamed/lists/" in out, out

    fs.invalidate_cache()
    rows = pads.dataset("streamed/masks/", format="parquet", filesystem=fs).to_table().to_pylist()
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(first + second)  # every image once
    by_id = {r["image_id"]: r for r in rows}
    assert all(by_id[n]["status"] == "ok" and by_id[n]["num_masks"] > 0 for n in real)
    assert all(by_id[i]["status"] == "error" for i in ids if i not in real)
    record = json.loads(fs.cat_file("streamed/masks/_run.json"))
    assert (record["images"], record["rows"]) == (len(ids), len(ids)), record
    summary = record["last_run_summary"]
    assert summary["images_planned"] == len(ids) and summary["images_ok"] == len(real), summary
    assert not fs.glob("streamed/masks/_plan/**")  # the plan's files removed at the end

    # The real images' masks against their ground truth (the shapes drawn in them): segmentation is
    # whole whichever wave an image came in.
    from pycocotools import mask as mask_utils
    from shapes import make_image

    best = []
    for seed, n in zip(range(8600, 8604), real):
        row = by_id[n]
        ours = [mask_utils.decode({"size": [row["height"], row["width"]], "counts": mk["counts"].encode()}).astype(bool)
                for mk in row["masks"]]
        for shape in make_image(seed)[1]:
            best.append(max(((shape.mask & m).sum() / (shape.mask | m).sum() for m in ours), default=0.0))
    assert best and sum(best) / len(best) >= 0.9, best


def test_ctrl_c_between_waves_keeps_what_was_committed_and_the_same_command_resumes(s3_env, s3fs_client, tmp_path):
    """The second list's read held: the first wave (the first chunk's plan files) is segmented and
    published, and the run says it waits for planning. Then Ctrl-C: the run says planning stops at its
    next batch (the held read let go only then), exits 130 saying what is committed: exactly the first
    wave's images, once. The same command, nothing held, resumes: every image once."""
    import threading

    fs = s3fs_client
    m, first, second, real, holds = _held_listing(s3_env, fs, tmp_path, "stopped")
    with FaultProxy(s3_env["AWS_ENDPOINT_URL"], [None], rule=holds) as proxy:
        proc = _start(m, s3_env, proxy.url, tmp_path)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        try:
            _wait_for(proc, fs, lambda: any("waiting for planning" in line for line in lines),
                      "the first wave done, the run waiting for planning")
            assert proxy.injected["hold"] >= 1 and not proxy.released.is_set()
            proc.send_signal(signal.SIGINT)
            _wait_for(proc, fs, lambda: any(line.startswith("stopping: planning ends") for line in lines),
                      "the run stopping its planning")
        finally:
            proxy.release()  # the held read answered: planning sees the stop at its next batch
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise
        reader.join(10)
        err = proc.stderr.read()
    out = "".join(lines)
    assert proc.returncode == 130, out + err
    done = _committed(fs, "stopped")
    # the first wave: plan files of the first chunk, in listed order: those images, once each
    assert len(done) >= 16 * PART_ROWS and len(done) % PART_ROWS == 0, len(done)
    assert sorted(done) == sorted(first[:len(done)])
    assert f"interrupted: {len(done)} of" in err, err
    record = json.loads(fs.cat_file("stopped/masks/_run.json"))
    assert record["images"] == len(done) and record["last_run"]["status"] == "interrupted"

    proc = _start(m, s3_env, s3_env["AWS_ENDPOINT_URL"], tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    assert f"resuming: {len(done)} images already have rows" in out, out
    ids = _committed(fs, "stopped")
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(first + second)
    fs.invalidate_cache()
    assert json.loads(fs.cat_file("stopped/masks/_run.json"))["images"] == len(ids)


# plan.StreamedPlan without Ray: the plan of a real list, planned in its thread ----------------------

def _list_job(tmp_path, rows: int):
    import pyarrow as pa

    from fastsam_batch.manifest import parse_manifest

    ids = [f"img/{i:06d}.jpg" for i in range(rows)]
    pq_path = tmp_path / "list.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"uri": [f"s3://b/{i}" for i in ids], "image_id": ids}), pq_path)
    return parse_manifest({"name": "t", "input": {"uri": str(pq_path), "format": "list"},
                           "output": {"uri": str(tmp_path / "out")}, "model": {"checkpoint": "/x.pt"},
                           "runtime": {"plan_part_rows": 100}}), ids


def _streamed(m, summary, stop_after_files: int | None = None, on_stop=lambda: None):
    from fastsam_batch.index import Committed
    from fastsam_batch.job import PromptAttacher, plan_job
    from fastsam_batch.plan import PlanParts, StreamedPlan
    from fastsam_batch.storage import Storage

    storage = Storage()

    class Parts(PlanParts):  # asks planning to stop once it has written some files (a Ctrl-C's stop)
        def _write_table(self, part):
            super()._write_table(part)
            if stop_after_files is not None and len(self.files) >= stop_after_files and not stream.stop.is_set():
                on_stop()
                stream.stop.set()

    parts = Parts(m.output.uri, storage, m.runtime.plan_part_rows)
    stream = StreamedPlan(parts, summary, lambda own, stop: plan_job(m, storage, own, Committed(),
                                                                     PromptAttacher(m, storage), plan=parts, stop=stop))
    return stream, parts, storage


def test_streamed_plan_counts_reach_the_run_summary_once_and_the_plan_is_the_whole_plans(tmp_path, monkeypatch):
    from fastsam_batch.plan import read_plan_part
    from fastsam_batch.summary import RunSummary

    monkeypatch.setenv("FASTSAM_BATCH_PLAN_PROCESSES", "1")
    m, ids = _list_job(tmp_path, 25_000)
    summary = RunSummary(name="t", images_ok=7)  # the run's own counts before planning are kept
    stream, parts, storage = _streamed(m, summary)
    stream.start()
    synced = 0
    while not stream.done.is_set():  # the run's thread adds the planner's counts as it goes
        synced += stream.sync()
        assert summary.images_planned <= len(ids)
        stream.wait(len(parts.files))
    planned = stream.finish()
    synced += stream.sync()
    assert summary.images_planned == len(ids) and summary.images_ok == 7 and synced == 0  # nothing found done
    assert summary.input_format == "list" and planned.plan is parts
    items = [r["image_id"] for f in parts.files for r in read_plan_part(f, storage)]
    assert items == ids  # every listed image once, in order, on file (more than one part)
    assert stream.finish() is planned and summary.images_planned == len(ids)  # finish again adds nothing


def test_a_stopped_plan_returns_what_it_planned_and_an_error_reaches_the_run(tmp_path, monkeypatch):
    from fastsam_batch.plan import read_plan_part
    from fastsam_batch.summary import RunSummary

    monkeypatch.setenv("FASTSAM_BATCH_PLAN_PROCESSES", "1")
    m, ids = _list_job(tmp_path, 200_000)
    summary = RunSummary(name="t")
    stream, parts, storage = _streamed(m, summary, stop_after_files=3)
    stream.start()
    planned = stream.finish()
    on_file = [r["image_id"] for f in parts.files for r in read_plan_part(f, storage)]
    # the stop is seen at the next batch: the first batch's images (65,536 list rows), in order, on file
    assert 300 <= len(on_file) < len(ids) and on_file == ids[:len(on_file)]
    assert planned.plan.count == len(on_file) == summary.images_planned

    # A list whose rows lack the URI column: planning's error is raised in the run's thread.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["s3://b/x.jpg"]}), tmp_path / "list.parquet")
    stream, parts, storage = _streamed(m, RunSummary(name="t"))
    stream.start()
    with pytest.raises(Exception, match="no 'uri' column"):
        stream.wait(0)
    with pytest.raises(Exception, match="no 'uri' column"):
        stream.finish()


def _spawned_children() -> set[int]:
    """This process's children that are multiprocessing ``spawn`` processes (a plan pool's, a split
    repeat check's), from /proc (not the resource tracker, not a test's servers)."""
    import glob

    out = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            pids = open(path).read().split()
        except OSError:
            continue
        for pid in map(int, pids):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                out.add(pid)
    return out


def test_a_plan_stopped_in_its_thread_ends_its_process_pool(tmp_path, monkeypatch):
    """Planning in its thread with a process pool (2 processes, started at once), stopped part-way
    (a Ctrl-C's stop): it returns what it planned, in order, and the pool's processes are gone."""
    import time as _time

    from fastsam_batch import parallel
    from fastsam_batch.plan import read_plan_part
    from fastsam_batch.summary import RunSummary

    monkeypatch.setenv("FASTSAM_BATCH_PLAN_PROCESSES", "2")
    monkeypatch.setattr(parallel, "POOL_AFTER_ROWS", 0)
    m, ids = _list_job(tmp_path, 400_000)
    seen: set[int] = set()
    stream, parts, storage = _streamed(m, RunSummary(name="t"), stop_after_files=3,
                                       on_stop=lambda: seen.update(_spawned_children()))
    stream.start()
    planned = stream.finish()
    assert seen, "no pool process was running when planning was stopped"
    on_file = [r["image_id"] for f in parts.files for r in read_plan_part(f, storage)]
    assert 300 <= len(on_file) < len(ids) and on_file == ids[:len(on_file)] and planned.plan.count == len(on_file)
    deadline = _time.monotonic() + 60
    while seen & _spawned_children() and _time.monotonic() < deadline:
        _time.sleep(0.05)
    assert not seen & _spawned_children()
