"""Re-running a job finishes it instead of redoing it; output is exactly one row per image."""

from __future__ import annotations

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
from shapes import make_image

N_IMAGES = 24


@pytest.fixture()
def job(tmp_path, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(N_IMAGES):
        make_image(3000 + i, size=(160, 128))[0].save(images / f"{i:03d}.png")
    out = tmp_path / "out"

    def manifest(name="m.yaml", conf=0.4):
        p = tmp_path / name
        p.write_text(yaml.safe_dump({
            "name": "resume",
            "input": {"uri": str(images)},
            "model": {"checkpoint": str(checkpoint), "imgsz": 320, "conf": conf, "device": "cpu"},
            "output": {"uri": str(out), "rows_per_file": 2},
            "runtime": {"batch_size": 2},
        }))
        return p

    return {"images": images, "out": out, "manifest": manifest}


def rows(out: Path):
    return pads.dataset(str(out), format="parquet").to_table(columns=["image_id", "run_fingerprint"]).to_pylist()


def assert_exactly_once(out: Path):
    ids = [r["image_id"] for r in rows(out)]
    assert len(ids) == len(set(ids)) == N_IMAGES
    assert set(ids) == {f"{i:03d}.png" for i in range(N_IMAGES)}


def test_driver_killed_mid_run_then_rerun_finishes_exactly_once(job):
    m = job["manifest"]()
    exe = Path(sys.executable).with_name("fastsam-batch")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([str(exe), "run", str(m)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(job["out"].glob("part-*.parquet"))) < 2:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = rows(job["out"])
    assert 0 < len(partial) < N_IMAGES, "the kill should land mid-run"

    r = run_cli("run", str(m))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming: {len(partial)} images already have rows" in r.stdout
    assert f"already done in an earlier run (skipped): {len(partial)}" in r.stdout
    assert_exactly_once(job["out"])
    assert not list(job["out"].glob("_tmp-*"))

    again = run_cli("run", str(m))
    assert again.returncode == 0
    assert f"nothing to do: all {N_IMAGES} images already have rows" in again.stdout
    assert_exactly_once(job["out"])


def test_resume_with_a_changed_setting_is_refused_unless_overwrite(job):
    assert run_cli("run", str(job["manifest"]())).returncode == 0
    first = {r["run_fingerprint"] for r in rows(job["out"])}
    assert len(first) == 1

    changed = job["manifest"]("changed.yaml", conf=0.5)
    r = run_cli("run", str(changed))
    assert r.returncode == 1
    assert "another configuration" in r.stderr and first.pop() in r.stderr and "--overwrite" in r.stderr
    assert_exactly_once(job["out"])

    r = run_cli("run", str(changed), "--overwrite")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_exactly_once(job["out"])
    assert len({r["run_fingerprint"] for r in rows(job["out"])}) == 1
