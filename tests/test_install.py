"""Installed as users install it. The container image's steps (cluster/Dockerfile: its COPY lines
and its one install step, cluster/install.sh) are replayed for real into a fresh virtual
environment: the package is built from the copied files and installed non-editable, with every
dependency pinned by constraints.txt. Then, from a folder outside the source tree and with nothing
of the source tree on the path, the installed ``fastsam-batch``: every module of the source imports,
every subcommand's --help, ``plan`` for every input kind, the demo job, and the helper commands on
its output. A module left out of the wheel fails here (as ``fastsam_batch/inputs/`` once was)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import yaml

from conftest import CHECKPOINT, FAKE_KEY, FAKE_SECRET, ROOT, make_bucket, parquet_bytes, pinned, png_bytes
from fastsam_batch.manifest import InputConfig

DOCKERFILE = ROOT / "cluster" / "Dockerfile"
IMAGE_SRC = "/opt/fastsam-batch"  # where the Dockerfile puts the sources it installs


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions (continuation lines joined), as (keyword, arguments)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _copy_as_the_image_does(root: Path) -> None:
    """The Dockerfile's COPY lines, replayed from the source tree into ``root`` (the image's /)."""
    for keyword, args in _instructions():
        if keyword != "COPY":
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        *sources, dest = parts
        for source in sources:
            src = ROOT / source
            target = root / dest.lstrip("/")
            if dest.endswith("/"):
                target = target / src.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, target)


def test_the_dockerfile_is_the_pinned_ray_image_and_installs_by_install_sh_alone():
    """What no image builder here can run is checked as text: the Ray base image of the pinned Ray,
    a non-root user, and one Python install step, cluster/install.sh (which the fixture below runs)."""
    steps = _instructions()
    base = next(args for keyword, args in steps if keyword == "FROM")
    assert base.startswith(f"rayproject/ray:{pinned('ray')}-py311") and base.endswith("-gpu")
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    runs = [args for keyword, args in steps if keyword == "RUN"]
    python_steps = [r for r in runs if "pip" in r or "python" in r or "install.sh" in r]
    assert python_steps == [f"bash {IMAGE_SRC}/cluster/install.sh {IMAGE_SRC}"], runs


class ImageInstall:
    """The image's install replayed into a fresh virtual environment under ``base``: the files the
    Dockerfile copies, a venv, then cluster/install.sh in a process of its own (no pip cache, no
    editable install). Started when collection ends (conftest's ``pytest_collection_finish``, when
    a test here that needs it is selected), so the couple of minutes pip spends fetching and
    unpacking run beside the tests before this module's; the fixture waits for its end."""

    def __init__(self, base: Path):
        self.base = base
        root = base / "root"
        _copy_as_the_image_does(root)
        src = root / IMAGE_SRC.lstrip("/")
        self.venv = base / "venv"
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(self.venv)],
                       check=True, timeout=300)
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "RAY_ADDRESS") and not k.startswith("AWS_")}
        env["PATH"] = f"{self.venv / 'bin'}:{env['PATH']}"
        env["YOLO_CONFIG_DIR"] = str(base / "yolo")  # ultralytics writes its settings here, not in the user's home
        for keyword, args in _instructions():  # the image's ENV lines
            if keyword == "ENV":
                env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
        env["FASTSAM_BATCH_CACHE"] = str(base / "cache")
        self.env = env
        self.log = base / "install.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["bash", str(src / "cluster" / "install.sh"), str(src)], env=env, cwd=base,
                                         stdout=log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 1500) -> str:
        """install.sh's exit status checked; its output."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        out = self.log.read_text(errors="replace")
        assert rc == 0, out[-6000:]
        return out

    def remove(self, wait: bool = True) -> None:
        """The install stopped if it still runs, and its folder (6.6 GB) removed: with ``wait`` false,
        in a thread that ``wait_removed`` (at the session's end) joins, so the tests go on meanwhile."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.remover = threading.Thread(target=shutil.rmtree, args=(self.base,), kwargs={"ignore_errors": True})
        self.remover.start()
        _removing.append(self.remover)
        if wait:
            self.remover.join()


_removing: list[threading.Thread] = []


def wait_removed() -> None:
    """Every image folder's removal finished (called when the session ends)."""
    while _removing:
        _removing.pop().join()


_started: ImageInstall | None = None


def start_install(base: Path) -> None:
    """Begin the image's install now (called once, when collection ends)."""
    global _started
    if _started is None:
        _started = ImageInstall(base)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The image's install (begun when collection ended, or now), waited for; yields (bin folder,
    environment, an empty working folder outside the source tree)."""
    global _started
    if _started is None:
        start_install(tmp_path_factory.mktemp("image"))
    image, _started = _started, None
    try:
        out = image.wait()
        assert re.search(rf"\| ray {re.escape(pinned('ray'))} \|", out), out[-2000:]
        work = image.base / "work"
        work.mkdir()
        yield image.venv / "bin", image.env, work
    finally:
        image.remove(wait=False)


def _run(installed, *args, cwd=None, timeout=600, env=None):
    bin_dir, base_env, work = installed
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], env={**base_env, **(env or {})}, cwd=cwd or work,
                          capture_output=True, text=True, timeout=timeout)


def _source_modules() -> set[str]:
    pkg = ROOT / "fastsam_batch"
    out = set()
    for p in pkg.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_every_module_of_the_source_is_installed_and_imports(installed):
    """Isolated mode (-I: no PYTHONPATH, no current folder on the path): what imports is what the
    wheel installed, from the environment's site-packages, never the source tree."""
    code = ("import importlib, json, pkgutil, fastsam_batch as p\n"
            "names = ['fastsam_batch'] + [m.name for m in pkgutil.walk_packages(p.__path__, 'fastsam_batch.')]\n"
            "for n in names: importlib.import_module(n)\n"
            "print(json.dumps({'file': p.__file__, 'modules': names}))\n")
    r = _run(installed, "python", "-I", "-c", code)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    bin_dir = installed[0]
    assert Path(got["file"]).is_relative_to(bin_dir.parent) and not Path(got["file"]).is_relative_to(ROOT)
    assert set(got["modules"]) == _source_modules()


def test_every_subcommand_answers_help(installed):
    subcommands = set(re.findall(r'add_parser\(\s*"([\w-]+)"', (ROOT / "fastsam_batch" / "cli.py").read_text()))
    r = _run(installed, "fastsam-batch", "--help")
    assert r.returncode == 0, r.stderr
    listed = set(re.search(r"\{([\w,-]+)\}", r.stdout).group(1).split(","))
    assert listed == subcommands and len(subcommands) >= 6
    for name in sorted(subcommands):
        r = _run(installed, "fastsam-batch", name, "--help")
        assert r.returncode == 0 and r.stdout.startswith("usage: fastsam-batch " + name), (name, r.stderr[-2000:])


def test_the_demo_job_and_the_helper_commands_run_from_outside_the_source_tree(installed, tmp_path):
    """The README's demo, as a user of the installed command has it: the job folder with its
    images and the fixture checkpoint where demo.yaml's relative paths point."""
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    (tmp_path / "tests" / "fixtures").mkdir(parents=True)
    shutil.copy2(CHECKPOINT, tmp_path / "tests" / "fixtures" / CHECKPOINT.name)
    demo = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    out = (tmp_path / "jobs" / demo["output"]["uri"]).resolve()
    images = sorted(p.name for p in (ROOT / "jobs" / "demo-images").iterdir())
    r = _run(installed, "fastsam-batch", "run", "jobs/demo.yaml", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = pads.dataset(str(out), format="parquet").to_table(columns=["image_id", "status", "num_masks"])
    assert sorted(table.column("image_id").to_pylist()) == images
    assert set(table.column("status").to_pylist()) == {"ok"} and min(table.column("num_masks").to_pylist()) > 0

    r = _run(installed, "fastsam-batch", "stats", str(out), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["rows_by_status"] == {"ok": len(images)}
    r = _run(installed, "fastsam-batch", "export-coco", str(out), "--out", str(tmp_path / "coco.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len({a["image_id"] for a in json.loads((tmp_path / "coco.json").read_text())}) == len(images)
    r = _run(installed, "fastsam-batch", "overlay", str(out), "--sample", "2", "--out", str(tmp_path / "look"),
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list((tmp_path / "look").glob("*.png"))) >= 2
    r = _run(installed, "fastsam-batch", "schema", cwd=tmp_path)
    assert r.returncode == 0 and "input" in json.loads(r.stdout)["properties"]


def test_plan_reads_every_input_kind(installed, s3_env, s3fs_client, tmp_path):
    """One small collection in each input form the manifest knows (on the moto S3 server): the
    installed command plans each, listing its images or containers (nothing is written)."""
    fs, bucket = s3fs_client, "install-kinds"
    make_bucket(s3_env, bucket)
    names = [f"{i}.png" for i in range(3)]
    images = {n: png_bytes(40 + i) for i, n in enumerate(names)}
    for n, data in images.items():
        fs.pipe(f"{bucket}/loose/{n}", data)
    text = io.StringIO()
    csv.writer(text).writerows([["uri"]] + [[f"s3://{bucket}/loose/{n}"] for n in names])
    fs.pipe(f"{bucket}/lists/images.csv", text.getvalue().encode())
    etags = {n: fs.info(f"{bucket}/loose/{n}")["ETag"].strip('"') for n in names}
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb") as g:
        g.write("".join(f'"{bucket}","loose/{n}","{len(images[n])}","{etags[n]}"\n' for n in names).encode())
    fs.pipe(f"{bucket}/inventory/data/part-0.csv.gz", gz.getvalue())
    fs.pipe(f"{bucket}/inventory/manifest.json", json.dumps({
        "sourceBucket": bucket, "destinationBucket": f"arn:aws:s3:::{bucket}", "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, Size, ETag", "files": [{"key": "inventory/data/part-0.csv.gz"}]}).encode())
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        for n, data in images.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    fs.pipe(f"{bucket}/shards/s0.tar", tar.getvalue())
    fs.pipe(f"{bucket}/pq/images.parquet", parquet_bytes(pa.table({"image": [images[n] for n in names], "id": names})))
    kinds = {
        "files": ({"uri": f"s3://{bucket}/loose/"}, "images_listed", 3),
        "list": ({"uri": f"s3://{bucket}/lists/images.csv", "format": "list"}, "images_listed", 3),
        "s3_inventory": ({"uri": f"s3://{bucket}/inventory/manifest.json", "format": "s3_inventory"}, "images_listed", 3),
        "tar": ({"uri": f"s3://{bucket}/shards/", "format": "tar"}, "containers_listed", 1),
        "parquet_images": ({"uri": f"s3://{bucket}/pq/", "format": "parquet_images", "id_column": "id"},
                           "containers_listed", 1),
    }
    assert set(kinds) == set(InputConfig.model_fields["format"].annotation.__args__)  # a new kind must be added here
    for kind, (input_cfg, _, _) in kinds.items():
        (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump({
            "name": f"install-{kind}", "input": input_cfg,
            "model": {"checkpoint": str(CHECKPOINT), "imgsz": 320, "device": "cpu"},
            "output": {"uri": str(tmp_path / "out" / kind)},
            "storage_options": {"endpoint_url": s3_env["AWS_ENDPOINT_URL"], "key": FAKE_KEY, "secret": FAKE_SECRET}}))
    with ThreadPoolExecutor(len(kinds)) as pool:  # each plan in a process of its own, all at once (CI time)
        plans = dict(zip(kinds, pool.map(lambda k: _run(installed, "fastsam-batch", "plan", str(tmp_path / f"{k}.yaml"),
                                                        "--json"), kinds)))
    for kind, (input_cfg, field, count) in kinds.items():
        r = plans[kind]
        assert r.returncode == 0, (kind, r.stdout[-2000:] + r.stderr[-2000:])
        plan = json.loads(r.stdout)
        assert (plan["input_format"], plan[field]) == (kind, count), (kind, plan)
    assert not (tmp_path / "out").exists()  # plan writes nothing
