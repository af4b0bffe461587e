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
from dataclasses import replace

import numpy as np

from . import __version__
from .decode import DecodeError, decode_for_model
from .manifest import Manifest
from .model import checkpoint_sha256
from .offline import configure_ultralytics
from .plan import PlanParts, Skipped, chunked, iter_inputs, read_plan_part, remove_plan_files
from .read import read_item
from .mask_rules import MaskRules
from .prompts import PromptSourceError, global_prompts, load_coco, load_prompt_table
from .segment import SegmentActor, SegmentSettings, resolve_threads
from .resume import (Committed, drop_superseded_rows, read_committed, remove_stale_temporaries, run_fingerprint,
                     source_version, superseded_parts)
from .sizing import embedded_ray_cpus, joined_cluster, local_machine, plan_actors
from .storage import Storage, join_uri, redact
from .summary import RunSummary
from .write import DriverWatch, ParquetWriter, put_atomic

_NO_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)
LIST_CHUNK = 1000  # listed items handled at a time on the driver
BLOCK_BYTES = 2 << 20  # Ray Data block size (decoded images in flight); see _run_ray


class JobError(RuntimeError):
    """A problem with the job as a whole (not one image): reported and the run stops."""


class ReadDecode:
    """Ray Data row function: planned item -> decoded RGB image, or an error row. ``imgsz``: decode
    JPEGs much larger than the model input at a reduced size (see decode.decode_for_model); the
    row's width and height are always the image's as shown."""

    def __init__(self, storage: Storage, max_pixels: int, imgsz: int | None = None):
        self.storage = storage
        self.max_pixels = max_pixels
        self.imgsz = imgsz

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
                image, (out["height"], out["width"]) = decode_for_model(data, self.max_pixels, self.imgsz)
            except DecodeError as e:
                err = str(e)
            out["decode_ms"] = (time.perf_counter() - t0) * 1000
        out["error"] = err or ""
        out["image"] = image
        return out


def _init_ray(m: Manifest, env: dict[str, str], log=print):
    """Joins the cluster named by ``runtime.ray_address`` / RAY_ADDRESS, or starts an embedded
    local Ray sized for the run. Returns ``(ray, actor plan)``."""
    import ray

    address = m.runtime.ray_address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": env}
    if address or ray.is_initialized():
        if not ray.is_initialized():
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        cluster = joined_cluster(ray.cluster_resources())
        if address:
            log(f"joined the Ray cluster at {address} ({cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs)")
        return ray, plan_actors(m.runtime, m.model.device, cluster)
    machine = local_machine(m.model.device)
    actors = plan_actors(m.runtime, m.model.device, machine)
    ray.init(num_cpus=embedded_ray_cpus(m.runtime, actors.actors, int(machine.cpus)), runtime_env=runtime_env,
             include_dashboard=False)
    log("started an embedded local Ray (no RAY_ADDRESS or runtime.ray_address given)")
    return ray, actors


class PromptAttacher:
    """Reads the prompt sources (before any work), then gives each planned item its prompts as a
    JSON string, a chunk at a time. ``sources`` identifies the sources for the run fingerprint.
    Counts in the summary the images without prompts and the table's keys that match no input image."""

    def __init__(self, m: Manifest, storage: Storage):
        p = self.p = m.prompts
        self.sources: dict = {}
        self.index = None
        self.common: list[dict] = []
        self.seen: set[str] = set()
        if not p.prompted:
            return
        try:
            if p.table:
                self.index = load_prompt_table(p.table, storage, p.key, p.table_format)
            elif p.coco:
                self.index = load_coco(p.coco, storage, p.coco_include_crowd)
        except PromptSourceError as e:
            raise JobError(str(e)) from None
        self.common = global_prompts(p.boxes, p.points, p.point_labels, p.texts)
        if bool(p.texts) or bool(self.index and self.index.has_texts):
            if not p.clip:
                raise JobError(f"prompts.clip is required: the prompt table {p.table!r} has text prompts")
            from .clip_text import ClipError, clip_sha256

            try:
                self.sources["clip_sha256"] = clip_sha256(p.clip, storage)
            except ClipError as e:
                raise JobError(str(e)) from None
        self.key = "uri" if (p.table and p.key == "uri") else "image_id"
        if self.index is not None:
            self.sources["source_sha256"] = self.index.sha256

    def attach(self, items: list[dict], summary: RunSummary) -> None:
        if not self.p.prompted:
            return
        by_key = self.index.by_key if self.index else {}
        for it in items:
            own = by_key.get(it[self.key], [])
            if own:
                self.seen.add(it[self.key])
            prompts = self.common + own
            it["prompts"] = json.dumps(prompts, separators=(",", ":")) if prompts else ""
            summary.images_without_prompts += not prompts
            summary.prompts_planned += len(prompts)

    def finish(self, summary: RunSummary) -> None:
        if self.index is None:
            return
        missing = sorted(k for k in self.index.by_key if k not in self.seen)
        summary.prompt_source_rows = self.index.rows
        summary.prompt_rows_without_image = self.index.rows_without_key
        summary.prompt_bad_rows = sum(self.index.bad_rows.values())
        summary.prompt_images_not_in_input = len(missing)
        summary.prompt_images_not_in_input_examples = missing[:5]


def attach_prompts(m: Manifest, storage: Storage, items: list[dict], summary: RunSummary) -> dict:
    """:class:`PromptAttacher` on one list of items; returns the sources for the fingerprint."""
    attacher = PromptAttacher(m, storage)
    attacher.attach(items, summary)
    attacher.finish(summary)
    return attacher.sources


def plan_job(m: Manifest, storage: Storage, summary: RunSummary, committed: Committed,
             prompts: PromptAttacher) -> tuple[PlanParts, dict[str, set[str]], dict[str, str]]:
    """Lists the input (streaming), gives items their prompts and source versions, and keeps those
    without a current committed row, in plan parts. Returns the parts, the rows of older object
    versions to drop now (left by a run cut short), and the changed images (id -> version now),
    whose old rows are dropped once the new ones are committed."""
    plan = PlanParts(m.output.uri, storage, m.runtime.plan_part_rows)
    skipped = Skipped()
    superseded: dict[str, set[str]] = {}
    changed: dict[str, str] = {}
    try:
        for chunk in chunked(iter_inputs(m.input.uri, storage, skipped, m.input.skip_non_images), LIST_CHUNK):
            summary.images_planned += len(chunk)
            prompts.attach(chunk, summary)
            for it in chunk:
                it["source_version"] = source_version(it)
            todo = []
            for it, found in zip(chunk, committed.lookup([it["image_id"] for it in chunk],
                                                         [it["source_version"] for it in chunk])):
                if found.state == "fresh":  # a row of the object as it is now
                    summary.images_skipped_done += 1
                    summary.images_ok += found.ok
                    summary.images_error += not found.ok
                    for part in found.superseded:
                        superseded.setdefault(part, set()).add(it["image_id"])
                    continue
                if found.state == "changed":
                    changed[it["image_id"]] = it["source_version"]
                todo.append(it)
            plan.add(todo)
    except FileNotFoundError as e:
        raise JobError(str(e)) from None
    prompts.finish(summary)
    summary.images_changed = len(changed)
    summary.skipped_not_images = skipped.count
    summary.skipped_examples = skipped.examples
    return plan, superseded, changed


def run_job(m: Manifest, overwrite: bool = False, log=print) -> RunSummary:
    t_start = time.perf_counter()
    env = configure_ultralytics()
    storage = Storage(m.storage_options)
    summary = RunSummary(name=m.name, output_uri=m.output.uri, tool_version=__version__)

    # Checks before any work.
    summary.checkpoint_sha256 = checkpoint_sha256(m.model.checkpoint, storage)
    summary.model = m.model.checkpoint.rstrip("/").rsplit("/", 1)[-1]
    prompts = PromptAttacher(m, storage)
    summary.run_fingerprint, material = run_fingerprint(m, summary.checkpoint_sha256, prompts.sources)
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
    remove_plan_files(m.output.uri, storage)  # left by runs cut short
    compression = None if m.output.compression == "none" else m.output.compression
    plan, superseded, changed = plan_job(m, storage, summary, committed, prompts)
    if superseded:  # rows of replaced objects, left by a run cut short after their new rows committed
        drop_superseded_rows(m.output.uri, storage, superseded, compression)
    if summary.images_skipped_done:
        if plan.count:
            log(f"resuming: {summary.images_skipped_done} images already have rows; {plan.count} to do "
                f"({summary.images_changed} of them changed since their row was written)")
        else:
            log(f"nothing to do: all {summary.images_planned} images already have rows under run fingerprint "
                f"{summary.run_fingerprint} (the run is complete)")
    log(f"planned {plan.count} images from {m.input.uri} ({summary.skipped_not_images} non-image keys skipped"
        + (f"; plan in {len(plan.files)} files under {plan.folder}" if plan.files else "") + ")")

    try:
        if plan.count:
            _run_ray(m, env, storage, settings_for(m, summary, prompts.sources), summary, plan, log)
    finally:
        plan.remove()

    summary.wall_s = time.perf_counter() - t_start
    done = summary.images_ok + summary.images_error
    summary.images_per_s = (done - summary.images_skipped_done) / summary.wall_s if summary.wall_s > 0 else 0.0
    final = read_committed(m.output.uri, storage)
    if changed:  # rows of objects that changed, replaced by this run's
        summary.rows_superseded = drop_superseded_rows(m.output.uri, storage, superseded_parts(final, changed),
                                                       compression)
        if summary.rows_superseded:
            final = read_committed(m.output.uri, storage)
    if final.rows != final.images:
        summary.failed = f"{final.rows - final.images} duplicate rows in {m.output.uri}"
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


def settings_for(m: Manifest, summary: RunSummary, prompt_sources: dict) -> SegmentSettings:
    return SegmentSettings(
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
        torch_threads=m.runtime.torch_threads or 0,
        actors=m.runtime.num_actors or 1,  # the run's count is set once Ray is up (sizing.py)
        cpus_per_actor=m.runtime.cpus_per_actor,
    )


def _run_ray(m: Manifest, env: dict, storage: Storage, settings: SegmentSettings, summary: RunSummary,
             plan: PlanParts, log=print) -> None:
    """read + decode -> segment + encode -> write, streaming through Ray Data; file stats to ``summary``."""
    ray, sizing = _init_ray(m, env, log)
    from ray.data import ActorPoolStrategy, DataContext, ExecutionResources

    actors, gpus = sizing.actors, sizing.gpus_per_actor
    settings = replace(settings, actors=actors)
    threads = resolve_threads(settings, "cpu")
    log(f"segmentation: {actors} actor{'s' if actors > 1 else ''} ({sizing.why})"
        + (f", {gpus:g} GPU each" if gpus else "")
        + (f", {threads} torch thread{'s' if threads > 1 else ''} each" if sizing.embedded and not gpus else "")
        + f"; up to {sizing.decode_workers} read/decode workers")
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.log_internal_stack_trace_to_stdout = False
    # Small blocks: a block of decoded images waits whole in the object store until the actors
    # take it, so memory in flight grows with the block size (128 MiB by default: 600 small images),
    # and the store's pages the run has touched grow with it over a long run (measured on 2,000 small
    # images: 16 MiB blocks left 152 MB of store pages mapped, 2 MiB blocks 44 MB). A 2250x1500
    # photo (10 MB decoded) is a block of its own.
    ctx.target_max_block_size = BLOCK_BYTES
    # Flat memory however long the run: decoded images queued ahead of the (slower) model are
    # capped, rather than filling Ray Data's default share of the object store.
    in_flight = sizing.in_flight_mb
    limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = ExecutionResources(
        cpu=limits.cpu, gpu=limits.gpu, memory=limits.memory, object_store_memory=in_flight * 2**20)

    if plan.files:  # the workers read the plan parts; the driver holds only their names. Asking for
        # the read/decode CPUs lets Ray Data fuse the reading into the read/decode actors.
        ds = ray.data.from_items([{"part": u} for u in plan.files], override_num_blocks=len(plan.files))
        ds = ds.flat_map(lambda row: read_plan_part(row["part"], storage), num_cpus=m.runtime.decode_cpus)
    else:
        ds = ray.data.from_items(plan.in_memory, override_num_blocks=max(1, min(plan.count, 200)))
    reduced = m.reduced_decode(bool(settings.clip_uri))
    ds = ds.map(ReadDecode, fn_constructor_args=(storage, m.input.max_pixels, m.model.imgsz if reduced else None),
                num_cpus=m.runtime.decode_cpus,
                compute=ActorPoolStrategy(min_size=1, max_size=sizing.decode_workers))
    ds = ds.map_batches(
        SegmentActor,
        fn_constructor_args=(settings, storage, summary.run_fingerprint),
        batch_size=m.runtime.batch_size,
        batch_format="numpy",
        # Two calls at once on GPUs (host work of one batch overlaps the device work of the next).
        compute=ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=sizing.calls_per_actor,
                                  enable_true_multi_threading=sizing.calls_per_actor > 1),
        num_cpus=m.runtime.cpus_per_actor,
        num_gpus=gpus,
    )
    ds = ds.map_batches(
        ParquetWriter,
        fn_constructor_args=(m.output.uri, storage, m.output.compression,
                             DriverWatch(os.getpid()) if sizing.embedded else None),
        batch_size=m.output.rows_per_file,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        summary.add_file_stats(batch.to_pylist())
