"""The job's lifecycle: checks before any work, the plan (streaming listing, prompts, resume),
the segmentation (:mod:`.pipeline`, the Ray part), then the end-of-run checks and summary."""

from __future__ import annotations

import json
import time

from . import __version__
from .manifest import Manifest
from .model import checkpoint_sha256
from .offline import configure_ultralytics
from .plan import PlanParts, Skipped, chunked, iter_inputs, remove_plan_files
from .mask_rules import MaskRules
from .prompts import PromptSourceError, global_prompts, load_coco, load_prompt_table
from .segment import SegmentSettings
from .lease import Lease, LeaseHeld, new_run_id
from .resume import (Committed, drop_rows, drop_superseded_rows, duplicate_rows, read_committed,
                     remove_stale_temporaries, run_fingerprint, source_version, superseded_parts)
from .storage import Storage, join_uri, redact
from .summary import RunSummary
from .write import put_atomic
from .pipeline import run_segmentation

LIST_CHUNK = 1000  # listed items handled at a time on the driver


class JobError(RuntimeError):
    """A problem with the job as a whole (not one image): reported and the run stops."""


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


def run_job(m: Manifest, overwrite: bool = False, log=print, break_lease: bool = False) -> RunSummary:
    t_start = time.perf_counter()
    env = configure_ultralytics()
    storage = Storage(m.storage_options)
    summary = RunSummary(name=m.name, output_uri=m.output.uri, tool_version=__version__)

    # Checks before any work.
    summary.checkpoint_sha256 = checkpoint_sha256(m.model.checkpoint, storage)
    summary.model = m.model.checkpoint.rstrip("/").rsplit("/", 1)[-1]
    prompts = PromptAttacher(m, storage)
    summary.run_fingerprint, material = run_fingerprint(m, summary.checkpoint_sha256, prompts.sources)

    # One writer per output: the lease is held from here to the end (see lease.py).
    summary.run_id = new_run_id()
    lease = Lease(storage, m.output.uri, summary.run_id, m.runtime.lease_stale_s, m.runtime.lease_heartbeat_s,
                  __version__)
    try:
        lease.acquire(break_lease)
    except LeaseHeld as e:
        raise JobError(str(e)) from None
    if lease.taken_over is not None:
        why = lease.stale_reason(lease.taken_over) or "--break-lease"
        summary.lease_taken_over = f"{lease.taken_over.describe()} ({why})"
        log(f"took over the lease on {m.output.uri} from {summary.lease_taken_over}")
    lease.start_heartbeat()
    try:
        return _run_holding_lease(m, overwrite, log, t_start, env, storage, summary, prompts, material, lease)
    finally:
        lease.release()


def _run_holding_lease(m: Manifest, overwrite: bool, log, t_start: float, env: dict, storage: Storage,
                       summary: RunSummary, prompts: "PromptAttacher", material: dict, lease: Lease) -> RunSummary:
    compression = None if m.output.compression == "none" else m.output.compression
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
    twice = duplicate_rows(committed)
    if twice:  # left by two runs writing at once (a commit in flight when a lease changed hands)
        summary.rows_deduplicated += drop_rows(m.output.uri, storage, twice, compression)
        committed = read_committed(m.output.uri, storage)
    remove_stale_temporaries(m.output.uri, storage)
    remove_plan_files(m.output.uri, storage)  # left by runs cut short
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

    written: set[str] = set()
    try:
        if plan.count:
            written = run_segmentation(m, env, storage, settings_for(m, summary, prompts.sources), summary, plan, log,
                                       lease.fence())
    except Exception as e:  # noqa: BLE001 - a writer that found the lease taken over stops the dataset
        if "LeaseLost" not in repr(e) and "LeaseLost" not in str(e):
            raise
        lease.renew()  # records who holds it now
    finally:
        plan.remove()
    if lease.lost is not None:
        raise JobError(f"this run's lease on {m.output.uri} was taken over by {lease.lost.describe()}: this run "
                       "stopped committing; the rows it committed before are kept, and that run finishes the output")

    summary.wall_s = time.perf_counter() - t_start
    done = summary.images_ok + summary.images_error
    summary.images_per_s = (done - summary.images_skipped_done) / summary.wall_s if summary.wall_s > 0 else 0.0
    final = read_committed(m.output.uri, storage)
    if changed:  # rows of objects that changed, replaced by this run's
        summary.rows_superseded = drop_superseded_rows(m.output.uri, storage, superseded_parts(final, changed),
                                                       compression)
        if summary.rows_superseded:
            final = read_committed(m.output.uri, storage)
    twice = duplicate_rows(final, prefer=written)
    if twice:  # another run's commit that landed while this run wrote the same images: this run's rows stay
        summary.rows_deduplicated += drop_rows(m.output.uri, storage, twice, compression)
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


