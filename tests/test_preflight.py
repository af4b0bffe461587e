"""Preflight of what the writer actors need (issue 23): where their output can be written from.

- A local ``output.uri`` through a Ray client connection (``ray://``) is refused at once, on the
  address's form (no Ray client is installed here, nor needed: nothing is joined).
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from conftest import CHECKPOINT, free_port, run_cli, save_shapes
from fastsam_batch.preflight import PreflightError, check_output_placement


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastsam-batch: "), r.stderr
    return lines[0]


def manifest(path, images, output_uri: str):
    path.write_text(yaml.safe_dump({
        "name": "preflight", "input": {"uri": str(images)},
        "model": {"checkpoint": str(CHECKPOINT), "imgsz": 320, "conf": 0.4, "device": "cpu"},
        "output": {"uri": output_uri}, "runtime": {"batch_size": 2}}))
    return path


# A local output through ray:// ---------------------------------------------------------------------

def test_a_local_output_through_a_ray_client_address_is_refused_on_its_form():
    with pytest.raises(PreflightError) as e:
        check_output_placement("ray://head:10001", "/data/masks")
    line = str(e.value)
    assert line.startswith("output.uri '/data/masks': a local output cannot be written through a Ray client "
                           "connection (runtime.ray_address / RAY_ADDRESS 'ray://head:10001')"), line
    assert "s3://" in line and "HEAD:6379" in line and "ray job submit" in line and "\n" not in line
    with pytest.raises(PreflightError):
        check_output_placement("ray://head:10001", "file:///data/masks")
    # what the writers can write: an object store through a client, anything from inside the cluster
    check_output_placement("ray://head:10001", "s3://bucket/masks/")
    check_output_placement("head:6379", "/data/masks")
    check_output_placement("auto", "/data/masks")
    check_output_placement(None, "/data/masks")


def test_run_and_plan_refuse_it_before_any_work(tmp_path):
    """As a user meets it: RAY_ADDRESS=ray://... and a local output. Nothing listens at that address
    and no Ray client is installed: the line comes from the address's form, before the output is
    made, the checkpoint loaded or a cluster asked."""
    images = tmp_path / "imgs"
    save_shapes(images, [8301])
    out = tmp_path / "out"
    m = manifest(tmp_path / "m.yaml", images, str(out))
    address = f"ray://127.0.0.1:{free_port()}"
    for command in ("run", "plan"):
        r = run_cli(command, str(m), env={"RAY_ADDRESS": address})
        assert r.returncode == 1, r.stdout + r.stderr
        line = one_line(r)
        assert line.startswith(f"fastsam-batch: output.uri {str(out)!r}: a local output cannot be written through a "
                               f"Ray client connection (runtime.ray_address / RAY_ADDRESS {address!r})"), line
        assert not out.exists()
