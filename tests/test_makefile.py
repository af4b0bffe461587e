"""The Makefile's opt-in CPU wheel index for torch, as make would run it (``make -n``: the commands
printed, not run; no package is downloaded here, and the index itself is not reachable)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import ROOT


def make_n(tmp_path, *args: str) -> str:
    if not shutil.which("make"):
        pytest.skip("needs make")
    r = subprocess.run(["make", "-n", "-B", "install", f"VENV={tmp_path / 'venv'}", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_torch_index_cpu_installs_torch_from_pytorchs_cpu_wheels_first(tmp_path):
    lines = make_n(tmp_path, "TORCH_INDEX=cpu").splitlines()
    torch = next(i for i, line in enumerate(lines) if "--index-url https://download.pytorch.org/whl/cpu" in line)
    assert lines[torch].endswith("-c constraints.txt --index-url https://download.pytorch.org/whl/cpu torch torchvision")
    package = next(i for i, line in enumerate(lines) if line.endswith("-e '.[test]'"))
    assert torch < package  # the pinned CPU build is there before the package asks for torch


def test_the_default_install_is_unchanged(tmp_path):
    out = make_n(tmp_path)
    assert "download.pytorch.org" not in out and "--index-url" not in out
    assert out.count("pip install") == 2  # pip itself, then the package under the constraints
