"""Plan stage: the streaming listing agrees with fsspec's own, plan parts round-trip, and listing
100,000 keys on the moto S3 server keeps the driver's memory bounded."""

from __future__ import annotations

import json
import subprocess
import sys

import fsspec
import pytest

from conftest import FAKE_KEY, FAKE_SECRET, ROOT, free_port
from fastsam_batch.inputs import Skipped
from fastsam_batch.inputs.files import iter_files as iter_inputs
from fastsam_batch.plan import PlanParts, read_plan_part
from fastsam_batch.storage import Storage


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "in"
    for rel in ["a.jpg", "b.PNG", "notes.txt", "sub/c.jpg", "sub/deeper/d.webp", "sub/deeper/e.json",
                "sub-x/f.jpg", "z/.hidden.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    return root


def test_local_listing_streams_the_files_fsspec_finds(tree):
    fs = fsspec.filesystem("file")
    skipped = Skipped(limit=None)
    items = list(iter_inputs(str(tree), Storage(), skipped))
    found = {p[len(str(tree)) + 1:]: info for p, info in fs.find(str(tree), detail=True).items()}
    images = {k for k in found if k.rsplit(".", 1)[-1].lower() in ("jpg", "png", "webp")}
    assert sorted(it["image_id"] for it in items) == sorted(images)
    assert sorted(skipped.examples) == sorted(set(found) - images) and skipped.count == 2
    for it in items:  # same size and version fields as fsspec's info
        info = found[it["image_id"]]
        assert it["uri"] == str(tree / it["image_id"]) and it["size"] == info["size"]
        assert it["etag"] == f"mtime:{info['mtime']}"


@pytest.mark.parametrize("pattern", ["*.jpg", "sub/**/*.jpg", "sub/**", "**/*.jpg", "sub*/*.jpg"])
def test_glob_listing_matches_fsspec_glob(tree, pattern):
    fs = fsspec.filesystem("file")
    want = sorted(p for p in fs.glob(f"{tree}/{pattern}") if fs.isfile(p) and not p.endswith((".txt", ".json")))
    got = sorted(it["uri"] for it in iter_inputs(f"{tree}/{pattern}", Storage(), Skipped()))
    assert got == want


def test_missing_input_names_the_uri(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        list(iter_inputs(str(tmp_path / "no-such-folder"), Storage(), Skipped()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.: an empty folder"):  # there, but nothing in it
        list(iter_inputs(str(tmp_path / "empty"), Storage(), Skipped()))


def test_plan_parts_stay_in_memory_for_one_part_and_go_to_files_beyond(tmp_path):
    items = [{"image_id": f"{i}.jpg", "uri": f"/x/{i}.jpg", "size": i, "etag": "e", "kind": "object", "extra": "",
              "prompts": "", "source_version": f"e/{i}", "done": ""} for i in range(7)]
    small = PlanParts(str(tmp_path / "out"), Storage(), part_rows=7)
    small.add(items)
    assert small.in_memory == items and small.files == [] and not (tmp_path / "out").exists()
    plan = PlanParts(str(tmp_path / "out"), Storage(), part_rows=3)
    plan.add(items[:2])
    plan.add(items[2:])
    assert plan.count == 7 and plan.in_memory == [] and len(plan.files) == 3
    assert [r for f in plan.files for r in read_plan_part(f, Storage())] == items
    plan.remove()
    assert not (tmp_path / "out" / "_plan").exists()


# Both measuring scripts run with `-X tracemalloc` (traced from interpreter start) and leave with
# os._exit: on CPython 3.11, tracemalloc.stop() - called by hand or at interpreter exit - races with
# threads that allocate outside the GIL (s3fs's event loop, pyarrow, numpy; CPython gh-128679, fixed
# only in 3.12) and can crash the process. Neither script ever stops tracing.
TRACED = [sys.executable, "-X", "tracemalloc=1", "-c"]

DRIVER = r"""
import json, os, resource, sys, tracemalloc
from fastsam_batch.manifest import parse_manifest
from fastsam_batch.job import PromptAttacher, plan_job
from fastsam_batch.resume import Committed
from fastsam_batch.storage import Storage
from fastsam_batch.summary import RunSummary

m = parse_manifest(json.loads(sys.argv[1]))
storage = Storage(m.storage_options)
# A first, small plan (3 parts) so that clients, connections and lazy imports are not measured.
warm = m.model_copy(update={"input": m.input.model_copy(update={"uri": "s3://warm/imgs/"}),
                            "output": m.output.model_copy(update={"uri": "s3://warm/out/"})})
plan_job(warm, storage, RunSummary(name=m.name), Committed(), PromptAttacher(warm, storage))
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before, _ = tracemalloc.get_traced_memory()
tracemalloc.reset_peak()
summary = RunSummary(name=m.name)
plan = plan_job(m, storage, summary, Committed(), PromptAttacher(m, storage)).plan
_, peak = tracemalloc.get_traced_memory()
print(json.dumps({"planned": summary.images_planned, "todo": plan.count, "skipped": summary.skipped_not_images,
                  "files": plan.files, "peak_mb": (peak - before) / 2**20,
                  "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024}),
      flush=True)
os._exit(0)
"""

# What holding the same plan whole would cost, measured the same way: every part read into one list.
WHOLE = r"""
import json, os, sys, tracemalloc
from fastsam_batch.plan import read_plan_part
from fastsam_batch.storage import Storage

files, options = json.loads(sys.argv[1])
storage = Storage(options)
read_plan_part(files[0], storage)  # clients and imports, not measured
before, _ = tracemalloc.get_traced_memory()
tracemalloc.reset_peak()
whole = [row for f in files for row in read_plan_part(f, storage)]
_, peak = tracemalloc.get_traced_memory()
print(json.dumps({"peak_mb": (peak - before) / 2**20, "ids": sorted(row["image_id"] for row in whole)}), flush=True)
os._exit(0)
"""


def test_listing_100k_keys_on_s3_streams_with_bounded_driver_memory(tmp_path):
    """100,000 keys on a moto server (moto's own server mode, in this process so that its backend
    can be filled directly: 100,000 PUTs over HTTP would take minutes). The job's planning runs in
    its own process, as the driver does, and is measured there."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer
    from moto.s3.models import s3_backends

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=FAKE_KEY,
                              aws_secret_access_key=FAKE_SECRET, region_name="us-east-1")
        client.create_bucket(Bucket="big")
        client.create_bucket(Bucket="warm")
        backend = s3_backends["123456789012"]["global"]
        for i in range(2500):
            backend.put_object("warm", f"imgs/{i:06d}.jpg", b"\xff\xd8")
        keys = [f"imgs/{i // 1000:03d}/{i:06d}.jpg" for i in range(100_000)]
        for k in keys:
            backend.put_object("big", k, b"\xff\xd8")
        backend.put_object("big", "imgs/README.md", b"not an image")
        # Listed in parallel (100 sub-prefixes, then key ranges): the same keys as were put.
        manifest = {"name": "big", "input": {"uri": "s3://big/imgs/", "list_workers": 16},
                    "model": {"checkpoint": "/unused.pt"},
                    "output": {"uri": "s3://big/out/"},
                    "storage_options": {"endpoint_url": endpoint, "key": FAKE_KEY, "secret": FAKE_SECRET}}
        r = subprocess.run([*TRACED, DRIVER, json.dumps(manifest)], capture_output=True, text=True,
                           cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert (got["planned"], got["todo"], got["skipped"]) == (100_000, 100_000, 1)
        assert len(got["files"]) == 100  # parts of 1,000 under s3://big/out/_plan/

        # The plan read back; and what holding it whole would cost the driver, measured the same way.
        r = subprocess.run([*TRACED, WHOLE, json.dumps([got["files"], manifest["storage_options"]])],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        whole = json.loads(r.stdout.strip().splitlines()[-1])
        ids, whole_peak_mb = whole["ids"], whole["peak_mb"]
        assert len(ids) == len(set(ids)) and set(ids) == {k[len("imgs/"):] for k in keys}
        print(f"driver peak while planning 100,000 keys: {got['peak_mb']:.1f} MB traced "
              f"(RSS +{got['rss_growth_mb']:.0f} MB); the plan held whole: {whole_peak_mb:.1f} MB")
        # What is held is the pages in flight (16 requests, 4 pages queued; about 1 MB a page once
        # parsed) and one plan part, not the listing: the plan held whole grows with the keys.
        assert got["peak_mb"] < 8 + (16 + 4) * 1.0, got
        assert got["peak_mb"] < whole_peak_mb / 2
    finally:
        server.stop()


KEY_SETS = {
    # Numbered keys in one prefix: ranges split on the digits where the keys vary.
    "flat": [f"imgs/{i:06d}.jpg" for i in range(4500)],
    # Folders of uneven size, a deep one, folder markers, keys equal to would-be split points, keys
    # with characters below '!' and beyond '~', a key named like the prefix's folders.
    "mixed": ([f"imgs/a/{i:05d}.png" for i in range(2100)] + [f"imgs/b/{i}.jpg" for i in range(7)]
              + [f"imgs/c/d/e/{i:04d}.jpg" for i in range(1300)] + ["imgs/a/", "imgs/c/", "imgs/1", "imgs/1 2.jpg"]
              + [f"imgs/{c}{i}.jpg" for c in ("é", "z", "~", "0", " ", "日本") for i in range(150)]
              + ["imgs/a", "imgsx/outside.jpg", "other/x.jpg"]),
}


@pytest.mark.parametrize("layout", sorted(KEY_SETS))
def test_parallel_listing_gives_the_keys_of_the_sequential_listing(layout):
    """On a moto server (in this process, its backend filled directly): the same objects, each
    once, as one page after another, for key sets that stress the range splits."""
    pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer
    from moto.s3.models import s3_backends

    from fastsam_batch.inputs.files import iter_s3, iter_s3_parallel

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        backend = s3_backends["123456789012"]["global"]
        backend.create_bucket(f"keys-{layout}", "us-east-1")
        for k in KEY_SETS[layout]:
            backend.put_object(f"keys-{layout}", k, b"x")
        storage = Storage({"endpoint_url": f"http://127.0.0.1:{port}", "key": FAKE_KEY, "secret": FAKE_SECRET})
        fs = storage.fs("s3://x/")
        sequential = [(p, info["size"]) for p, info in iter_s3(fs, f"keys-{layout}/imgs/")]
        want = {f"keys-{layout}/{k}" for k in KEY_SETS[layout] if k.startswith("imgs/") and not k.endswith("/")}
        assert {p for p, _ in sequential} == want
        for workers in (2, 16):
            parallel = [(p, info["size"]) for p, info in iter_s3_parallel(fs, f"keys-{layout}/imgs/", workers)]
            assert len(parallel) == len(set(parallel)) == len(sequential)
            assert set(parallel) == set(sequential)
    finally:
        server.stop()
