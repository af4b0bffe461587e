"""The Ray wiring, and the only place that knows about Ray.

    plan (driver) -> read + decode (CPU tasks) -> segment + encode (actor pool, model loaded once
    per actor, GPUs when present) -> write Parquet (tasks) -> per-file stats back to the driver

Everything before Ray starts is checked first: the manifest, the checkpoint (exists, SHA-256),
the input listing and the output location. Only small things travel to the driver: per-file
statistics, never masks or images.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from . import __version__
from .decode import DecodeError, decode_image
from .manifest import Manifest
from .model import checkpoint_sha256
from .offline import configure_ultralytics
from .plan import list_inputs
from .read import read_item
from .mask_rules import MaskRules
from .prompts import PromptSourceError, global_prompts, load_coco, load_prompt_table
from .segment import SegmentActor, SegmentSettings
from .resume import (Committed, drop_superseded_rows, read_committed, remove_stale_temporaries, run_fingerprint,
                     source_version)
from .storage import Storage, join_uri, redact
from .summary import RunSummary
from .write import ParquetWriter, put_atomic

_NO_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)


class JobError(RuntimeError):
    """A problem with the job as a whole (not one image): reported and the run stops."""


class ReadDecode:
    """Ray Data row function: planned item -> decoded RGB image, or an error row."""

    def __init__(self, storage: Storage, max_pixels: int):
        self.storage = storage
        self.max_pixels = max_pixels

    def __call__(self, row: dict) -> dict:
        out = {"image_id": row["image_id"], "uri": row["uri"], "width": -1, "height": -1, "decode_ms": -1.0,
               "prompts": row.get("prompts", ""), "source_version": row.get("source_version", "")}
        t0 = time.perf_counter()
        data, err, out["read_retries"] = read_item(row["uri"], self.storage)
        out["read_ms"] = (time.perf_counter() - t0) * 1000
        image = _NO_IMAGE
        if err is None:
            t0 = time.perf_counter()
            try:
                image = decode_image(data, self.max_pixels)
                out["height"], out["width"] = int(image.shape[0]), int(image.shape[1])
            except DecodeError as e:
                err = str(e)
            out["decode_ms"] = (time.perf_counter() - t0) * 1000
        out["error"] = err or ""
        out["image"] = image
        return out


def _init_ray(m: Manifest, env: dict[str, str], log=print):
    import ray

    address = m.runtime.ray_address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": env}
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        log(f"joined the Ray cluster at {address} ({int(ray.cluster_resources().get('CPU', 0))} CPUs, "
            f"{int(ray.cluster_resources().get('GPU', 0))} GPUs)")
    else:
        # Embedded local Ray. Actors hold their CPUs for the whole run, so reserve logical CPUs
        # for them on top of the machine's, or the read/decode tasks could never be scheduled.
        need = m.runtime.num_actors * m.runtime.cpus_per_actor + m.runtime.decode_cpus
        ray.init(num_cpus=int(max(os.cpu_count() or 1, need + 1)), runtime_env=runtime_env, include_dashboard=False)
        log("started an embedded local Ray (no RAY_ADDRESS or runtime.ray_address given)")
    return ray


def attach_prompts(m: Manifest, storage: Storage, items: list[dict], summary: RunSummary) -> dict:
    """Reads the prompt sources (before any work) and gives each plan item its prompts as a JSON
    string. Returns what identifies the sources for the run fingerprint. Counts in ``summary`` the
    images without prompts and the table's keys that match no input image."""
    p = m.prompts
    sources: dict = {}
    if not p.prompted:
        return sources
    try:
        if p.table:
            index = load_prompt_table(p.table, storage, p.key, p.table_format)
        elif p.coco:
            index = load_coco(p.coco, storage, p.coco_include_crowd)
        else:
            index = None
    except PromptSourceError as e:
        raise JobError(str(e)) from None
    common = global_prompts(p.boxes, p.points, p.point_labels, p.texts)
    has_texts = bool(p.texts) or bool(index and index.has_texts)
    if has_texts:
        if not p.clip:
            raise JobError(f"prompts.clip is required: the prompt table {p.table!r} has text prompts")
        from .clip_text import ClipError, clip_sha256

        try:
            sources["clip_sha256"] = clip_sha256(p.clip, storage)
        except ClipError as e:
            raise JobError(str(e)) from None
    key = "uri" if (p.table and p.key == "uri") else "image_id"
    by_key = index.by_key if index else {}
    seen = set()
    for it in items:
        own = by_key.get(it[key], [])
        if own:
            seen.add(it[key])
        prompts = common + own
        it["prompts"] = json.dumps(prompts, separators=(",", ":")) if prompts else ""
        summary.images_without_prompts += not prompts
        summary.prompts_planned += len(prompts)
    if index is not None:
        missing = sorted(k for k in by_key if k not in seen)
        summary.prompt_source_rows = index.rows
        summary.prompt_rows_without_image = index.rows_without_key
        summary.prompt_bad_rows = sum(index.bad_rows.values())
        summary.prompt_images_not_in_input = len(missing)
        summary.prompt_images_not_in_input_examples = missing[:5]
        sources["source_sha256"] = index.sha256
    return sources


def run_job(m: Manifest, overwrite: bool = False, log=print) -> RunSummary:
    t_start = time.perf_counter()
    env = configure_ultralytics()
    storage = Storage(m.storage_options)
    summary = RunSummary(name=m.name, output_uri=m.output.uri, tool_version=__version__)

    # Checks before any work.
    summary.checkpoint_sha256 = checkpoint_sha256(m.model.checkpoint, storage)
    summary.model = m.model.checkpoint.rstrip("/").rsplit("/", 1)[-1]
    try:
        plan = list_inputs(m.input.uri, storage, m.input.skip_non_images)
    except FileNotFoundError as e:
        raise JobError(str(e)) from None
    summary.images_planned = len(plan.items)
    summary.skipped_not_images = len(plan.skipped)
    summary.skipped_examples = plan.skipped[:5]
    prompt_sources = attach_prompts(m, storage, plan.items, summary)
    summary.run_fingerprint, material = run_fingerprint(m, summary.checkpoint_sha256, prompt_sources)
    committed = read_committed(m.output.uri, storage)
    others = {fp: n for fp, n in committed.fingerprints.items() if fp != summary.run_fingerprint}
    if others and not overwrite:
        raise JobError(
            f"output.uri {m.output.uri!r} holds {sum(others.values())} rows written by another configuration "
            f"(run fingerprint {', '.join(sorted(others))}; this run's is {summary.run_fingerprint}: checkpoint, "
            "model settings, prompt rules, decode limits or tool version differ). Pass --overwrite to replace them, "
            "or choose a new output.uri"
        )
    if overwrite and committed.parts:
        storage.fs(m.output.uri).rm(committed.parts)
        log(f"--overwrite: removed {len(committed.parts)} Parquet files from {m.output.uri}")
        committed = Committed()
    remove_stale_temporaries(m.output.uri, storage)
    compression = None if m.output.compression == "none" else m.output.compression
    current = {it["image_id"]: source_version(it) for it in plan.items}
    for it in plan.items:
        it["source_version"] = current[it["image_id"]]
    if committed.rows:
        if drop_superseded_rows(m.output.uri, storage, committed, current, compression):  # left by a run cut short
            committed = read_committed(m.output.uri, storage)
        before = len(plan.items)
        fresh = {i for i, v in current.items() if committed.fresh(i, v)}  # a row of the object as it is now
        done_before = [committed.status[i] for i in fresh]
        summary.images_changed = sum(1 for i in current if i in committed.status and i not in fresh)
        plan.items = [it for it in plan.items if it["image_id"] not in fresh]
        summary.images_skipped_done = len(done_before)
        summary.images_ok = sum(s == "ok" for s in done_before)
        summary.images_error = len(done_before) - summary.images_ok
        if plan.items:
            log(f"resuming: {summary.images_skipped_done} images already have rows; {len(plan.items)} to do "
                f"({summary.images_changed} of them changed since their row was written)")
        else:
            log(f"nothing to do: all {before} images already have rows under run fingerprint "
                f"{summary.run_fingerprint} (the run is complete)")
    log(f"planned {len(plan.items)} images from {m.input.uri} ({len(plan.skipped)} non-image keys skipped)")

    if plan.items:
        ray = _init_ray(m, env, log)
        from ray.data import ActorPoolStrategy, DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.log_internal_stack_trace_to_stdout = False

        settings = SegmentSettings(
            checkpoint_uri=m.model.checkpoint,
            checkpoint_sha256=summary.checkpoint_sha256,
            imgsz=m.model.imgsz,
            conf=m.model.conf,
            iou=m.model.iou,
            max_det=m.model.max_det,
            device=m.model.device,
            half=m.model.half,
            rules=MaskRules(**m.mask_rules.model_dump()),
            prompted=m.prompts.prompted,
            keep_everything=m.prompts.keep_everything,
            merge_points=m.prompts.merge_points,
            clip_uri=m.prompts.clip if prompt_sources.get("clip_sha256") else None,
            clip_sha256=prompt_sources.get("clip_sha256"),
            text_min_area=m.prompts.text_min_area,
        )
        gpus = m.runtime.gpus_per_actor
        if gpus is None:
            wants_cuda = m.model.device.startswith("cuda") or (
                m.model.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0
            )
            gpus = 1.0 if wants_cuda else 0.0
        ds = ray.data.from_items(plan.items, override_num_blocks=max(1, min(len(plan.items), 200)))
        ds = ds.map(ReadDecode, fn_constructor_args=(storage, m.input.max_pixels), num_cpus=m.runtime.decode_cpus,
                    compute=ActorPoolStrategy(min_size=1, max_size=max(1, m.runtime.num_actors * 2)))
        ds = ds.map_batches(
            SegmentActor,
            fn_constructor_args=(settings, storage, summary.run_fingerprint),
            batch_size=m.runtime.batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=m.runtime.num_actors),
            num_cpus=m.runtime.cpus_per_actor,
            num_gpus=gpus,
        )
        ds = ds.map_batches(
            ParquetWriter,
            fn_constructor_args=(m.output.uri, storage, m.output.compression),
            batch_size=m.output.rows_per_file,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=1),
            num_cpus=0.5,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            summary.add_file_stats(batch.to_pylist())

    summary.wall_s = time.perf_counter() - t_start
    done = summary.images_ok + summary.images_error
    summary.images_per_s = (done - summary.images_skipped_done) / summary.wall_s if summary.wall_s > 0 else 0.0
    final = read_committed(m.output.uri, storage)
    summary.rows_superseded = drop_superseded_rows(m.output.uri, storage, final, current, compression)
    if summary.rows_superseded:  # rows of objects that changed, replaced by this run's
        final = read_committed(m.output.uri, storage)
    if final.rows != len(final.status):
        summary.failed = f"{final.rows - len(final.status)} duplicate rows in {m.output.uri}"
    elif done != summary.images_planned:
        summary.failed = f"{summary.images_planned - done} planned images have no output row"
    frac = m.runtime.max_error_fraction
    if frac is not None and done and summary.images_error / done > frac:
        summary.failed = (
            f"error budget exceeded: {summary.images_error}/{done} images failed "
            f"({summary.images_error / done:.1%} > runtime.max_error_fraction {frac:.1%})"
        )
    summary.fingerprint_material = material
    put_atomic(storage, join_uri(m.output.uri, "_run.json"), summary.to_json().encode())
    put_atomic(storage, join_uri(m.output.uri, "_manifest.json"),
               json.dumps({**m.model_dump(), "storage_options": redact(m.storage_options)}, indent=2).encode())
    return summary
