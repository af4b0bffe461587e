"""Re-running a job finishes it instead of redoing it; output is exactly one row per image."""

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

from conftest import run_cli
from fastsam_batch.resume import list_parts_stamped, read_committed
from fastsam_batch.saved_index import load_index
from fastsam_batch.storage import Storage
from shapes import make_image
from test_repair import index_rows, plain_read

N_IMAGES = 24


@pytest.fixture()
def job(tmp_path, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(N_IMAGES):
        make_image(3000 + i, size=(160, 128))[0].save(images / f"{i:03d}.png")
    out = tmp_path / "out"

    def manifest(name="m.yaml", conf=0.4, actors=2, **runtime):
        p = tmp_path / name
        p.write_text(yaml.safe_dump({
            "name": "resume",
            "input": {"uri": str(images)},
            "model": {"checkpoint": str(checkpoint), "imgsz": 320, "conf": conf, "device": "cpu"},
            "output": {"uri": str(out), "rows_per_file": 2},
            # the plan in files under out/_plan/; two actors, so that one held by the test-only slow
            # hook (the driver-kill test) leaves the other committing (one where that is not needed:
            # sooner on 2 cores)
            "runtime": {"batch_size": 2, "plan_part_rows": 5, "num_actors": actors, **runtime},
        }))
        return p

    return {"images": images, "out": out, "manifest": manifest}


def rows(out: Path):
    return pads.dataset(str(out), format="parquet").to_table(columns=["image_id", "run_fingerprint"]).to_pylist()


def assert_exactly_once(out: Path):
    ids = [r["image_id"] for r in rows(out)]
    assert len(ids) == len(set(ids)) == N_IMAGES
    assert set(ids) == {f"{i:03d}.png" for i in range(N_IMAGES)}


# Ray's per-node agents (metrics, runtime environments): they hold and write none of the run's data,
# and after their raylet is killed they wait out Ray's GCS reconnect timeout (60 s) before ending
RAY_AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")


def processes_with_env(marker: str, agents: bool = True) -> list[int]:
    """Pids of the processes whose environment holds ``marker`` (a run's driver and every Ray process
    it started: raylet, GCS and workers inherit the driver's environment); ``agents=False``: but
    Ray's agents (RAY_AGENTS)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "environ").read_bytes():
                    if agents or not (d / "cmdline").read_bytes().startswith(RAY_AGENTS):
                        found.append(int(d.name))
            except OSError:
                pass
    return found


def test_driver_killed_mid_run_then_rerun_finishes_exactly_once(job, tmp_path):
    # the index saved during the run often (deltas, checkpoints.py): the kill lands after one
    m = job["manifest"](index_save_interval_s=0.2)
    exe = Path(sys.executable).with_name("fastsam-batch")
    marker = f"FASTSAM_TEST_RUN={tmp_path.name}"
    # The last image takes an hour in this run (the test-only slow hook), so the run cannot finish
    # before the kill, whatever the machine's load: the kill lands mid-run by construction.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | dict([marker.split("=")]) | {
        "FASTSAM_BATCH_TEST_SLOW": f"segment:{N_IMAGES - 1:03d}.png:3600"}
    proc = subprocess.Popen([str(exe), "run", str(m)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(job["out"].glob("part-*.parquet"))) < 2 or not list(job["out"].glob("_index/*.delta.json")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "nothing was committed and saved in the index in 5 minutes"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The embedded Ray outlives its driver for a moment; only the driver publishes (its writer
    # actors stage files nobody sees until it does), so
    # nothing more is committed. Read the output only once every process of the killed run that
    # holds its data is gone (all but Ray's agents): then nothing can change it any more, and the
    # re-run must see exactly these rows.
    deadline = time.time() + 120
    while processes_with_env(marker, agents=False):
        assert time.time() < deadline, f"the killed run's processes still run: {processes_with_env(marker, agents=False)}"
        time.sleep(0.2)
    partial = rows(job["out"])
    assert 0 < len(partial) < N_IMAGES, "the kill should land mid-run"
    assert len(list((job["out"] / "_plan").glob("*/part-*.parquet"))) == 5  # 24 images in parts of 5
    # the killed run's deltas: a start takes the files they hold from them (and reads the rest),
    # with the rows a read of every file gives
    listed = list_parts_stamped(str(job["out"]), Storage())
    saved = load_index(str(job["out"]), Storage(), listed)
    assert saved.deltas.covered and saved.deltas.covered <= set(listed)
    assert sorted(saved.read) == sorted(set(listed) - saved.deltas.covered)
    saved.base.close()
    assert index_rows(read_committed(str(job["out"]), Storage())) == index_rows(plain_read(str(job["out"]), Storage()))

    r = run_cli("run", str(m))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming: {len(partial)} images already have rows" in r.stdout
    assert "took over the lease" in r.stdout and "is gone" in r.stdout  # the killed driver's lease
    assert f"already done in an earlier run (skipped): {len(partial)}" in r.stdout
    assert_exactly_once(job["out"])
    assert not list(job["out"].glob("_tmp-*")) and not (job["out"] / "_plan").exists()  # the killed run's plan too
    assert not list(job["out"].glob("_index/*.delta.*"))  # the run's full save replaced every delta

    again = run_cli("run", str(m))
    assert again.returncode == 0
    assert f"nothing to do: all {N_IMAGES} images already have rows" in again.stdout
    assert_exactly_once(job["out"])


def test_resume_with_a_changed_setting_is_refused_unless_overwrite(job):
    assert run_cli("run", str(job["manifest"](actors=1))).returncode == 0
    first = {r["run_fingerprint"] for r in rows(job["out"])}
    assert len(first) == 1

    changed = job["manifest"]("changed.yaml", conf=0.5, actors=1)
    r = run_cli("run", str(changed))
    assert r.returncode == 1
    assert "another configuration" in r.stderr and first.pop() in r.stderr and "--overwrite" in r.stderr
    assert "mask rules" in r.stderr  # they are in the fingerprint too
    assert_exactly_once(job["out"])
    assert not (job["out"] / "_lease.json").exists()  # released by the run that failed

    r = run_cli("run", str(changed), "--overwrite")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_exactly_once(job["out"])
    assert len({r["run_fingerprint"] for r in rows(job["out"])}) == 1


def test_incremental_run_on_s3_processes_only_new_and_changed_objects(s3fs_client, s3_env, checkpoint, tmp_path):
    from conftest import cli_env, files_read, make_bucket, write_job

    fs = s3fs_client
    make_bucket(s3_env, "grows")
    local = tmp_path / "imgs"
    local.mkdir()
    for i in range(6):
        make_image(3100 + i, size=(160, 128))[0].save(local / f"{i}.png")
        fs.put_file(str(local / f"{i}.png"), f"grows/images/{i}.png")
    fs.put_file(str(checkpoint), "grows/models/fixture.pt")
    # Index deltas every 0.2 s (checkpoints.py) on S3, where ETags tell a file's content. The first
    # run is held open (its last image's decoding, the test-only slow hook) until a delta of its first
    # file is on S3, then let finish: each file it commits is read by its index once (the delta's
    # read-back, or its end's for the files after it); an end that read a delta's files again would
    # make it twice.
    m = write_job(tmp_path / "job.yaml", "incremental", "s3://grows/images/", "s3://grows/models/fixture.pt",
                  "s3://grows/masks/", 4, index_save_interval_s=0.2)
    env = {**s3_env, "FASTSAM_BATCH_CACHE": str(tmp_path / "cache")}
    reads = [tmp_path / "reads-1.txt", tmp_path / "reads-2.txt"]  # each read of the index's (tests/inject), a line
    release = tmp_path / "release"
    held = cli_env({**env, "FASTSAM_BATCH_TEST_READS": str(reads[0]), "FASTSAM_BATCH_TEST_SLOW": "decode:5.png:600",
                    "FASTSAM_BATCH_TEST_SLOW_UNTIL": str(release)})
    proc = subprocess.Popen([str(Path(sys.executable).with_name("fastsam-batch")), "run", str(m)], env=held,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not fs.glob("grows/masks/_index/*.delta.json"):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no index delta on S3 in 5 minutes"
            time.sleep(0.2)
            fs.invalidate_cache()
        release.touch()
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # a failure above: the run is not left running beside the next tests
            release.touch()
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stdout + stderr
    first = part_names(fs)
    assert sorted(files_read(reads[0])) == sorted(first)  # each file it wrote read once: by a delta or by its end
    assert not fs.glob("grows/masks/_index/*.delta.*")  # its full save at the end replaced the deltas

    # The prefix grows by three objects, and one object is replaced by another image (new ETag, size).
    for i in range(6, 9):
        make_image(3100 + i, size=(160, 128))[0].save(local / f"{i}.png")
        fs.put_file(str(local / f"{i}.png"), f"grows/images/{i}.png")
    make_image(3999, size=(200, 150))[0].save(local / "new-2.png")
    fs.put_file(str(local / "new-2.png"), "grows/images/2.png")
    r = run_cli("run", str(m), env={**env, "FASTSAM_BATCH_TEST_READS": str(reads[1])})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming: 5 images already have rows; 4 to do (1 of them changed" in r.stdout
    # the first run's files were taken from its saved index, not read; what this run wrote (and the
    # file its old row of 2.png was dropped from, rewritten) read once each
    second = files_read(reads[1])
    assert len(second) == len(set(second)) and set(second) == part_names(fs) - first, (second, first)
    fs.invalidate_cache()
    summary = json.loads(fs.cat_file("grows/masks/_run.json"))["last_run_summary"]
    assert (summary["images_skipped_done"], summary["images_changed"], summary["rows_superseded"]) == (5, 1, 1)
    table = pads.dataset("grows/masks/", format="parquet", filesystem=fs).to_table()
    by_id = {}
    for row in table.to_pylist():
        assert row["image_id"] not in by_id  # exactly one row per object
        by_id[row["image_id"]] = row
    assert sorted(by_id) == [f"{i}.png" for i in range(9)]
    assert (by_id["2.png"]["width"], by_id["2.png"]["height"]) == (200, 150)  # the new content's row
    etag = fs.info("grows/images/2.png")["ETag"].strip('"')
    assert by_id["2.png"]["source_version"] == f"{etag}/{fs.info('grows/images/2.png')['size']}"

    again = run_cli("run", str(m), env=env)
    assert "nothing to do: all 9 images already have rows" in again.stdout


def part_names(fs) -> set[str]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1] for p in fs.glob("grows/masks/part-*.parquet")}


def test_superseded_rows_are_found_only_where_a_current_row_exists():
    from fastsam_batch.resume import Committed, superseded_parts

    c = Committed.from_rows([
        ("a", "old/1", "ok", "p1"), ("a", "new/2", "ok", "p2"),  # replaced: drop the old row from p1
        ("b", "old/1", "ok", "p1"),  # changed, not yet redone: keep until its new row exists
        ("c", "x/1", "ok", "p1"), ("c", "x/1", "error", "p3"),  # same version twice: not this rule's business
        ("d", "", "error", "p1"),  # written before versions were recorded: counts as current
    ])
    current = {"a": "new/2", "b": "new/5", "c": "x/1", "d": "any/1", "e": "new/1"}
    assert superseded_parts(c, current) == {"p1": {"a": "new/2"}}
    found = dict(zip(current, c.lookup(list(current), list(current.values()))))
    assert [found[i].state for i in "abcde"] == ["fresh", "changed", "fresh", "fresh", "new"]
    assert found["a"].ok and not found["d"].ok
    assert (c.rows, c.images) == (6, 4)


def test_duplicates_keep_an_ok_row_and_retried_images_old_rows_are_found():
    """Pure: of an image's rows of one version in two files (a --retry-errors run cut short), the
    ok one is kept; rows_outside finds the old rows of retried images that have a new one; rows
    by error reason are counted."""
    from fastsam_batch.resume import Committed, id_key, duplicate_rows, rows_outside, version_key

    c = Committed.from_rows([
        ("a", "v1/1", "error", "out/p1.parquet", "read_failed: 503"),
        ("a", "v1/1", "ok", "out/p2.parquet", None),
        ("b", "v1/1", "error", "out/p1.parquet", "timeout: took long"),
        ("c", "v1/1", "ok", "out/p1.parquet", None),
    ])
    assert duplicate_rows(c).drop == {"out/p1.parquet": {(id_key("a"), version_key("v1/1"))}}  # the error row goes, the ok one stays
    assert duplicate_rows(c, prefer={"p1.parquet"}).drop == {"out/p2.parquet": {(id_key("a"), version_key("v1/1"))}}  # this run's file wins
    assert rows_outside(c, {"a", "b"}, keep={"p2.parquet"}) == {"out/p1.parquet": {"a"}}  # b has no new row yet
    assert c.errors_by_reason() == {"read_failed": 1, "timeout": 1}
    found = dict(zip("abc", c.lookup(["a", "b", "c"], ["v1/1"] * 3)))
    assert found["b"].reason == "timeout" and found["c"].reason is None


def test_id_keys_ending_in_nul_survive_numpy():
    """numpy's fixed-width bytes drop trailing NULs: the keys handed to drop_rows are put back whole."""
    from fastsam_batch.resume import Committed, duplicate_rows, id_key, version_key

    image_id = next(f"img{i}.jpg" for i in range(100_000) if id_key(f"img{i}.jpg").endswith(b"\0"))
    c = Committed.from_rows([(image_id, "v", "error", "out/p1.parquet"), (image_id, "v", "ok", "out/p2.parquet")])
    assert duplicate_rows(c).drop == {"out/p1.parquet": {(id_key(image_id), version_key("v"))}}


def test_a_container_is_recorded_complete_only_when_each_of_its_images_has_a_row(tmp_path):
    """A member given twice (a read task Ray retried) must not stand in for a member without a row:
    the writer counts a container's distinct images, not its rows (write.Committer)."""
    import pyarrow as pa

    from fastsam_batch.lease import Lease
    from fastsam_batch.schema import UNIT_END, UNIT_SKIPPED
    from fastsam_batch.storage import Storage
    from fastsam_batch.write import Committer, ParquetWriter

    out = str(tmp_path / "out")
    lease = Lease(Storage(), out, "run-units")
    lease.acquire()

    def rows(ids: list[str], end: int = -1) -> pa.Table:
        n = len(ids)
        return pa.table({"image_id": ids, "shard": ["s.tar"] * n, "source_version": ["v1"] * n, "status": ["ok"] * n,
                         "error": pa.array([None] * n, pa.string()), "num_masks": [0] * n,
                         "prompts": pa.array([[]] * n, pa.list_(pa.int32())), "read_retries": [0] * n,
                         UNIT_END: [end] * n, UNIT_SKIPPED: [0] * n})

    complete: list = []
    c = Committer(ParquetWriter(out, Storage(), "zstd", lease.fence()), rows_per_file=1, interval_s=3600,
                  on_commit=lambda row: None, on_units_complete=complete.extend)
    c.add(rows(["s.tar/a.jpg", "s.tar/a.jpg"]))  # member a twice; member b not (yet) given
    c.add(rows(["s.tar"], end=2))  # the shard's end: it gave 2 images
    c.flush()
    assert complete == []  # b has no row: the shard is not complete
    c.add(rows(["s.tar/b.jpg"]))
    c.flush()
    assert complete == [("s.tar", "v1", 2)]
    lease.release()


def test_the_committed_index_is_read_once_and_kept_current_from_new_and_rewritten_files(tmp_path, monkeypatch):
    """Issue 23: the start reads every committed file (in parallel); later steps read only the
    files added or rewritten since, and end with the index a full read gives."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastsam_batch import resume
    from fastsam_batch.lease import Lease
    from fastsam_batch.repair import drop_rows
    from fastsam_batch.resume import apply_rewrites, id_key, read_committed, refresh_committed
    from fastsam_batch.storage import Storage

    out = tmp_path / "out"
    out.mkdir()

    def part(name: str, ids: list[str], status: str = "ok") -> None:
        pq.write_table(pa.table({"image_id": ids, "run_fingerprint": ["fp"] * len(ids), "status": [status] * len(ids),
                                 "error": [None if status == "ok" else "read_failed: x"] * len(ids),
                                 "source_version": ["v/1"] * len(ids), "shard": [None] * len(ids)}),
                       out / f"part-{name}.parquet")

    for k in range(5):
        part(f"{k:02d}", [f"{k}-{i}" for i in range(20)])
    read: list[str] = []
    real = resume.read_file_rows
    monkeypatch.setattr(resume, "read_file_rows",
                        lambda p, fs, stamp=None: read.append(p.rsplit("/", 1)[-1]) or real(p, fs, stamp))
    storage = Storage()
    c = read_committed(str(out), storage)
    assert (c.rows, c.images, len(read)) == (100, 100, 5)
    read.clear()
    part("05", ["0-1", "new"], "error")  # this run's commit (one image again, one new)
    (out / "part-01.parquet").unlink()  # a file gone
    c = refresh_committed(c, str(out), storage)
    assert read == ["part-05.parquet"] and (c.rows, c.images) == (82, 81)
    read.clear()
    lease = Lease(storage, str(out), "run-index")
    lease.acquire()
    rewrites: dict = {}
    assert drop_rows(str(out), storage, {str(out / "part-00.parquet"): {id_key("0-1")}}, fence=lease.fence(),
                     rewrites=rewrites) == 1
    c = apply_rewrites(c, str(out), storage, rewrites)
    assert len(read) == 1 and read[0] != "part-00.parquet"
    lease.release()
    again = read_committed(str(out), storage)
    assert (c.parts, c.rows, c.images, c.fingerprints, c.errors_by_reason()) == \
        (again.parts, again.rows, again.images, again.fingerprints, again.errors_by_reason())
    assert c.lookup(["0-1", "new", "2-3"], ["v/1"] * 3) == again.lookup(["0-1", "new", "2-3"], ["v/1"] * 3)


def _plain(out: Path) -> tuple:
    """The reference a refreshed index must equal, from every committed row read plainly (pyarrow,
    a list of rows, none of the index's code): rows, distinct images, ok rows, error rows by reason,
    and each image's statuses."""
    import pyarrow.parquet as pq

    rows = []
    for f in sorted(out.glob("part-*.parquet")):
        t = pq.read_table(f, columns=["image_id", "status", "error"])
        rows += list(zip(*(t.column(c).to_pylist() for c in ("image_id", "status", "error"))))
    errors: dict[str, int] = {}
    for _, status, error in rows:
        if status != "ok":
            reason = (error or "error").split(":")[0]
            errors[reason] = errors.get(reason, 0) + 1
    statuses: dict[str, list] = {}
    for image_id, status, _ in rows:
        statuses.setdefault(image_id, []).append(status == "ok")
    return len(rows), len(statuses), sum(s == "ok" for _, s, _ in rows), errors, statuses


def _indexed(c, ids) -> tuple:
    found = c.lookup(ids, ["v/1"] * len(ids))
    statuses = {i: [f.ok] for i, f in zip(ids, found) if f.state != "new"}
    return c.rows, c.images, int(c.ok.sum()), c.errors_by_reason(), statuses


def test_a_committed_file_rewritten_under_its_own_name_is_read_again(tmp_path, monkeypatch):
    """A file's name is a hash of the ids it holds: a --retry-errors commit of exactly an earlier
    file's ids (or a previous lease holder's commit in flight at a takeover) rewrites it under its
    own name. The refresh reads it again (its listing entry changed; and always, for the names
    this run wrote), and equals a plain read of every row."""
    import pyarrow as pa

    from fastsam_batch import resume
    from fastsam_batch.resume import read_committed, refresh_committed
    from fastsam_batch.storage import Storage
    from fastsam_batch.write import parquet_file_bytes, part_name, put_atomic

    out = tmp_path / "out"
    out.mkdir()
    storage = Storage()

    def commit(ids: list[str], status: str) -> str:
        n = len(ids)
        name = part_name(ids)
        put_atomic(storage, str(out / name), parquet_file_bytes(pa.table({
            "image_id": ids, "run_fingerprint": ["fp"] * n, "status": [status] * n,
            "error": [None if status == "ok" else "timeout: slow"] * n, "source_version": ["v/1"] * n,
            "shard": pa.array([None] * n, pa.string())}), None))
        return name

    ids = ["slow", "a", "b"]
    commit(["slow"], "error")
    commit(["a", "b"], "ok")
    start = read_committed(str(out), storage)
    assert _indexed(start, ids) == _plain(out) and start.errors_by_reason() == {"timeout": 1}
    slow = commit(["slow"], "ok")  # the retried image's new row, under the same name
    assert _indexed(refresh_committed(start, str(out), storage), ids) == _plain(out)
    assert _plain(out)[2:4] == (3, {})
    # a storage whose listing entry did not change (coarse mtime, a lagging listing): the names this
    # run wrote are read again whatever their entry
    monkeypatch.setattr(resume, "listing_stamp", lambda entry: "unchanged")
    start = read_committed(str(out), storage)
    commit(["slow"], "error")
    assert _indexed(refresh_committed(start, str(out), storage, reread={slow}), ids) == _plain(out)


def test_a_corrupt_committed_file_is_named_and_an_error_stops_the_queued_reads(tmp_path, monkeypatch):
    """A committed file that cannot be read stops the run with its path in the message; the other
    reads queued behind it are cancelled, not all waited for (reads go in bounded windows)."""
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastsam_batch import resume
    from fastsam_batch.resume import CommittedFileError, iter_files, read_committed
    from fastsam_batch.storage import Storage

    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"image_id": ["a"], "run_fingerprint": ["fp"], "status": ["ok"],
                             "error": pa.array([None], pa.string())}), out / "part-good.parquet")
    (out / "part-bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CommittedFileError, match="part-bad.parquet"):
        read_committed(str(out), Storage())

    calls: list[str] = []
    lock = threading.Lock()

    def failing(p, fs, stamp=None):
        with lock:
            calls.append(p)
        if p.endswith("000"):
            raise CommittedFileError(f"committed file {p} could not be read")
        time.sleep(0.01)  # the other reads: not done before the error is seen (what is counted is calls)

    monkeypatch.setattr(resume, "read_file_rows", failing)
    with pytest.raises(CommittedFileError, match="000"):
        list(iter_files(str(out), Storage(), [f"p{i:03d}" for i in range(400)], threads=2))
    assert len(calls) <= 4 * 2 + 2  # the window and the reads under way; before: all 400


def test_iter_files_read_ahead_window_holds_with_a_slow_first_read(monkeypatch):
    """One slow read (the first file) never lets more than the window of reads start (before: one
    more a pass, hundreds held); the order kept, and closing the generator cancels the queued reads."""
    import threading
    import time

    from fastsam_batch import resume
    from fastsam_batch.storage import Storage

    first = threading.Event()
    started: list[str] = []
    lock = threading.Lock()

    def reader(p, fs, stamp=None):
        with lock:
            started.append(p)
        if p == "p000":
            first.wait(5)
        return p

    monkeypatch.setattr(resume, "read_file_rows", reader)
    paths = [f"p{i:03d}" for i in range(300)]
    threads = 2
    window = 4 * threads
    gen = resume.iter_files("/nonexistent", Storage(), paths, threads=threads)
    timer = threading.Timer(0.2, first.set)  # the others finish meanwhile
    timer.start()
    got = [next(gen)]
    assert len(started) <= window  # before the first is given: the window only
    got += [next(gen) for _ in range(99)]
    assert got == paths[:100]
    assert len(started) <= 100 + window
    gen.close()  # the queued reads cancelled: only those under way finish
    n = len(started)
    assert n <= 100 + window
    time.sleep(0.05)
    assert len(started) == n  # none started after the close
    timer.cancel()
