"""The Ray wiring, and the only place that knows about Ray.

    planned items -> read + decode (CPU actors) -> segment + encode (actor pool, model loaded once
    per actor, GPUs when present) -> write Parquet (one writer) -> per-file stats back to the driver

The job's lifecycle around it (checks, plan, resume, lease, summary) is :mod:`.job`. Only small
things travel to the driver: per-file statistics, never masks or images.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np

from .decode import DecodeError, decode_for_model
from .manifest import Manifest
from .plan import PlanParts, read_plan_part
from .read import read_item
from .segment import SegmentActor, SegmentSettings, resolve_threads
from .sizing import embedded_ray_cpus, joined_cluster, local_machine, plan_actors
from .storage import Storage
from .summary import RunSummary
from .watchdog import Watchdog, maybe_slow_for_test
from .write import DriverWatch, ParquetWriter

_NO_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)
BLOCK_BYTES = 2 << 20  # Ray Data block size (decoded images in flight); see run_segmentation


class ReadDecode:
    """Ray Data row function: planned item -> decoded RGB image, or an error row. ``imgsz``: decode
    JPEGs much larger than the model input at a reduced size (see decode.decode_for_model); the
    row's width and height are always the image's as shown."""

    def __init__(self, storage: Storage, max_pixels: int, imgsz: int | None = None, run_id: str = "",
                 timeout_s: float | None = None):
        self.storage = storage
        self.max_pixels = max_pixels
        self.imgsz = imgsz
        self.timeout_s = timeout_s
        self.watchdog = Watchdog(run_id)

    def __call__(self, row: dict) -> dict:
        out = {"image_id": row["image_id"], "uri": row["uri"], "width": -1, "height": -1, "decode_ms": -1.0,
               "prompts": row.get("prompts", ""), "source_version": row.get("source_version", "")}
        t0 = time.perf_counter()
        data, err, out["read_retries"] = read_item(row["uri"], self.storage)
        out["read_ms"] = (time.perf_counter() - t0) * 1000
        image = _NO_IMAGE
        if err is None and row["image_id"] in self.watchdog.poisoned("decode"):  # outlasted the limit before
            err = f"timeout: decoding took longer than runtime.image_timeout_s = {self.timeout_s:g} s"
        elif err is None:
            t0 = time.perf_counter()
            try:
                with self.watchdog.watch("decode", [row["image_id"]], self.timeout_s):
                    maybe_slow_for_test("decode", row["image_id"])
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


def run_segmentation(m: Manifest, env: dict, storage: Storage, settings: SegmentSettings, summary: RunSummary,
                     plan: PlanParts, log=print, fence=None) -> set[str]:
    """read + decode -> segment + encode -> write, streaming through Ray Data; file stats to ``summary``.
    Returns the names of the files written. ``fence``: see lease.LeaseFence."""
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
    reduced = m.reduced_decode(bool(settings.clip_uri), accelerators=gpus > 0)
    if reduced:
        log(f"decode: JPEGs much larger than the model input at a reduced size (input.decode: {m.input.decode})")
    ds = ds.map(ReadDecode, fn_constructor_args=(storage, m.input.max_pixels, m.model.imgsz if reduced else None,
                                                 summary.run_id, m.runtime.image_timeout_s),
                num_cpus=m.runtime.decode_cpus,
                compute=ActorPoolStrategy(min_size=1, max_size=sizing.decode_workers))
    ds = ds.map_batches(
        SegmentActor,
        fn_constructor_args=(settings, storage, summary.run_fingerprint, summary.run_id, m.runtime.image_timeout_s),
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
                             DriverWatch(os.getpid()) if sizing.embedded else None, fence),
        batch_size=m.output.rows_per_file,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    written = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows = batch.to_pylist()
        summary.add_file_stats(rows)
        written.update(r["file"] for r in rows if r.get("file"))
    return written
