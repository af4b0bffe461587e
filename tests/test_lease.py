"""One writer per output: the lease on output.uri (local and on the moto S3 server), its fence in the
writer, and two runs started on the same output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from conftest import make_bucket, run_cli, save_shapes, write_job
from fastsam_batch.lease import LEASE_NAME, Lease, LeaseHeld, LeaseLost
from fastsam_batch.storage import Storage


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path, s3_env, monkeypatch):
    """An output location and a Storage for it: a local folder, or a prefix on the moto server."""
    if request.param == "local":
        return str(tmp_path / "out"), Storage()
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    bucket = f"lease-{tmp_path.name.lower().replace('_', '-')[-30:]}"
    make_bucket(s3_env, bucket)
    return f"s3://{bucket}/out/", Storage()


def lease_record(storage: Storage, output_uri: str) -> dict | None:
    uri = output_uri.rstrip("/") + "/" + LEASE_NAME
    fs = storage.fs(uri)
    fs.invalidate_cache()
    return json.loads(fs.cat_file(uri)) if fs.exists(uri) else None


def test_a_second_run_is_refused_with_who_holds_the_lease(output):
    uri, storage = output
    first = Lease(storage, uri, "run-1")
    first.acquire()
    assert lease_record(storage, uri)["run_id"] == "run-1"
    second = Lease(storage, uri, "run-2")
    with pytest.raises(LeaseHeld) as e:
        second.acquire()
    msg = str(e.value)
    assert "run run-1 on" in msg and f"pid {os.getpid()}" in msg and "--break-lease" in msg and "started 20" in msg
    assert first.renew()  # the holder's heartbeat goes on
    first.release()
    assert lease_record(storage, uri) is None
    second.acquire()
    assert lease_record(storage, uri)["run_id"] == "run-2" and second.taken_over is None
    second.release()


def test_a_stale_lease_is_taken_over_and_its_holder_fenced(output):
    uri, storage = output
    old = Lease(storage, uri, "run-old", stale_s=60)
    old.acquire()
    # Its last heartbeat was 61 s ago (by the holder's clock): stale by the next run's clock.
    old.record.heartbeat_at = time.time() - 61
    old.token = old.backend.replace(old._data(), old.token)
    assert lease_record(storage, uri)["heartbeat_at"] < time.time() - 60
    new = Lease(storage, uri, "run-new", stale_s=60)
    new.acquire()
    assert new.taken_over.run_id == "run-old"
    assert "no heartbeat for 6" in new.stale_reason(new.taken_over)
    # The old holder finds out at its next heartbeat, and its writer's fence refuses to commit.
    assert not old.renew() and old.lost.run_id == "run-new"
    with pytest.raises(LeaseLost):
        old.fence().check(storage)
    new.fence().check(storage)
    old.release()  # never deletes a lease it lost
    assert lease_record(storage, uri)["run_id"] == "run-new"
    new.release()


def test_break_lease_takes_over_a_live_holder(output):
    uri, storage = output
    live = Lease(storage, uri, "run-live")
    live.acquire()
    breaker = Lease(storage, uri, "run-breaker")
    breaker.acquire(break_lease=True)
    assert breaker.taken_over.run_id == "run-live"
    assert not live.renew()
    breaker.release()


def test_a_lease_of_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "out")
    child = subprocess.run([sys.executable, "-c", (
        "import sys; from fastsam_batch.lease import Lease; from fastsam_batch.storage import Storage\n"
        f"Lease(Storage(), {uri!r}, 'run-killed').acquire()\n")], capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert lease_record(storage, uri)["run_id"] == "run-killed"  # left behind, as by a killed run
    new = Lease(storage, uri, "run-next", stale_s=3600)
    new.acquire()
    assert new.taken_over.run_id == "run-killed" and "is gone" in new.stale_reason(new.taken_over)
    new.release()


def test_two_runs_on_one_output_one_is_refused_at_once(tmp_path, checkpoint):
    """The same command started twice: the second is refused in seconds with who holds the lease;
    the first finishes; exactly one row per image; the lease is gone afterwards."""
    images = tmp_path / "imgs"
    names = save_shapes(images, range(7000, 7030))
    out = tmp_path / "out"
    m = write_job(tmp_path / "job.yaml", "lease", str(images), str(checkpoint), str(out), 4)
    exe = Path(sys.executable).with_name("fastsam-batch")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen([str(exe), "run", str(m)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.time() + 120
    while not (out / LEASE_NAME).exists():
        assert first.poll() is None and time.time() < deadline, "the first run never took its lease"
        time.sleep(0.1)
    holder = json.loads((out / LEASE_NAME).read_text())
    t0 = time.time()
    second = run_cli("run", str(m))
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"is being written by run {holder['run_id']}" in second.stderr and "--break-lease" in second.stderr
    assert time.time() - t0 < 60  # refused before any work (generous for a busy CI machine)
    log, _ = first.communicate(timeout=600)
    assert first.returncode == 0, log
    ids = pads.dataset(str(out), format="parquet").to_table(columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == sorted(names)
    assert not (out / LEASE_NAME).exists()
    summary = json.loads((out / "_run.json").read_text())["last_run_summary"]
    assert summary["run_id"] == holder["run_id"]


def test_rows_written_twice_are_repaired_keeping_one(tmp_path, checkpoint):
    """A file committed by a run whose lease was taken over, for images the next run also wrote: the
    next run keeps one row per image (its own when it wrote one)."""
    images = tmp_path / "imgs"
    names = save_shapes(images, range(7100, 7106))
    out = tmp_path / "out"
    m = write_job(tmp_path / "job.yaml", "dups", str(images), str(checkpoint), str(out), 2)
    assert run_cli("run", str(m)).returncode == 0
    parts = sorted(out.glob("part-*.parquet"))
    shutil.copy(parts[0], out / "part-0late-commit.parquet")  # the same rows, in another run's file
    r = run_cli("run", str(m))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rows of images written twice (by two runs at once) removed: 2" in r.stdout
    ids = pads.dataset(str(out), format="parquet").to_table(columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == sorted(names)
