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
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from conftest import CHECKPOINT, ROOT, run_cli
from shapes import make_image

SEEDS = list(range(9100, 9107))
FORMATS = {9100: "png", 9101: "png", 9102: "jpg", 9103: "jpg", 9104: "webp", 9105: "png", 9106: "jpg"}
ROTATED = 9106  # a JPEG stored turned, with EXIF orientation 6 ("rotate 90 degrees clockwise to display")
SIZES = {ROTATED: (320, 224)}  # not square: a turned image has another width and height


def _displayed(seed: int) -> tuple[Image.Image, list]:
    return make_image(seed, size=SIZES.get(seed))


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
        "output": {"uri": str(out), "rows_per_file": 4}, "runtime": {"batch_size": 2, "num_actors": 1},
    }))
    r = run_cli("run", str(m))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {r["image_id"]: r for r in pads.dataset(str(out), format="parquet").to_table().to_pylist()}
    return out, rows


@pytest.fixture(scope="module")
def files_output(tmp_path_factory):
    """Seven generated images (PNG, JPEG, WebP, a JPEG with EXIF orientation 6) and a broken file,
    with a point prompt on each image's first shape and the everything-mode masks kept after it."""
    root = tmp_path_factory.mktemp("exports")
    images = root / "images"
    images.mkdir()
    prompts = []
    for seed in SEEDS:
        img, shapes = _displayed(seed)
        name = f"{seed}.{FORMATS[seed]}"
        if seed == ROTATED:  # stored turned back, so that EXIF orientation 6 displays it as generated
            exif = Image.Exif()
            exif[0x0112] = 6
            img.transpose(Image.Transpose.ROTATE_90).save(images / name, quality=95, exif=exif)
        else:
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
def datumaro_path():
    """Datumaro and its missing dependencies, installed with --no-deps into a folder of their own
    (tests/datumaro-requirements.txt says why); used only by the subprocess that imports with it.
    The folder is kept under the git-ignored build/, named by the requirements file's hash, so a
    session installs only when that file changed; it is installed beside it and renamed into place
    when complete, so a killed install leaves no half folder to be used."""
    import hashlib
    import shutil
    import tempfile

    requirements = ROOT / "tests" / "datumaro-requirements.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    cache = ROOT / "build" / "test-cache"
    target = cache / f"datumaro-{digest}"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".datumaro-{digest}-", dir=cache))
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary", ":all:",
                            "--timeout", "60", "--target", str(tmp), "-r", str(requirements)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        try:
            tmp.rename(target)
        except OSError:  # another session put it there first: use theirs
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _same_image(written: bytes, original: bytes) -> None:
    """The image written beside the masks is the original as displayed: a JPEG or PNG without an
    EXIF rotation byte for byte; a turned JPEG as a JPEG of the displayed pixels (no rotation left,
    quality 95: within a few levels); other formats a PNG of the displayed pixels."""
    src = Image.open(io.BytesIO(original))
    turned = src.getexif().get(0x0112, 1) != 1
    if src.format in ("JPEG", "PNG") and not turned:
        assert written == original
        return
    out = Image.open(io.BytesIO(written))
    assert out.getexif().get(0x0112, 1) == 1
    want = np.asarray(ImageOps.exif_transpose(src)).astype(int)
    got = np.asarray(out).astype(int)
    assert got.shape == want.shape
    if src.format == "JPEG":
        assert out.format == "JPEG" and np.abs(got - want).mean() < 3
    else:
        assert out.format == "PNG" and np.array_equal(got, want)


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
    assert len(items) == len(ok) == len(SEEDS)
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
        # The image beside the record: a JPEG or PNG byte for byte, the WebP as a PNG of the same
        # pixels, the JPEG stored turned (EXIF orientation 6) as a JPEG turned as displayed.
        _same_image((out / f"{name}.{ext}").read_bytes(), (files_output["images"] / image_id).read_bytes())
        for a in item["masks"]:  # SA-1B's area is the mask's pixel count
            rec = json.loads((out / f"{name}.json").read_text())
            ann = next(x for x in rec["annotations"] if x["id"] == a["id"])
            assert ann["area"] == int(_decode_rle(ann["segmentation"]).sum())
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
    assert sorted(os.listdir(shards)) == ["sa_000000.tar", "sa_000001.tar"]  # 7 images, 4 a shard
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


def _rewrite_output(src: Path, dst: Path, change=None, files=None) -> Path:
    """A copy of the output ``src`` at ``dst``, each row passed through ``change(row) -> row`` (the
    part files keep their names and schema; ``files``: only these of them)."""
    dst.mkdir(parents=True, exist_ok=True)
    for part in sorted(src.glob("part-*.parquet")):
        if files is not None and part.name not in files:
            continue
        t = pq.read_table(part)
        rows = [change(dict(r)) if change else r for r in t.to_pylist()]
        pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), dst / part.name)
    return dst


def _version(path: Path) -> str:
    """A local object's source_version as the run records it."""
    st = os.stat(path)
    return f"mtime:{st.st_mtime}/{st.st_size}"


def _own_copy(files_output, tmp_path: Path) -> tuple[Path, Path]:
    """The files output and its images copied (modification times kept), the rows' uri pointing
    at the copy: a test may delete or change images without touching the module's fixture."""
    images = tmp_path / "images"
    shutil.copytree(files_output["images"], images)  # copy2: the same mtimes, the same versions
    old = str(files_output["images"])

    def change(r):
        r["uri"] = r["uri"].replace(old, str(images))
        return r
    return _rewrite_output(files_output["out"], tmp_path / "out", change), images


def test_an_image_gone_or_changed_since_the_run_is_left_out_and_said(files_output, tmp_path):
    out, images = _own_copy(files_output, tmp_path)
    ok = _ok(files_output["rows"])
    r = run_cli("export-webdataset", str(out), "--out", str(tmp_path / "wds0"))
    assert r.returncode == 0, r.stdout + r.stderr  # the copy is the images as segmented
    (images / "9100.png").unlink()
    changed = images / "9101.png"
    os.utime(changed, (changed.stat().st_atime, changed.stat().st_mtime + 60))  # same bytes, another version
    r = run_cli("export-webdataset", str(out), "--out", str(tmp_path / "wds"))
    _one_line(r, "2 images could not be read", "9100.png", "9101.png: changed since it was segmented")
    assert "wrote" in r.stdout and f"export-webdataset: {len(ok)} / {len(ok)} images (100.0%)" in r.stderr
    samples = _read_webdataset([str(tmp_path / "wds" / "000000.tar")])
    assert sorted(json.loads(s["json"])["image_id"] for s in samples) == sorted(set(ok) - {"9100.png", "9101.png"})


def test_a_jpeg_with_exif_orientation_is_written_as_displayed(files_output, tmp_path):
    """Width, height and masks are of the image as displayed (decode.py turns it): the JPEG stored
    turned with orientation 6 is written turned, so that a reader ignoring EXIF gets the pixels the
    masks were made on: those of the generated image."""
    name = f"{ROTATED}.jpg"
    row = files_output["rows"][name]
    assert row["status"] == "ok" and (row["width"], row["height"]) == SIZES[ROTATED]
    r = run_cli("export-webdataset", str(files_output["out"]), "--out", str(tmp_path / "wds"), "--shard-size", "100")
    assert r.returncode == 0, r.stdout + r.stderr
    sample = next(s for s in _read_webdataset([str(tmp_path / "wds" / "000000.tar")])
                  if json.loads(s["json"])["image_id"] == name)
    _check_sample(sample, row)
    img = Image.open(io.BytesIO(sample["jpg"]))  # as a reader ignoring EXIF sees it
    assert img.getexif().get(0x0112, 1) == 1 and img.size == SIZES[ROTATED]
    # The generated image's pixels, compared at 1/8 scale (the background's noise does not survive
    # two JPEG encodings; the shapes' places do): as displayed, not turned or flipped.
    def small(im):
        return np.asarray(im.convert("RGB").resize((40, 28), Image.Resampling.BOX)).astype(int)
    generated = _displayed(ROTATED)[0]
    assert np.abs(small(img) - small(generated)).mean() < 4
    assert np.abs(small(img) - small(generated.transpose(Image.Transpose.ROTATE_180))).mean() > 8


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


def test_point_coords_are_the_foreground_points_only():
    from fastsam_batch.exports.sa1b import record

    mask = {"counts": "PP0", "bbox": [1.0, 2.0, 3.0, 4.0], "area": 12, "score": 0.75, "prompt_index": 0,
            "prompt_kind": "points"}
    row = {"width": 8, "height": 6, "masks": [mask],
           "prompts": [{"points": [[1.5, 1.5], [4.5, 2.5], [6.5, 5.5]], "labels": [1, 0, 1]}]}
    assert record(row, 1, "a.png", 1)["annotations"][0]["point_coords"] == [[1.5, 1.5], [6.5, 5.5]]


def test_webdataset_json_uri_has_no_credentials_or_signature():
    from fastsam_batch.exports.webdataset import sample_json

    row = {"image_id": "a.jpg", "width": 8, "height": 6, "masks": [], "prompts": [],
           "uri": "https://alice:s3cret@images.example.com/a.jpg?X-Amz-Signature=abc&X-Amz-Credential=AKIA"}
    assert sample_json(row, "k")["uri"] == "https://images.example.com/a.jpg"
    row["uri"] = "tar://0.jpg::https://bob:pw@host/s.tar?sig=1"
    assert sample_json(row, "k")["uri"] == "tar://0.jpg::https://host/s.tar"
    row["uri"] = "s3://bucket/x.jpg"
    assert sample_json(row, "k")["uri"] == "s3://bucket/x.jpg"


# --- outputs made by hand from the fixtures' rows (no model run) -----------------------------------

def _tiny_png(i: int) -> tuple[bytes, np.ndarray]:
    """A 12x10 PNG with a bright rectangle placed by ``i``, and that rectangle's mask."""
    mask = np.zeros((10, 12), np.uint8)
    x, y = i % 7, (i // 7) % 5
    mask[y:y + 4, x:x + 5] = 1
    buf = io.BytesIO()
    Image.fromarray((mask * 200 + 30).astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue(), mask


def _template(rows: dict) -> dict:
    return next(r for r in rows.values() if r["status"] == "ok" and r["masks"])


def _mask_entry(template_mask: dict, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    return {**template_mask, "counts": rle["counts"].decode(), "bbox": [x, y, w, h], "area": int(mask.sum()),
            "prompt_index": None, "prompt_kind": None, "prompt_id": None}


LOW_FILE_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (%d, %d))
from fastsam_batch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_aligned_export_of_many_shards_under_a_low_file_limit(tar_output, tmp_path):
    """2,000 tar shards of two images each, their rows in two part files (every shard's first image
    in one, its second in the other, so every shard is open until the second file is read): the
    export keeps one spool file, not one per shard, and runs under a limit of 200 open files."""
    shards_dir = tmp_path / "shards"
    template = _template(tar_output["rows"])
    schema = pq.read_schema(next(tar_output["out"].glob("part-*.parquet")))
    n = 2000
    parts: list[list[dict]] = [[], []]
    truth = {}
    for i in range(n):
        shard = shards_dir / f"{i // 100:02d}" / f"s{i:04d}.tar"
        members = []
        for j in range(2):
            data, mask = _tiny_png(2 * i + j)
            members.append((f"{j}.png", data))
            image_id = f"{i // 100:02d}/s{i:04d}.tar/{j}.png"
            truth[image_id] = mask
            parts[j].append({**template, "image_id": image_id, "uri": f"tar://{j}.png::{shard}", "shard": str(shard),
                             "width": 12, "height": 10, "masks": [_mask_entry(template["masks"][0], mask)],
                             "num_masks": 1, "prompts": []})
        _tar(shard, members)
    for rows in parts:
        for r in rows:
            r["source_version"] = _version(Path(r["shard"]))
    out = tmp_path / "out"
    out.mkdir()
    for j, rows in enumerate(parts):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / f"part-{j:020d}.parquet")
    wds = tmp_path / "wds"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", LOW_FILE_LIMIT % (200, 200), "export-webdataset", str(out), "--out",
                        str(wds)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert f"{2 * n:,} samples" in r.stdout and f"in {n:,} shards (one per input tar shard)" in r.stdout
    assert "export-webdataset: reading the output" in r.stderr
    written = sorted(wds.rglob("*.tar"))
    assert len(written) == n
    seen = 0
    for path in written:
        with tarfile.open(path) as tf:
            names = tf.getnames()
            assert names == ["0.png", "0.json", "1.png", "1.json"]  # the input's keys, in its order
            for key in ("0", "1"):
                doc = json.loads(tf.extractfile(f"{key}.json").read())
                (m,) = doc["masks"]
                assert np.array_equal(_decode_rle(m["segmentation"]), truth[doc["image_id"]])
                seen += 1
    assert seen == 2 * n


def test_parquet_image_inputs_read_each_row_group_once(files_output, tmp_path, monkeypatch):
    """Rows whose images are in a Parquet file (``<file>#row=<n>``): each row group of the file is
    read once, not once per image; every sample's image and masks are the row's."""
    import pyarrow.parquet as pqm

    from fastsam_batch.exports.webdataset import export_webdataset
    from fastsam_batch.storage import Storage

    ok = _ok(files_output["rows"])
    names = sorted(ok)
    images = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": [(files_output["images"] / n).read_bytes() for n in names]}), images,
                   row_group_size=2)
    version = _version(images)

    def change(r):
        if r["image_id"] in ok:
            r.update(uri=f"{images}#row={names.index(r['image_id'])}", shard=str(images), source_version=version)
        return r
    out = _rewrite_output(files_output["out"], tmp_path / "out", change)
    reads = []
    real_iter, real_group = pqm.ParquetFile.iter_batches, pqm.ParquetFile.read_row_group

    def iter_batches(self, *a, **k):
        if "image" in (k.get("columns") or []):
            reads.extend(k.get("row_groups") or range(self.num_row_groups))
        return real_iter(self, *a, **k)

    def read_row_group(self, i, *a, **k):
        if "image" in (k.get("columns") or (a[0] if a else None) or []):
            reads.append(i)
        return real_group(self, i, *a, **k)
    monkeypatch.setattr(pqm.ParquetFile, "iter_batches", iter_batches)
    monkeypatch.setattr(pqm.ParquetFile, "read_row_group", read_row_group)
    counts = export_webdataset(str(out), Storage(), str(tmp_path / "wds"), shard_size=100, progress=False)
    assert counts["images"] == len(ok) and counts["unavailable"] == 0
    assert sorted(reads) == list(range(pq.ParquetFile(images).num_row_groups))  # each group once
    samples = _read_webdataset([str(tmp_path / "wds" / "000000.tar")])
    assert len(samples) == len(ok)
    for s in samples:
        row = ok[json.loads(s["json"])["image_id"]]
        _check_sample(s, row)
        _same_image(next(s[k] for k in ("jpg", "png") if k in s), (files_output["images"] / row["image_id"]).read_bytes())


def test_rows_written_twice_are_exported_once(files_output, tmp_path):
    """A part file's rows copied into a second part file (as a run killed before its repair can
    leave them): each image is exported once, as the job's repair would keep it."""
    out = _rewrite_output(files_output["out"], tmp_path / "out")
    first = sorted(out.glob("part-*.parquet"))[0]
    shutil.copy(first, out / "part-00000000000000000dup.parquet")
    twice = pq.read_table(first).num_rows
    ok = _ok(files_output["rows"])
    r = run_cli("export-webdataset", str(out), "--out", str(tmp_path / "wds"), "--shard-size", "100")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(ok)} samples" in r.stdout and f"({twice} rows written twice exported once)" in r.stdout
    samples = _read_webdataset([str(tmp_path / "wds" / "000000.tar")])
    assert len({s["__key__"] for s in samples}) == len(samples) == len(ok)
    for s in samples:
        _check_sample(s, ok[json.loads(s["json"])["image_id"]])
    r = run_cli("export-sa1b", str(out), "--out", str(tmp_path / "sa1b"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"wrote {tmp_path / 'sa1b'}: {len(ok)} records") and len(list((tmp_path / "sa1b").glob("*.json"))) == len(ok)
    # Rows of two versions of one image: only a run knows which is current, so the export stops.
    other = _rewrite_output(files_output["out"], tmp_path / "other", files=[first.name],
                            change=lambda r: {**r, "source_version": "mtime:1.0/1"})
    (tmp_path / "two").mkdir()
    for p in list(files_output["out"].glob("part-*.parquet")) + [other / first.name]:
        shutil.copy(p, tmp_path / "two" / (p.name if p.parent != other else "part-0000000000000000other.parquet"))
    _one_line(run_cli("export-webdataset", str(tmp_path / "two"), "--out", str(tmp_path / "wds2")),
              "rows of two versions", "run the job again")
    assert not (tmp_path / "wds2").exists() or not os.listdir(tmp_path / "wds2")


def test_shards_that_would_share_a_name_stop_the_export(tar_output, tmp_path):
    shards = tar_output["shards"]

    def change(r):  # sub/s1.tar.gz's rows as if they came from s0.tar.gz beside s0.tar
        if "s1.tar.gz" in (r["shard"] or ""):
            member = r["uri"][len("tar://"):].partition("::")[0]
            r.update(image_id=f"s0.tar.gz/{member}", shard=str(shards / "s0.tar.gz"),
                     uri=f"tar://{member}::{shards / 's0.tar.gz'}")
        return r
    out = _rewrite_output(tar_output["out"], tmp_path / "out", change)
    _one_line(run_cli("export-webdataset", str(out), "--out", str(tmp_path / "wds")),
              "'s0.tar'", "'s0.tar.gz'", "would both be written as 's0.tar'")
    assert not list((tmp_path / "wds").rglob("*.tar")) if (tmp_path / "wds").exists() else True


def test_out_with_files_is_refused_unless_overwrite(files_output, tmp_path):
    out = tmp_path / "wds"
    assert run_cli("export-webdataset", str(files_output["out"]), "--out", str(out), "--shard-size", "2").returncode == 0
    assert sorted(os.listdir(out)) == ["000000.tar", "000001.tar", "000002.tar", "000003.tar"]
    (out / "notes.txt").write_text("mine")
    (out / ".000009.tar.0123abcd.tmp").write_bytes(b"half a shard")  # left by a killed export
    _one_line(run_cli("export-webdataset", str(files_output["out"]), "--out", str(out), "--shard-size", "4"),
              "not empty", "--overwrite")
    assert not (out / ".000009.tar.0123abcd.tmp").exists()  # removed at the start all the same
    r = run_cli("export-webdataset", str(files_output["out"]), "--out", str(out), "--shard-size", "4", "--overwrite")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(os.listdir(out)) == ["000000.tar", "000001.tar", "notes.txt"]  # no stale 000002/3.tar
    assert len(_read_webdataset([str(out / "000000.tar"), str(out / "000001.tar")])) == len(_ok(files_output["rows"]))


def test_a_shard_key_outside_out_is_refused(tar_output, tmp_path):
    def change(r):
        if r["shard"] and r["shard"].endswith("s0.tar"):
            member = r["uri"][len("tar://"):].partition("::")[0]
            r["image_id"] = f"../../escape.tar/{member}"
        return r
    out = _rewrite_output(tar_output["out"], tmp_path / "out", change)
    _one_line(run_cli("export-webdataset", str(out), "--out", str(tmp_path / "a" / "b" / "wds")), "outside")
    assert not list(tmp_path.rglob("escape*"))


def test_ctrl_c_is_one_line_and_exit_130(tar_output, tmp_path):
    """SIGINT once the export shows its progress line, while it waits on a shard that never comes
    (a named pipe nobody writes): one line, exit 130, no traceback, no temporary left."""
    import signal

    fifo = tmp_path / "s0.tar"
    os.mkfifo(fifo)

    def change(r):
        if r["shard"] and r["shard"].endswith("/s0.tar"):
            member = r["uri"][len("tar://"):].partition("::")[0]
            r.update(shard=str(fifo), uri=f"tar://{member}::{fifo}", source_version=None)
        return r
    out = _rewrite_output(tar_output["out"], tmp_path / "out", change)
    exe = Path(sys.executable).with_name("fastsam-batch")
    p = subprocess.Popen([str(exe), "export-webdataset", str(out), "--out", str(tmp_path / "wds")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import selectors

        seen = ""
        sel = selectors.DefaultSelector()
        sel.register(p.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 150  # a bound on a failure only (no progress line at all)
        while "reading the output" not in seen and time.monotonic() < deadline:
            if sel.select(timeout=1):
                chunk = os.read(p.stderr.fileno(), 65536)  # unbuffered: select sees every byte
                if not chunk:
                    break
                seen += chunk.decode()
        assert "reading the output" in seen, seen
        p.send_signal(signal.SIGINT)
        stdout, rest = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    stderr = seen + rest
    assert p.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    said = [x for x in stderr.splitlines() if x.startswith("fastsam-batch:")]
    assert len(said) == 1 and "interrupted" in said[0], stderr
    assert not [x for x in (tmp_path / "wds").rglob("*") if x.name.endswith(".tmp")]


def test_export_sa1b_of_tar_shards_with_tar(tar_output, tmp_path):
    """export-sa1b --tar of a tar input: one sa_ shard per input shard (in the input shards' sorted
    order), a record then its image, masks and areas those of the Parquet."""
    from fastsam_batch.exports import sample_name

    out = tmp_path / "sa1b"
    r = run_cli("export-sa1b", str(tar_output["out"]), "--out", str(out), "--tar", "--with-images")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(os.listdir(out)) == ["sa_000000.tar", "sa_000001.tar"]
    rows = _ok(tar_output["rows"])
    expect = {"sa_000000.tar": ["s0.tar/000.png", "s0.tar/001.png", "s0.tar/002.png"],
              "sa_000001.tar": ["sub/s1.tar.gz/100.png", "sub/s1.tar.gz/101.png"]}
    for shard, ids in expect.items():
        with tarfile.open(out / shard) as tf:
            names = tf.getnames()
            assert names == [f"{sample_name(i)}.{ext}" for i in ids for ext in ("json", "png")]
            for image_id in ids:
                row = rows[image_id]
                rec = json.loads(tf.extractfile(f"{sample_name(image_id)}.json").read())
                assert rec["image"]["file_name"] == f"{sample_name(image_id)}.png"
                got = [_decode_rle(a["segmentation"]) for a in rec["annotations"]]
                assert len(got) == len(row["masks"]) and all(np.array_equal(g, w) for g, w in zip(got, _decoded(row)))
                assert [a["area"] for a in rec["annotations"]] == [int(g.sum()) for g in got]
                member = image_id.rsplit("/", 1)[1]
                source = tar_output["shards"] / image_id[: -len(member) - 1]
                with tarfile.open(source) as src:
                    assert tf.extractfile(f"{sample_name(image_id)}.png").read() == src.extractfile(member).read()


def test_row_groups_stay_under_the_cap_when_large_rows_cluster(files_output, tmp_path, monkeypatch):
    """Through the run's writer and repair's rewrite, with the cap made small: rows with many
    masks first, small ones after; every row group within the cap, several groups, and the
    files still read by resume (read_committed, duplicate_rows)."""
    from fastsam_batch import write
    from fastsam_batch.repair import drop_rows
    from fastsam_batch.resume import duplicate_rows, id_key, read_committed
    from fastsam_batch.storage import Storage

    part = sorted(files_output["out"].glob("part-*.parquet"))[0]
    t = pq.read_table(part)
    template = next(r for r in t.to_pylist() if r["masks"])
    big = [{**template, "image_id": f"big/{i}.png", "masks": template["masks"] * 40} for i in range(12)]
    small = [{**template, "image_id": f"small/{i}.png", "masks": template["masks"][:1]} for i in range(60)]
    table = pa.Table.from_pylist(big + small, schema=t.schema)
    cap = int(table.slice(0, 3).nbytes * 1.15)  # three big rows a group (not four); the mean row would allow ~16
    assert table.nbytes // table.num_rows * 5 < cap
    monkeypatch.setattr(write, "ROW_GROUP_BYTES", cap)
    out = tmp_path / "out"
    storage = Storage()
    write.ParquetWriter(str(out), storage)(table)

    def groups_of(path):
        """The Arrow size of each row group read back (within 1% of the rows the writer measured:
        buffers read back are laid out a little differently)."""
        f = pq.ParquetFile(path)
        return [f.read_row_group(i).nbytes for i in range(f.num_row_groups)]

    (written,) = list(out.glob("part-*.parquet"))
    md = pq.ParquetFile(written).metadata
    counts = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    starts = np.cumsum([0] + counts[:-1]).tolist()
    assert all(table.slice(a, n).nbytes <= cap for a, n in zip(starts, counts)), (counts, cap)
    sizes = groups_of(written)
    assert len(sizes) >= 4 and all(s <= cap * 1.01 for s in sizes), (sizes, cap)

    class Fence:
        def check(self, storage):
            pass
    assert drop_rows(str(out), storage, {str(written): {id_key("small/0.png")}}, fence=Fence()) == 1
    (rewritten,) = list(out.glob("part-*.parquet"))
    sizes = groups_of(rewritten)
    assert len(sizes) >= 4 and all(s <= cap * 1.01 for s in sizes), (sizes, cap)
    committed = read_committed(str(out), storage)
    assert committed.rows == table.num_rows - 1 and not duplicate_rows(committed)
