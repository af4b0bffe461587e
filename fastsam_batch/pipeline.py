"""The Ray wiring, and the only place that knows about Ray.

    planned items -> read + decode (CPU actors) -> segment + encode (actor pool, model loaded once
    per actor, GPUs when present) -> output blocks (RLE, small columns) -> writer actors, which
    encode and stage the files -> the driver publishes them (WriterPool, writers.py)

The job's lifecycle around it (checks, plan, resume, lease, summary) is :mod:`.job`. What travels
to the driver is the output blocks' references and the writers' small records, never rows.
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
from .watchdog import Watchdog
from .write import Interrupted
from .writers import BlockWriter, Ledger

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
                     plan: PlanParts, sizing: ActorPlan, output: "WriterPool", log=print,
                     keep_writers: bool = False) -> None:
    """read + decode -> segment + encode, streaming through Ray Data, into ``output`` (the writer
    actors; the driver publishes their files). Raises write.Interrupted after a Ctrl-C (what the
    writers had staged and what had reached the driver, published). ``keep_writers``: the writers
    are left running when it ends well (another wave of the plan follows: job._segment_waves)."""
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
    # The output blocks stay in the object store: the driver routes their references to the writer
    # actors, which encode and stage the files; the driver publishes them (writers.py).
    try:
        output.run(ds, keep=keep_writers)
    except Exception:  # Interrupted (Ctrl-C), LeaseLost (the lease taken over), a failed commit
        # Stop Ray Data's executor thread now, not while Ray shuts down at exit (where it would go on
        # calling Ray, and Ray would start a new local instance for it). Ray Data's own blocking
        # APIs end their executors this way; the attribute is internal, hence the getattr.
        executor = getattr(ds, "_current_executor", None)
        if executor is not None:
            executor.shutdown(force=True)
        raise


WRITER_CALLS = 2  # calls queued on a writer (add, poll, flush) past which no more blocks go to it
# Writer deaths in a row with no file published in between before the run fails (at least this, and
# at least 2 per writer: a node lost takes the writers on it at once). A run of any length survives
# any number of deaths that each let it go on: every published file starts the count again.
WRITER_DEATHS = 8  # (a single block that keeps killing its writer stops the run sooner: writers.BLOCK_DEATHS)
# A writer whose oldest call has not answered for this long (a put that never returns, a fetch of a
# block that never comes) is treated as dead: killed, started again, its blocks sent again. Far above
# the longest honest call: staging a file of output.target_file_mb (128 MiB by default) on a slow link.
WRITER_HANG_S = 600.0


class WritersLost(RuntimeError):
    """The writer actors kept dying: the run stops (what was published stays)."""


class BlockLost(RuntimeError):
    """An output block was lost from Ray's object store before a writer wrote it: the run stops."""


_END = object()


def writer_nodes(nodes: list[dict]) -> list[str]:
    """The nodes a remote output's writers are placed on, in turn (``nodes``: ray.nodes()): the alive
    nodes with CPUs, of them those with GPUs if any (the work is there). A node that advertises no
    CPUs (our Kubernetes heads: rayStartParams num-cpus "0", the driver's) takes none: a writer there
    would take the driver's cores."""
    alive = [n for n in nodes if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    gpus = [n for n in alive if n["Resources"].get("GPU", 0) > 0]
    return [n["NodeID"] for n in (gpus or alive)]


class WriterPool:
    """The run's K writer actors and the driver's side of them (writers.Ledger): output blocks'
    references routed to the writers in turn, skipping one with WRITER_CALLS calls queued (a slow
    writer gets fewer), so the driver pulls blocks from Ray Data only as fast as the writers take them
    in (each holds the rows it took in up to its own limit, write.MAX_PENDING_FACTOR targets, the
    blocks staying in the object store until published); every answer handled in the order its writer gave them
    (the files it staged published, in order); a writer due by ``commit_interval_s`` asked to
    stage its rows; a writer that dies, or whose oldest call has not answered for ``hang_s`` seconds
    (then killed), started again and its blocks sent again (writers.Ledger.resend). The run fails
    (WritersLost) after ``max_deaths`` deaths in a row with no file published in between (default:
    WRITER_DEATHS, at least 2 per writer).

    ``publish``: makes a staged file visible (the fence checked first; job.py). ``watch``: raises to
    stop (the lease taken over); ``tick``: progress. Only :meth:`run` and what it calls know Ray."""

    def __init__(self, m: Manifest, storage: Storage, count: int, ledger: Ledger, watch=None, tick=None,
                 local_output: bool = True, run_id: str = "", clean_s3=None, hang_s: float = WRITER_HANG_S,
                 max_deaths: int | None = None):
        self.m, self.storage, self.count, self.ledger, self.run_id = m, storage, count, ledger, run_id
        # S3: aborts the uploads this run's writers staged and did not report (job.py: behind the fence)
        self.clean_s3 = clean_s3
        self.watch = watch or (lambda: None)
        self.tick = tick or (lambda: None)
        self.local_output = local_output
        self.hang_s = hang_s
        self.max_deaths = max_deaths if max_deaths is not None else max(WRITER_DEATHS, 2 * count)
        self.handles: list = []
        self.calls: list[list] = []  # per writer: its calls not yet answered, in order: (future, block number or None)
        self.head_since: list[float | None] = []  # per writer: since when its oldest call has been its oldest
        self.due_at: list[float | None] = []
        self.died = 0  # writers that died (or hung) in this run
        self.hung = 0  # of them, killed as hung
        self.deaths_in_a_row = 0  # deaths since the last file published
        self.pid_refs: list = []  # every writer's process id, asked (a local output's: on this node)
        self._remote = None
        self.nodes: list[str] = []  # a remote output's: the nodes writers are placed on, in turn (writer_nodes)
        self.started = 0  # writers started (the next one's place in turn)
        self.turn = 0  # the writer the next block goes to, if it has room
        self.stopped = False  # stop() has been called
        self._sigint = None  # run()'s: set by the first Ctrl-C

    def _start(self, i: int):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts: dict = {"num_cpus": 0, "max_restarts": 0, "max_task_retries": 0}
        if self.local_output:  # a local folder: the driver's disk, so the driver's node
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                         soft=False)
        elif self.nodes:  # in turn over the nodes with CPUs (soft: another node if that one is gone)
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.nodes[self.started % len(self.nodes)],
                                                                         soft=True)
        else:
            opts["scheduling_strategy"] = "SPREAD"
        self.started += 1
        o = self.m.output
        if self._remote is None:  # writers.BlockWriter as an actor: its module imports no more than it needs
            self._remote = ray.remote(BlockWriter)
        handle = self._remote.options(**opts).remote(
            i, o.uri, self.storage, o.compression, o.rows_per_file, o.commit_interval_s,
            max(1, int(o.target_file_mb * (1 << 20))), self.m.name, self.run_id)
        if self.local_output:  # its process, on this node: waited for before the run's temporaries go
            self.pid_refs.append(handle.pid.remote())  # asked now, answered once it is up; read when needed
        return handle

    def start(self) -> None:
        if not self.local_output:  # once per run
            import ray

            self.nodes = writer_nodes(ray.nodes())
        self.calls = [[] for _ in range(self.count)]
        self.head_since = [None] * self.count
        self.due_at = [None] * self.count
        self.handles = [self._start(i) for i in range(self.count)]  # started while Ray Data starts its actors

    def stop(self, clean: bool = False, at_once: bool = False) -> None:
        """Every writer ended. ``clean`` (the run stops on an error, or a writer died): a local
        output's temporary files of this run's writers are removed once their processes are gone
        (what they staged and the driver did not publish), on S3 their open uploads aborted, so such a
        run leaves nothing behind (but for a writer process still running 30 s after it was killed, or
        one that never said its process id: its temporary files are the next run's start's to remove). ``at_once`` (a second Ctrl-C): the writers are told to end and
        nothing is waited for, nothing cleaned (the next run's start removes what is left). Once only:
        a second call does nothing."""
        import ray

        if self.stopped:
            return
        self.stopped = True
        for h in self.handles:
            if h is not None:
                try:
                    ray.kill(h, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        if at_once:
            return
        if clean and self.local_output:
            pids = []
            for ref in self.pid_refs:
                try:
                    pids.append(ray.get(ref, timeout=10))
                except Exception:  # noqa: BLE001 - it never started, or died before answering
                    pass
            deadline = time.monotonic() + 30
            while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
                time.sleep(0.05)  # a killed writer may be writing a temporary file until its process ends
            from .writers import remove_own_temporaries

            remove_own_temporaries(self.m.output.uri, self.run_id)
        elif clean and self.clean_s3 is not None:
            try:
                self.clean_s3()
            except Exception:  # noqa: BLE001 - the lease lost, the store unreachable: the next run's start
                pass

    def _submit(self, i: int, method: str, *args, seq: int | None = None) -> None:
        if not self.calls[i]:
            self.head_since[i] = time.monotonic()
        self.calls[i].append((getattr(self.handles[i], method).remote(*args), seq))

    def _alive(self) -> list[int]:
        return [i for i, h in enumerate(self.handles) if h is not None]

    def _least_busy(self, room: bool = True) -> int | None:
        best = None
        for i in self._alive():
            if room and len(self.calls[i]) >= WRITER_CALLS:
                continue
            if best is None or len(self.calls[i]) < len(self.calls[best]):
                best = i
        return best

    def _next(self) -> int:
        """The next writer in turn with room (fewer than WRITER_CALLS calls queued), else the least busy."""
        alive = self._alive()
        for k in range(len(self.handles)):
            i = (self.turn + k) % len(self.handles)
            if i in alive and len(self.calls[i]) < WRITER_CALLS:
                self.turn = i + 1
                return i
        return self._least_busy(room=False)

    def route(self, bundle) -> None:
        slices = getattr(bundle, "slices", None) or [None] * len(bundle.blocks)
        for entry, cut in zip(bundle.blocks, slices):
            i = self._next()
            start, end = (cut.start_offset, cut.end_offset) if cut is not None else (None, None)
            size = cut.num_rows if cut is not None else (entry.metadata.num_rows or 0)
            seq = self.ledger.add(entry.ref, i, start, end, size)
            self._submit(i, "add_block", seq, entry.ref, start, end, 0, seq=seq)

    def collect(self, timeout: float) -> None:
        """Handles the answers that are in (waiting up to ``timeout`` for the first), each writer's in
        order; then a writer whose oldest call has waited ``hang_s`` is treated as dead."""
        import ray

        heads = [c[0][0] for c in self.calls if c]
        if heads:
            ray.wait(heads, num_returns=1, timeout=timeout)
        progressed = True
        while progressed:
            progressed = False
            heads = [c[0][0] for c in self.calls if c]
            if not heads:
                break
            ready, _ = ray.wait(heads, num_returns=len(heads), timeout=0)
            ready = set(ready)
            for i in self._alive():
                if self.calls[i] and self.calls[i][0][0] in ready:
                    future, seq = self.calls[i].pop(0)
                    self.head_since[i] = time.monotonic() if self.calls[i] else None
                    self._answer(i, future, seq)
                    progressed = True
        now = time.monotonic()
        for i in self._alive():
            if self.calls[i] and self.head_since[i] is not None and now - self.head_since[i] > self.hang_s:
                self.hung += 1
                self._died(i, f"writer {i} did not answer for {self.hang_s:g} s")

    def _answer(self, i: int, future, seq: int | None) -> None:
        import ray
        from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

        try:
            answer = ray.get(future)
        except RayActorError:
            self._died(i, f"writer {i} died")
            return
        except ObjectLostError as e:
            if getattr(e, "object_ref_hex", None) == future.hex():  # the answer lost, not the block: its node gone
                self._died(i, f"writer {i}'s answer was lost ({type(e).__name__})")
                return
            raise BlockLost(self._lost(i, seq, e)) from None
        except RayTaskError as e:  # the writer raised (storage refused a put): the run stops with its error
            cause = getattr(e, "cause", None)
            if isinstance(cause, ObjectLostError):
                raise BlockLost(self._lost(i, seq, cause)) from None
            raise (cause or e) from None
        self.ledger.answered(answer)
        if answer["staged"]:
            self.deaths_in_a_row = 0  # files published: the run goes on
        self.due_at[i] = None if answer["due_in"] is None else time.monotonic() + answer["due_in"]

    @staticmethod
    def _lost(i: int, seq: int | None, e: Exception) -> str:
        what = f"output block {seq} (rows segmented, not yet written)" if seq is not None else "an output block"
        return (f"{what} was lost from Ray's object store before writer {i} wrote it ({type(e).__name__}: a node "
                "left the cluster?): the run stops; the files published are kept, and running the same command "
                "again resumes and processes its images")

    def _died(self, i: int, why: str) -> None:
        """Writer ``i`` is gone (or hung, or its answer lost: then ended here): what it staged and had not
        answered is never published (the run's end removes it, else the next run's start); a new writer
        takes its place, and every block it held that is not wholly published is sent again, without
        the rows already published. A block held by a writer that died BLOCK_DEATHS times stops the run
        (writers.BlockDeaths)."""
        import ray

        self.died += 1
        self.deaths_in_a_row += 1
        try:
            ray.kill(self.handles[i], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.calls[i] = []
        self.head_since[i] = None
        self.due_at[i] = None
        if self.deaths_in_a_row > self.max_deaths:
            self.handles[i] = None
            raise WritersLost(f"the writer actors died {self.deaths_in_a_row} times in a row with no file published "
                              f"in between (last: {why}): the run stops (the files published are kept; run the "
                              "same command to resume)")
        self.handles[i] = self._start(i)
        for seq, ref, start, end, skip in self.ledger.resend(i, lambda seq: self._least_busy(room=False)):
            self._submit(self.ledger.blocks[seq].writer, "add_block", seq, ref, start, end, skip, seq=seq)

    def _polls(self) -> None:
        now = time.monotonic()
        for i in self._alive():
            if self.due_at[i] is not None and now >= self.due_at[i] and not self.calls[i]:
                self.due_at[i] = None
                self._submit(i, "poll")

    def interrupted(self) -> bool:
        """Whether a Ctrl-C has stopped the current :meth:`run` from taking blocks."""
        return self._sigint is not None and self._sigint.is_set()

    def has_room(self) -> bool:
        return self._least_busy() is not None

    def drain(self) -> None:
        """Every writer stages what it holds and every file is published; again after a writer died
        meanwhile (its blocks went to another), until every block sent is published. A writer that died
        while it had no call, or hangs, is found here too (its flush fails, or does not answer)."""
        while True:
            died = self.died
            for i in self._alive():
                self._submit(i, "flush")
            while any(self.calls):
                self.collect(0.5)
                self.watch()
                self.tick()
            if not self.ledger.blocks:
                return
            if self.died == died:
                raise RuntimeError(f"{len(self.ledger.blocks)} output blocks were not written after every writer "
                                   "flushed (a bug)")

    def run(self, ds, keep: bool = False) -> None:
        """Routes the dataset's output blocks to the writers (produced in a thread of their own, so
        that answers and due files never wait for the next block) and publishes what they stage. The
        first Ctrl-C (SIGINT) stops taking blocks: the blocks that had reached the driver are routed,
        every writer stages what it holds, the driver publishes it, and Interrupted is raised; a
        second Ctrl-C stops at once (KeyboardInterrupt: the writers are told to end, nothing waited for
        or cleaned up; the next run's start removes what they staged). A publish is never cut in half
        by the first. ``keep``: the writers are not stopped when it ends well (every file published),
        for the next :meth:`run`."""
        import queue
        import signal
        import threading

        inbox: queue.Queue = queue.Queue(maxsize=4)
        stop = self._sigint = threading.Event()

        def produce():
            try:
                bundles, _, _ = ds._execute_to_iterator()  # iter_internal_ref_bundles, the executor kept on ds
                for bundle in bundles:
                    inbox.put(bundle)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                inbox.put(e)
            inbox.put(_END)

        def on_sigint(signum, frame):
            stop.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the second one stops at once

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, on_sigint) if main else None
        if not self.handles:
            self.start()
        threading.Thread(target=produce, name="fastsam-batch-blocks", daemon=True).start()
        failed = at_once = False
        try:
            while not stop.is_set():
                self.collect(0)
                self._polls()
                self.watch()
                self.tick()
                if not self.has_room():
                    self.collect(0.2)
                    continue
                try:
                    item = inbox.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                self.route(item)
            if stop.is_set():
                while True:  # the blocks that had already reached the driver are done work: keep them
                    try:
                        item = inbox.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _END and not isinstance(item, BaseException):
                        self.route(item)
            self.drain()
        except KeyboardInterrupt:
            at_once = True
            raise
        except BaseException:
            failed = True
            raise
        finally:
            if main and not stop.is_set():
                signal.signal(signal.SIGINT, previous)
            if failed or at_once or stop.is_set() or not keep:
                self.stop(clean=failed or self.died > 0, at_once=at_once)
        if stop.is_set():
            raise Interrupted()
