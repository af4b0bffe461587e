"""Exports for dataset builders, read back by the tools people load them with: SA-1B records by
Datumaro's ``segment_anything`` importer, WebDataset shards by the ``webdataset`` package (aligned
with the input's tar shards), and the output Parquet by Hugging Face ``datasets``. Every mask read
back is compared, decoded, with the Parquet's, on outputs the fixture model made from generated
images (a prompted run on loose files, an everything-mode run on tar shards)."""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from conftest import CHECKPOINT, ROOT, run_cli
from shapes import make_image

SEEDS = list(range(9100, 9106))
FORMATS = {9100: "png", 9101: "png", 9102: "jpg", 9103: "jpg", 9104: "webp", 9105: "png"}


def _centre(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    i = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return [float(xs[i]) + 0.5, float(ys[i]) + 0.5]


def _run(root: Path, name: str, input_cfg: dict, prompts: dict | None = None) -> tuple[Path, dict]:
    out = root / f"{name}-out"
    m = root / f"{name}.yaml"
    m.write_text(yaml.safe_dump({
        "name": name, "input": input_cfg, "prompts": prompts or {"mode": "everything"},
        "model": {"checkpoint": str(CHECKPOINT), "imgsz": 320, "conf": 0.4, "device": "cpu"},
        "output": {"uri": str(out), "rows_per_file": 4}, "runtime": {"batch_size": 2},
    }))
    r = run_cli("run", str(m))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {r["image_id"]: r for r in pads.dataset(str(out), format="parquet").to_table().to_pylist()}
    return out, rows


@pytest.fixture(scope="module")
def files_output(tmp_path_factory):
    """Six generated images (PNG, JPEG, WebP) and a broken file, with a point prompt on each image's
    first shape and the everything-mode masks kept after it."""
    root = tmp_path_factory.mktemp("exports")
    images = root / "images"
    images.mkdir()
    prompts = []
    for seed in SEEDS:
        img, shapes = make_image(seed)
        name = f"{seed}.{FORMATS[seed]}"
        img.save(images / name, **({"quality": 95} if FORMATS[seed] == "jpg" else {}))
        prompts.append({"image_id": name, "points": [_centre(shapes[0].mask)], "prompt_id": f"p{seed}"})
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    table = root / "prompts.jsonl"
    table.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    out, rows = _run(root, "files", {"uri": str(images)}, {"table": str(table), "keep_everything": True})
    return {"root": root, "images": images, "out": out, "rows": rows}


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    make_image(seed)[0].save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tar_output(tmp_path_factory):
    """Two tar shards (one gzipped, in a subfolder), with side files, segmented in everything mode."""
    root = tmp_path_factory.mktemp("exports-tar")
    shards = root / "shards"
    _tar(shards / "s0.tar", [("000.png", _png(9110)), ("000.txt", b"a caption"), ("001.png", _png(9111)),
                             ("002.png", _png(9112))])
    _tar(shards / "sub" / "s1.tar.gz", [("100.png", _png(9113)), ("100.cls", b"3"), ("101.png", _png(9114))])
    out, rows = _run(root, "tars", {"uri": str(shards), "format": "tar"})
    return {"root": root, "shards": shards, "out": out, "rows": rows}


def _decoded(row: dict) -> list[np.ndarray]:
    """The Parquet's masks of a row, decoded."""
    h, w = row["height"], row["width"]
    return [mask_utils.decode({"size": [h, w], "counts": m["counts"].encode()}) for m in row["masks"]]


def _decode_rle(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})


def _ok(rows: dict) -> dict:
    return {k: r for k, r in rows.items() if r["status"] == "ok"}


# --- SA-1B --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def datumaro_path(tmp_path_factory):
    """Datumaro and its missing dependencies, installed with --no-deps into a folder of their own
    (tests/datumaro-requirements.txt says why); used only by the subprocess that imports with it."""
    target = tmp_path_factory.mktemp("datumaro")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        "-r", str(ROOT / "tests" / "datumaro-requirements.txt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return target


DATUMARO_READ = """
import json, sys
import numpy as np
from pycocotools import mask as mask_utils
from datumaro.components.annotation import AnnotationType
from datumaro.components.dataset import Dataset
from datumaro.components.environment import Environment

print(json.dumps({"detected": Environment().detect_dataset(sys.argv[1])}))
for item in Dataset.import_from(sys.argv[1], "segment_anything"):
    masks = []
    for a in item.annotations:
        if a.type == AnnotationType.mask:
            rle = mask_utils.encode(np.asfortranarray(a.image.astype(np.uint8)))
            masks.append({"id": a.id, "counts": rle["counts"].decode(), "size": rle["size"], "attributes": a.attributes})
    print(json.dumps({"id": item.id, "image_id": item.attributes["id"], "size": list(item.media.size),
                      "path": item.media.path, "masks": masks,
                      "boxes": sorted([a.id, *a.get_bbox()] for a in item.annotations if a.type == AnnotationType.bbox)}))
"""


def test_export_sa1b_records_read_back_by_datumaro(files_output, datumaro_path, tmp_path):
    out = tmp_path / "sa1b"
    r = run_cli("export-sa1b", str(files_output["out"]), "--out", str(out), "--with-images")
    assert r.returncode == 0, r.stdout + r.stderr
    ok = _ok(files_output["rows"])
    masks = sum(len(row["masks"]) for row in ok.values())
    assert r.stdout.strip() == (f"wrote {out}: {len(ok)} records ({masks} masks), {2 * len(ok)} files "
                                "(1 error rows left out)")
    assert f"export-sa1b: {len(ok)} / {len(ok)} images (100.0%)" in r.stderr  # the progress line's last state
    env = {**os.environ, "PYTHONPATH": str(datumaro_path)}
    d = subprocess.run([sys.executable, "-c", DATUMARO_READ, str(out)], capture_output=True, text=True, env=env)
    assert d.returncode == 0, d.stderr[-3000:]
    lines = [json.loads(line) for line in d.stdout.splitlines()]
    assert lines[0]["detected"] == ["segment_anything"]
    items = lines[1:]
    assert len(items) == len(ok) == 6
    by_file = {os.path.basename(it["path"]): it for it in items}
    from fastsam_batch.exports import sample_name

    for image_id, row in ok.items():
        name = sample_name(image_id)
        ext = "jpg" if image_id.endswith(".jpg") else "png"
        item = by_file[f"{name}.{ext}"]
        assert item["id"] == name and item["size"] == [row["height"], row["width"]]
        assert len(item["masks"]) == len(row["masks"]) and len(item["boxes"]) == len(row["masks"])
        for got, want, m in zip(sorted(item["masks"], key=lambda a: a["id"]), _decoded(row), row["masks"]):
            assert np.array_equal(_decode_rle(got), want)
            a = got["attributes"]
            assert a["predicted_iou"] == pytest.approx(m["score"]) and a["crop_box"] == [0, 0, row["width"], row["height"]]
            if m["prompt_kind"] == "points":
                assert a["point_coords"] == row["prompts"][m["prompt_index"]]["points"]
            else:
                assert a["point_coords"] == []
        for box, m in zip(sorted(item["boxes"]), row["masks"]):
            assert box[1:] == pytest.approx(m["bbox"])
        # The image beside the record: a JPEG or PNG byte for byte, the WebP as a PNG of the same pixels.
        original = (files_output["images"] / image_id).read_bytes()
        written = (out / f"{name}.{ext}").read_bytes()
        if image_id.endswith((".jpg", ".png")):
            assert written == original
        else:
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(written))),
                                  np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(original)))))
    assert sum(1 for it in items for m in it["masks"] if m["attributes"]["point_coords"]) >= 1  # prompts made some
    record = json.loads(next(out.glob("*.json")).read_text())
    has_stability = "stability_score" in ok[next(iter(ok))]["masks"][0] if ok[next(iter(ok))]["masks"] else False
    assert all(("stability_score" in a) == has_stability for a in record["annotations"])


def test_export_sa1b_tar_shards_hold_the_same_files(files_output, tmp_path):
    loose, shards = tmp_path / "loose", tmp_path / "shards"
    assert run_cli("export-sa1b", str(files_output["out"]), "--out", str(loose), "--with-images").returncode == 0
    r = run_cli("export-sa1b", str(files_output["out"]), "--out", str(shards), "--tar", "--shard-size", "4",
                "--with-images")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(shards)) == ["sa_000000.tar", "sa_000001.tar"]  # 6 images, 4 a shard
    members = {}
    for name in sorted(os.listdir(shards)):
        with tarfile.open(shards / name) as tf:
            names = tf.getnames()
            assert all(n.endswith(".json") for n in names[0::2])  # a record, then its image
            members.update({n: tf.extractfile(n).read() for n in names})
    assert members == {p.name: p.read_bytes() for p in loose.iterdir()}


# --- WebDataset ---------------------------------------------------------------------------------

def _read_webdataset(paths: list[str]) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(paths, shardshuffle=False, empty_check=False))


def _check_sample(sample: dict, row: dict) -> None:
    doc = json.loads(sample["json"])
    assert doc["image_id"] == row["image_id"] and (doc["width"], doc["height"]) == (row["width"], row["height"])
    got = [_decode_rle(m["segmentation"]) for m in doc["masks"]]
    want = _decoded(row)
    assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))
    assert [m["score"] for m in doc["masks"]] == pytest.approx([m["score"] for m in row["masks"]])
    image = next(sample[k] for k in ("jpg", "png") if k in sample)
    assert Image.open(io.BytesIO(image)).size == (row["width"], row["height"])


def test_export_webdataset_shards_read_back_by_webdataset(files_output, tmp_path):
    out = tmp_path / "wds"
    r = run_cli("export-webdataset", str(files_output["out"]), "--out", str(out), "--shard-size", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(os.listdir(out)) == ["000000.tar", "000001.tar"]
    samples = _read_webdataset(sorted(str(p) for p in out.iterdir()))
    ok = _ok(files_output["rows"])
    assert len(samples) == len(ok)
    seen = set()
    for s in samples:
        row = ok[json.loads(s["json"])["image_id"]]
        _check_sample(s, row)
        seen.add(row["image_id"])
        assert ("jpg" in s) == row["image_id"].endswith(".jpg")
    assert seen == set(ok)


def test_export_webdataset_aligned_with_the_input_tar_shards(tar_output, tmp_path):
    out = tmp_path / "wds"
    r = run_cli("export-webdataset", str(tar_output["out"]), "--out", str(out), "--shard-size", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "5 samples" in r.stdout and "in 2 shards (one per input tar shard)" in r.stdout
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.tar"))
    assert written == ["s0.tar", "sub/s1.tar"]
    rows = _ok(tar_output["rows"])
    for shard, keys in (("s0.tar", ["000", "001", "002"]), ("sub/s1.tar", ["100", "101"])):
        samples = _read_webdataset([str(out / shard)])
        assert [s["__key__"] for s in samples] == keys  # the input's keys, in its order
        source = shard if shard == "s0.tar" else "sub/s1.tar.gz"
        for s in samples:
            _check_sample(s, rows[f"{source}/{s['__key__']}.png"])


# --- Hugging Face datasets -----------------------------------------------------------------------

HF_READ = """
import json, sys
from datasets import load_dataset
ds = load_dataset("parquet", data_files=sys.argv[1:], split="train", cache_dir=%r)
print(json.dumps({"rows": ds.num_rows, "features": list(ds.features),
                  "masks": {r["image_id"]: [m["counts"] for m in r["masks"]] for r in ds}}))
"""


def test_hugging_face_datasets_loads_the_output(files_output, tmp_path):
    files = sorted(glob.glob(str(files_output["out"] / "part-*.parquet")))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-c", HF_READ % str(tmp_path / "cache"), *files], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    rows = files_output["rows"]
    assert got["rows"] == len(rows) and {"image_id", "masks", "status"} <= set(got["features"])
    for image_id, counts in got["masks"].items():
        row = rows[image_id]
        decoded = [mask_utils.decode({"size": [row["height"], row["width"]], "counts": c.encode()}) for c in counts]
        assert len(decoded) == len(row["masks"]) and all(np.array_equal(a, b) for a, b in zip(decoded, _decoded(row)))


def test_row_groups_are_sized_for_the_hub_viewer(files_output):
    import pyarrow as pa

    from fastsam_batch.write import ROW_GROUP_BYTES, parquet_file_bytes

    assert ROW_GROUP_BYTES <= 300_000_000
    for path in glob.glob(str(files_output["out"] / "part-*.parquet")):
        md = pq.ParquetFile(path).metadata
        assert all(md.row_group(i).total_byte_size <= ROW_GROUP_BYTES for i in range(md.num_row_groups))
    # Rows of 1 MB each, 10 MB a group at most: 10 rows a group.
    table = pa.table({"image_id": [str(i) for i in range(35)], "masks": ["x" * 1_000_000] * 35})
    md = pq.ParquetFile(io.BytesIO(parquet_file_bytes(table, "zstd", row_group_bytes=10_000_000))).metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [9, 9, 9, 8]


# --- failing well -------------------------------------------------------------------------------

def _one_line(r, *words):
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("export-")]  # progress
    assert len(lines) == 1 and lines[0].startswith("fastsam-batch:") and all(w in lines[0] for w in words), r.stderr


def test_bad_paths_are_one_line(files_output, tmp_path, s3_env):
    (tmp_path / "a-file").write_text("x")
    for cmd in ("export-sa1b", "export-webdataset"):
        _one_line(run_cli(cmd, str(files_output["out"]), "--out", str(tmp_path / "a-file")), "a file is there")
        _one_line(run_cli(cmd, str(tmp_path / "nothing"), "--out", str(tmp_path / "x")), "no such file or folder")
        _one_line(run_cli(cmd, str(files_output["out"]), "--out", str(files_output["out"])), "the output itself")
        _one_line(run_cli(cmd, str(files_output["out"]), "--out", "s3://no-such-bucket-24b/x", env=s3_env),
                  "s3://no-such-bucket-24b/x", "no such bucket")
    assert not (tmp_path / "x").exists()


def test_an_image_gone_since_the_run_is_left_out_and_said(files_output, tmp_path):
    gone = files_output["images"] / "9100.png"
    kept = gone.read_bytes()
    gone.unlink()
    try:
        r = run_cli("export-webdataset", str(files_output["out"]), "--out", str(tmp_path / "wds"))
    finally:
        gone.write_bytes(kept)
    _one_line(r, "1 images could not be read", "9100.png")
    assert "wrote" in r.stdout and "export-webdataset: 6 / 6 images (100.0%)" in r.stderr
    assert len(_read_webdataset([str(tmp_path / "wds" / "000000.tar")])) == len(_ok(files_output["rows"])) - 1


def test_sa1b_record_fields():
    """A record's fields from a row, without a model: stability_score where the output has one
    (absent otherwise: Datumaro's importer refuses null there), the points of a point prompt."""
    from fastsam_batch.exports.sa1b import record

    mask = {"counts": "PP0", "bbox": [1.0, 2.0, 3.0, 4.0], "area": 12, "score": 0.75, "prompt_index": None,
            "prompt_kind": None}
    row = {"width": 8, "height": 6, "masks": [mask, {**mask, "prompt_index": 1, "prompt_kind": "points"}],
           "prompts": [{"points": None}, {"points": [[2.5, 3.5]]}]}
    rec = record(row, 7, "a-0123abcd.png", 10)
    assert rec["image"] == {"image_id": 7, "file_name": "a-0123abcd.png", "width": 8, "height": 6}
    first, second = rec["annotations"]
    assert first == {"id": 10, "segmentation": {"size": [6, 8], "counts": "PP0"}, "bbox": [1.0, 2.0, 3.0, 4.0],
                     "area": 12, "predicted_iou": 0.75, "crop_box": [0, 0, 8, 6], "point_coords": []}
    assert second["id"] == 11 and second["point_coords"] == [[2.5, 3.5]]
    row["masks"] = [{**mask, "stability_score": 0.96}, {**mask, "stability_score": None}]
    with_scores = record(row, 7, "a.png", 1)["annotations"]
    assert with_scores[0]["stability_score"] == 0.96 and "stability_score" not in with_scores[1]


def test_export_to_s3(files_output, s3_env, s3fs_client, tmp_path):
    """``--out s3://...``: each shard one upload, read back from the bucket."""
    from conftest import make_bucket

    make_bucket(s3_env, "exports24")
    r = run_cli("export-webdataset", str(files_output["out"]), "--out", "s3://exports24/wds/", "--shard-size", "4",
                env=s3_env)
    assert r.returncode == 0, r.stdout + r.stderr
    s3fs_client.invalidate_cache()
    assert sorted(s3fs_client.ls("exports24/wds/")) == ["exports24/wds/000000.tar", "exports24/wds/000001.tar"]
    local = []
    for key in sorted(s3fs_client.ls("exports24/wds/")):
        local.append(str(tmp_path / os.path.basename(key)))
        s3fs_client.get_file(key, local[-1])
    ok = _ok(files_output["rows"])
    samples = _read_webdataset(local)
    assert len(samples) == len(ok)
    for s in samples:
        _check_sample(s, ok[json.loads(s["json"])["image_id"]])
