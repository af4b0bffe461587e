"""Each kind of bad manifest fails before any work, naming the field; nothing is written."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import ROOT, run_cli
from fastsam_batch.manifest import ManifestError, load_manifest, parse_manifest

GOOD = {
    "name": "t",
    "input": {"uri": "s3://bucket/images/"},
    "model": {"checkpoint": "s3://bucket/models/FastSAM-s.pt"},
    "prompts": {"mode": "everything"},
    "output": {"uri": "s3://bucket/masks/"},
}


def with_change(path: str, value):
    m = copy.deepcopy(GOOD)
    *parents, leaf = path.split(".")
    node = m
    for p in parents:
        node = node.setdefault(p, {})
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return m


def test_good_manifest_gets_fastsam_defaults():
    m = parse_manifest(GOOD)
    assert (m.model.imgsz, m.model.conf, m.model.iou, m.model.device) == (1024, 0.4, 0.9, "auto")
    assert m.runtime.max_error_fraction is None


def test_files_are_sized_by_bytes_unless_a_row_cap_is_set():
    """Issue 23: files are cut at output.target_file_mb (128 MiB by default) and no row count;
    rows_per_file, when a manifest sets it, still caps the rows of a file (and can be set with it)."""
    m = parse_manifest(GOOD)
    assert (m.output.target_file_mb, m.output.rows_per_file, m.output.commit_interval_s) == (128, None, 10.0)
    m = parse_manifest(with_change("output", {**GOOD["output"], "rows_per_file": 1000, "target_file_mb": 32.5}))
    assert (m.output.target_file_mb, m.output.rows_per_file) == (32.5, 1000)


@pytest.mark.parametrize(
    "path,value,field,words",
    [
        ("model.colour", "red", "model.colour", "unknown key"),
        ("extra_section", {"a": 1}, "extra_section", "unknown key"),
        ("input.uri", KeyError, "input.uri", "required"),
        ("model.checkpoint", KeyError, "model.checkpoint", "required"),
        ("output", KeyError, "output", "required"),
        ("name", KeyError, "name", "required"),
        ("model.conf", "high", "model.conf", "number"),
        ("model.conf", 1.5, "model.conf", "less than or equal to 1"),
        ("model.iou", -0.1, "model.iou", "greater than or equal to 0"),
        ("model.imgsz", "big", "model.imgsz", "integer"),
        ("model.imgsz", 8, "model.imgsz", "greater than or equal to 32"),
        ("model.device", "tpu", "model.device", "cuda"),
        ("model.half", "maybe", "model.half", "boolean"),
        ("prompts.mode", "telepathy", "prompts.mode", "everything"),
        ("output.rows_per_file", 0, "output.rows_per_file", "greater than or equal to 1"),
        ("output.target_file_mb", 0, "output.target_file_mb", "greater than 0"),
        ("output.target_file_mb", -64, "output.target_file_mb", "greater than 0"),
        ("output.target_file_mb", "big", "output.target_file_mb", "number"),
        ("runtime.batch_size", 0, "runtime.batch_size", "greater than or equal to 1"),
        ("runtime.max_error_fraction", 2, "runtime.max_error_fraction", "less than or equal to 1"),
        ("input", "s3://x", "input", "dictionary"),
        ("name", "bad name!", "name", "pattern"),
        ("output.uri", "s3://bucket/images/", "output.uri must differ", "input.uri"),
        ("mask_rules.min_stability", 1.2, "mask_rules.min_stability", "less than or equal to 1"),
        ("mask_rules.min_stability", "high", "mask_rules.min_stability", "number"),
        ("mask_rules.max_overlap", 1.0, "mask_rules.max_overlap", "less than 1"),
        ("mask_rules.max_overlap", -0.5, "mask_rules.max_overlap", "greater than or equal to 0"),
        ("mask_rules.max_iou", 0.9, "mask_rules.max_iou", "unknown key"),
    ],
)
def test_bad_manifest_names_the_field(path, value, field, words):
    with pytest.raises(ManifestError) as e:
        parse_manifest(with_change(path, value))
    msg = str(e.value)
    assert field in msg and words in msg, msg


def test_quality_rules_reach_the_mask_rules_and_the_fingerprint():
    from fastsam_batch.mask_rules import MaskRules

    m = parse_manifest(with_change("mask_rules", {"min_stability": 0.95, "max_overlap": 0.9}))
    rules = MaskRules(**m.mask_rules.model_dump())
    assert (rules.min_stability, rules.max_overlap) == (0.95, 0.9) and rules.filters
    from fastsam_batch.resume import run_fingerprint

    fingerprints = {run_fingerprint(parse_manifest(with_change("mask_rules", r)), "0" * 64)[0]
                    for r in ({}, {"min_stability": 0.95}, {"max_overlap": 0.9})}
    assert len(fingerprints) == 3  # another rule, another run: its rows are not mixed with the old ones


def bad_demo_manifest(tmp_path, out, field: str, value):
    """The demo job on the fixture model with ``field`` set to ``value``, written to bad.yaml."""
    bad = with_change(field, value)
    bad["input"]["uri"] = str(ROOT / "jobs" / "demo-images")
    bad["output"]["uri"] = str(out)
    bad["model"]["checkpoint"] = str(ROOT / "tests" / "fixtures" / "fastsam-fixture.pt")
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    return p


def test_cli_rejects_a_bad_quality_rule_before_any_work(tmp_path):
    out = tmp_path / "out"
    r = run_cli("run", str(bad_demo_manifest(tmp_path, out, "mask_rules.max_overlap", 1.5)))
    assert r.returncode == 2 and "mask_rules.max_overlap" in r.stderr
    assert not out.exists()


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ManifestError, match="top level must be a mapping"):
        parse_manifest(["a", "b"])
    p = tmp_path / "m.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(p)
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "missing.yaml")


def test_relative_paths_resolve_against_manifest_folder(tmp_path):
    (tmp_path / "jobs").mkdir()
    p = tmp_path / "jobs" / "m.yaml"
    p.write_text(yaml.safe_dump({**GOOD, "input": {"uri": "imgs/"}, "model": {"checkpoint": "../w.pt"},
                                 "output": {"uri": "out/"}}))
    m = load_manifest(p)
    assert m.input.uri == str(tmp_path / "jobs" / "imgs") + "/"
    assert m.model.checkpoint == str(tmp_path / "w.pt")


def test_cli_rejects_bad_manifest_before_any_work(tmp_path):
    out = tmp_path / "out"
    r = run_cli("run", str(bad_demo_manifest(tmp_path, out, "model.conf", "high")))
    assert r.returncode == 2
    assert "model.conf" in r.stderr
    assert not out.exists()


def test_cli_missing_checkpoint_is_clear_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    m = copy.deepcopy(GOOD)
    m["input"]["uri"] = str(ROOT / "jobs" / "demo-images")
    m["output"]["uri"] = str(out)
    m["model"]["checkpoint"] = str(tmp_path / "FastSAM-x.pt")
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(m))
    r = run_cli("run", str(p))
    assert r.returncode == 1
    assert "model.checkpoint" in r.stderr and "not found" in r.stderr and "FastSAM-x.pt" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_jobs_are_valid_and_their_local_files_exist(job):
    from pathlib import Path

    m = load_manifest(job)
    local = [m.input.uri, m.model.checkpoint, m.prompts.table, m.prompts.coco, m.prompts.clip]
    for uri in filter(None, local):
        if "://" not in uri:
            assert Path(uri).exists(), f"{job.name}: {uri} is missing"


@pytest.mark.parametrize("spelling", ["{d}/imgs/../imgs/out", "{d}/./imgs/out", "{d}/link/out", "link/out/"])
def test_output_inside_input_is_caught_however_the_path_is_spelled(tmp_path, spelling):
    """`..`, `./` and a symlink to the input folder all name a folder inside the input: refused before
    any work (the run would list its own _lease.json and Parquet files as input)."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "imgs")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**copy.deepcopy(GOOD), "input": {"uri": str(tmp_path / "imgs")},
                                   "output": {"uri": spelling.format(d=tmp_path)}}))
    with pytest.raises(ManifestError, match="is inside input.uri"):
        load_manifest(job)
    outside = tmp_path / "imgs-out"
    job.write_text(yaml.safe_dump({**copy.deepcopy(GOOD), "input": {"uri": str(tmp_path / "link")},
                                   "output": {"uri": str(outside)}}))
    assert load_manifest(job).output.uri == str(outside)


def test_a_relative_output_in_rays_copy_of_a_working_dir_is_refused(tmp_path):
    """`ray job submit --working-dir` runs the job in a temporary copy: a relative output.uri would be
    written there and lost, so it is refused; an absolute one in the same copy is fine."""
    copy_dir = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy_dir.mkdir(parents=True)
    job = copy_dir / "job.yaml"
    job.write_text(yaml.safe_dump({**copy.deepcopy(GOOD), "input": {"uri": "imgs/"}, "output": {"uri": "out/"}}))
    with pytest.raises(ManifestError, match=r"output.uri 'out/' is relative .* --working-dir"):
        load_manifest(job)
    job.write_text(yaml.safe_dump({**copy.deepcopy(GOOD), "input": {"uri": "imgs/"}, "output": {"uri": str(tmp_path / "o")}}))
    assert load_manifest(job).input.uri == str(copy_dir / "imgs") + "/"
