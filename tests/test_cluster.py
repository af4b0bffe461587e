"""Where it runs: the documented `ray job submit -- fastsam-batch run job.yaml` on a head started
with `ray start --head`; the KubeRay RayJob / RayCronJob manifests against KubeRay's own CRD
schemas (../shared/kuberay). The container image is tested in test_install.py."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from conftest import CHECKPOINT, KUBERAY, ROOT, free_port, pinned, run_cli, save_shapes, shared, write_job
BIN = Path(sys.executable).parent


def start_head(temp: Path, env: dict, *args: str) -> dict:
    """`ray start --head` on free ports with its own temp folder (`--temp-dir`, RAY_TMPDIR). Every port
    with a fixed default is given: the dashboard agent's (52365) too, which another Ray on the machine
    may hold; its agent then never starts, and the Jobs API answers "No available agent" for good."""
    port, client, agent = free_port(), free_port(), free_port()
    r = subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", f"--ray-client-server-port={client}",
                        f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats", f"--temp-dir={temp / 'ray'}",
                        *args], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"gcs": f"127.0.0.1:{port}", "port": port, "temp": temp, "env": env}


def head_processes(head: dict) -> list:
    """The processes of the head started with :func:`start_head`: those naming its temp folder or its
    GCS port in their command line (every Ray daemon does one or the other), and their children."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline", "uids"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if p.info["uids"] is None or p.info["uids"].real != os.getuid():
            continue  # only this user's processes: the test started the head as this user
        if (str(head["temp"]) in cmd or re.search(rf":{head['port']}\b", cmd)) and p.pid != os.getpid():
            found[p.pid] = p
            try:
                found.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.Error:
                pass
    return list(found.values())


def stop_head(head: dict) -> None:
    """Stops that head by its address and temp folder only (never `ray stop`, which ends every Ray of
    the user on the machine): its processes are asked to end, then killed when they do not."""
    import psutil

    procs = head_processes(head)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    # GCS and the autoscaler's monitor do not end on SIGTERM (measured: both still ran 30 s later),
    # so the grace is short: what has not ended by then is killed either way.
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=60)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started as the cluster guide says (`ray start --head`, with the dashboard, which
    serves the Jobs API, and token authentication: RAY_AUTH_MODE=token and the cluster's token), on
    free ports and a temp folder of its own; stopped by its address at the end. RAY_TMPDIR names the
    folder whose ``ray/`` it records its address in, as `ray start` does in /tmp/ray by default.
    (A short folder under TMPDIR: Ray's socket paths must stay under 108 characters.)"""
    import secrets
    import shutil
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="rh-"))
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(temp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # fastsam-batch on the head's PATH
    head = start_head(temp, env, f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=4",
                      "--include-dashboard=true")
    try:
        yield {**head, "address": f"http://127.0.0.1:{dashboard}"}
    finally:
        stop_head(head)
        shutil.rmtree(temp, ignore_errors=True)


SUBMIT = """
import json, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
runtime_env = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
deadline = time.time() + 300
while True:  # a head just started may not have its Jobs agent yet: asked again until it answers
    try:
        job_id = client.submit_job(entrypoint=sys.argv[2], runtime_env=runtime_env)
        break
    except RuntimeError as e:
        assert "No available agent" in str(e) and time.time() < deadline, e
        time.sleep(1)
deadline = time.time() + 600
while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    assert time.time() < deadline, "the job did not end"
    time.sleep(1)
print(json.dumps({"status": str(client.get_job_status(job_id).value), "logs": client.get_job_logs(job_id)}))
"""


def submit(head: dict, entrypoint: str, cwd: Path | None = None, runtime_env: dict | None = None) -> dict:
    """Submits through the Jobs API (JobSubmissionClient, as `ray job submit` does) from a process of
    its own in ``cwd``, holding the cluster's token as a user's shell would (Ray reads RAY_AUTH_MODE
    once per process); waits for the Jobs agent to take it, then for the job to end."""
    r = subprocess.run([sys.executable, "-c", SUBMIT, head["address"], entrypoint,
                        *([json.dumps(runtime_env)] if runtime_env else [])], env=head["env"], cwd=cwd,
                       capture_output=True, text=True, timeout=1300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_ray_job_submit_runs_a_manifest_and_a_bad_one_fails_with_its_error(ray_head, tmp_path):
    """The guide's submission: `fastsam-batch` on the head's PATH, the manifest's path on the head, from
    another directory; its relative paths resolve against the manifest's folder, so the output lands
    where the manifest says. With --working-dir, Ray runs the job in a temporary copy of the folder:
    a relative output.uri would be written inside that copy and lost, so the run refuses it."""
    jobdir, elsewhere = tmp_path / "jobdir", tmp_path / "elsewhere"
    elsewhere.mkdir()
    names = save_shapes(jobdir / "imgs", range(9500, 9504))
    job = jobdir / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "submitted", "input": {"uri": "imgs/"},
        "model": {"checkpoint": str(CHECKPOINT), "imgsz": 320, "conf": 0.4, "device": "auto"},
        "output": {"uri": "out/"}, "runtime": {"batch_size": 2, "decode_cpus": 0.5, "cpus_per_actor": 1, "num_actors": 1},
    }))
    done = submit(ray_head, f"fastsam-batch run {job}", cwd=elsewhere)
    assert done["status"] == "SUCCEEDED", done["logs"]
    assert "fastsam-batch run 'submitted': 4 images" in done["logs"]
    ids = pads.dataset(str(jobdir / "out"), format="parquet").to_table().column("image_id").to_pylist()
    assert sorted(ids) == sorted(names)
    assert not (elsewhere / "out").exists()

    copied = submit(ray_head, "fastsam-batch run job.yaml --overwrite", cwd=elsewhere,
                    runtime_env={"working_dir": str(jobdir), "excludes": ["out/"]})
    assert copied["status"] == "FAILED", copied["logs"]
    assert "output.uri 'out/'" in copied["logs"] and "--working-dir" in copied["logs"], copied["logs"]
    assert sorted(pads.dataset(str(jobdir / "out"), format="parquet").to_table().column("image_id").to_pylist()) \
        == sorted(names)  # the first run's output untouched

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "input": {"uri": str(jobdir / "imgs")},
                                   "model": {"checkpoint": str(CHECKPOINT), "conf": 3},
                                   "output": {"uri": str(tmp_path / "bad-out")}}))
    failed = submit(ray_head, f"fastsam-batch run {bad}")
    assert failed["status"] == "FAILED" and "model.conf" in failed["logs"], failed
    assert not (tmp_path / "bad-out").exists()


def test_a_submitted_job_gets_its_s3_credentials_from_runtime_env_json(ray_head, s3_env, s3fs_client, tmp_path):
    """The guide's `--runtime-env-json '{"env_vars": {"AWS_...": ...}}'`: the head has no credentials
    of its own; the submission's runtime environment gives them to the job's driver and workers,
    which read the images from and write the masks to the S3 server, and no secret reaches the logs."""
    from conftest import FAKE_SECRET, make_bucket

    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} & set(ray_head["env"])  # the head has none
    make_bucket(s3_env, "submitted")
    names = save_shapes(tmp_path / "imgs", range(9530, 9533))
    for n in names:
        s3fs_client.put_file(str(tmp_path / "imgs" / n), f"submitted/imgs/{n}")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "submitted-s3", "input": {"uri": "s3://submitted/imgs/"},
        "model": {"checkpoint": str(CHECKPOINT), "imgsz": 320, "conf": 0.4, "device": "auto"},
        "output": {"uri": "s3://submitted/out/"}, "runtime": {"batch_size": 2, "decode_cpus": 0.5, "cpus_per_actor": 1, "num_actors": 1},
    }))
    done = submit(ray_head, f"fastsam-batch run {job}", runtime_env={"env_vars": s3_env})
    assert done["status"] == "SUCCEEDED", done["logs"]
    s3fs_client.invalidate_cache()
    table = pads.dataset("submitted/out/", format="parquet", filesystem=s3fs_client).to_table()
    assert sorted(table.column("image_id").to_pylist()) == sorted(names)
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert FAKE_SECRET not in done["logs"]


def test_a_run_beside_a_running_head_starts_its_own_ray_and_says_so(ray_head, tmp_path):
    """A `ray start --head` on the machine (recorded where ray.init() looks for one) and no
    RAY_ADDRESS: the run starts an embedded Ray of its own, as `plan` says it will, naming the cluster
    it does not join; Ray's warnings about several instances stay out of the output."""
    names = save_shapes(tmp_path / "imgs", range(9510, 9512))
    job = write_job(tmp_path / "job.yaml", "beside-a-head", str(tmp_path / "imgs"), str(CHECKPOINT),
                    str(tmp_path / "out"), 10, num_actors=1)
    env = {"RAY_TMPDIR": str(ray_head["temp"])}  # a user's shell on that machine: no address, no token
    plan = run_cli("plan", str(job), env=env)
    assert plan.returncode == 0, plan.stderr
    cluster = next(line for line in plan.stdout.splitlines() if line.strip().startswith("cluster:"))
    assert "embedded local Ray of this run's own" in cluster and f":{ray_head['port']} is not joined" in cluster, cluster
    r = run_cli("run", str(job), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith("started an embedded local Ray"))
    assert f":{ray_head['port']} is not joined" in line, line
    assert sorted(pads.dataset(str(tmp_path / "out"), format="parquet").to_table().column("image_id").to_pylist()) \
        == sorted(names)
    for noise in ("Found multiple active Ray instances", "UserWarning", "Traceback"):
        assert noise not in r.stdout + r.stderr, r.stdout + r.stderr
    # The guide's run on the head: RAY_ADDRESS=auto (and the cluster's token) joins it.
    joined = write_job(tmp_path / "joined.yaml", "on-the-head", str(tmp_path / "imgs"), str(CHECKPOINT),
                       str(tmp_path / "out-joined"), 10, num_actors=1)
    r = run_cli("run", str(joined), env={**{k: ray_head["env"][k] for k in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")},
                                         "RAY_ADDRESS": "auto"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "joined the Ray cluster at auto (4 CPUs" in r.stdout, r.stdout
    assert sorted(pads.dataset(str(tmp_path / "out-joined"), format="parquet").to_table().column("image_id")
                  .to_pylist()) == sorted(names)


def test_joining_a_token_cluster_without_the_token_says_what_to_set(ray_head, tmp_path):
    """RAY_ADDRESS=HOST:PORT of a cluster with token authentication, from a shell without
    RAY_AUTH_MODE=token: one line naming the fix, not Ray's InvalidAuthToken retries."""
    save_shapes(tmp_path / "imgs", range(9520, 9521))
    job = write_job(tmp_path / "job.yaml", "no-token", str(tmp_path / "imgs"), str(CHECKPOINT), str(tmp_path / "out"), 10)
    r = run_cli("run", str(job), env={"RAY_ADDRESS": ray_head["gcs"], "RAY_TMPDIR": str(tmp_path)})
    assert r.returncode == 1, r.stdout + r.stderr
    said = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith("fastsam-batch: runtime.ray_address / RAY_ADDRESS"), r.stderr
    assert "RAY_AUTH_MODE=token" in said[0] and "InvalidAuthToken" in said[0], said
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.parquet"))


def test_a_head_is_stopped_by_its_address_alone(ray_head, tmp_path):
    """The tests stop only the Ray they started (never `ray stop`, which ends every Ray of the user on
    the machine, a developer's own cluster included): a second head stopped by its address leaves the
    first one running."""
    tests = ROOT / "tests"
    for f in tests.glob("*.py"):
        assert not re.search(r"""["']ray["']\)?\s*,\s*["']stop["']|\bray stop --force""", f.read_text()), f.name
    import psutil

    import shutil
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="rh-"))  # short: Ray's socket paths
    second = start_head(temp, {**ray_head["env"], "RAY_TMPDIR": str(temp)}, "--num-cpus=1", "--include-dashboard=false")
    procs = head_processes(second)
    assert procs
    stop_head(second)
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    shutil.rmtree(temp, ignore_errors=True)
    socket.create_connection(("127.0.0.1", ray_head["port"]), timeout=10).close()  # the first still answers


def _crd_schema(name: str) -> dict:
    crd = yaml.safe_load((shared(KUBERAY) / name).read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def _k8s_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "cluster" / "k8s" / name).read_text()) if d]


@pytest.mark.parametrize("name,kind,crd", [("rayjob.yaml", "RayJob", "ray.io_rayjobs.yaml"),
                                           ("raycronjob.yaml", "RayCronJob", "ray.io_raycronjobs.yaml")])
def test_kuberay_manifests_validate_against_kuberays_crds(name, kind, crd):
    import jsonschema

    docs = _k8s_docs(name)
    resource = next(d for d in docs if d["kind"] == kind)
    assert resource["apiVersion"] == "ray.io/v1"
    jsonschema.validate(resource, _crd_schema(crd))
    spec = resource["spec"]["jobTemplate"] if kind == "RayCronJob" else resource["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned("ray")
    assert cluster["authOptions"]["mode"] == "token"  # Ray 2.60's default, with the token KubeRay makes
    workers = cluster["workerGroupSpecs"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for w in workers for c in w["template"]["spec"]["containers"])
    assert spec["entrypoint"].startswith("fastsam-batch run ")
    # Credentials come from a Secret (or a service account), never inline.
    groups = [cluster["headGroupSpec"], *workers]
    for container in (c for g in groups for c in g["template"]["spec"]["containers"]):
        assert any("secretRef" in source for source in container.get("envFrom", [])), container["name"]
        inline = [e["name"] for e in container.get("env", []) if "value" in e and re.search("KEY|SECRET|TOKEN", e["name"])]
        assert not inline, inline
    # The job manifest it runs is a valid manifest.
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    from fastsam_batch.manifest import parse_manifest

    for body in config["data"].values():
        parse_manifest(yaml.safe_load(body))
    if kind == "RayCronJob":
        jsonschema.validate({**resource, "spec": {**resource["spec"], "schedule": "0 2 * * *"}}, _crd_schema(crd))
        assert len(resource["spec"]["schedule"].split()) == 5


def test_a_manifest_missing_what_kuberay_requires_is_rejected_by_the_schema():
    """The validation above can fail: a RayCronJob without its schedule does not validate."""
    import jsonschema

    resource = next(d for d in _k8s_docs("raycronjob.yaml") if d["kind"] == "RayCronJob")
    broken = {**resource, "spec": {k: v for k, v in resource["spec"].items() if k != "schedule"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _crd_schema("ray.io_raycronjobs.yaml"))
