"""Prompt tables (Parquet, JSONL, CSV), COCO files, global prompts and the prompts/mask_rules
sections of the manifest: bad rows become per-prompt errors, bad manifests name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastsam_batch.intervals import IntervalMask
from fastsam_batch.manifest import ManifestError, parse_manifest
from fastsam_batch.prompts import PromptSourceError, global_prompts, load_coco, load_prompt_table
from fastsam_batch.select import apply_prompts
from fastsam_batch.storage import Storage

ROWS = [
    {"image_id": "a.png", "box": [1, 2, 30, 40], "prompt_id": "p1"},
    {"image_id": "a.png", "points": [[5, 6], [7, 8]], "labels": [1, 0]},
    {"image_id": "b.png", "text": "red circle", "prompt_id": "7"},
    {"image_id": "b.png", "box": [1, 2, 3]},  # three numbers
    {"image_id": "b.png"},  # nothing to prompt with
    {"image_id": "", "box": [0, 0, 5, 5]},  # no image key
    {"image_id": "c.png", "points": [[1, 1]], "labels": [2]},  # label not 0/1
    {"image_id": "c.png", "kind": "ellipse", "box": [0, 0, 1, 1]},
]


def _check(index):
    assert index.rows == 8 and index.rows_without_key == 1
    a, b, c = index.by_key["a.png"], index.by_key["b.png"], index.by_key["c.png"]
    assert a[0] == {"kind": "box", "id": "p1", "category_id": None, "error": None, "box": [1.0, 2.0, 30.0, 40.0]}
    assert a[1]["kind"] == "points" and a[1]["points"] == [[5.0, 6.0], [7.0, 8.0]] and a[1]["labels"] == [1, 0]
    assert b[0]["text"] == "red circle" and b[0]["id"] == "7"
    assert b[1]["error"].startswith("bad_prompt: box [x1, y1, x2, y2] must have 4 numbers")
    assert b[2]["error"] == "bad_prompt: the row has no box, points or text"
    assert c[0]["error"].startswith("bad_prompt: labels must be 1")
    assert c[1]["error"].startswith("bad_prompt: kind must be one of")
    assert sum(index.bad_rows.values()) == 4
    assert index.has_texts


def test_jsonl_table(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    _check(load_prompt_table(str(p), Storage(), "image_id"))


def test_parquet_table(tmp_path):
    p = tmp_path / "prompts.parquet"
    cols = ["image_id", "kind", "box", "points", "labels", "text", "prompt_id"]
    table = pa.table({c: [r.get(c) for r in ROWS] for c in cols},
                     schema=pa.schema([("image_id", pa.string()), ("kind", pa.string()), ("box", pa.list_(pa.float64())),
                                       ("points", pa.list_(pa.list_(pa.float64()))), ("labels", pa.list_(pa.int64())),
                                       ("text", pa.string()), ("prompt_id", pa.string())]))
    pq.write_table(table, p)
    _check(load_prompt_table(str(p), Storage(), "image_id"))


def test_csv_table_with_json_cells(tmp_path):
    import csv

    p = tmp_path / "prompts.csv"
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, ["image_id", "kind", "box", "points", "labels", "text", "prompt_id"])
        w.writeheader()
        for r in ROWS:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    _check(load_prompt_table(str(p), Storage(), "image_id"))


def test_bad_json_lines_are_counted_not_fatal(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"image_id": "a.png", "box": [0, 0, 4, 4]}\n{not json\n[1, 2]\n')
    index = load_prompt_table(str(p), Storage(), "image_id")
    assert index.rows == 3 and index.rows_without_key == 2 and len(index.by_key["a.png"]) == 1


def test_unusable_tables_fail_before_work(tmp_path):
    with pytest.raises(PromptSourceError, match="no such file"):
        load_prompt_table(str(tmp_path / "missing.jsonl"), Storage(), "image_id")
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"file": "a.png", "box": [0, 0, 4, 4]}\n')
    with pytest.raises(PromptSourceError, match=r"no 'image_id' column \(prompts.key\)"):
        load_prompt_table(str(p), Storage(), "image_id")
    q = tmp_path / "prompts.txt"
    q.write_text("x")
    with pytest.raises(PromptSourceError, match="prompts.table_format"):
        load_prompt_table(str(q), Storage(), "image_id")


def test_coco_boxes_carry_annotation_and_category_ids(tmp_path):
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}, {"id": 2, "file_name": "sub/b.png"}],
        "annotations": [
            {"id": 11, "image_id": 1, "bbox": [2, 3, 4, 5], "category_id": 3, "iscrowd": 0},
            {"id": 12, "image_id": 2, "bbox": [0, 0, 1, 1], "category_id": 1, "iscrowd": 1},
            {"id": 13, "image_id": 2, "bbox": [0, 0, "x", 1], "category_id": 1},
            {"id": 14, "image_id": 99, "bbox": [0, 0, 1, 1], "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "x"}, {"id": 3, "name": "y"}],
    }
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(doc))
    index = load_coco(str(p), Storage())
    assert index.by_key["a.png"] == [{"kind": "box", "id": "11", "category_id": 3, "error": None, "box": [2.0, 3.0, 6.0, 8.0]}]
    assert [x["id"] for x in index.by_key["sub/b.png"]] == ["13"]  # the crowd one is left out
    assert index.by_key["sub/b.png"][0]["error"].startswith("bad_prompt")
    assert index.rows_without_key == 1  # annotation of an image the file does not list
    assert len(load_coco(str(p), Storage(), include_crowd=True).by_key["sub/b.png"]) == 2
    p.write_text("{}")
    with pytest.raises(PromptSourceError, match="not a COCO annotations file"):
        load_coco(str(p), Storage())


def test_global_prompts_and_per_prompt_errors():
    import numpy as np

    # One 10x10 square mask at (10..20, 10..20) in a 40x40 image.
    h = w = 40
    cols = np.arange(10, 20, dtype=np.int64) * h
    masks = [IntervalMask(cols + 10, cols + 20, 0.8, (10.0, 10.0, 20.0, 20.0))]
    prompts = global_prompts([[8, 8, 22, 22], [5, 5, 5, 30], [-20, -20, -5, -5], [30, 30, 39, 39]],
                             [[15, 15], [45, 3]], [1, 1], []) + [{"kind": None, "id": "x", "category_id": None,
                                                                  "error": "bad_prompt: the row has no box, points or text"}]
    selected, errors, counts = apply_prompts(masks, prompts, h, w)
    assert [k for k, _ in selected] == [0]
    assert selected[0][1].prompt_score == pytest.approx(100 / 196)
    assert errors[0] is None
    assert errors[1].startswith("empty_box")  # zero width
    assert errors[2].startswith("empty_box")  # entirely outside: nothing left after clipping
    assert errors[3].startswith("no_mask_selected")  # overlaps no mask
    assert errors[4].startswith("point_outside_image")
    assert errors[5].startswith("bad_prompt")
    assert counts == [1, 0, 0, 0, 0, 0]
    _, errors, _ = apply_prompts([], prompts[:1], h, w)
    assert errors[0].startswith("no_mask:")
    _, errors, _ = apply_prompts(masks, [{"kind": "text", "text": "x", "id": None, "category_id": None, "error": None}], h, w)
    assert errors[0].startswith("no_clip")


def test_point_prompts_merge_option():
    import numpy as np

    h = w = 40
    a = np.arange(0, 10, dtype=np.int64) * h
    b = np.arange(20, 30, dtype=np.int64) * h
    masks = [IntervalMask(a, a + 10, 0.9, (0.0, 0.0, 10.0, 10.0)), IntervalMask(b + 20, b + 30, 0.7, (20.0, 20.0, 30.0, 30.0))]
    p = [{"kind": "points", "points": [[5, 5], [25, 25]], "labels": [1, 1], "id": None, "category_id": None, "error": None}]
    sel, _, counts = apply_prompts(masks, p, h, w)
    assert [s.masks for _, s in sel] == [[0], [1]] and counts == [2]
    sel, _, counts = apply_prompts(masks, p, h, w, merge_points=True)
    assert [s.masks for _, s in sel] == [[0, 1]] and counts == [1] and sel[0][1].score == 0.9


BASE = {"name": "t", "input": {"uri": "/in"}, "model": {"checkpoint": "/m.pt"}, "output": {"uri": "/out"}}


@pytest.mark.parametrize(
    "section, value, field_text",
    [
        ("prompts", {"table": "/p.jsonl", "coco": "/c.json"}, "either prompts.table or prompts.coco"),
        ("prompts", {"texts": ["a dog"]}, "prompts.clip is required"),
        ("prompts", {"boxes": [[1, 2, 3]]}, "prompts.boxes: Value error, box 0 must be [x1, y1, x2, y2]"),
        ("prompts", {"points": [[1, 2]], "point_labels": [1, 0]}, "2 labels for 1 points"),
        ("prompts", {"mode": "prompts"}, "no prompts are given"),
        ("prompts", {"mode": "everything", "texts": ["x"], "clip": "/c"}, "prompts are given"),
        ("prompts", {"key": "path"}, "prompts.key"),
        ("mask_rules", {"min_area": 10, "max_area": 5}, "min_area (10) is above mask_rules.max_area"),
        ("mask_rules", {"top_k_by": "size"}, "mask_rules.top_k_by"),
        ("mask_rules", {"containment": 0}, "mask_rules.containment"),
        ("mask_rules", {"min_area_fraction": 1.5}, "mask_rules.min_area_fraction"),
        ("mask_rules", {"clean_up": 3}, "mask_rules.clean_up: unknown key"),
    ],
)
def test_bad_prompt_and_rule_sections_name_the_field(section, value, field_text):
    with pytest.raises(ManifestError) as e:
        parse_manifest({**BASE, section: value})
    assert field_text in str(e.value)


def test_attach_prompts_by_uri_counts_images_without_prompts_and_unknown_images(tmp_path):
    from fastsam_batch.job import attach_prompts
    from fastsam_batch.summary import RunSummary

    items = [{"image_id": f"{i}.png", "uri": f"s3://b/imgs/{i}.png"} for i in range(3)]
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"uri": "s3://b/imgs/0.png", "box": [0, 0, 4, 4]},
        {"uri": "s3://b/imgs/0.png", "text": "red circle"},
        {"uri": "s3://b/imgs/2.png", "points": [[1, 1]]},
        {"uri": "s3://b/other/9.png", "box": [0, 0, 4, 4]},
        {"image_id": "0.png", "box": [0, 0, 4, 4]},  # no uri: the key is uri here
    ]) + "\n")
    clip = Path(__file__).parent / "fixtures" / "clip-fixture"
    m = parse_manifest({**BASE, "prompts": {"table": str(p), "key": "uri", "boxes": [[1, 1, 9, 9]], "clip": str(clip)}})
    s = RunSummary(name="t")
    sources = attach_prompts(m, Storage(), items, s)
    kinds = [[q["kind"] for q in json.loads(it["prompts"])] for it in items]
    assert kinds == [["box", "box", "text"], ["box"], ["box", "points"]]  # global first, then the table's
    assert s.prompts_planned == 6 and s.images_without_prompts == 0
    assert s.prompt_images_not_in_input == 1 and s.prompt_images_not_in_input_examples == ["s3://b/other/9.png"]
    assert s.prompt_rows_without_image == 1
    assert len(sources["source_sha256"]) == 64 and len(sources["clip_sha256"]) == 64
    # Without global prompts an image the table does not name has none, and is counted.
    m = parse_manifest({**BASE, "prompts": {"table": str(p), "key": "uri", "clip": str(clip)}})
    s = RunSummary(name="t")
    attach_prompts(m, Storage(), items, s)
    assert items[1]["prompts"] == "" and s.images_without_prompts == 1


def test_text_prompts_without_a_usable_clip_fail_before_work(tmp_path):
    from fastsam_batch.job import JobError, attach_prompts
    from fastsam_batch.summary import RunSummary

    items = [{"image_id": "0.png", "uri": "/x/0.png"}]
    m = parse_manifest({**BASE, "prompts": {"texts": ["dog"], "clip": str(tmp_path / "no-clip")}})
    with pytest.raises(JobError, match=r"prompts.clip .*no such folder"):
        attach_prompts(m, Storage(), items, RunSummary(name="t"))
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"image_id": "0.png", "text": "dog"}\n')
    m = parse_manifest({**BASE, "prompts": {"table": str(p)}})
    with pytest.raises(JobError, match="prompts.clip is required"):
        attach_prompts(m, Storage(), items, RunSummary(name="t"))
