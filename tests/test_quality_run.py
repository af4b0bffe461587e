"""Quality scores and duplicate masks through a real run (Ray, the fixture model, generated images):
the rules keep exactly what a dense reference keeps of a run without them, the dropped duplicates are
counted the same in the rows, ``_run.json`` and ``stats``; the histograms (text, JSON, PNG) and
``overlay --color-by`` show the scores."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import CHECKPOINT, run_cli, save_shapes
from shapes import make_image

SEEDS = list(range(9500, 9506))
MAX_OVERLAP, MIN_STABILITY = 0.3, 0.5


def run(root, name: str, rules: dict) -> dict:
    m = root / f"{name}.yaml"
    out = root / name
    m.write_text(yaml.safe_dump({
        "name": name, "input": {"uri": str(root / "imgs")},
        "model": {"checkpoint": str(CHECKPOINT), "imgsz": 320, "conf": 0.25, "device": "cpu"},
        "mask_rules": rules, "output": {"uri": str(out)}, "runtime": {"batch_size": 2, "num_actors": 1},
    }))
    r = run_cli("run", str(m))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {row["image_id"]: row for row in pads.dataset(str(out), format="parquet").to_table().to_pylist()}
    return {"out": out, "rows": rows, "proc": r, "record": json.loads((out / "_run.json").read_text())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    save_shapes(root / "imgs", SEEDS)
    return run(root, "plain", {}), run(root, "rules", {"min_stability": MIN_STABILITY, "max_overlap": MAX_OVERLAP})


def decoded(row: dict, m: dict) -> np.ndarray:
    return mask_utils.decode({"size": [row["height"], row["width"]], "counts": m["counts"].encode()}).astype(bool)


def test_rules_keep_what_a_dense_reference_keeps_and_count_the_duplicates(runs):
    plain, rules = runs
    dropped = 0
    for image_id, row in plain["rows"].items():
        assert row["num_duplicates"] is None  # the rule was off
        masks = row["masks"]
        assert all(0 < m["stability_score"] <= 1 for m in masks)
        stable = [m for m in masks if m["stability_score"] >= MIN_STABILITY]
        dense = [decoded(row, m) for m in stable]
        kept, dup = [], 0  # greedy NMS on dense masks, best score first (ties: the earlier)
        for i in sorted(range(len(stable)), key=lambda i: (-stable[i]["score"], i)):
            inter = [(dense[i] & dense[j]).sum() for j in kept]
            if any(x / (dense[i].sum() + dense[j].sum() - x) > MAX_OVERLAP for x, j in zip(inter, kept)):
                dup += 1
            else:
                kept.append(i)
        got = rules["rows"][image_id]
        assert [m["counts"] for m in got["masks"]] == [stable[i]["counts"] for i in sorted(kept)]
        assert [m["stability_score"] for m in got["masks"]] == [stable[i]["stability_score"] for i in sorted(kept)]
        assert got["num_duplicates"] == dup
        dropped += dup
    assert dropped > 0  # the case is not vacuous
    assert rules["record"]["last_run_summary"]["masks_dropped_duplicates"] == dropped
    # per run (this run wrote every row here); the output's total is stats'
    assert (f"duplicate masks dropped in this run's rows (mask_rules.max_overlap): {dropped} "
            "(the output's total: fastsam-batch stats)") in rules["proc"].stdout
    assert plain["record"]["last_run_summary"]["masks_dropped_duplicates"] == 0


def test_stats_histograms_match_the_rows(runs, tmp_path):
    plain, rules = runs
    r = run_cli("stats", str(rules["out"]), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    rows = list(rules["rows"].values())
    scores = np.array([m["stability_score"] for row in rows for m in row["masks"]], np.float32)
    per_image = [row["num_masks"] for row in rows if row["status"] == "ok"]
    assert st["duplicates"] == {"rows_checked": len(rows), "masks_dropped": sum(r["num_duplicates"] for r in rows)}
    assert st["stability_score"]["count"] == len(scores) and st["stability_score"]["at_least_0.95"] == (scores >= 0.95).sum()
    assert st["stability_score"]["mean"] == pytest.approx(scores.mean(), abs=1e-4)
    h = st["histograms"]["stability_score"]
    assert h["counts"] == [int(((scores >= lo) & ((scores < hi) if hi < 1 else (scores <= hi))).sum())
                           for lo, hi in zip(h["edges"][:-1], h["edges"][1:])]
    h = st["histograms"]["masks_per_ok_image"]
    assert sum(h["counts"]) == len(per_image) and len(h["counts"]) <= 20
    assert h["counts"] == [sum(lo <= n < hi for n in per_image) for lo, hi in zip(h["edges"][:-1], h["edges"][1:])]
    png = tmp_path / "hist.png"
    text = run_cli("stats", str(rules["out"]), "--histogram-png", str(png))
    assert text.returncode == 0, text.stderr
    assert "stability_score: mean" in text.stdout and "masks per ok image:" in text.stdout and f"wrote {png}" in text.stdout
    assert f"duplicate masks dropped (mask_rules.max_overlap): {st['duplicates']['masks_dropped']}" in text.stdout
    bars = [line for line in text.stdout.splitlines() if "|" in line]
    assert sum(int(b.rsplit(" ", 1)[1].replace(",", "")) for b in bars) == len(scores) + len(per_image)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1000, 400)
    # a path that cannot be written: one line, before the output is read
    bad = run_cli("stats", str(rules["out"]), "--histogram-png", str(tmp_path / "no" / "h.png"))
    said = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 1 and len(said) == 1 and "--histogram-png" in said[0] and "no such folder" in said[0]


@pytest.mark.parametrize("color_by,field", [("stability", "stability_score"), ("score", "score")])
def test_overlay_colours_each_mask_by_its_score(runs, tmp_path, color_by, field):
    from fastsam_batch.overlay import ALPHA, outline, value_colour

    plain, _ = runs
    out = tmp_path / "o"
    r = run_cli("overlay", str(plain["out"]), "--sample", "2", "--color-by", color_by, "--out", str(out))
    assert r.returncode == 0, r.stderr
    checked = set()
    for pic in sorted(p for p in out.glob("*.png") if p.name != "contact-sheet.png"):
        row = plain["rows"][pic.name[:-len(".png")]]
        original = np.asarray(make_image(int(row["image_id"].split(".")[0]))[0].convert("RGB")).astype(np.float64)
        drawn = np.asarray(Image.open(pic).convert("RGB")).astype(np.int64)
        masks = [decoded(row, m) for m in row["masks"]]
        cover = np.sum(masks, axis=0)
        edges = np.any([outline(d) for d in masks], axis=0)
        for m, d in zip(row["masks"], masks):
            alone = d & (cover == 1) & ~edges  # tinted once, by this mask only
            if alone.any():
                want = (original[alone] * (1 - ALPHA) + value_colour(m[field]) * ALPHA).round()
                assert (drawn[alone] == want).all()
                checked.add(round(m[field], 2))
    assert len(checked) >= 3  # masks of several different values were checked


def test_value_colours_are_red_yellow_green():
    """Known answers (HSV saturation 0.85, value 0.95): 0 red, 0.5 yellow, 1 green; out of range clamps."""
    from fastsam_batch.overlay import value_colour

    hi, lo = 0.95 * 255, 0.95 * 0.15 * 255
    assert np.allclose(value_colour(0), [hi, lo, lo]) and np.allclose(value_colour(-1), [hi, lo, lo])
    assert np.allclose(value_colour(0.5), [hi, hi, lo])
    assert np.allclose(value_colour(1), [lo, hi, lo]) and np.allclose(value_colour(2), [lo, hi, lo])


def mixed_output(src, dst):
    """``src``'s rows in two files: the first as written, the second as an earlier version wrote it
    (no ``num_duplicates``, no ``masks[].stability_score``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in sorted(src.glob("part-*.parquet"))]).sort_by("image_id")
    dst.mkdir()
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), dst / "part-00000-new.parquet")
    old = table.slice(half).drop_columns(["num_duplicates"])
    masks = old.column("masks").combine_chunks()
    element = masks.type.value_type
    keep = [f.name for f in element if f.name != "stability_score"]
    flat = masks.flatten()
    stripped = pa.ListArray.from_arrays(masks.offsets, pa.StructArray.from_arrays([flat.field(n) for n in keep], keep))
    old = old.set_column(old.schema.get_field_index("masks"), "masks", stripped)
    pq.write_table(old, dst / "part-00001-old.parquet")
    return table.slice(0, half).to_pylist(), old.to_pylist()


@pytest.mark.parametrize("new_first", [True, False])
def test_stats_and_overlay_read_each_files_own_schema(runs, tmp_path, new_first):
    """An output holding files of an earlier version (no stability_score, no num_duplicates) next to
    new ones, whichever comes first: stats counts the new files' values and treats the old rows as
    unknown; overlay --color-by stability draws the old files' masks grey, the new ones by score."""
    from fastsam_batch.overlay import ALPHA, NO_VALUE, outline, value_colour

    _, rules = runs
    out = tmp_path / "mixed"
    new, old = mixed_output(rules["out"], out)
    if not new_first:  # the old file's name sorts first: pyarrow would take its schema
        (out / "part-00001-old.parquet").rename(out / "part-00000-aaa-old.parquet")
    r = run_cli("stats", str(out), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["rows"] == len(new) + len(old)
    assert st["duplicates"] == {"rows_checked": len(new), "masks_dropped": sum(row["num_duplicates"] for row in new)}
    assert st["stability_score"]["count"] == sum(len(row["masks"]) for row in new)

    pics = tmp_path / "o"
    r = run_cli("overlay", str(out), "--sample", str(len(new) + len(old)), "--color-by", "stability", "--out", str(pics))
    assert r.returncode == 0, r.stderr
    kinds = set()
    for row in new + old:
        original = np.asarray(make_image(int(row["image_id"].split(".")[0]))[0].convert("RGB")).astype(np.float64)
        drawn = np.asarray(Image.open(pics / f"{row['image_id']}.png").convert("RGB")).astype(np.int64)
        masks = [decoded(row, m) for m in row["masks"]]
        if not masks:
            continue
        cover = np.sum(masks, axis=0)
        edges = np.any([outline(d) for d in masks], axis=0)
        for m, d in zip(row["masks"], masks):
            alone = d & (cover == 1) & ~edges
            if alone.any():
                colour = value_colour(m["stability_score"]) if "stability_score" in m else NO_VALUE
                assert (drawn[alone] == (original[alone] * (1 - ALPHA) + colour * ALPHA).round()).all()
                kinds.add("stability_score" in m)
    assert kinds == {True, False}


def test_the_contact_sheet_has_a_legend_with_value_colours(runs, tmp_path):
    from fastsam_batch.overlay import LEGEND_BAR, LEGEND_H, THUMB, value_colour

    plain, _ = runs
    sheets = {}
    for color_by in ("mask", "stability"):
        out = tmp_path / color_by
        r = run_cli("overlay", str(plain["out"]), "--sample", "2", "--color-by", color_by, "--out", str(out))
        assert r.returncode == 0, r.stderr
        sheets[color_by] = np.asarray(Image.open(out / "contact-sheet.png").convert("RGB")).astype(np.int64)
    assert sheets["mask"].shape[0] == THUMB and sheets["stability"].shape[0] == THUMB + LEGEND_H
    x1, y1, x2, _ = LEGEND_BAR
    bar = sheets["stability"][THUMB + y1 + 2]
    for v, x in ((0.0, x1), (0.5, x1 + round(0.5 * (x2 - x1 - 1))), (1.0, x2 - 1)):
        assert (bar[x] == value_colour(v).round()).all()
    assert bar[x1][0] > 200 > bar[x1][1]  # red at 0, green at 1
    assert bar[x2 - 1][1] > 200 > bar[x2 - 1][0]


def test_a_bad_colour_choice_is_refused():
    r = run_cli("overlay", "/nowhere", "--color-by", "area", "--out", "/tmp/x")
    assert r.returncode == 2 and "--color-by" in r.stderr


def test_the_version_changed_with_the_schema_and_the_fingerprint():
    """0.1.0 outputs have neither masks[].stability_score nor num_duplicates, and their fingerprints
    lack min_stability / max_overlap: the version is past 0.1.0 (resume refuses them by version, and
    the README says --overwrite), and pyproject's version is the package's."""
    import tomllib
    from pathlib import Path

    import fastsam_batch

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == fastsam_batch.__version__ != "0.1.0"
