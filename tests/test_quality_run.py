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
        "mask_rules": rules, "output": {"uri": str(out)}, "runtime": {"batch_size": 2},
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
    assert f"duplicate masks dropped (mask_rules.max_overlap): {dropped}" in rules["proc"].stdout
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
