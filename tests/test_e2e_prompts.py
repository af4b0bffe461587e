"""End to end with prompts, through `fastsam-batch run` as users run it:

* on the moto S3 server, with the prompt table (JSONL) and the CLIP folder in S3: box, point and
  text prompts, bad rows, an invalid box, an image the table names but the input lacks, an image
  without prompts, and a mask rule;
* on a local folder from a COCO annotations file plus a global text: every annotation gets its
  mask, joined back by annotation id and category, next to the everything-mode masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import yaml
from pycocotools import mask as mask_utils

from conftest import FIXTURES, make_bucket, run_cli
from fastsam_batch.schema import OUTPUT_SCHEMA
from shapes import make_image

SEEDS = list(range(800, 808))
CLIP_DIR = FIXTURES / "clip-fixture"


def _iou(rle_counts: str, h: int, w: int, mask: np.ndarray) -> float:
    rle = {"size": [h, w], "counts": rle_counts.encode()}
    return float(mask_utils.iou([rle], [mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))], [0])[0, 0])


def _centre(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    i = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))  # a pixel of the shape nearest its centre
    return [float(xs[i]) + 0.5, float(ys[i]) + 0.5]


def _images(root: Path) -> dict:
    truth = {}
    for seed in SEEDS:
        img, shapes = make_image(seed)
        root.mkdir(parents=True, exist_ok=True)
        img.save(root / f"{seed}.png")
        truth[f"{seed}.png"] = shapes
    return truth


def _manifest(path: Path, **sections) -> Path:
    doc = {"name": "prompted", "model": {"imgsz": 320, "conf": 0.25, "iou": 0.9, "device": "cpu"},
           "runtime": {"batch_size": 3, "num_actors": 1}}
    for k, v in sections.items():
        doc[k] = {**doc.get(k, {}), **v}
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def s3_prompted(s3fs_client, s3_env, checkpoint, tmp_path_factory):
    fs = s3fs_client
    make_bucket(s3_env, "prompted")
    local = tmp_path_factory.mktemp("prompted-images")
    truth = _images(local)
    for name in truth:
        fs.put_file(str(local / name), f"prompted/images/{name}")
    no_prompts = f"{SEEDS[-1]}.png"  # the table never names it
    rows = []
    for name, shapes in truth.items():
        if name == no_prompts:
            continue
        for k, s in enumerate(shapes):
            rows.append({"image_id": name, "box": list(s.box_xyxy), "prompt_id": f"{name}#{k}"})
        rows.append({"image_id": name, "points": [_centre(shapes[0].mask)], "labels": [1], "prompt_id": f"{name}#pt"})
        rows.append({"image_id": name, "text": shapes[0].caption, "prompt_id": f"{name}#text"})
    first = f"{SEEDS[0]}.png"
    rows.append({"image_id": first, "box": [1, 2, 3], "prompt_id": "bad-row"})
    rows.append({"image_id": first, "box": [10, 10, 10, 50], "prompt_id": "zero-area"})
    rows.append({"image_id": "ghost.png", "box": [0, 0, 5, 5], "prompt_id": "ghost"})
    fs.pipe_file("prompted/prompts.jsonl", ("\n".join(json.dumps(r) for r in rows) + "\n").encode())
    fs.put_file(str(checkpoint), "prompted/models/fastsam-fixture.pt")
    for f in CLIP_DIR.iterdir():
        fs.put_file(str(f), f"prompted/models/clip/{f.name}")
    m = _manifest(
        tmp_path_factory.mktemp("job") / "prompted.yaml",
        input={"uri": "s3://prompted/images/"},
        model={"checkpoint": "s3://prompted/models/fastsam-fixture.pt"},
        prompts={"table": "s3://prompted/prompts.jsonl", "clip": "s3://prompted/models/clip"},
        mask_rules={"min_area": 20},
        output={"uri": "s3://prompted/masks/"},
    )
    env = {**s3_env, "FASTSAM_BATCH_CACHE": str(tmp_path_factory.mktemp("cache"))}
    r = run_cli("run", str(m), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    fs.invalidate_cache()
    table = pads.dataset("prompted/masks/", format="parquet", filesystem=fs).to_table()
    summary = json.loads(fs.cat_file("prompted/masks/_run.json"))["last_run_summary"]
    return {"proc": r, "rows": {row["image_id"]: row for row in table.to_pylist()}, "table": table, "summary": summary,
            "truth": truth, "no_prompts": no_prompts, "fs": fs}


def test_one_row_per_image_with_the_schema(s3_prompted):
    assert s3_prompted["table"].schema.equals(OUTPUT_SCHEMA, check_metadata=False)
    assert sorted(s3_prompted["rows"]) == sorted(s3_prompted["truth"])
    assert all(r["status"] == "ok" for r in s3_prompted["rows"].values())


def test_box_prompts_from_true_boxes_give_the_true_masks(s3_prompted):
    ious = []
    for name, shapes in s3_prompted["truth"].items():
        row = s3_prompted["rows"][name]
        by_id = {m["prompt_id"]: m for m in row["masks"]}
        for k, s in enumerate(shapes):
            if name == s3_prompted["no_prompts"]:
                continue
            m = by_id[f"{name}#{k}"]
            assert m["prompt_kind"] == "box" and 0 < m["prompt_score"] <= 1
            ious.append(_iou(m["counts"], row["height"], row["width"], s.mask))
    print(f"e2e box prompts from true boxes: mean IoU {np.mean(ious):.3f} over {len(ious)}")
    assert len(ious) >= 15 and np.mean(ious) > 0.9


def test_point_and_text_prompts_pick_the_first_shape(s3_prompted):
    right = total = 0
    for name, shapes in s3_prompted["truth"].items():
        if name == s3_prompted["no_prompts"]:
            continue
        row = s3_prompted["rows"][name]
        by_id = {m["prompt_id"]: m for m in row["masks"]}
        pt = by_id[f"{name}#pt"]
        assert pt["prompt_kind"] == "points" and pt["prompt_score"] is None
        assert _iou(pt["counts"], row["height"], row["width"], shapes[0].mask) > 0.8
        text = by_id[f"{name}#text"]
        same = [s.mask for s in shapes if s.caption == shapes[0].caption]
        right += max(_iou(text["counts"], row["height"], row["width"], m) for m in same) > 0.5
        total += 1
    assert right >= total - 1, (right, total)


def test_bad_and_invalid_prompts_are_recorded_per_prompt(s3_prompted):
    row = s3_prompted["rows"][f"{SEEDS[0]}.png"]
    records = {p["id"]: p for p in row["prompts"]}
    assert records["bad-row"]["error"].startswith("bad_prompt: box")
    assert records["zero-area"]["error"].startswith("empty_box")
    assert row["num_prompt_errors"] == 2
    assert [p["index"] for p in row["prompts"]] == list(range(len(row["prompts"])))
    # Every mask points at a prompt of its row that succeeded.
    ok = {p["index"] for p in row["prompts"] if p["error"] is None}
    assert {m["prompt_index"] for m in row["masks"]} == ok
    assert all(p["num_masks"] >= 1 for p in row["prompts"] if p["error"] is None)


def test_images_without_prompts_and_prompts_without_images_are_counted(s3_prompted):
    row = s3_prompted["rows"][s3_prompted["no_prompts"]]
    assert row["status"] == "ok" and row["masks"] == [] and row["prompts"] == [] and row["model_ms"] is None
    s = s3_prompted["summary"]
    assert s["images_without_prompts"] == 1
    assert s["prompt_images_not_in_input"] == 1 and s["prompt_images_not_in_input_examples"] == ["ghost.png"]
    assert s["prompt_bad_rows"] == 1
    assert s["prompt_errors_by_reason"] == {"bad_prompt": 1, "empty_box": 1}
    assert s["prompts_run"] == sum(len(r["prompts"]) for r in s3_prompted["rows"].values())
    out = s3_prompted["proc"].stdout
    assert "images without prompts: 1" in out and "1 images not in the input e.g. ghost.png" in out


def test_mask_rule_applies_before_prompts(s3_prompted):
    areas = [m["area"] for r in s3_prompted["rows"].values() for m in r["masks"]]
    assert areas and min(areas) >= 20


@pytest.fixture(scope="module")
def coco_run(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    truth = _images(root / "images")
    images, anns = [], []
    for i, (name, shapes) in enumerate(sorted(truth.items()), 1):
        h, w = shapes[0].mask.shape
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for s in shapes:
            x1, y1, x2, y2 = s.box_xyxy
            anns.append({"id": 1000 + len(anns), "image_id": i, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "category_id": 1 + ["circle", "square", "triangle"].index(s.kind), "iscrowd": 0,
                         "area": int(s.mask.sum())})
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]}))
    m = _manifest(root / "coco.yaml", input={"uri": "images/"}, model={"checkpoint": str(checkpoint)},
                  prompts={"coco": "instances.json", "texts": ["red circle"], "clip": str(CLIP_DIR), "keep_everything": True},
                  output={"uri": "masks/"})
    r = run_cli("run", str(m))
    assert r.returncode == 0, r.stdout + r.stderr
    table = pads.dataset(str(root / "masks"), format="parquet").to_table()
    return {"rows": {row["image_id"]: row for row in table.to_pylist()}, "truth": truth, "anns": anns, "images": images}


def test_coco_boxes_join_back_by_annotation_id(coco_run):
    by_ann = {}
    for row in coco_run["rows"].values():
        for m in row["masks"]:
            if m["prompt_kind"] == "box":
                assert m["prompt_id"] not in by_ann
                by_ann[m["prompt_id"]] = (row, m)
    assert set(by_ann) == {str(a["id"]) for a in coco_run["anns"]}  # every annotation, once
    name_of = {im["id"]: im["file_name"] for im in coco_run["images"]}
    ious = []
    for a in coco_run["anns"]:
        row, m = by_ann[str(a["id"])]
        assert row["image_id"] == name_of[a["image_id"]] and m["category_id"] == a["category_id"]
        shape = next(s for s in coco_run["truth"][row["image_id"]] if int(s.mask.sum()) == a["area"])
        ious.append(_iou(m["counts"], row["height"], row["width"], shape.mask))
    print(f"COCO box prompts: mean IoU {np.mean(ious):.3f} over {len(ious)} annotations")
    assert np.mean(ious) > 0.9


def test_global_text_and_kept_everything_masks(coco_run):
    for name, row in coco_run["rows"].items():
        kinds = [m["prompt_kind"] for m in row["masks"]]
        assert kinds[0] == "text" and row["prompts"][0]["kind"] == "text"  # the global prompt comes first
        assert row["prompts"][0]["text"] == "red circle"  # its text recorded with it
        assert all(p["text"] is None for p in row["prompts"][1:])  # box prompts have none
        assert row["prompts"][0]["box"] is None and all(len(p["box"]) == 4 for p in row["prompts"][1:])
        everything = [m for m in row["masks"] if m["prompt_index"] is None]
        assert everything and all(m["prompt_id"] is None and m["category_id"] is None for m in everything)
        assert kinds.index(None) == len(kinds) - len(everything)  # prompted masks first, then all masks
