"""Reliability: secrets appear nowhere a run leaves anything, a per-image time limit turns a
pathological image into one `timeout` row, and a chaos run (actors killed every few batches, S3
requests failing, the driver killed and the job run again) still ends with one row per image."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from conftest import FAKE_KEY, FAKE_SECRET, make_bucket, run_cli, save_shapes, write_job
from s3_fault_proxy import FaultProxy
from test_resume import processes_with_env

OPTIONS_SECRET = "0pt10ns-s3cr3t-never-written-4c3b2a"
RAY_TMP = Path(os.environ.get("RAY_TMPDIR") or "/tmp") / "ray"  # where Ray puts its sessions (RAY_TMPDIR, else /tmp)


def ray_sessions(ray_tmp: Path = RAY_TMP) -> set[Path]:
    return {p for p in ray_tmp.glob("session_*") if not p.is_symlink()} if ray_tmp.exists() else set()


@pytest.fixture
def own_ray_tmpdir():
    """A RAY_TMPDIR of the test's own (short: Ray's socket paths must fit in 107 characters), so that
    the sessions found there are its run's only, whatever else runs on the machine; removed after."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="fsb-ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def everything_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.parametrize("how", ["environment", "storage_options"])
def test_secrets_appear_nowhere_a_run_leaves_anything(how, s3fs_client, s3_env, checkpoint, tmp_path, own_ray_tmpdir):
    """An S3 job with recognisable secrets (in the standard AWS environment, or in the manifest's
    storage_options): stdout, stderr, every object the run wrote (_run.json, _manifest.json, the
    Parquet files) and Ray's session logs of the run hold neither the secret nor the key id."""
    fs = s3fs_client
    bucket = f"secrets-{how.replace('_', '-')}"
    make_bucket(s3_env, bucket)
    names = save_shapes(tmp_path / "imgs", range(7300, 7304))
    for n in names:
        fs.put_file(str(tmp_path / "imgs" / n), f"{bucket}/images/{n}")
    fs.put_file(str(checkpoint), f"{bucket}/models/fixture.pt")
    m = write_job(tmp_path / "job.yaml", "secrets", f"s3://{bucket}/images/", f"s3://{bucket}/models/fixture.pt",
                  f"s3://{bucket}/masks/", 2)
    env = {**s3_env, "FASTSAM_BATCH_CACHE": str(tmp_path / "cache")}
    secrets = [FAKE_SECRET, FAKE_KEY]
    if how == "storage_options":
        doc = yaml.safe_load(m.read_text())
        doc["storage_options"] = {"key": FAKE_KEY, "secret": OPTIONS_SECRET, "endpoint_url": s3_env["AWS_ENDPOINT_URL"]}
        m.write_text(yaml.safe_dump(doc))
        env = {"AWS_REGION": "us-east-1", "FASTSAM_BATCH_CACHE": str(tmp_path / "cache")}
        secrets = [OPTIONS_SECRET]
    env["RAY_TMPDIR"] = str(own_ray_tmpdir)
    r = run_cli("run", str(m), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    sessions = ray_sessions(own_ray_tmpdir / "ray")  # this run's only (its own RAY_TMPDIR)
    assert sessions, "the run's Ray session folder was not found"
    fs.invalidate_cache()
    written = fs.find(f"{bucket}/masks/")
    assert any(p.endswith("_manifest.json") for p in written) and any(p.endswith(".parquet") for p in written)
    logs = [p for s in sessions for p in everything_under(s / "logs")]
    assert logs
    # The embedded Ray's workers run at the run's priority, not Ray's default of 15 (pipeline.start_ray).
    nice = [line for p in logs if p.name.startswith("python-core-worker-")
            for line in p.read_text(errors="replace").splitlines() if "Adjusted worker niceness to" in line]
    assert nice and all(line.endswith("niceness to 0") for line in nice), nice[:3]
    for secret in secrets:
        assert secret not in r.stdout + r.stderr
        for path in written:
            assert secret.encode() not in fs.cat_file(path), path
        for p in logs:
            assert secret.encode() not in p.read_bytes(), p
    if how == "storage_options":
        manifest = json.loads(fs.cat_file(f"{bucket}/masks/_manifest.json"))
        assert manifest["storage_options"]["secret"] == "***"


@pytest.mark.parametrize("stage", ["segment"])  # decode: test_failing_well's retry-errors test, first run
def test_an_image_over_the_time_limit_is_one_timeout_row(stage, checkpoint, tmp_path):
    """A pathological image (simulated: the test-only FASTSAM_BATCH_TEST_SLOW makes work on it take
    an hour) with runtime.image_timeout_s = 10 (ten times what an image takes here on a busy
    machine): its row is a `timeout` error, every other image is ok, the run finishes (run_cli's
    own limit, 10 minutes, is far under the hour the image would take). An image slow to decode is
    the first run of test_failing_well's retry-errors test, with the same checks."""
    images = tmp_path / "imgs"
    names = save_shapes(images, range(7400, 7405))
    (images / names[2]).rename(images / "slow-one.png")
    names[2] = "slow-one.png"
    out = tmp_path / "out"
    m = write_job(tmp_path / "job.yaml", "slow", str(images), str(checkpoint), str(out), 8, image_timeout_s=10)
    r = run_cli("run", str(m), env={"FASTSAM_BATCH_TEST_SLOW": f"{stage}:slow-one:3600",
                                    "FASTSAM_BATCH_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {row["image_id"]: row for row in pads.dataset(str(out), format="parquet").to_table().to_pylist()}
    assert sorted(rows) == sorted(names)
    slow = rows.pop("slow-one.png")
    verb = "decoding" if stage == "decode" else "segmenting"
    assert slow["status"] == "error" and slow["error"].startswith(f"timeout: {verb} took longer than")
    assert all(row["status"] == "ok" for row in rows.values())
    assert "error timeout: 1" in r.stdout


class ActorKiller:
    """Chaos monkey: each time two more Parquet files are committed, SIGKILL one actor process of the
    run (found by the run's environment marker), at most ``most`` times: a segmentation actor, then
    a writer actor, and so on (``kinds``, by what their process titles hold)."""

    def __init__(self, count_files, marker: str, most: int, kinds: tuple[bytes, ...] = (b"SegmentActor",)):
        import threading

        self.count_files, self.marker, self.most, self.kinds = count_files, marker, most, kinds
        self.kills: list[int] = []
        self.killed: list[bytes] = []  # the kind of each kill
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        seen = self.count_files()
        while not self.stop.is_set() and len(self.kills) < self.most:
            n = self.count_files()
            if n >= seen + 2:
                for pid in processes_with_env(self.marker):
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    except OSError:
                        continue
                    kind = self.kinds[len(self.kills) % len(self.kinds)]
                    if kind in cmd:
                        os.kill(pid, signal.SIGKILL)
                        self.kills.append(pid)
                        self.killed.append(kind)
                        seen = n
                        break
            self.stop.wait(0.3)

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return len(self.kills)


def run_processes(marker: str, kind: bytes) -> list[int]:
    """Pids of the run's processes (its environment marker) whose titles hold ``kind``."""
    found = []
    for pid in processes_with_env(marker):
        try:
            if kind in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def kill_run_processes(marker: str, kind: bytes, every: bool = False, timeout: float = 300) -> list[int]:
    """SIGKILL of one of the run's ``kind`` processes (``every``: all of them), waited for until there is one."""
    deadline = time.time() + timeout
    while not (found := run_processes(marker, kind)):
        assert time.time() < deadline, f"no {kind.decode()} process of the run in {timeout:g} s"
        time.sleep(0.1)
    killed = found if every else found[:1]
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    return killed


def test_chaos_run_ends_with_one_row_per_image(s3fs_client, s3_env, checkpoint, tmp_path):
    """96 generated images on S3, 4 writer actors (output.writers), with at once: in the first run a
    segmentation actor and a writer actor killed (after two more committed files each), 10% of S3
    requests failing (a 503, a dropped connection, a 500 in every 30: multipart uploads and their
    completions among them), and the driver killed mid-run, then the same command again. In the
    second run one image is pathologically slow to decode (the test-only slow hook): it holds the run
    (its dataset cannot end, so the writers are not yet drained) until this test has killed a writer
    actor and a segmentation actor, and then does what the watchdog would (the image recorded in the
    run's poison file, its decoder killed): the image is a `timeout` row. So the kills land mid-run by
    construction, not by luck. One row per image, the error budget kept, the summary's retry counts
    are those of the rows the second run wrote, the writer killed in the second run found dead and
    started again once (writers_restarted), and no upload left open (the killed run's aborted at the
    second run's start, the killed writer's at its end)."""
    from s3fs import S3FileSystem

    fs = s3fs_client
    make_bucket(s3_env, "chaos")
    local = tmp_path / "imgs"
    local.mkdir()
    from shapes import make_image

    names = []
    for i in range(96):
        make_image(8000 + i, size=(160, 128))[0].save(local / f"{i:03d}.png")
        fs.put_file(str(local / f"{i:03d}.png"), f"chaos/images/{i:03d}.png")
        names.append(f"{i:03d}.png")
    fs.put_file(str(checkpoint), "chaos/models/fixture.pt")
    m = write_job(tmp_path / "job.yaml", "chaos", "s3://chaos/images/", "s3://chaos/models/fixture.pt",
                  "s3://chaos/masks/", 8, output={"writers": 4}, max_error_fraction=0.03, plan_part_rows=40,
                  image_timeout_s=3600, num_actors=2)
    watcher = S3FileSystem(key=FAKE_KEY, secret=FAKE_SECRET, endpoint_url=s3_env["AWS_ENDPOINT_URL"],
                           skip_instance_cache=True)

    def committed() -> int:
        watcher.invalidate_cache()
        try:
            return len([p for p in watcher.ls("chaos/masks/") if p.rsplit("/", 1)[-1].startswith("part-")])
        except FileNotFoundError:
            return 0

    faults = [None] * 30
    faults[4], faults[14], faults[24] = "503", "reset", "500"
    marker = f"FASTSAM_TEST_RUN=chaos-{tmp_path.name}"
    kills = 0
    with FaultProxy(s3_env["AWS_ENDPOINT_URL"], faults) as proxy:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}, **s3_env,
               "AWS_ENDPOINT_URL": proxy.url, "FASTSAM_BATCH_CACHE": str(tmp_path / "cache"), **dict([marker.split("=")])}
        exe = Path(sys.executable).with_name("fastsam-batch")
        first = subprocess.Popen([str(exe), "run", str(m)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killer = ActorKiller(committed, marker, most=2, kinds=(b"SegmentActor", b"BlockWriter"))
        deadline = time.time() + 600
        while committed() < 6:
            assert first.poll() is None, "the first run ended before it could be killed"
            assert time.time() < deadline, "the first run committed too little in 10 minutes"
            time.sleep(0.5)
        kills += killer.close()
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        deadline = time.time() + 120
        while processes_with_env(marker, agents=False):  # all but Ray's agents (test_resume.RAY_AGENTS)
            assert time.time() < deadline, "the killed run's processes still run"
            time.sleep(0.2)
        watcher.invalidate_cache()
        done_before = set(pads.dataset("chaos/masks/", format="parquet", filesystem=watcher)
                          .to_table(columns=["image_id"]).column("image_id").to_pylist())
        assert 0 < len(done_before) < len(names)
        slow = sorted(set(names) - done_before)[0]
        mark = tmp_path / "slow-mark"
        second = subprocess.Popen([str(exe), "run", str(m)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**env, "FASTSAM_BATCH_TEST_SLOW": f"decode:{slow}:3600",
                                       "FASTSAM_BATCH_TEST_SLOW_MARK": str(mark)})
        try:
            deadline = time.time() + 600
            while not mark.exists():  # the run is inside the slow image: it cannot finish before this test acts
                assert second.poll() is None, "the second run ended before the slow image"
                assert time.time() < deadline, "the second run did not reach the slow image in 10 minutes"
                time.sleep(0.1)
            writers_killed = len(kill_run_processes(marker, b"BlockWriter"))
            kills += writers_killed + len(kill_run_processes(marker, b"SegmentActor"))
            run_id = json.loads(watcher.cat_file("chaos/masks/_lease.json"))["run_id"]
            poison = tmp_path / "cache" / "poison" / f"{run_id}.txt"  # watchdog.poison_path on this node
            poison.parent.mkdir(parents=True, exist_ok=True)
            with open(poison, "a") as f:
                f.write(f"decode\t{slow}\n")
            kill_run_processes(marker, b"ReadDecode", every=True)  # Ray Data retries; the image is then poisoned
            out, _ = second.communicate(timeout=900)
        finally:
            if second.poll() is None:
                second.kill()
    assert second.returncode == 0, out
    assert kills >= 2  # actors really were killed (a writer and a segmentation actor in the second run, at least)
    assert sum(proxy.injected.values()) > 0, proxy.injected
    watcher.invalidate_cache()
    table = pads.dataset("chaos/masks/", format="parquet", filesystem=watcher).to_table()
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == names  # one row per image: none missing, none twice
    slow_row = next(r for r in table.select(["image_id", "status", "error"]).to_pylist() if r["image_id"] == slow)
    assert slow_row["status"] == "error" and slow_row["error"].startswith("timeout: decoding"), slow_row["error"]
    summary = json.loads(watcher.cat_file("chaos/masks/_run.json"))["last_run_summary"]
    assert summary["failed"] is None and summary["images_error"] <= 0.03 * len(names)  # the slow image's and 1 more
    rows = [row for row in table.select(["image_id", "read_retries"]).to_pylist() if row["image_id"] not in done_before]
    assert summary["images_skipped_done"] == len(done_before)
    assert summary["read_retries"] == sum(row["read_retries"] for row in rows)
    assert summary["images_retried"] == sum(1 for row in rows if row["read_retries"])
    assert "took over the lease" in out
    assert "writers: 4 (output.writers)" in out
    assert writers_killed == 1 and summary["writers_restarted"] == 1, summary
    # the first run was killed with its processes before the second began: no two runs at once, so
    # the end's duplicate repair must have found nothing (else the ledger wrote a row twice)
    assert summary["rows_deduplicated"] == 0, summary
    from fastsam_batch.storage import Storage
    from fastsam_batch.writers import open_uploads

    storage = Storage({"key": FAKE_KEY, "secret": FAKE_SECRET, "endpoint_url": s3_env["AWS_ENDPOINT_URL"]})
    assert open_uploads("s3://chaos/masks", storage) == []
