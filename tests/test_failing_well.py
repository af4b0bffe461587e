"""The mistakes users make every day fail well: one clear line before any work, nothing lost.

Each case runs the CLI as a user does (a subprocess) against a moto S3 server with IAM-style
authentication on (``INITIAL_NO_AUTH_ACTION_COUNT``) and a local Ray, and checks the exit status,
the one line, how long it took (a bound generous enough for CI) and what is left in the output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from conftest import CHECKPOINT, files_read, free_port, moto_server, run_cli, save_shapes
from shapes import make_image

BUCKET = "fw-data"


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory):
    """A moto server that checks signatures: three unauthenticated IAM calls make a user with an
    access key allowed everything; from then on every request is authenticated."""
    import boto3

    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as endpoint:
        iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="AKIABOOTSTRAP", aws_secret_access_key="x",
                           region_name="us-east-1")
        iam.create_user(UserName="batch")
        key = iam.create_access_key(UserName="batch")["AccessKey"]
        iam.put_user_policy(UserName="batch", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        good = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=good["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=good["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="models/fastsam-fixture.pt", Body=CHECKPOINT.read_bytes())
        images = tmp_path_factory.mktemp("fw-images")
        for name in save_shapes(images, range(8100, 8103)):
            s3.put_object(Bucket=BUCKET, Key=f"imgs/{name}", Body=(images / name).read_bytes())
        yield {"good": good, "bad": {**good, "AWS_SECRET_ACCESS_KEY": "not-the-secret-Zq81"}, "images": images,
               "endpoint": endpoint}


def manifest(path: Path, input_uri: str, checkpoint: str, output_uri: str, **sections) -> Path:
    doc = {"name": "failing-well", "input": {"uri": input_uri},
           "model": {"checkpoint": checkpoint, "imgsz": 320, "conf": 0.4, "device": "cpu"},
           "output": {"uri": output_uri}, "runtime": {"batch_size": 2, "num_actors": 1}}  # 1: sooner on 2 cores
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value}
    path.write_text(yaml.safe_dump(doc))
    return path


def one_line(r: subprocess.CompletedProcess) -> str:
    """The run's stderr must be exactly one ``fastsam-batch:`` line (no traceback)."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastsam-batch: "), r.stderr
    return lines[0]


def timed_cli(*args, env=None):
    t0 = time.monotonic()
    r = run_cli(*args, env=env)
    return r, time.monotonic() - t0


def nothing_started(r: subprocess.CompletedProcess) -> None:
    assert "Ray" not in r.stdout and "segmentation" not in r.stdout, r.stdout


# Preflight: storage -------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["input", "checkpoint", "output"])
def test_a_wrong_secret_is_one_line_naming_the_field_before_any_work(where, auth_s3, tmp_path):
    local_out = tmp_path / "out"
    m = manifest(tmp_path / "m.yaml",
                 f"s3://{BUCKET}/imgs/" if where == "input" else str(auth_s3["images"]),
                 f"s3://{BUCKET}/models/fastsam-fixture.pt" if where == "checkpoint" else str(CHECKPOINT),
                 f"s3://{BUCKET}/out-{where}/" if where == "output" else str(local_out))
    r, took = timed_cli("run", str(m), env=auth_s3["bad"])
    assert r.returncode == 1
    field = {"input": "input.uri", "checkpoint": "model.checkpoint", "output": "output.uri"}[where]
    line = one_line(r)
    assert line.startswith(f"fastsam-batch: {field} 's3://{BUCKET}/")
    assert line.endswith("credentials rejected by the endpoint (403 SignatureDoesNotMatch)"), line
    assert "not-the-secret" not in r.stdout + r.stderr
    assert took < 150  # fails fast: not a retry ladder (200 s), with room for a busy machine
    nothing_started(r)
    assert not local_out.exists() or not any(local_out.iterdir())


def test_an_unreachable_endpoint_is_found_in_seconds(auth_s3, tmp_path):
    closed = free_port()  # nothing listens there
    m = manifest(tmp_path / "m.yaml", f"s3://{BUCKET}/imgs/", str(CHECKPOINT), str(tmp_path / "out"))
    r, took = timed_cli("run", str(m), env={**auth_s3["good"], "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}"})
    assert r.returncode == 1
    line = one_line(r)
    assert line.startswith(f"fastsam-batch: input.uri 's3://{BUCKET}/imgs/': cannot reach http://127.0.0.1:{closed}"), line
    assert took < 150  # the SDK's own retry ladder took 200 s; 150: a CLI start on a busy machine
    nothing_started(r)


def test_forgetting_the_endpoint_is_named_as_the_likely_cause():
    """Without AWS_ENDPOINT_URL a request goes to AWS itself; an endpoint that cannot be reached
    then says that the variable is not set (checked on the error itself: the tests reach no AWS)."""
    from botocore.exceptions import EndpointConnectionError

    from fastsam_batch.storage import storage_error_cause

    err = EndpointConnectionError(endpoint_url="https://fw-data.s3.amazonaws.com/")
    wrapped = OSError("listing failed")
    wrapped.__cause__ = err
    saved = {k: os.environ.pop(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3") if k in os.environ}
    try:
        assert storage_error_cause(wrapped) == ("cannot reach https://fw-data.s3.amazonaws.com/ (AWS_ENDPOINT_URL is "
                                                "not set: is the storage somewhere other than AWS?)")
    finally:
        os.environ.update(saved)


@pytest.mark.parametrize("where", ["input", "output"])
def test_a_missing_bucket_is_named(where, auth_s3, tmp_path):
    m = manifest(tmp_path / "m.yaml",
                 "s3://no-such-input/imgs/" if where == "input" else f"s3://{BUCKET}/imgs/",
                 str(CHECKPOINT), "s3://no-such-output/masks/" if where == "output" else str(tmp_path / "out"))
    r, took = timed_cli("run", str(m), env=auth_s3["good"])
    assert r.returncode == 1
    line = one_line(r)
    uri = "s3://no-such-input/imgs/" if where == "input" else "s3://no-such-output/masks/"
    assert line.startswith(f"fastsam-batch: {where}.uri {uri!r}: no such bucket"), line
    assert took < 150  # fails fast: not a retry ladder (200 s), with room for a busy machine
    nothing_started(r)  # the whole segmentation used to run first, then fail on the first PUT


def test_no_credentials_at_all_say_so(auth_s3, tmp_path):
    env = {"AWS_ENDPOINT_URL": auth_s3["endpoint"], "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    m = manifest(tmp_path / "m.yaml", f"s3://{BUCKET}/imgs/", str(CHECKPOINT), str(tmp_path / "out"))
    r, took = timed_cli("run", str(m), env=env)
    assert r.returncode == 1
    line = one_line(r)
    assert line.startswith(f"fastsam-batch: input.uri 's3://{BUCKET}/imgs/': "), line
    assert "no credentials found" in line or "credentials rejected" in line or "access denied" in line, line
    assert took < 150  # fails fast: not a retry ladder (200 s), with room for a busy machine


# Preflight: checkpoint and device -----------------------------------------------------------------

@pytest.fixture(scope="module")
def wrong_checkpoints(tmp_path_factory):
    """Checkpoints a user might point at by mistake: other ultralytics tasks, a truncated copy of
    a good one, and a JPEG renamed .pt."""
    import torch

    from fastsam_batch.offline import configure_ultralytics

    configure_ultralytics()
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel

    d = tmp_path_factory.mktemp("checkpoints")
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=2, verbose=False)}, d / "detect.pt")
    torch.save({"model": ClassificationModel("yolov8n-cls.yaml", nc=2, verbose=False)}, d / "classify.pt")
    data = CHECKPOINT.read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    make_image(1)[0].save(d / "photo.pt", format="JPEG")  # a picture where a checkpoint should be
    return d


@pytest.mark.parametrize("name,cause", [
    ("detect.pt", "a 'detect' checkpoint, not a segmentation (FastSAM / YOLOv8-seg) one"),
    ("classify.pt", "a 'classify' checkpoint, not a segmentation (FastSAM / YOLOv8-seg) one"),
    ("truncated.pt", "the file is truncated or corrupt"),
    ("photo.pt", "not a PyTorch checkpoint (it does not unpickle)"),
])
def test_a_wrong_checkpoint_stops_before_ray_with_its_cause(name, cause, wrong_checkpoints, tmp_path):
    images = tmp_path / "imgs"
    save_shapes(images, [8200])
    out = tmp_path / "out"
    m = manifest(tmp_path / "m.yaml", str(images), str(wrong_checkpoints / name), str(out))
    r, took = timed_cli("run", str(m))
    assert r.returncode == 1
    line = one_line(r)  # was ~390 lines of Ray and ultralytics tracebacks
    assert line.startswith(f"fastsam-batch: model.checkpoint '{wrong_checkpoints / name}': {cause}"), line
    assert took < 150
    nothing_started(r)
    assert not out.exists() or not any(out.iterdir())  # nothing written: the lease is taken after the checks


def test_debug_shows_the_traceback(wrong_checkpoints, tmp_path):
    images = tmp_path / "imgs"
    save_shapes(images, [8202])
    m = manifest(tmp_path / "m.yaml", str(images), str(wrong_checkpoints / "detect.pt"), str(tmp_path / "out"))
    r = run_cli("run", str(m), "--debug")
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "CheckpointError: model.checkpoint" in r.stderr


def test_cuda_without_a_gpu_is_refused_at_once(tmp_path):
    images = tmp_path / "imgs"
    save_shapes(images, [8201])
    m = manifest(tmp_path / "m.yaml", str(images), str(CHECKPOINT), str(tmp_path / "out"), model={"device": "cuda"})
    r, took = timed_cli("run", str(m))
    assert r.returncode == 1  # used to wait for a GPU forever
    assert one_line(r).startswith("fastsam-batch: model.device 'cuda': no GPU in this machine"), r.stderr
    assert took < 150
    nothing_started(r)


def test_a_joined_cpu_cluster_refuses_cuda_and_sizes_auto_truly(tmp_path):
    from ray.cluster_utils import Cluster

    images = tmp_path / "imgs"
    names = save_shapes(images, range(8210, 8214))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    cluster.add_node(num_cpus=3)
    try:
        env = {"RAY_ADDRESS": cluster.address}
        m = manifest(tmp_path / "cuda.yaml", str(images), str(CHECKPOINT), str(tmp_path / "out-cuda"),
                     model={"device": "cuda"})
        r = run_cli("run", str(m), env=env)
        assert r.returncode == 1
        assert one_line(r) == ("fastsam-batch: model.device 'cuda': no GPU in the Ray cluster; use 'auto' or 'cpu' "
                               "to run on the CPU")
        assert not (tmp_path / "out-cuda").exists() or not list((tmp_path / "out-cuda").glob("part-*"))

        m = manifest(tmp_path / "auto.yaml", str(images), str(CHECKPOINT), str(tmp_path / "out"), model={"device": "auto"},
                     runtime={"num_actors": None})  # sized by auto
        r = run_cli("run", str(m), env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "model.device 'auto': no GPU in the Ray cluster, the model runs on the CPU" in r.stdout
        # 6 CPUs less read/decode (1) and the other stages (1): 4 actors; it used to say "one per core, 0"
        assert ("segmentation: 4 actors (on CPU: one per CPU the cluster's 6 leave after read/decode and the other "
                "stages (2), 4;") in r.stdout, r.stdout
        assert len(pads.dataset(str(tmp_path / "out"), format="parquet").to_table()) == len(names)
    finally:
        cluster.shutdown()


def test_an_unreachable_cluster_with_overwrite_loses_nothing_and_a_rerun_changes_nothing(tmp_path):
    images = tmp_path / "imgs"
    save_shapes(images, range(8220, 8223))
    out = tmp_path / "out"
    m = manifest(tmp_path / "m.yaml", str(images), str(CHECKPOINT), str(out))
    r = run_cli("run", str(m))
    assert r.returncode == 0, r.stdout + r.stderr
    for noise in ("Token authentication is enabled", "constructor arguments in the object store",
                  "Progress bars disabled", "Traceback"):
        assert noise not in r.stdout + r.stderr  # Ray's own lines, shown only with --debug
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "_lease" not in p.name}
    assert len(list(out.glob("_runs/*.json"))) == 1
    assert len(list(out.glob("_index/*.json"))) == 1  # the committed index saved for the next start

    # A finished job run again: one line, and the output (its records included) exactly as it was.
    again = run_cli("run", str(m))
    assert again.returncode == 0 and again.stderr == ""
    assert again.stdout.strip().splitlines() == [
        line for line in again.stdout.strip().splitlines() if line.startswith("nothing to do: all 3 images")]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "_lease" not in p.name} \
        == before

    # ... and with no index saved (an output of an earlier version): the same, and the index saved
    shutil.rmtree(out / "_index")
    again = run_cli("run", str(m))
    assert again.returncode == 0 and again.stderr == "" and "nothing to do: all 3 images" in again.stdout
    now = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "_lease" not in p.name}
    assert {p: b for p, b in now.items() if p.parts[0] != "_index"} == \
        {p: b for p, b in before.items() if p.parts[0] != "_index"}
    assert len(list(out.glob("_index/*.json"))) == 1
    before = now

    # --overwrite with a cluster that cannot be reached: refused before anything is removed.
    closed = free_port()
    r, took = timed_cli("run", str(m), "--overwrite", env={"RAY_ADDRESS": f"127.0.0.1:{closed}"})
    assert r.returncode == 1
    assert one_line(r).startswith(f"fastsam-batch: runtime.ray_address / RAY_ADDRESS '127.0.0.1:{closed}': cannot reach")
    assert took < 150
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "_lease" not in p.name} \
        == before
    r = run_cli("run", str(m), "--overwrite", env={"RAY_ADDRESS": "http://127.0.0.1:8265"})
    assert r.returncode == 1 and "that is the dashboard / Jobs API address" in one_line(r)


# No surprises -------------------------------------------------------------------------------------

def test_an_input_of_only_non_images_is_an_error(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a.txt", "b.json", "README.md"):
        (docs / name).write_text("not an image")
    m = manifest(tmp_path / "m.yaml", str(docs), str(CHECKPOINT), str(tmp_path / "out"))
    r = run_cli("run", str(m))
    assert r.returncode == 1  # was exit 0 with "planned 0 images"
    assert one_line(r).startswith(f"fastsam-batch: input.uri '{docs}': no images there: 3 files, none with an "
                                  "image extension")


def test_nothing_to_read_or_a_held_output_is_found_before_the_checkpoint_and_writes_nothing(tmp_path):
    """The quick checks come first: an empty folder (said as such), a folder without images, and an
    output another run holds are each refused before the checkpoint is even loaded (here a file that
    is no model, whose error would otherwise come first), and leave no output folder or lock."""
    from fastsam_batch.lease import Lease
    from fastsam_batch.storage import Storage

    bad_checkpoint = tmp_path / "not-a-model.pt"
    bad_checkpoint.write_text("not a checkpoint")
    empty, docs = tmp_path / "empty", tmp_path / "docs"
    empty.mkdir()
    docs.mkdir()
    (docs / "a.txt").write_text("not an image")
    for folder, words in ((empty, "an empty folder"), (docs, "no images there: 1 files")):
        out = tmp_path / f"out-{folder.name}"
        r = run_cli("run", str(manifest(tmp_path / "m.yaml", str(folder), str(bad_checkpoint), str(out))))
        assert r.returncode == 1 and one_line(r).startswith(f"fastsam-batch: input.uri '{folder}': {words}"), r.stderr
        assert not out.exists()
    images, held = tmp_path / "imgs", tmp_path / "held"
    save_shapes(images, [8240])
    lease = Lease(Storage(), str(held), "another-run")
    lease.acquire()
    try:
        r = run_cli("run", str(manifest(tmp_path / "m.yaml", str(images), str(bad_checkpoint), str(held))))
        assert r.returncode == 1 and "output.uri is being written by" in one_line(r), r.stderr
    finally:
        lease.release()
    assert not list(held.glob("*.parquet"))


def test_an_output_inside_the_input_is_refused(tmp_path):
    images = tmp_path / "imgs"
    save_shapes(images, [8230])
    m = manifest(tmp_path / "m.yaml", str(images), str(CHECKPOINT), str(images / "masks"))
    r = run_cli("run", str(m))
    assert r.returncode == 2
    assert "output.uri" in r.stderr and "is inside input.uri" in r.stderr
    assert not (images / "masks").exists()


# Nothing lost: Ctrl-C, periodic commits, history -------------------------------------------------

def test_ctrl_c_commits_what_is_done_and_the_same_command_resumes(tmp_path):
    """One image takes 10 minutes (the test-only slow hook), so the run cannot finish by itself;
    commits come every second (output.commit_interval_s) though rows_per_file is 1,000. Once some
    rows are committed, SIGINT: the run commits what had reached the writer, says how many, exits 130.
    With 4 writer actors (output.writers): each stages what it holds, the driver publishes it all,
    nothing staged is left behind, and the same command resumes."""
    images = tmp_path / "imgs"
    names = save_shapes(images, range(8300, 8312))
    (images / names[-1]).rename(images / "zz-slow.png")
    out = tmp_path / "out"
    m = manifest(tmp_path / "m.yaml", str(images), str(CHECKPOINT), str(out),
                 output={"rows_per_file": 1000, "commit_interval_s": 1, "writers": 4})
    exe = Path(sys.executable).with_name("fastsam-batch")
    reads = tmp_path / "reads.txt"  # each committed file the index reads (resume.read_file_rows), a line (tests/inject)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"FASTSAM_BATCH_TEST_SLOW": "decode:zz-slow:600",
                                                                        "FASTSAM_BATCH_TEST_READS": str(reads)}
    proc = subprocess.Popen([str(exe), "run", str(m)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob("part-*.parquet")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "nothing was committed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    committed = pads.dataset(str(out), format="parquet").to_table().column("image_id").to_pylist()
    assert 0 < len(committed) < len(names) and "zz-slow.png" not in committed
    assert f"fastsam-batch: interrupted: {len(committed)} of {len(names)} images committed; run the same command " \
           "to resume" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    # Ray's relayed lines about the workers it ended are kept out; the raylet's disk-space warning
    # (file_system_monitor, a machine over 95% full) is the user's to see and may come before the Ctrl-C.
    relayed = [line for line in stderr.splitlines() if "(raylet" in line and "file_system_monitor" not in line]
    assert not relayed, stderr
    record = json.loads((out / "_run.json").read_text())
    assert record["images"] == len(committed) and record["last_run"]["status"] == "interrupted"
    assert not list(out.glob("_tmp-*"))  # everything the writers had staged was published
    assert json.loads(next(out.glob("_runs/*.json")).read_text())["writers"] == 4
    # what it published was saved in the index at the Ctrl-C (deltas): the next start reads no file
    from fastsam_batch.resume import list_parts_stamped
    from fastsam_batch.saved_index import load_index
    from fastsam_batch.storage import Storage

    listed = list_parts_stamped(str(out), Storage())
    saved = load_index(str(out), Storage(), listed)
    assert list(out.glob("_index/*.delta.json")) and saved.read == [] and saved.deltas.covered == set(listed)
    saved.base.close()
    # and the run read each file it committed once: the deltas' read-back; its end took them from there
    assert sorted(files_read(reads)) == sorted(_names(listed)), (reads.read_text(), listed)

    again = tmp_path / "reads-again.txt"
    r = run_cli("run", str(m), "--debug", env={"FASTSAM_BATCH_TEST_READS": str(again)})
    assert r.returncode == 0, r.stdout + r.stderr
    # the rerun's start took the deltas (no file read), its end read each file it wrote once
    assert sorted(files_read(again)) == sorted(_names(list_parts_stamped(str(out), Storage())) - _names(listed)), \
        again.read_text() if again.exists() else "no file read"
    assert f"resuming: {len(committed)} images already have rows" in r.stdout
    assert f"run 'failing-well': {len(names) - len(committed)} images in" in r.stdout, r.stdout  # this run's
    assert "constructor arguments in the object store" in r.stdout + r.stderr  # Ray's noise, shown with --debug
    ids = pads.dataset(str(out), format="parquet").to_table().column("image_id").to_pylist()
    assert sorted(ids) == sorted(names[:-1] + ["zz-slow.png"])
    runs = sorted(out.glob("_runs/*.json"))
    assert len(runs) == 2  # each run's summary kept
    assert [json.loads(p.read_text())["interrupted"] for p in runs] == [True, False]
    record = json.loads((out / "_run.json").read_text())
    assert (record["images"], record["images_ok"], record["last_run"]["status"]) == (len(names), len(names), "finished")


def _names(paths) -> set[str]:
    return {p.rsplit("/", 1)[-1] for p in paths}


def test_a_ctrl_c_while_ray_shuts_down_ends_quietly():
    """A Ctrl-C that lands while Ray shuts down at exit (after the run said how it ended) is no
    traceback. The stand-in raises as ray.shutdown() does when interrupted."""
    from fastsam_batch.console import shutdown_ray

    class Interrupted:
        calls = 0

        def shutdown(self):
            self.calls += 1
            raise KeyboardInterrupt

    ray = Interrupted()
    shutdown_ray(ray)
    assert ray.calls == 1


# Retrying failures -------------------------------------------------------------------------------

def test_retry_errors_replaces_only_the_error_rows_asked_for(tmp_path):
    images = tmp_path / "imgs"
    names = save_shapes(images, range(8400, 8405))
    (images / names[0]).rename(images / "slow-one.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "out"
    m = manifest(tmp_path / "m.yaml", str(images), str(CHECKPOINT), str(out), runtime={"image_timeout_s": 10})
    r = run_cli("run", str(m), env={"FASTSAM_BATCH_TEST_SLOW": "decode:slow-one:3600"})
    assert r.returncode == 0, r.stdout + r.stderr

    def by_id():
        return {row["image_id"]: row for row in pads.dataset(str(out), format="parquet").to_table().to_pylist()}

    first = by_id()
    # An image slow to decode (an hour, by the test-only hook) is one timeout row; the others are ok
    # but the broken file; the run ended (run_cli's own limit, 10 minutes, is far under the hour).
    assert first["slow-one.png"]["error"].startswith("timeout: decoding took longer than")
    assert first["broken.png"]["status"] == "error"
    assert all(row["status"] == "ok" for image_id, row in first.items() if image_id not in ("slow-one.png", "broken.png"))
    assert "error timeout: 1" in r.stdout, r.stdout
    reason = first["broken.png"]["error"].split(":")[0]

    r = run_cli("run", str(m), "--retry-errors", "read_failed")
    assert r.returncode == 0 and r.stdout.strip() == "nothing to do: no error rows to retry among the 6 images"

    r = run_cli("run", str(m), "--retry-errors", "timeout")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "error rows processed again (--retry-errors, old rows replaced): 1" in r.stdout
    # This run's count and rate, apart from the job's totals (it processed one image, not six).
    assert "run 'failing-well': 1 images in" in r.stdout and "this run: ok: 1   error: 0" in r.stdout, r.stdout
    assert "UserWarning" not in r.stderr, r.stderr  # Ray Data's advice for a plan of one image, kept out
    assert "the job's images now: 6 of 6 have rows (ok 5, error 1), 5 of them from earlier runs" in r.stdout
    second = by_id()
    assert len(second) == 6 and second["slow-one.png"]["status"] == "ok"  # one row each: the old one replaced
    assert second["broken.png"] == first["broken.png"]
    for image_id in second:
        if image_id != "slow-one.png":
            assert second[image_id]["masks"] == first[image_id]["masks"]

    r = run_cli("run", str(m), "--retry-errors")  # every error reason: the broken file again (still broken)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "error rows processed again (--retry-errors, old rows replaced): 1" in r.stdout
    third = by_id()
    assert len(third) == 6 and third["broken.png"]["error"].startswith(reason + ":")
    record = json.loads((out / "_run.json").read_text())
    assert (record["images"], record["images_ok"], record["images_error"]) == (6, 5, 1)
    assert record["errors_by_reason"] == {reason: 1}


def test_retry_errors_names_the_reasons_it_knows(tmp_path):
    images = tmp_path / "imgs"
    save_shapes(images, [8410])
    m = manifest(tmp_path / "m.yaml", str(images), str(CHECKPOINT), str(tmp_path / "out"))
    r = run_cli("run", str(m), "--retry-errors", "read_failed,decode_failed")
    assert r.returncode == 2
    assert one_line(r).startswith("fastsam-batch: --retry-errors: unknown error reason decode_failed; give some of "
                                  "empty_file, not_an_image, corrupt_image")
    assert not (tmp_path / "out").exists()
