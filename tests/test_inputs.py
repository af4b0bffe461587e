"""Inputs as large collections come (issue: lists, S3 Inventory reports, tar shards, Parquet with
image bytes): each kind end to end on a moto S3 server with the fixture model, its masks equal to
those of the same images given as loose files; carried columns; error rows for what cannot be read;
resume after a driver kill inside a shard; a changed shard read again; bad inputs refused before
any work. The runs share one local Ray (started once for the module), as a cluster's driver would."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import (CHECKPOINT, FAKE_KEY, FAKE_SECRET, REAL_IMAGES, make_bucket, parquet_bytes, png_bytes, run_cli,
                      shared, shared_or_none)
from fastsam_batch.inputs import read_image_at
from fastsam_batch.storage import Storage
from shapes import make_image

BUCKET = "inputs"
NAMES = [f"{i}.png" for i in range(6)] + ["cat.jpg"]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _photo() -> bytes:
    """A photograph (../shared/real-images/cat.jpg) where the test data is there, as in CI; on a
    fresh clone without it, a generated picture saved as JPEG: every input form reads either."""
    cat = shared_or_none(REAL_IMAGES / "cat.jpg")
    if cat is not None:
        return cat.read_bytes()
    buf = io.BytesIO()
    make_image(99)[0].save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bucket(s3_env, s3fs_client):
    """The same seven images as loose objects, in lists, in inventory reports, in tar shards and in
    Parquet files; plus the broken things each kind must survive."""
    fs = s3fs_client
    make_bucket(s3_env, BUCKET)
    images = {f"{i}.png": png_bytes(i) for i in range(6)} | {"cat.jpg": _photo()}
    put = lambda key, data: fs.pipe(f"{BUCKET}/{key}", data)  # noqa: E731
    for name, data in images.items():
        put(f"loose/{name}", data)
    # A list in Parquet: its own ids, carried columns, a missing object, an id that comes twice.
    put("lists/images.parquet", parquet_bytes(pa.table({
        "uri": [f"s3://{BUCKET}/loose/{n}" for n in NAMES] + [f"s3://{BUCKET}/loose/missing.png",
                                                              f"s3://{BUCKET}/loose/1.png"],
        "image_id": NAMES + ["missing.png", "0.png"],
        "split": ["train", "val"] * 4 + ["train"],
        "label": list(range(len(NAMES) + 2)),
    })))
    # A list in CSV: no ids (the URI is the id), a caption carried.
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["uri", "caption"])
    for n in NAMES:
        w.writerow([f"s3://{BUCKET}/loose/{n}", f"a picture, {n}"])
    put("lists/images.csv", text.getvalue().encode())
    # S3 Inventory reports of the loose images (CSV and Parquet), as S3 writes them.
    etags = {n: fs.info(f"{BUCKET}/loose/{n}")["ETag"].strip('"') for n in NAMES}
    rows = [[BUCKET, f"loose/{n}".replace(".", "%2E"), str(len(images[n])), etags[n], "true", "false"] for n in NAMES]
    rows += [[BUCKET, "loose/README.txt", "3", "e", "true", "false"], [BUCKET, "loose/gone.png", "0", "", "true", "true"]]
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb") as g:
        g.write("".join(",".join(f'"{v}"' for v in r) + "\n" for r in rows).encode())
    put("inventory/data/part-0.csv.gz", gz.getvalue())
    put("inventory/data/part-0.parquet", parquet_bytes(pa.table({
        "bucket": [BUCKET] * len(NAMES), "key": [f"loose/{n}" for n in NAMES],
        "size": [len(images[n]) for n in NAMES], "e_tag": [etags[n] for n in NAMES]})))
    for fmt, key, schema in (("CSV", "part-0.csv.gz", "Bucket, Key, Size, ETag, IsLatest, IsDeleteMarker"),
                             ("Parquet", "part-0.parquet", "message s3.inventory { ... }")):
        put(f"inventory/{fmt.lower()}/manifest.json", json.dumps({
            "sourceBucket": BUCKET, "destinationBucket": f"arn:aws:s3:::{BUCKET}", "version": "2016-11-30",
            "fileFormat": fmt, "fileSchema": schema, "files": [{"key": f"inventory/data/{key}", "size": 1}]}).encode())
    put("inventory/orc/manifest.json", json.dumps({
        "destinationBucket": f"arn:aws:s3:::{BUCKET}", "fileFormat": "ORC", "fileSchema": "struct<bucket:string>",
        "files": [{"key": "inventory/data/part-0.orc"}]}).encode())
    put("inventory/bad/manifest.json", json.dumps({
        "destinationBucket": f"arn:aws:s3:::{BUCKET}", "fileFormat": "CSV", "fileSchema": "Bucket, Key",
        "files": [{"key": "inventory/data/part-0.csv.gz"}, {"key": "inventory/data/part-9.csv.gz"}]}).encode())
    # Tar shards with side files (SA-1B's layout), a member that is not an image, and one cut short.
    side = lambda n: (n.rsplit(".", 1)[0] + ".json", json.dumps({"image": n}).encode())  # noqa: E731
    s0 = _tar([m for n in NAMES[:3] for m in ((n, images[n]), side(n))])
    put("shards/s0.tar", s0)
    put("shards/s1.tar", _tar([m for n in NAMES[3:] for m in ((n, images[n]), side(n))]
                              + [("bad.png", b"\x89PNG\r\n\x1a\n this is no picture")]))
    cut = _tar([("a.png", images["0.png"]), ("b.png", images["1.png"])])
    put("shards/s2-cut.tar", cut[: 512 + len(images["0.png"]) + 512 + 512 + 1000])  # inside b.png
    # Parquet with image bytes: a Hugging Face Image struct, and a binary column (img2dataset).
    hf_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    put("pq/hf.parquet", parquet_bytes(pa.table({
        "image": pa.array([{"bytes": images[n], "path": n} for n in NAMES] + [{"bytes": None, "path": "x.png"}],
                          hf_type),
        "id": [f"id-{n}" for n in NAMES] + ["id-none"], "label": list(range(len(NAMES) + 1))})))
    put("pq-bin/bin.parquet", parquet_bytes(pa.table({"key": [f"k{i:03d}" for i in range(len(NAMES))],
                                                 "jpg": [images[n] for n in NAMES], "caption": NAMES})))
    put("pq-bad/wrong.parquet", parquet_bytes(pa.table({"image": [1, 2], "id": ["a", "b"]})))
    put("lists-bad/no-uri.csv", b"path,label\ns3://inputs/loose/0.png,1\n")
    put("lists-bad/clash.csv", b"uri,status\ns3://inputs/loose/0.png,x\n")
    return {"endpoint": s3_env["AWS_ENDPOINT_URL"], "images": images, "fs": fs}


def manifest(bucket, out: Path, input_cfg: dict, **output) -> dict:
    return {"name": "inputs", "input": input_cfg,
            "model": {"checkpoint": str(CHECKPOINT), "imgsz": 320, "conf": 0.4, "device": "cpu"},
            "output": {"uri": str(out), "rows_per_file": 4, **output}, "runtime": {"batch_size": 2, "num_actors": 1},
            "storage_options": {"endpoint_url": bucket["endpoint"], "key": FAKE_KEY, "secret": FAKE_SECRET}}


@pytest.fixture(scope="module")
def ray_session():
    import ray

    # address="local": a Ray of the test's own, never a cluster `ray start` runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def run(bucket, out: Path, input_cfg: dict, retry_errors=None, **output):
    from fastsam_batch.job import run_job
    from fastsam_batch.manifest import parse_manifest

    summary = run_job(parse_manifest(manifest(bucket, out, input_cfg, **output)), retry_errors=retry_errors)
    assert summary.failed is None, summary.failed
    return summary


def rows(out: Path) -> list[dict]:
    return pads.dataset(str(out), format="parquet").to_table().to_pylist()


@pytest.fixture(scope="module")
def loose(bucket, ray_session, tmp_path_factory):
    """The reference: the images as loose objects. name -> masks."""
    out = tmp_path_factory.mktemp("loose") / "out"
    run(bucket, out, {"uri": f"s3://{BUCKET}/loose/"})
    got = {r["image_id"]: r for r in rows(out)}
    assert sorted(got) == sorted(NAMES) and all(r["status"] == "ok" and r["masks"] for r in got.values())
    return {k: r["masks"] for k, r in got.items()}


def same_masks(loose: dict, got: list[dict], name_of) -> None:
    """Each ok row's masks equal the loose file's (the same RLE, boxes, areas, scores); rows
    ``name_of`` names None are not of the seven."""
    ok = [r for r in got if r["status"] == "ok" and name_of(r) is not None]
    assert sorted(name_of(r) for r in ok) == sorted(NAMES)
    for r in ok:
        assert r["masks"] == loose[name_of(r)], r["image_id"]


def test_a_parquet_list_with_carried_columns_a_missing_object_and_a_repeated_id(bucket, loose, tmp_path):
    s = run(bucket, tmp_path / "out", {"uri": f"s3://{BUCKET}/lists/images.parquet", "format": "list"})
    got = rows(tmp_path / "out")
    same_masks(loose, got, lambda r: r["image_id"])
    by_id = {r["image_id"]: r for r in got}
    assert len(got) == len(by_id) == len(NAMES) + 1  # one row per distinct image_id
    assert s.duplicates_in_input == 1 and s.duplicate_examples == ["0.png"]
    assert by_id["missing.png"]["status"] == "error" and by_id["missing.png"]["error"].startswith("read_failed:")
    # Carried under their own names, as text; the first row of a repeated id wins.
    assert [(by_id[n]["split"], by_id[n]["label"]) for n in NAMES[:2]] == [("train", "0"), ("val", "1")]
    assert by_id["0.png"]["uri"] == f"s3://{BUCKET}/loose/0.png" and by_id["0.png"]["shard"] is None


def test_a_csv_list_ids_by_uri_and_carries_its_caption(bucket, loose, tmp_path):
    run(bucket, tmp_path / "out", {"uri": f"s3://{BUCKET}/lists/images.csv", "format": "list"})
    got = rows(tmp_path / "out")
    same_masks(loose, got, lambda r: r["image_id"].rsplit("/", 1)[-1])
    assert {r["image_id"] for r in got} == {f"{BUCKET}/loose/{n}" for n in NAMES}
    assert all(r["caption"] == f"a picture, {r['image_id'].rsplit('/', 1)[-1]}" for r in got)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_s3_inventory_report(bucket, loose, tmp_path, fmt):
    s = run(bucket, tmp_path / "out", {"uri": f"s3://{BUCKET}/inventory/{fmt}/manifest.json",
                                       "format": "s3_inventory"})
    got = rows(tmp_path / "out")
    same_masks(loose, got, lambda r: r["image_id"].rsplit("/", 1)[-1])
    assert {r["image_id"] for r in got} == {f"loose/{n}" for n in NAMES}  # keys URL-decoded; delete marker out
    assert s.skipped_not_images == (1 if fmt == "csv" else 0)  # README.txt
    # The inventory's ETag and size are the version: a re-run finds every image done.
    assert all(r["source_version"].split("/")[0] == bucket["fs"].info(f"{BUCKET}/{r['image_id']}")["ETag"].strip('"')
               for r in got)
    again = run(bucket, tmp_path / "out", {"uri": f"s3://{BUCKET}/inventory/{fmt}/manifest.json",
                                           "format": "s3_inventory"})
    assert again.noop and again.images_skipped_done == len(NAMES)


def test_tar_shards_with_side_files_a_corrupt_member_and_a_cut_shard(bucket, loose, tmp_path):
    s = run(bucket, tmp_path / "out", {"uri": f"s3://{BUCKET}/shards/", "format": "tar"})
    got = rows(tmp_path / "out")
    same_masks(loose, got, lambda r: None if r["image_id"].startswith("s2-cut") else r["image_id"].rsplit("/", 1)[-1])
    by_id = {r["image_id"]: r for r in got}
    assert by_id["s0.tar/0.png"]["uri"] == f"tar://0.png::s3://{BUCKET}/shards/s0.tar"
    assert by_id["s0.tar/0.png"]["shard"] == f"s3://{BUCKET}/shards/s0.tar"
    storage = Storage({"endpoint_url": bucket["endpoint"], "key": FAKE_KEY, "secret": FAKE_SECRET})
    assert read_image_at(by_id["s1.tar/cat.jpg"]["uri"], storage) == bucket["images"]["cat.jpg"]  # as overlay reads
    assert by_id["s1.tar/bad.png"]["error"].startswith("corrupt_image:")  # a member is its own error row
    # The cut shard: its whole member is a row, the cut one an error row naming the cut.
    assert by_id["s2-cut.tar/a.png"]["status"] == "ok" and by_id["s2-cut.tar/a.png"]["masks"] == loose["0.png"]
    assert by_id["s2-cut.tar/b.png"]["error"].startswith("read_failed: the shard is cut short inside member 'b.png'")
    assert len(got) == len(NAMES) + 3 and s.members_skipped == len(NAMES)  # the .json side files
    assert s.units_planned == s.units_done == 3
    again = run(bucket, tmp_path / "out", {"uri": f"s3://{BUCKET}/shards/", "format": "tar"})
    assert again.noop and again.units_skipped_done == 3 and again.images_skipped_done == len(got)
    # --retry-errors corrupt_image: s1 is read again for bad.png alone; its old row replaced.
    retry = run(bucket, tmp_path / "out", {"uri": f"s3://{BUCKET}/shards/", "format": "tar"},
                retry_errors=frozenset({"corrupt_image"}))
    assert (retry.images_retried_errors, retry.units_skipped_done, retry.units_done) == (1, 2, 1)
    now = {r["image_id"]: r for r in rows(tmp_path / "out")}
    assert len(rows(tmp_path / "out")) == len(now) == len(got)
    assert now["s1.tar/bad.png"]["segmented_at"] > by_id["s1.tar/bad.png"]["segmented_at"]
    assert all(now[i] == r for i, r in by_id.items() if i != "s1.tar/bad.png")  # not read again


def test_a_changed_shard_is_read_again_and_its_old_rows_replaced(bucket, ray_session, tmp_path):
    fs, images = bucket["fs"], bucket["images"]
    fs.pipe(f"{BUCKET}/grow/s0.tar", _tar([(n, images[n]) for n in NAMES[:3]]))
    fs.pipe(f"{BUCKET}/grow/s1.tar", _tar([(n, images[n]) for n in NAMES[3:5]]))
    cfg = {"uri": f"s3://{BUCKET}/grow/", "format": "tar"}
    run(bucket, tmp_path / "out", cfg)
    before = {r["image_id"]: r for r in rows(tmp_path / "out")}
    assert sorted(before) == [f"s0.tar/{n}" for n in NAMES[:3]] + [f"s1.tar/{n}" for n in NAMES[3:5]]
    # s0 now holds other pictures under two of its names, and lost one.
    fs.pipe(f"{BUCKET}/grow/s0.tar", _tar([("0.png", images["5.png"]), ("1.png", images["cat.jpg"])]))
    s = run(bucket, tmp_path / "out", cfg)
    assert (s.units_planned, s.units_changed, s.units_skipped_done, s.units_done) == (2, 1, 1, 1)
    after = {r["image_id"]: r for r in rows(tmp_path / "out")}
    assert sorted(after) == ["s0.tar/0.png", "s0.tar/1.png"] + [f"s1.tar/{n}" for n in NAMES[3:5]]
    assert after["s0.tar/0.png"]["source_version"] != before["s0.tar/0.png"]["source_version"]
    assert after["s0.tar/0.png"]["masks"] != before["s0.tar/0.png"]["masks"]
    assert after["s1.tar/3.png"] == before["s1.tar/3.png"]  # not read again


@pytest.mark.parametrize("form", ["hf", "binary"])
def test_parquet_with_image_bytes(bucket, loose, tmp_path, form):
    if form == "hf":
        cfg = {"uri": f"s3://{BUCKET}/pq/", "format": "parquet_images", "id_column": "id", "carry": ["label"]}
        name_of = lambda r: r["image_id"].split("/id-", 1)[-1]  # noqa: E731
    else:
        cfg = {"uri": f"s3://{BUCKET}/pq-bin/bin.parquet", "format": "parquet_images", "image_column": "jpg",
               "id_column": "key", "carry": ["caption"]}
        name_of = lambda r: r["caption"]  # noqa: E731
    run(bucket, tmp_path / "out", cfg)
    got = rows(tmp_path / "out")
    same_masks(loose, got, name_of)
    if form == "hf":
        by_id = {r["image_id"]: r for r in got}
        assert by_id["hf.parquet/id-0.png"]["uri"] == f"s3://{BUCKET}/pq/hf.parquet#row=0"
        assert by_id["hf.parquet/id-0.png"]["label"] == "0"
        storage = Storage({"endpoint_url": bucket["endpoint"], "key": FAKE_KEY, "secret": FAKE_SECRET})
        assert read_image_at(by_id["hf.parquet/id-3.png"]["uri"], storage) == bucket["images"]["3.png"]
        none = by_id["hf.parquet/id-none"]
        assert none["status"] == "error" and "no image bytes" in none["error"] and "x.png" in none["error"]
    else:
        assert sorted(r["image_id"] for r in got) == [f"bin.parquet/k{i:03d}" for i in range(len(NAMES))]


@pytest.mark.parametrize("cfg, words", [
    ({"uri": f"s3://{BUCKET}/lists-bad/no-uri.csv", "format": "list"}, ["no-uri.csv", "no 'uri' column", "path"]),
    ({"uri": f"s3://{BUCKET}/lists-bad/clash.csv", "format": "list"}, ["clash.csv", "'status'", "output schema"]),
    ({"uri": f"s3://{BUCKET}/inventory/bad/manifest.json", "format": "s3_inventory"},
     ["manifest.json", "1 of the 2 data files", "part-9.csv.gz"]),
    ({"uri": f"s3://{BUCKET}/inventory/orc/manifest.json", "format": "s3_inventory"},
     ["manifest.json", "'ORC' is not read", "CSV or Parquet"]),
    ({"uri": f"s3://{BUCKET}/pq-bad/", "format": "parquet_images"},
     ["wrong.parquet", "'image'", "neither binary nor a Hugging Face Image struct"]),
    ({"uri": f"s3://{BUCKET}/pq/", "format": "parquet_images", "id_column": "nope"}, ["hf.parquet", "'nope'"]),
])
def test_bad_inputs_fail_before_any_work_naming_file_and_column(bucket, tmp_path, cfg, words):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest(bucket, tmp_path / "out", cfg)))
    r = run_cli("run", str(path))
    assert r.returncode == 1, r.stdout + r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("fastsam-batch:") and all(w in line for w in words), line
    assert "Ray" not in r.stdout  # found before Ray starts
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))


def test_a_manifest_field_of_another_format_is_refused():
    from fastsam_batch.manifest import ManifestError, parse_manifest

    with pytest.raises(ManifestError, match="input.image_column applies to input.format parquet_images"):
        parse_manifest({"name": "x", "input": {"uri": "/data", "image_column": "jpg"},
                        "model": {"checkpoint": "/m.pt"}, "output": {"uri": "/out"}})


def _members_committed(out: Path) -> int:
    try:
        return sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))
    except OSError:  # a file being renamed into place
        return 0


def test_resume_after_a_driver_kill_inside_a_shard(bucket, tmp_path):
    """An SA-1B-like shard of photos (each with its .json) is held inside (one member takes long),
    killed once some of its members are committed; the next run reads it again without those and
    completes it, each member once. (Photos: each is a Ray Data block of its own once decoded, so
    rows flow one by one; small images would travel several to a block.)"""
    photos = sorted(shared(REAL_IMAGES).glob("sa_*.jpg"))[:6]
    assert len(photos) == 6, f"needs six sa_*.jpg photographs in {REAL_IMAGES}"
    names = [p.name for p in photos]
    members = [m for p in photos for m in ((p.name, p.read_bytes()), (p.stem + ".json", b"{}"))]
    bucket["fs"].pipe(f"{BUCKET}/kill/s1.tar", _tar(members))
    out = tmp_path / "out"
    path = tmp_path / "job.yaml"
    m = manifest(bucket, out, {"uri": f"s3://{BUCKET}/kill/", "format": "tar"}, commit_interval_s=0.2)
    m["output"]["rows_per_file"] = 1
    path.write_text(yaml.safe_dump(m))
    exe = Path(sys.executable).with_name("fastsam-batch")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "FASTSAM_BATCH_TEST_SLOW": f"segment:s1.tar/{names[-1]}:600"}
    proc = subprocess.Popen([str(exe), "run", str(path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while _members_committed(out) < 2:
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "_units").exists()  # s1 was not complete
    r = run_cli("run", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    got = rows(out)
    ids = [r["image_id"] for r in got]
    assert sorted(ids) == [f"s1.tar/{n}" for n in names]  # each member once
    summary = json.loads((out / "_run.json").read_text())["last_run_summary"]
    assert summary["images_skipped_done"] >= 2 and summary["units_done"] == 1
    assert summary["images_ok"] == 6 and (out / "_units").exists()


def test_a_shard_read_that_breaks_goes_on_from_the_byte_where_it_broke(bucket, s3_env):
    """The shard's GET is cut halfway (headers and half the body, then the connection closed):
    reading goes on with a ranged GET from there; every member once, byte for byte."""
    from s3_fault_proxy import FaultProxy

    from fastsam_batch.inputs import tar_shards
    from fastsam_batch.inputs.files import version_of
    from fastsam_batch.manifest import InputConfig
    from fastsam_batch.storage import Storage

    members = [(f"{i}.png", bucket["images"][f"{i}.png"]) for i in range(6)]
    shard = _tar(members)
    bucket["fs"].pipe(f"{BUCKET}/cut/s.tar", shard)
    etag = version_of(bucket["fs"].info(f"{BUCKET}/cut/s.tar"))
    with FaultProxy(s3_env["AWS_ENDPOINT_URL"], ["cut"] + [None] * 9) as proxy:
        storage = Storage({"endpoint_url": proxy.url, "key": FAKE_KEY, "secret": FAKE_SECRET})
        unit = {"image_id": "s.tar", "uri": f"s3://{BUCKET}/cut/s.tar", "etag": etag, "kind": "tar"}
        got = list(tar_shards.read_images(unit, storage, InputConfig(uri="x", format="tar"), frozenset()))
    assert [(g.image_id, g.data, g.error) for g in got] == [(f"s.tar/{n}", d, None) for n, d in members]
    assert proxy.injected["cut"] == 1 and got[-1].retries == 1
    # On from the last byte it had taken (a read the cut interrupted gave nothing: 0 < N <= half). When
    # the client saw the connection closed before any byte of the body (a race on a busy machine:
    # seen in about half the runs, also before issue 21), nothing was taken and it starts again at 0.
    assert proxy.ranges[0] is None
    if proxy.ranges[1] is not None:
        assert proxy.ranges[1].startswith("bytes=") and proxy.ranges[1].endswith("-")
        assert 0 < int(proxy.ranges[1][6:-1]) <= len(shard) // 2


def test_a_jsonl_list_resolves_relative_uris_and_counts_what_it_skips(tmp_path):
    """No Ray: the list's units as planned (JSONL, gzip'd), against the rows written."""
    from fastsam_batch.inputs import Skipped, open_input
    from fastsam_batch.manifest import InputConfig

    rows_in = [{"uri": "imgs/a.jpg", "meta": {"k": 1}, "n": 3}, {"uri": "", "meta": None, "n": 4},
               {"uri": "/abs/b.png", "meta": None, "n": None}, {"uri": "imgs/a.jpg", "meta": None, "n": 5}]
    with gzip.open(tmp_path / "list.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows_in) + "\n")
    form = open_input(InputConfig(uri=str(tmp_path / "list.jsonl.gz"), format="list"), Storage())
    skipped = Skipped()
    units = list(form.units(skipped))
    assert [(u["image_id"], u["uri"]) for u in units] == [(f"{tmp_path}/imgs/a.jpg", f"{tmp_path}/imgs/a.jpg"),
                                                          ("/abs/b.png", "/abs/b.png")]
    assert [json.loads(u["extra"]) for u in units] == [{"meta": '{"k":1}', "n": "3"}, {"meta": None, "n": None}]
    assert form.carried == ["meta", "n"] and form.duplicates == 1 and skipped.count == 1


STREAM_READER = r"""
import json, os, sys, tracemalloc
from fastsam_batch.inputs import tar_shards
from fastsam_batch.manifest import InputConfig
from fastsam_batch.storage import Storage

unit = {"image_id": "big.tar", "uri": sys.argv[1], "etag": "", "kind": "tar"}
cfg = InputConfig(uri="x", format="tar")
before, _ = tracemalloc.get_traced_memory()
tracemalloc.reset_peak()
n = sizes = 0
for im in tar_shards.read_images(unit, Storage(), cfg, frozenset()):
    n, sizes = n + 1, sizes + len(im.data)
    del im
_, peak = tracemalloc.get_traced_memory()
print(json.dumps({"members": n, "bytes": sizes, "peak_mb": (peak - before) / 2**20}), flush=True)
os._exit(0)  # never tracemalloc.stop() (see test_plan.py: a CPython 3.11 race)
"""


def test_a_shard_is_read_streaming_one_member_at_a_time(tmp_path):
    """A 48 MB shard read through: the reader holds one member (1 MB) and its read buffers, never
    the shard (measured with tracemalloc in a process of its own, members consumed as they come)."""
    member = os.urandom(1 << 20)
    (tmp_path / "big.tar").write_bytes(_tar([(f"{i:03d}.jpg", member) for i in range(48)]))
    r = subprocess.run([sys.executable, "-X", "tracemalloc=1", "-c", STREAM_READER, str(tmp_path / "big.tar")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert (got["members"], got["bytes"]) == (48, 48 << 20)
    assert got["peak_mb"] < 6, got
