"""Faults, with the real S3 API (moto over HTTP) and real Ray: transient S3 errors are retried
and the output still holds exactly one row per image; permanent errors fail fast."""

from __future__ import annotations

import errno
import json

import pyarrow.dataset as pads
import pytest

from conftest import make_bucket, run_cli, save_shapes, write_job
from fastsam_batch.read import read_item
from fastsam_batch.retry import READ_ATTEMPTS, READ_BUDGET_S, is_transient, with_retries
from fastsam_batch.storage import Storage
from s3_fault_proxy import FaultProxy


def test_transient_errors_are_retried_and_permanent_ones_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.EBUSY, "SlowDown")
        return "data"

    assert with_retries(flaky, sleep=lambda s: None) == ("data", 2)
    for permanent in (FileNotFoundError("gone"), PermissionError("403 Forbidden"), ValueError("bad request")):
        calls.clear()

        def fails(e=permanent):
            calls.append(1)
            raise e

        with pytest.raises(type(permanent)):
            with_retries(fails, sleep=lambda s: None)
        assert len(calls) == 1  # at once, no waiting
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(OSError(errno.EREMOTEIO, "InternalError"))
    assert not is_transient(OSError(errno.EINVAL, "InvalidArgument"))


def _fs_options(proxy_url: str, s3_env: dict, attempts: int) -> Storage:
    return Storage({"endpoint_url": proxy_url, "key": s3_env["AWS_ACCESS_KEY_ID"], "secret": s3_env["AWS_SECRET_ACCESS_KEY"],
                    "config_kwargs": {"retries": {"max_attempts": attempts, "mode": "standard"}}})


def test_read_retries_a_500_itself_and_fails_a_missing_object_fast(s3fs_client, s3_env):
    make_bucket(s3_env, "flaky-read")
    s3fs_client.pipe_file("flaky-read/a.bin", b"payload")
    # botocore's own retries off, so the 500 reaches our layer: s3fs sends HEAD then GET; the GET fails.
    with FaultProxy(s3_env["AWS_ENDPOINT_URL"], [None, "500", None]) as proxy:
        storage = _fs_options(proxy.url, s3_env, attempts=0)
        data, err, retries = read_item("s3://flaky-read/a.bin", storage)
        assert (data, err) == (b"payload", None) and retries >= 1
        data, err, retries = read_item("s3://flaky-read/missing.bin", storage)
    # The proxy's 500 on its first request is retried; the 404 that follows is not (no attempt after it).
    faulted = [f for _, p, f in proxy.log if "missing.bin" in p]
    assert data is None and err.startswith("read_failed: object not found") and retries == faulted.count("500")
    assert faulted[-1] is None and faulted.count(None) <= 2  # one attempt answered: its HEAD (+ s3fs's listing)
    assert proxy.injected["500"] >= 1


@pytest.fixture(scope="module")
def faulty_run(s3fs_client, s3_env, checkpoint, tmp_path_factory):
    fs = s3fs_client
    make_bucket(s3_env, "faulty")
    local = tmp_path_factory.mktemp("faulty")
    names = save_shapes(local, range(900, 912))
    for name in names:
        fs.put_file(str(local / name), f"faulty/images/{name}")
    fs.put_file(str(checkpoint), "faulty/models/fixture.pt")
    m = write_job(local / "job.yaml", "faulty", "s3://faulty/images/", "s3://faulty/models/fixture.pt",
                  "s3://faulty/masks/", 4)
    # 3 of every 10 requests fail: a 503 SlowDown, a dropped connection, a 500.
    faults = [None, "503", None, None, "reset", None, "500", None, None, None]
    with FaultProxy(s3_env["AWS_ENDPOINT_URL"], faults) as proxy:
        env = {**s3_env, "AWS_ENDPOINT_URL": proxy.url, "FASTSAM_BATCH_CACHE": str(local / "cache")}
        r = run_cli("run", str(m), env=env)
    fs.invalidate_cache()
    return {"proc": r, "proxy": proxy, "names": names, "fs": fs}


def test_s3_faults_during_a_run_leave_exactly_one_row_per_image(faulty_run):
    r, proxy = faulty_run["proc"], faulty_run["proxy"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(proxy.injected[f] > 0 for f in {"503", "500", "reset"}), proxy.injected
    table = pads.dataset("faulty/masks/", format="parquet", filesystem=faulty_run["fs"]).to_table()
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == sorted(faulty_run["names"])  # none missing, none twice
    assert set(table.column("status").to_pylist()) == {"ok"}
    summary = json.loads(faulty_run["fs"].cat_file("faulty/masks/_run.json"))["last_run_summary"]
    assert summary["images_ok"] == len(faulty_run["names"]) and summary["failed"] is None
    assert summary["images_retried"] >= 1 and summary["read_retries"] >= summary["images_retried"]  # the GETs that failed
    print(f"S3 faults injected: {proxy.injected}; forwarded: {proxy.forwarded}; summary retried: "
          f"{summary['images_retried']} images")


@pytest.fixture(scope="module")
def lost_answers_run(s3fs_client, s3_env, checkpoint, tmp_path_factory):
    """A run on S3 through the fault proxy where (a) the first heartbeat's conditional PUT of the lease
    is applied but answered 500 (so botocore retries it and the retry meets the ETag it wrote), and
    (b) every read of one image fails with a 500."""
    fs = s3fs_client
    make_bucket(s3_env, "lost-answers")
    local = tmp_path_factory.mktemp("lost-answers")
    names = save_shapes(local, range(960, 963))
    (local / names[-1]).rename(local / "zz-unreadable.png")
    names[-1] = "zz-unreadable.png"
    for name in names:
        fs.put_file(str(local / name), f"lost-answers/images/{name}")
    fs.put_file(str(checkpoint), "lost-answers/models/fixture.pt")
    m = write_job(local / "job.yaml", "lost-answers", "s3://lost-answers/images/", "s3://lost-answers/models/fixture.pt",
                  "s3://lost-answers/masks/", 2, lease_heartbeat_s=0.5, lease_stale_s=3600)
    renewals: list[str] = []

    def rule(method, path, headers):
        path = path.split("?")[0]
        if method == "GET" and path.endswith("/images/zz-unreadable.png"):
            return "500"
        if method == "PUT" and path.endswith("/masks/_lease.json") and headers.get("If-Match"):
            renewals.append("applied-500" if not renewals else "forwarded")
            return "applied-500" if len(renewals) == 1 else None
        return None

    with FaultProxy(s3_env["AWS_ENDPOINT_URL"], [None], rule=rule) as proxy:
        env = {**s3_env, "AWS_ENDPOINT_URL": proxy.url, "FASTSAM_BATCH_CACHE": str(local / "cache")}
        r = run_cli("run", str(m), env=env)
    fs.invalidate_cache()
    return {"proc": r, "proxy": proxy, "names": names, "fs": fs, "renewals": renewals}


def test_a_heartbeat_whose_answer_was_lost_keeps_the_lease_and_the_run_finishes(lost_answers_run):
    r, renewals, fs = lost_answers_run["proc"], lost_answers_run["renewals"], lost_answers_run["fs"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert renewals[:1] == ["applied-500"]
    # botocore's retry of that PUT (412: the ETag is the one it wrote) and the heartbeats after it
    assert renewals.count("forwarded") >= 3, renewals
    assert not fs.exists("lost-answers/masks/_lease.json")
    ids = pads.dataset("lost-answers/masks/", format="parquet", filesystem=fs).to_table().column("image_id")
    assert sorted(ids.to_pylist()) == sorted(lost_answers_run["names"])


def test_an_object_whose_reads_always_fail_is_an_error_row_within_the_read_budget(lost_answers_run):
    """One budget for a read, not botocore's attempts times ours (it was 8 x 5 requests, minutes of
    backoff): at most READ_ATTEMPTS requests, counted by the proxy."""
    proxy, fs = lost_answers_run["proxy"], lost_answers_run["fs"]
    gets = [p for method, p, _ in proxy.log if method == "GET" and p.split("?")[0].endswith("/zz-unreadable.png")]
    assert 2 <= len(gets) <= READ_ATTEMPTS, len(gets)
    table = pads.dataset("lost-answers/masks/", format="parquet", filesystem=fs).to_table().to_pylist()
    row = next(r for r in table if r["image_id"] == "zz-unreadable.png")
    assert row["status"] == "error" and row["error"].startswith("read_failed:"), row["error"]
    assert f"retry budget {READ_ATTEMPTS} attempts / {READ_BUDGET_S:g} s" in row["error"]
    assert row["read_retries"] == len(gets) - 1


def test_a_segment_actor_killed_mid_batch_is_replaced_and_its_batch_redone(checkpoint, tmp_path):
    images = tmp_path / "images"
    names = save_shapes(images, range(920, 932))
    m = write_job(tmp_path / "job.yaml", "actor-kill", str(images), str(checkpoint), str(tmp_path / "masks"), 3)
    marker = tmp_path / "crashed"
    r = run_cli("run", str(m), env={"FASTSAM_BATCH_CRASH_ONCE": str(marker)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert marker.exists()  # the actor process really died (os._exit in the middle of a batch)
    table = pads.dataset(str(tmp_path / "masks"), format="parquet").to_table()
    assert sorted(table.column("image_id").to_pylist()) == sorted(names)
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert all(n > 0 for n in table.column("num_masks").to_pylist())


def test_a_worker_node_removed_mid_run_leaves_exactly_one_row_per_image(checkpoint, tmp_path):
    """A two-worker Ray cluster (``ray.cluster_utils.Cluster``); one worker node is removed while its
    segmentation actor holds a batch, and a replacement joins, as an autoscaler would do. The doomed
    node alone runs with the test-only slow hook (its raylet, and so its workers, get the variable):
    its actor holds its first batch until the node goes, so the node is removed with work on it,
    and the run can only finish by redoing that work elsewhere."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from ray.cluster_utils import Cluster

    images = tmp_path / "images"
    names = save_shapes(images, range(940, 964))
    out = tmp_path / "masks"
    # One segment actor per worker node (2 of its 3 CPUs), so losing a node loses an actor.
    m = write_job(tmp_path / "job.yaml", "node-loss", str(images), str(checkpoint), str(out), 2,
                  num_actors=2, cpus_per_actor=2, decode_cpus=0.5)
    busy = tmp_path / "doomed-node-holds-a-batch"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    slow = {"FASTSAM_BATCH_TEST_SLOW": "segment::3600", "FASTSAM_BATCH_TEST_SLOW_MARK": str(busy)}
    os.environ.update(slow)
    try:
        doomed = cluster.add_node(num_cpus=3)
    finally:
        for k in slow:
            del os.environ[k]
    cluster.add_node(num_cpus=3)
    try:
        exe = Path(sys.executable).with_name("fastsam-batch")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, "RAY_ADDRESS": cluster.address}
        proc = subprocess.Popen([str(exe), "run", str(m)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while not busy.exists():
            assert proc.poll() is None, "the run ended before the doomed node held any work: " + proc.communicate()[0]
            assert time.time() < deadline, "the doomed node's actor took no batch in 5 minutes"
            time.sleep(0.2)
        cluster.remove_node(doomed)
        cluster.add_node(num_cpus=3)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # a failed wait: the driver is ours to end
            proc.kill()
            proc.communicate()
        cluster.shutdown()
    assert proc.returncode == 0, output
    table = pads.dataset(str(out), format="parquet").to_table()
    assert sorted(table.column("image_id").to_pylist()) == sorted(names)
    assert set(table.column("status").to_pylist()) == {"ok"}
