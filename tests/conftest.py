"""Shared test fixtures: the fixture checkpoint, generated images with ground truth, a moto S3
server on 127.0.0.1 (real S3 API over HTTP), and a helper that runs the CLI as a user would."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CHECKPOINT = FIXTURES / "fastsam-fixture.pt"
SHARED = ROOT.parent / "shared"  # test data beside the clone, not in it: photographs, KubeRay's CRDs
REAL_IMAGES = SHARED / "real-images"
KUBERAY = SHARED / "kuberay"
sys.path.insert(0, str(FIXTURES))
# The tests' fault injection (tests/inject/sitecustomize.py: slow images, a crashing actor), in every
# process the tests start: the CLI runs, their Ray workers, test-owned clusters' nodes. It does
# nothing in a process without its environment variables.
INJECT = FIXTURES.parent / "inject"
os.environ["PYTHONPATH"] = os.pathsep.join([str(INJECT), *filter(None, [os.environ.get("PYTHONPATH")])])

from fastsam_batch.offline import configure_ultralytics  # noqa: E402

configure_ultralytics()

FAKE_KEY = "AKIAFASTSAMTESTKEY01"
FAKE_SECRET = "s3cr3t-never-printed-9f8e7d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(package: str) -> str:
    """The version constraints.txt pins ``package`` to."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(package + "=="):
            return line.split("==")[1]
    raise AssertionError(f"{package} not pinned")


def png_bytes(seed: int) -> bytes:
    """The generated picture of ``seed`` (tests/fixtures/shapes.py), as PNG bytes."""
    import io

    from shapes import make_image

    buf = io.BytesIO()
    make_image(seed)[0].save(buf, format="PNG")
    return buf.getvalue()


def parquet_bytes(table) -> bytes:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def shared(path: Path) -> Path:
    """``path`` (under ../shared) when it is there; else the calling test (or module) skips, naming
    what is missing, as on a fresh clone of the repository alone. CI sets
    FASTSAM_BATCH_REQUIRE_SHARED=1: there a missing ../shared fails instead of skipping."""
    found = shared_or_none(path)  # fails there under FASTSAM_BATCH_REQUIRE_SHARED
    if found is None:
        pytest.skip(f"needs ../{path.relative_to(ROOT.parent)} (test data beside the clone), which this checkout "
                    "does not have", allow_module_level=True)
    return found


def shared_or_none(path: Path) -> Path | None:
    """``path`` (under ../shared) when it is there, else None for a test that can use a stand-in
    (a generated picture for "a JPEG"); with FASTSAM_BATCH_REQUIRE_SHARED (CI) it must be there."""
    if path.exists():
        return path
    if os.environ.get("FASTSAM_BATCH_REQUIRE_SHARED"):
        pytest.fail(f"../{path.relative_to(ROOT.parent)} is missing and FASTSAM_BATCH_REQUIRE_SHARED is set "
                    "(CI runs every test)", pytrace=False)
    return None


@contextlib.contextmanager
def moto_server(env: dict | None = None):
    """A moto server (S3, IAM, ...) in its own process on 127.0.0.1, with ``env`` added to its
    environment (e.g. INITIAL_NO_AUTH_ACTION_COUNT: signatures and IAM policies checked); yields
    its endpoint URL once it answers, and stops it after."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120  # a busy machine: starting moto's server can take a while
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # hung: it goes anyway
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server in its own process on 127.0.0.1; yields the endpoint URL."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3_env(s3_server):
    """The standard AWS environment pointing at the moto server, as a user would set it."""
    return {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": FAKE_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_REGION": "us-east-1",
    }


@pytest.fixture(scope="session")
def s3fs_client(s3_env):
    import s3fs

    return s3fs.S3FileSystem(key=FAKE_KEY, secret=FAKE_SECRET, endpoint_url=s3_env["AWS_ENDPOINT_URL"],
                             client_kwargs={"region_name": "us-east-1"}, skip_instance_cache=True)


def make_bucket(s3_env: dict, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], aws_access_key_id=FAKE_KEY,
                 aws_secret_access_key=FAKE_SECRET, region_name="us-east-1").create_bucket(Bucket=name)


def cli_env(env: dict | None = None) -> dict:
    """The environment of a ``fastsam-batch`` run a test starts: this one's without AWS settings or
    RAY_ADDRESS (an embedded Ray of its own), with ``env`` added."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"} | (env or {})


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``fastsam-batch ARGS`` in a subprocess, as a user runs it."""
    exe = Path(sys.executable).with_name("fastsam-batch")
    return subprocess.run([str(exe), *args], env=cli_env(env), capture_output=True, text=True, timeout=timeout)


def files_read(path: Path) -> list[str]:
    """The names of the committed files a run's index read, one a read, from the file its
    FASTSAM_BATCH_TEST_READS named (tests/inject); none where it read none."""
    return [line.rsplit("/", 1)[-1] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    assert CHECKPOINT.is_file(), "run tests/fixtures/make_model.py to create the fixture checkpoint"
    return CHECKPOINT


def save_shapes(folder: Path, seeds) -> list[str]:
    """Generated images ``<seed>.png`` in ``folder``; returns their names."""
    from shapes import make_image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for seed in seeds:
        make_image(seed)[0].save(folder / f"{seed}.png")
        names.append(f"{seed}.png")
    return names


def write_job(path: Path, name: str, input_uri: str, checkpoint: str, output_uri: str, rows_per_file: int,
              output: dict | None = None, **runtime) -> Path:
    """A manifest for the fixture model on generated images (imgsz 320, conf 0.4, CPU, batches of 2,
    one segmentation actor unless ``num_actors`` is given: a run of a few small images starts about
    3 s sooner on 2 cores than with auto's 2); ``output``: more output settings (e.g. writers)."""
    import yaml

    path.write_text(yaml.safe_dump({
        "name": name, "input": {"uri": input_uri},
        "model": {"checkpoint": checkpoint, "imgsz": 320, "conf": 0.4, "device": "cpu"},
        "output": {"uri": output_uri, "rows_per_file": rows_per_file, **(output or {})},
        "runtime": {"batch_size": 2, "num_actors": 1, **runtime},
    }))
    return path


def pytest_collection_finish(session):
    """When a test of test_install.py that needs the installed image is selected, the image's install
    (minutes of pip fetching and unpacking wheels) begins now, beside the tests before it; its
    fixture waits for it (test_install.ImageInstall)."""
    if session.config.option.collectonly:
        return
    for module in {item.module for item in session.items if "installed" in getattr(item, "fixturenames", ())}:
        if hasattr(module, "start_install"):
            import tempfile

            module.start_install(Path(tempfile.mkdtemp(prefix="fastsam-image-")))


def pytest_sessionfinish(session):
    """An image install begun for tests that never ran (stopped, or failed early) is ended and removed;
    every image folder's removal is waited for."""
    module = sys.modules.get("test_install")
    if module is not None and getattr(module, "_started", None) is not None:
        module._started.remove()
        module._started = None
    if module is not None and hasattr(module, "wait_removed"):
        module.wait_removed()
