"""The Ray wiring, and the only place that knows about Ray.

    planned items -> read + decode (CPU actors) -> segment + encode (actor pool, model loaded once
    per actor, GPUs when present) -> output blocks (RLE, small columns) to the driver's one writer

The job's lifecycle around it (checks, plan, resume, lease, summary) is :mod:`.job`. What travels
to the driver is the output rows (RLE strings and small columns), never images or dense masks.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from .console import quiet_ray_loggers
from .decode import DecodeError, decode_for_model, device_decode_supported, probe_for_device
from .manifest import Manifest
from .metrics import ReadMetrics
from .inputs import OBJECT, read_images
from .plan import PlanParts, read_plan_part
from .read import read_item
from .sizing import ActorPlan, embedded_ray_cpus, joined_cluster, local_machine, plan_actors
from .storage import Storage
from .summary import RunSummary
from .watchdog import Watchdog, maybe_slow_for_test
from .write import Committer

if TYPE_CHECKING:
    from .segment import SegmentSettings

# No torch here at import: the read/decode workers import this module (ReadDecode is pickled by
# reference), and torch would cost each of them about 1.5 s of CPU and a few hundred MB at start.
# The segmentation stage (segment.py, which needs torch) is imported where the actors are made.

_NO_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)
BLOCK_BYTES = 2 << 20  # Ray Data block size (decoded images in flight); see run_segmentation


class ReadDecode:
    """Ray Data flat-map function: one planned unit -> its decoded RGB images (or error rows). An
    object unit is one image; a container unit (tar shard, Parquet file of images) is read in one
    streaming pass by its input form, its images decoded one at a time as they come, and ends with
    an end-of-unit row (``_unit_end`` = the rows it gave) that tells the writer when every row of
    the unit is committed (see write.Committer). ``imgsz``: decode JPEGs much larger than the model
    input at a reduced size (see decode.decode_for_model); a row's width and height are always the
    image's as shown. ``device_decode`` (``input.decode: device``): a JPEG the model's device can
    decode is not decoded here; its header is read (size, orientation, the same refusals) and its
    bytes travel in a ``jpeg`` column to the segmentation actor, which decodes them on the device
    (decode.probe_for_device / decode_on_device); other files are decoded here as always."""

    def __init__(self, storage: Storage, max_pixels: int, imgsz: int | None = None, run_id: str = "",
                 timeout_s: float | None = None, job: str = "", input_cfg=None, device_decode: bool = False):
        self.storage = storage
        self.metrics = ReadMetrics(job)
        self.max_pixels = max_pixels
        self.imgsz = imgsz
        self.timeout_s = timeout_s
        self.watchdog = Watchdog(run_id)
        self.input_cfg = input_cfg
        self.device_decode = device_decode

    def __call__(self, row: dict):
        if row.get("kind", OBJECT) == OBJECT:
            t0 = time.perf_counter()
            data, err, retries = read_item(row["uri"], self.storage)
            yield self.decoded(row, row["image_id"], row["uri"], data, err, retries, (time.perf_counter() - t0) * 1000,
                               row.get("extra", ""), "")
            return
        done = frozenset(bytes.fromhex(h) for h in row["done"].split(",")) if row.get("done") else frozenset()
        images = read_images(row, self.storage, self.input_cfg, done)
        n = retries = 0
        t0 = time.perf_counter()
        while True:
            try:
                im = next(images)
            except StopIteration as stop:
                skipped = int(stop.value or 0)
                break
            read_ms = (time.perf_counter() - t0) * 1000
            yield self.decoded(row, im.image_id, im.uri, im.data, im.error, im.retries - retries, read_ms,
                               im.extra or row.get("extra", ""), row["uri"])
            retries, n = im.retries, n + 1
            t0 = time.perf_counter()
        end = self.decoded(row, row["image_id"], row["uri"], None, "unit_end", 0, -1.0, "", row["uri"])
        end["_unit_end"], end["_unit_skipped"] = n, skipped
        yield end

    def decoded(self, row: dict, image_id: str, uri: str, data: bytes | None, err: str | None, retries: int,
                read_ms: float, extra: str, shard: str) -> dict:
        out = {"image_id": image_id, "uri": uri, "shard": shard, "extra": extra or "", "width": -1, "height": -1,
               "decode_ms": -1.0, "read_ms": read_ms, "read_retries": retries, "prompts": row.get("prompts", ""),
               "source_version": row.get("source_version", ""), "_unit_end": -1, "_unit_skipped": 0}
        if err != "unit_end":
            self.metrics.read(len(data) if data is not None else 0)
        image = _NO_IMAGE
        if self.device_decode:
            out["jpeg"], out["orientation"] = b"", 1
        if err is None and image_id in self.watchdog.poisoned("decode"):  # outlasted the limit before
            err = f"timeout: decoding took longer than runtime.image_timeout_s = {self.timeout_s:g} s"
        elif err is None:
            t0 = time.perf_counter()
            try:
                with self.watchdog.watch("decode", [image_id], self.timeout_s):
                    maybe_slow_for_test("decode", image_id)
                    jpeg = probe_for_device(data, self.max_pixels) if self.device_decode else None
                    if jpeg is not None:  # decoded by the segmentation actor, on its device
                        out["jpeg"], out["orientation"] = jpeg.data, jpeg.orientation
                        out["height"], out["width"] = jpeg.shown
                    else:
                        image, (out["height"], out["width"]) = decode_for_model(data, self.max_pixels, self.imgsz)
            except DecodeError as e:
                err = str(e)
            out["decode_ms"] = (time.perf_counter() - t0) * 1000
        out["error"] = err or ""
        out["image"] = image
        return out


def ray_address(m: Manifest) -> str | None:
    """The cluster a run joins: ``runtime.ray_address``, else RAY_ADDRESS; None: an embedded Ray."""
    return m.runtime.ray_address or os.environ.get("RAY_ADDRESS")


def start_ray(m: Manifest, env: dict[str, str], debug: bool = False) -> tuple[ActorPlan, str]:
    """Joins the cluster named by ``runtime.ray_address`` / RAY_ADDRESS, or starts an embedded
    local Ray sized for the run. Returns the actor plan and a line saying which. Ray's own INFO
    lines and advice are kept out of the user's way unless ``debug``."""
    import ray
    import ray.data  # noqa: F401 - configures Ray Data's loggers, which quiet_ray_loggers then quiets

    address = ray_address(m)
    runtime_env = {"env_vars": env}
    quiet = {} if debug else {"logging_level": logging.WARNING}
    if not debug:
        quiet_ray_loggers()
    if address or ray.is_initialized():
        if not ray.is_initialized():
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, **quiet)
        cluster = joined_cluster(ray.cluster_resources())
        line = f"joined the Ray cluster at {address} ({cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs)" if address else ""
        return plan_actors(m.runtime, m.model.device, cluster), line
    machine = local_machine(m.model.device)
    actors = plan_actors(m.runtime, m.model.device, machine)
    if m.runtime.metrics_export_port:
        quiet["_metrics_export_port"] = m.runtime.metrics_export_port
    # address="local": always a new Ray of this run's own. Without it ray.init() joins the cluster
    # that `ray start` recorded on this machine (a dev cluster, a head node), where num_cpus is refused.
    # worker_niceness 0: the embedded Ray's workers are the job, so they run at the priority it was
    # started with. Ray's default (15, for a cluster node: its raylet ahead of the work) starves them
    # behind any other busy process on the machine (CFS weights: 1024 at 0 against 36 at 15); with a
    # CPU-bound process per core beside it, the test suite's runs took about 5x their time alone on a
    # 2-core machine. `nice fastsam-batch run` still lowers the whole run.
    ray.init(address="local", num_cpus=embedded_ray_cpus(m.runtime, actors.actors, int(machine.cpus)),
             runtime_env=runtime_env, include_dashboard=False, _system_config={"worker_niceness": 0}, **quiet)
    return actors, "started " + embedded_ray_line()


def recorded_local_cluster() -> str | None:
    """The address of a Ray cluster that `ray start` recorded on this machine (in Ray's temp folder:
    RAY_TMPDIR, else /tmp/ray) and that still answers, else None. A run never joins it unless asked."""
    import socket

    from ray._private.services import find_bootstrap_address

    try:
        address = find_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - no record, or an unreadable one
        return None
    if not address:
        return None
    host, _, port = address.strip().rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError):
        return None  # a record left by a cluster that has stopped
    return address.strip()


def embedded_ray_line() -> str:
    """Says that a run starts its own Ray (the decision for a machine where a cluster runs: it is not
    joined unless RAY_ADDRESS or runtime.ray_address names it)."""
    line = "an embedded local Ray of this run's own (no RAY_ADDRESS or runtime.ray_address given)"
    recorded = recorded_local_cluster()
    if recorded:
        line += (f"; the Ray cluster running on this machine at {recorded} is not joined "
                 "(RAY_ADDRESS=auto joins it)")
    return line


def run_segmentation(m: Manifest, storage: Storage, settings: SegmentSettings, summary: RunSummary,
                     plan: PlanParts, sizing: ActorPlan, committer: Committer, log=print) -> None:
    """read + decode -> segment + encode, streaming through Ray Data, into ``committer`` (the one
    writer, on the driver). Raises write.Interrupted after a Ctrl-C (what had arrived committed)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext, ExecutionResources

    from .segment import SegmentActor, resolve_threads  # not at the top: see the note there

    actors, gpus = sizing.actors, sizing.gpus_per_actor
    settings = replace(settings, actors=actors, batch_size=sizing.batch_size)
    threads = resolve_threads(settings, "cpu")
    log(f"segmentation: {actors} actor{'s' if actors > 1 else ''} ({sizing.why})"
        + (f", {gpus:g} GPU each" if gpus else "")
        + (f", {threads} torch thread{'s' if threads > 1 else ''} each" if sizing.embedded and not gpus else "")
        + f"; batches of {sizing.batch_size}" + (f" (rows grouped by letterboxed shape, {sizing.rows_per_call} at a time)"
                                                  if sizing.rows_per_call > sizing.batch_size else "")
        + f"; up to {sizing.decode_workers} read/decode workers")
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
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
    mode = m.decode_mode(bool(settings.clip_uri), accelerators=gpus > 0, device_decode=device_decode_supported())
    reduced = mode == "reduced"
    if reduced:
        log(f"decode: JPEGs much larger than the model input at a reduced size (input.decode: {m.input.decode})")
    elif mode == "device":
        log(f"decode: JPEGs on the model's device, in batches (torchvision decode_jpeg; input.decode: {m.input.decode})")
    ds = ds.flat_map(ReadDecode, fn_constructor_args=(storage, m.input.max_pixels, m.model.imgsz if reduced else None,
                                                      summary.run_id, m.runtime.image_timeout_s, m.name, m.input,
                                                      mode == "device"),
                num_cpus=m.runtime.decode_cpus,
                compute=ActorPoolStrategy(min_size=1, max_size=sizing.decode_workers))
    ds = ds.map_batches(
        SegmentActor,
        fn_constructor_args=(settings, storage, summary.run_fingerprint, summary.run_id, m.runtime.image_timeout_s),
        batch_size=sizing.rows_per_call,  # cut into forward passes by letterboxed shape (bucketing)
        batch_format="numpy",
        # Two calls at once on GPUs (host work of one batch overlaps the device work of the next).
        compute=ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=sizing.calls_per_actor,
                                  enable_true_multi_threading=sizing.calls_per_actor > 1),
        num_cpus=m.runtime.cpus_per_actor,
        num_gpus=gpus,
    )
    # Only RLE strings and small columns come to the driver, whose one writer commits them.
    try:
        committer.consume(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    except Exception:  # Interrupted (Ctrl-C), LeaseLost (the lease taken over), a failed commit
        # Stop Ray Data's executor thread now, not while Ray shuts down at exit (where it would go on
        # calling Ray, and Ray would start a new local instance for it). Ray Data's own blocking
        # APIs end their executors this way; the attribute is internal, hence the getattr.
        executor = getattr(ds, "_current_executor", None)
        if executor is not None:
            executor.shutdown(force=True)
        raise
