"""End to end: `fastsam-batch run` as a user runs it, against a moto S3 server over HTTP and on a
local folder, checked against ultralytics' FastSAM and against the generator's ground truth."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import FAKE_KEY, FAKE_SECRET, make_bucket, run_cli
from fastsam_batch.schema import OUTPUT_SCHEMA
from shapes import make_image

IMGSZ, CONF, IOU = 320, 0.4, 0.9
SHAPE_SEEDS = list(range(500, 510))
MAX_PIXELS = 1_000_000


def _save(img: Image.Image, path: Path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A folder as users have them: generated shapes (with ground truth), odd formats, broken files."""
    root = tmp_path_factory.mktemp("images")
    truth = {}
    for seed in SHAPE_SEEDS:
        img, shapes = make_image(seed)
        key = f"shapes/{seed}.png"
        _save(img, root / key)
        truth[key] = shapes
    base = make_image(777, size=(120, 80))[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed 80 wide, 120 high
    ok_sizes = {
        "odd/gray.png": ((120, 80), lambda p: _save(base.convert("L"), p)),
        "odd/rgba.png": ((120, 80), lambda p: _save(base.convert("RGBA"), p)),
        "odd/palette.gif": ((120, 80), lambda p: _save(base.convert("P"), p)),
        "odd/deep16.png": ((120, 80), lambda p: _save(Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257), p)),
        "odd/cmyk.jpg": ((120, 80), lambda p: _save(base.convert("CMYK"), p)),
        "odd/rotated.jpg": ((80, 120), lambda p: _save(base, p, exif=exif.tobytes())),
        "odd/pic.tiff": ((120, 80), lambda p: _save(base, p)),
        "odd/pic.bmp": ((120, 80), lambda p: _save(base, p)),
        "odd/pic.webp": ((120, 80), lambda p: _save(base, p)),
        "odd/UPPER.JPG": ((120, 80), lambda p: _save(base, p, format="JPEG")),
    }
    for key, (_, make) in ok_sizes.items():
        make(root / key)
    jpeg = io.BytesIO()
    make_image(778, size=(300, 200))[0].save(jpeg, format="JPEG", quality=90)
    broken = {
        "broken/empty.jpg": (b"", "empty_file"),
        "broken/truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "truncated_image"),
        "broken/not-really.png": (b"<html>not an image</html>\n" * 20, "not_an_image"),
    }
    for key, (data, _) in broken.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    _save(Image.new("RGB", (1250, 1000), (10, 20, 30)), root / "broken/bomb.png")  # 1.25 MP > MAX_PIXELS
    broken["broken/bomb.png"] = (None, "too_many_pixels")
    (root / "odd" / "README.txt").write_text("not an image; skipped by extension\n")
    return {"root": root, "truth": truth, "ok_sizes": {k: v[0] for k, v in ok_sizes.items()},
            "broken": {k: v[1] for k, v in broken.items()}, "skipped": ["odd/README.txt"]}


def manifest(path: Path, input_uri: str, output_uri: str, checkpoint: str, output: dict | None = None,
             **runtime) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "e2e",
        "input": {"uri": input_uri, "max_pixels": MAX_PIXELS},
        "model": {"checkpoint": checkpoint, "imgsz": IMGSZ, "conf": CONF, "iou": IOU, "device": "cpu"},
        "prompts": {"mode": "everything"},
        "output": {"uri": output_uri, "rows_per_file": 8, **(output or {})},
        "runtime": {"batch_size": 4, "num_actors": 1, **runtime},  # 1: sooner on 2 cores (the local run: 2)
    }))
    return path


@pytest.fixture(scope="session")
def s3_run(dataset, s3fs_client, s3_env, checkpoint, tmp_path_factory):
    fs = s3fs_client
    make_bucket(s3_env, "data")
    for p in sorted(dataset["root"].rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"data/images/{p.relative_to(dataset['root'])}")
    fs.put_file(str(checkpoint), "data/models/fastsam-fixture.pt")
    # Small plan parts: the plan goes to files under the output's _plan/ that the workers read.
    m = manifest(tmp_path_factory.mktemp("job") / "s3.yaml", "s3://data/images/", "s3://data/masks/",
                 "s3://data/models/fastsam-fixture.pt", plan_part_rows=4)
    r = run_cli("run", str(m), env=s3_env)
    assert r.returncode == 0, r.stdout + r.stderr
    fs.invalidate_cache()
    table = pads.dataset("data/masks/", format="parquet", filesystem=fs).to_table()
    return {"proc": r, "table": table, "fs": fs}


@pytest.fixture(scope="session")
def local_run(dataset, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("local-out") / "masks"
    # 4 writer actors (output.writers; the S3 run has auto's 1): rows_per_file 4, so that most
    # blocks cut files and the writers' queues fill
    m = manifest(tmp_path_factory.mktemp("job") / "local.yaml", str(dataset["root"]), str(out), str(checkpoint),
                 output={"writers": 4, "rows_per_file": 4}, num_actors=2, cpus_per_actor=0.5)
    r = run_cli("run", str(m))
    assert r.returncode == 0, r.stdout + r.stderr
    return {"proc": r, "table": pads.dataset(str(out), format="parquet").to_table(), "out": out}


def rows_by_id(table):
    return {r["image_id"]: r for r in table.to_pylist()}


def decode_masks(row) -> list[np.ndarray]:
    h, w = row["height"], row["width"]
    return [mask_utils.decode({"size": [h, w], "counts": m["counts"].encode()}).astype(bool) for m in row["masks"]]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_one_row_per_image_with_the_documented_schema(s3_run, dataset):
    t = s3_run["table"]
    expected = set(dataset["truth"]) | set(dataset["ok_sizes"]) | set(dataset["broken"])
    ids = t.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(expected)
    assert set(ids) == expected
    assert t.schema.remove_metadata().equals(OUTPUT_SCHEMA)
    for row in t.to_pylist():
        assert row["uri"] == f"s3://data/images/{row['image_id']}"
        assert row["checkpoint_sha256"] and row["model"] == "fastsam-fixture.pt"
    assert f"plan in {-(-len(expected) // 4)} files under s3://data/masks/_plan/" in s3_run["proc"].stdout
    assert not s3_run["fs"].exists("data/masks/_plan")  # removed at the end of the run


def test_odd_and_broken_files_give_statuses_and_sizes(s3_run, dataset):
    rows = rows_by_id(s3_run["table"])
    for key, (w, h) in dataset["ok_sizes"].items():
        assert rows[key]["status"] == "ok", (key, rows[key]["error"])
        assert (rows[key]["width"], rows[key]["height"]) == (w, h), key
    for key, reason in dataset["broken"].items():
        assert rows[key]["status"] == "error" and rows[key]["masks"] == [], key
        assert rows[key]["error"].startswith(reason + ":"), (key, rows[key]["error"])
    out = s3_run["proc"].stdout
    assert "skipped (not an image by extension): 1" in out and "odd/README.txt" in out
    assert f"error: {len(dataset['broken'])}" in out
    for reason in set(dataset["broken"].values()):
        assert f"error {reason}: 1" in out


def test_masks_agree_with_ultralytics_fastsam(s3_run, dataset, checkpoint):
    from ultralytics import FastSAM

    model = FastSAM(str(checkpoint))
    rows = rows_by_id(s3_run["table"])
    matched = total = extra = 0
    for key in sorted(dataset["truth"]) + ["odd/gray.png", "odd/pic.bmp"]:
        ref = model.predict(str(dataset["root"] / key), imgsz=IMGSZ, conf=CONF, iou=IOU, retina_masks=True,
                            device="cpu", verbose=False)[0]
        ref_masks = [] if ref.masks is None else [m.astype(bool) for m in ref.masks.data.cpu().numpy()]
        ours = decode_masks(rows[key])
        assert len(ours) == rows[key]["num_masks"]
        for rm in ref_masks:
            total += 1
            if ours and max(iou(rm, om) for om in ours) >= 0.95:
                matched += 1
        extra += max(0, len(ours) - len(ref_masks))
    assert total >= 20, "the fixture model should find masks on the shapes"
    assert matched / total >= 0.95, f"{matched}/{total} reference masks matched at IoU >= 0.95"
    assert extra <= 0.05 * total


def test_masks_agree_with_ground_truth(s3_run, dataset):
    rows = rows_by_id(s3_run["table"])
    rng = np.random.default_rng(0)
    best, chance = [], []
    for key, shapes in dataset["truth"].items():
        ours = decode_masks(rows[key])
        for s in shapes:
            best.append(max((iou(s.mask, m) for m in ours), default=0.0))
            # Chance: the true mask itself, placed at a random position in the image.
            h, w = s.mask.shape
            chance.append(iou(s.mask, np.roll(s.mask, (rng.integers(h), rng.integers(w)), (0, 1))))
    mean_best, mean_chance = float(np.mean(best)), float(np.mean(chance))
    print(f"ground truth: mean best IoU {mean_best:.3f} over {len(best)} shapes (chance {mean_chance:.3f})")
    assert mean_best >= 0.90 and mean_best > mean_chance + 0.7


def test_area_and_bbox_are_pycocotools_own(s3_run):
    for row in s3_run["table"].to_pylist():
        for m in row["masks"]:
            rle = {"size": [row["height"], row["width"]], "counts": m["counts"].encode()}
            assert m["area"] == int(mask_utils.area(rle)) > 0
            assert m["bbox"] == pytest.approx(list(mask_utils.toBbox(rle)))
            assert 0.0 <= m["score"] <= 1.0 and m["score"] >= CONF - 1e-6


def test_secrets_never_appear(s3_run):
    p = s3_run["proc"]
    assert FAKE_SECRET not in p.stdout + p.stderr and FAKE_KEY not in p.stdout + p.stderr
    fs = s3_run["fs"]
    for path in fs.find("data/masks/"):
        assert FAKE_SECRET.encode() not in fs.cat_file(path), path


def test_run_summary_file(s3_run, dataset):
    fs = s3_run["fs"]
    summary = json.loads(fs.cat_file("data/masks/_run.json"))["last_run_summary"]
    assert summary["images_planned"] == len(s3_run["table"])
    assert summary["images_error"] == len(dataset["broken"])
    assert summary["skipped_not_images"] == 1
    assert summary["masks_written"] == sum(s3_run["table"].column("num_masks").to_pylist())
    fingerprints = set(s3_run["table"].column("run_fingerprint").to_pylist())
    assert fingerprints == {summary["run_fingerprint"]}
    assert summary["fingerprint_material"]["checkpoint_sha256"] == summary["checkpoint_sha256"]
    assert summary["fingerprint_material"]["model"] == {"imgsz": IMGSZ, "conf": CONF, "iou": IOU, "max_det": 300,
                                                        "half": False}


def test_local_folder_with_two_actors_and_four_writers_gives_the_same_rows(s3_run, local_run):
    """Exactly once with 4 writers: the same images, each one row, as the S3 run's 1 writer wrote;
    the files staged by the writers all published (no temporary left)."""
    a, b = rows_by_id(s3_run["table"]), rows_by_id(local_run["table"])
    assert set(a) == set(b)
    assert local_run["table"].num_rows == len(b) == s3_run["table"].num_rows == len(a)
    assert "writers: 4 (output.writers)" in local_run["proc"].stdout
    assert "writers: 1 (auto: 1 without GPUs)" in s3_run["proc"].stdout
    assert not list(local_run["out"].glob("_tmp-*"))
    last = json.loads((local_run["out"] / "_run.json").read_text())["last_run_summary"]
    assert last["writers"] == 4
    assert last["rows_deduplicated"] == 0  # one run: the end's repair found no row written twice by the writers
    for key in a:
        ra, rb = a[key], b[key]
        for col in ("status", "error", "width", "height", "num_masks", "checkpoint_sha256"):
            assert ra[col] == rb[col], (key, col)
        assert [m["counts"] for m in ra["masks"]] == [m["counts"] for m in rb["masks"]], key
        assert [m["score"] for m in ra["masks"]] == pytest.approx([m["score"] for m in rb["masks"]], abs=1e-5)


def test_output_readable_by_common_readers(local_run):
    import duckdb
    import pandas as pd
    import polars as pl

    out = local_run["out"]
    n = local_run["table"].num_rows
    assert (out / "_run.json").exists() and list(out.glob("_runs/*.json"))  # metadata the readers must skip
    assert len(pd.read_parquet(out)) == n
    assert pl.read_parquet(f"{out}/*.parquet").height == n
    assert duckdb.connect().execute(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()[0][0] == n
    # The README's reading examples, as written there, on this output.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b.split("\n", 1)[1] for b in readme.split("```python")[1:] if "pl.read_parquet" in b).split("```")[0]
    names: dict = {}
    exec(block.replace("out/demo/", f"{out}/"), names)  # noqa: S102 - the documented snippet itself
    assert len(names["df"]) == n and names["n"] == n


def test_joins_a_ray_cluster_from_ray_address_and_enforces_the_error_budget(dataset, checkpoint, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    address = cluster.address
    try:
        out = tmp_path / "masks"
        m = manifest(tmp_path / "budget.yaml", str(dataset["root"]), str(out), str(checkpoint),
                     max_error_fraction=0.1, cpus_per_actor=0.5, decode_cpus=0.5,
                     num_actors=None)  # auto: actors on both nodes of the joined cluster
        r = run_cli("run", str(m), env={"RAY_ADDRESS": address})
    finally:
        cluster.shutdown()
    assert f"joined the Ray cluster at {address} (4 CPUs" in r.stdout, r.stdout + r.stderr
    n_broken, n_total = len(dataset["broken"]), len(dataset["truth"]) + len(dataset["ok_sizes"]) + len(dataset["broken"])
    assert n_broken / n_total > 0.1
    assert r.returncode == 1
    assert "error budget exceeded" in r.stdout and "runtime.max_error_fraction" in r.stdout
    # The rows are still all written: the budget judges the run, it does not lose work.
    assert pads.dataset(str(out), format="parquet").count_rows() == n_total
    summary = json.loads((out / "_run.json").read_text())["last_run_summary"]
    assert summary["failed"].startswith("error budget exceeded")
