"""Where it runs: the documented `ray job submit -- fastsam-batch run job.yaml` on a head started
with `ray start --head`; the KubeRay RayJob / RayCronJob manifests against KubeRay's own CRD
schemas (../shared/kuberay). The container image is tested in test_install.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from conftest import CHECKPOINT, KUBERAY, ROOT, free_port, save_shapes, shared
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head started as the cluster guide says (`ray start --head`, with the dashboard, which
    serves the Jobs API, and token authentication: RAY_AUTH_MODE=token and the cluster's token);
    stopped at the end."""
    import secrets

    temp = tmp_path_factory.mktemp("ray-head")
    port, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(temp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    r = subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                        "--dashboard-host=127.0.0.1", "--num-cpus=4", "--include-dashboard=true", "--disable-usage-stats",
                        f"--temp-dir={temp}"], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


SUBMIT = """
import json, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
job_id = client.submit_job(entrypoint=sys.argv[2])
deadline = time.time() + 600
while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    assert time.time() < deadline, "the job did not end"
    time.sleep(1)
print(json.dumps({"status": str(client.get_job_status(job_id).value), "logs": client.get_job_logs(job_id)}))
"""


def submit(head: dict, entrypoint: str) -> dict:
    """Submits through the Jobs API (JobSubmissionClient) from a process of its own, holding the
    cluster's token as a user's shell would (Ray reads RAY_AUTH_MODE once per process); waits for
    the job to end."""
    r = subprocess.run([sys.executable, "-c", SUBMIT, head["address"], entrypoint], env=head["env"],
                       capture_output=True, text=True, timeout=700)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_ray_job_submit_runs_a_manifest_and_a_bad_one_fails_with_its_error(ray_head, tmp_path):
    images = tmp_path / "imgs"
    names = save_shapes(images, range(9500, 9504))
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "submitted", "input": {"uri": str(images)},
        "model": {"checkpoint": str(CHECKPOINT), "imgsz": 320, "conf": 0.4, "device": "auto"},
        "output": {"uri": str(out)}, "runtime": {"batch_size": 2, "decode_cpus": 0.5, "cpus_per_actor": 1},
    }))
    done = submit(ray_head, f"{BIN / 'fastsam-batch'} run {job}")
    assert done["status"] == "SUCCEEDED", done["logs"]
    assert "fastsam-batch run 'submitted': 4 images" in done["logs"]
    ids = pads.dataset(str(out), format="parquet").to_table().column("image_id").to_pylist()
    assert sorted(ids) == sorted(names)

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "input": {"uri": str(images)},
                                   "model": {"checkpoint": str(CHECKPOINT), "conf": 3},
                                   "output": {"uri": str(tmp_path / "bad-out")}}))
    failed = submit(ray_head, f"{BIN / 'fastsam-batch'} run {bad}")
    assert failed["status"] == "FAILED" and "model.conf" in failed["logs"], failed
    assert not (tmp_path / "bad-out").exists()


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
    assert cluster["rayVersion"] == _pinned("ray")
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


def _pinned(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(package + "=="):
            return line.split("==")[1]
    raise AssertionError(f"{package} not pinned")
