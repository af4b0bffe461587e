"""How many segmentation actors a run starts, and what each reserves: plain functions of the
manifest's runtime section and the cluster's resources, so that the defaults can be tested
without Ray. The defaults come from benchmarks/RESULTS.md (see "Defaults" there)."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

# Memory one CPU actor needs: a FastSAM-s model, its activations at imgsz 1024 and the masks of one
# batch of photographs (benchmarks: about 1.2 GiB per actor at its peak), with room to spare.
CPU_ACTOR_BYTES = 2 * 2**30
# Object store a CPU actor's run may fill with decoded images queued ahead of it: six of the
# 2250x1500 photographs, more than a batch of 4 waiting (benchmarks/RESULTS.md: memory).
CPU_IN_FLIGHT_MB = 64
# Images per forward pass (runtime.batch_size) by default: on the CPU 4 (benchmarks/RESULTS.md: 1-8 are
# within noise there); on GPUs 16, the usual choice for FastSAM-s/-x at imgsz 1024 in fp16 (not yet
# measured here: no GPU was lent; benchmarks/gpu.sh times the model alone at batch 8, 16 and 32 on the
# first one, and `bench.py --sweep --device cuda` runs end to end over batch sizes).
CPU_BATCH = 4
GPU_BATCH = 16
# On GPUs an actor takes this many batches' worth of rows at a time and groups them by letterboxed
# shape (bucketing), so that a forward pass is full whatever the photos' aspects.
GPU_BUCKET_WINDOW = 2
# Logical CPUs a run needs besides the actors and read/decode: Ray Data's own, the driver's writer.
OTHER_CPUS = 1.0

# Actors per GPU by default (runtime.gpus_per_actor unset). One actor finishes at most about 100
# images/s whatever its GPU does: its host work (mask rules, prompts, RLE, the sort of the mask
# intervals; about 10 ms an image) runs in its one Python process (benchmarks/RESULTS.md: "one
# actor's host work caps it near 100 images/s", a prediction). Several actors on one GPU run their
# host work in parallel processes, each still with its own device lock. At most GPU_ACTORS_MAX (the
# 300 images/s target needs 3-4 at 100 each), as many as the GPU's memory holds at GPU_ACTOR_BYTES
# each, and as many as the CPUs allow (see actors_per_gpu). Not yet measured on a GPU.
GPU_ACTORS_MAX = 4
# GPU memory one actor may need at its peak, with the defaults (fp32: model.half is off by default;
# batch 16 at imgsz 1024; two batches in the actor at once), estimated for FastSAM-x, the larger model:
#   CUDA context, cuDNN / cuBLAS kernels and workspaces   ~1.0 GiB
#   FastSAM-x weights (72M parameters, fp32)              ~0.3 GiB
#   forward pass, 16 images of 1024x1024 (the widest live tensors: the first C2f's 400 channels
#   at 256x256 with its inputs, ~0.25 GiB an image in fp32; half of it in fp16)   ~4.0 GiB
#   its outputs (predictions, 32 prototype masks at 256x256 per image)             ~0.3 GiB
#   the other batch in flight (16 JPEGs decoded on the device, 2250x1500, and the letterboxed
#   input)                                                                         ~0.5 GiB
#   one mask chunk: at most 1 GiB (masks.py: budget_pixels 2**26 x BYTES_PER_CROP_PIXEL 16)  1.0 GiB
# about 7 GiB, plus ~40% for the caching allocator's fragmentation and a CLIP model (ViT-B/32, ~0.6 GiB)
# with text prompts: 10 GiB. An estimate, not measured (no GPU lent yet). So an 80 GB GPU (79 GiB
# as torch reports it) takes 4, a 40 GB A100 (39.6 GiB) 3, a 24 GB one (22.5 GiB) 2, 16 GB and less 1.
# An actor that still runs out of memory redoes the image in smaller pieces, then on the CPU (README).
GPU_ACTOR_BYTES = 10 * 2**30
# Actors per GPU when the GPUs' memory is unknown (a joined cluster whose accelerator type is not in
# GPU_MEMORY_BY_TYPE, or a machine where torch could not say): 1, the old default. Types missing from
# the table are often consumer cards (Ray's "GeForce-RTX-..." types) of 8-16 GB, which two actors
# at GPU_ACTOR_BYTES each would not fit; runtime.gpus_per_actor (0.5: two per GPU) sets more.
GPU_ACTORS_UNKNOWN_MEMORY = 1
# Read/decode workers a GPU keeps at least, when the CPUs limit the actors per GPU.
DECODERS_PER_GPU = 2
# Object store a GPU's actors may fill with images queued ahead of them (runtime.in_flight_mb), per GPU,
# not per actor: the GPU's rate, which the queue must cover, does not grow with its actors.
GPU_IN_FLIGHT_MB = 1024
# GPU memory by Ray's accelerator type (the "accelerator_type:..." resource Ray gives a node with
# NVIDIA GPUs, from the first GPU's name; ray.util.accelerators), for a joined cluster, whose
# resources do not say the GPUs' memory: the smallest variant of the type, as torch reports it, in GiB.
GPU_MEMORY_BY_TYPE = {
    "B200": 178, "GB200": 184, "H200": 139, "H100": 79, "H20": 95, "A100": 39, "L40S": 44, "L40": 44,
    "RTX-PRO-6000": 94, "A10G": 22, "A10": 22, "L4": 22, "T4": 14.5, "V100": 15.5, "P100": 11.9,
}


@dataclass(frozen=True)
class Cluster:
    cpus: float
    gpus: float
    memory_bytes: int
    embedded: bool  # an embedded local Ray started by this run (the machine's own resources)
    gpu_memory_bytes: int = 0  # per GPU (the smallest GPU's); 0: unknown (or not read yet: gpu_memory_probe)
    gpu_memory_from: str = ""  # where gpu_memory_bytes came from, for the log
    # Reads gpu_memory_bytes when it is needed (this machine's GPUs: local_gpu_memory, a child
    # process), so that callers needing only the counts (job.py's device check) never start one.
    gpu_memory_probe: Callable[[], int] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    gpus_per_actor: float
    in_flight_mb: int
    decode_workers: int  # most read/decode workers the run scales to
    why: str  # how the actor count was chosen, for the log
    embedded: bool  # sized from this machine (an embedded local Ray)
    calls_per_actor: int = 1  # batches an actor works on at once (see plan_actors)
    cluster_gpus: float = 0.0  # GPUs of the machine / cluster it was sized for
    batch_size: int = CPU_BATCH  # images per forward pass
    rows_per_call: int = CPU_BATCH  # rows an actor call takes, grouped by letterboxed shape into forward passes


def uses_cuda(device: str, cluster_gpus: float) -> bool:
    return device.startswith("cuda") or (device == "auto" and cluster_gpus > 0)


def actors_per_gpu(runtime, cluster: Cluster) -> tuple[int, str]:
    """Actors per GPU when ``runtime.gpus_per_actor`` is not set, and why (for the log): the fewest of
    ``GPU_ACTORS_MAX``, what a GPU's memory holds at ``GPU_ACTOR_BYTES`` each (unknown memory:
    ``GPU_ACTORS_UNKNOWN_MEMORY``), and what the CPUs allow: each actor reserves
    ``runtime.cpus_per_actor``, and the cluster's CPUs (the machine's cores for an embedded Ray: its
    extra logical CPUs would not run the actors' host work in parallel) keep ``DECODERS_PER_GPU``
    read/decode workers per GPU and ``OTHER_CPUS`` free; at least one."""
    gpu_memory, source = cluster.gpu_memory_bytes, cluster.gpu_memory_from
    if gpu_memory <= 0 and cluster.gpu_memory_probe is not None:  # read only now, when needed
        gpu_memory = cluster.gpu_memory_probe()
        source = source or ("torch" if gpu_memory > 0 else "torch could not say")
    if gpu_memory > 0:
        by_memory = int(gpu_memory // GPU_ACTOR_BYTES)
        memory = f"{gpu_memory / 2**30:.1f} GiB per GPU, {by_memory} at {GPU_ACTOR_BYTES / 2**30:g} GiB each"
    else:
        by_memory = GPU_ACTORS_UNKNOWN_MEMORY
        memory = f"GPU memory unknown, {GPU_ACTORS_UNKNOWN_MEMORY} assumed"
    if source:
        memory = f"{source}: {memory}"
    gpus = max(cluster.gpus, 1.0)
    spare = cluster.cpus - OTHER_CPUS - DECODERS_PER_GPU * runtime.decode_cpus * gpus
    by_cpu = max(0, math.floor(spare / (gpus * runtime.cpus_per_actor) + 1e-9))
    k = max(1, min(GPU_ACTORS_MAX, by_memory, by_cpu))
    why = (f"at most {GPU_ACTORS_MAX}; {memory}; {cluster.cpus:g} CPUs allow {by_cpu} per GPU after "
           f"{DECODERS_PER_GPU} read/decode workers per GPU and {OTHER_CPUS:g} for the other stages"
           + ("; at least one" if min(by_memory, by_cpu) < 1 else ""))
    return k, why


def plan_actors(runtime, device: str, cluster: Cluster) -> ActorPlan:
    """Segmentation actors for a run. ``runtime`` is the manifest's runtime section.

    - Set in the manifest (``runtime.num_actors``): that many; on GPUs without ``gpus_per_actor``,
      one GPU each when they are no more than the GPUs (as before), else equal shares of a GPU
      (1/m with m = actors / GPUs rounded up, so that they all fit). Ray packs fractional requests
      onto as few GPUs as it can, so when the actors are not a multiple of the GPUs some GPUs may
      sit idle (12 actors on 8 GPUs: half a GPU each, 6 GPUs used, 2 idle): ``why`` warns.
    - With the model on GPUs and ``runtime.gpus_per_actor`` set: one actor per ``gpus_per_actor`` of
      the cluster's GPUs (``1``: one per GPU). Not set: several per GPU (``actors_per_gpu``: up to 4,
      as memory and CPUs allow), each with a 1/k share of its GPU, so that the host work of an image
      (mask rules, prompts, RLE: about 10 ms, in an actor's one Python process) runs in k processes
      per GPU; each actor's device lock still keeps its own device work in order.
    - On the CPU: one actor per core (each then runs torch with one thread), as many as memory
      holds at 2 GiB each. On 2 cores, 2 actors x 1 thread ran workload 1 1.76x faster than
      1 actor x 2 threads: much of an image's time is single-threaded post-processing, which a
      second actor overlaps with the first one's forward pass. An embedded local Ray gets extra
      logical CPUs for read/decode (see ``embedded_ray_cpus``); on a joined CPU-only cluster the
      actors leave ``decode_cpus`` plus one CPU free for the other stages.

    Read/decode workers (``runtime.decode_workers``, else): on the CPU two per actor (decoding is
    2% of an image's time there); on GPUs every CPU the actors leave, at least two per GPU the actors
    use (two per actor with one actor per GPU): a 2250x1500 JPEG takes about 75 ms to decode on one
    core, so one decoder feeds about 13 images/s, far below what a GPU segments.

    Object store in flight (``runtime.in_flight_mb``, else): 64 MiB per actor on the CPU; on GPUs
    ``GPU_IN_FLIGHT_MB`` (1 GiB) per GPU the actors use, whatever the actors per GPU: the queue ahead
    of a GPU covers its rate, shared by its actors. Their calls' rows count in it while they run: with
    4 actors per GPU, 256 rows, about 0.25 GiB of JPEG bytes with ``input.decode: device`` and 0.6 GiB
    of 2250x1500 photos decoded at half size (``reduced``); with ``exact`` decodes of such photos
    (10 MB each, e.g. with CLIP text prompts) fewer calls run at once unless ``in_flight_mb`` is raised.

    Batch size (``runtime.batch_size``, else): 16 on GPUs, 4 on the CPU. On GPUs an actor call takes
    ``GPU_BUCKET_WINDOW`` batches' worth of rows and cuts them, by letterboxed shape, into forward
    passes of at most the batch size (segment.SegmentActor), so mixed aspects still fill them.

    Batches in an actor at once: on GPUs two, so that the host part of one batch (mask rules,
    prompts, RLE) runs while the device works on the next (the device part holds a lock; see
    ``segment.SegmentActor``); on the CPU one, where both parts compete for the same core.
    """
    gpus = runtime.gpus_per_actor
    shared = gpus is None and uses_cuda(device, cluster.gpus)  # actors per GPU chosen here
    if gpus is None:
        gpus = 1.0 if shared else 0.0
    if runtime.num_actors:
        actors, why = runtime.num_actors, "runtime.num_actors"
        if shared and actors > cluster.gpus:  # more actors than GPUs: equal shares, 1/m of a GPU each
            m = math.ceil(actors / max(cluster.gpus, 1.0) - 1e-9)
            gpus = 1.0 / m
            total = int(round(cluster.gpus))
            if total and actors % total:
                idle = total - math.ceil(actors / m)
                why += (f"; warning: {actors} actors at 1/{m} GPU each on {total} GPUs: Ray packs them onto "
                        f"{math.ceil(actors / m)} GPUs, so {idle} may sit idle" if idle > 0 else
                        f"; warning: {actors} actors at 1/{m} GPU each do not divide evenly over {total} GPUs: "
                        f"some GPUs run fewer")
                why += f" (a multiple of {total}, or runtime.gpus_per_actor, shares them evenly)"
    elif shared:
        k, reasons = actors_per_gpu(runtime, cluster)
        gpus = 1.0 / k
        actors = max(1, math.floor(cluster.gpus * k + 1e-9))
        where = "this machine's" if cluster.embedded else "the cluster's"
        why = (f"{'one' if k == 1 else k} per GPU of {where} {cluster.gpus:g}, so that several actors' "
               f"host work runs in parallel ({reasons}); runtime.gpus_per_actor: 1 for one per GPU")
    elif gpus > 0:
        actors = max(1, int(cluster.gpus // gpus))
        why = f"one per {gpus:g} GPU of the cluster's {cluster.gpus:g}"
    else:
        cpus = cluster.cpus if cluster.embedded else cluster.cpus - runtime.decode_cpus - OTHER_CPUS
        by_cpu = int(cpus // max(runtime.cpus_per_actor, 1.0))
        by_memory = int(cluster.memory_bytes // CPU_ACTOR_BYTES)
        actors = max(1, min(by_cpu, by_memory))
        where = (f"one per core, {by_cpu}" if cluster.embedded else
                 f"one per CPU the cluster's {cluster.cpus:g} leave after read/decode and the other stages "
                 f"({runtime.decode_cpus + OTHER_CPUS:g}), {max(by_cpu, 0)}")
        why = (f"on CPU: {where}; at most one per {CPU_ACTOR_BYTES / 2**30:g} GiB of memory, {by_memory}"
               + ("; at least one" if min(by_cpu, by_memory) < 1 else ""))
    # GPUs the actors use (a share of one counts as one)
    gpus_used = max(1, math.ceil(actors * gpus - 1e-6)) if gpus > 0 else 0
    in_flight = runtime.in_flight_mb or (gpus_used * GPU_IN_FLIGHT_MB if gpus > 0 else actors * CPU_IN_FLIGHT_MB)
    if runtime.decode_workers:
        decoders = runtime.decode_workers
    elif gpus > 0:
        free = cluster.cpus - actors * runtime.cpus_per_actor - OTHER_CPUS
        decoders = max(DECODERS_PER_GPU * gpus_used, int(free // runtime.decode_cpus))
    else:
        decoders = 2 * actors
    batch = runtime.batch_size or (GPU_BATCH if gpus > 0 else CPU_BATCH)
    return ActorPlan(actors=actors, gpus_per_actor=gpus, in_flight_mb=in_flight, decode_workers=decoders, why=why,
                     embedded=cluster.embedded, calls_per_actor=2 if gpus > 0 else 1, cluster_gpus=cluster.gpus,
                     batch_size=batch, rows_per_call=batch * (GPU_BUCKET_WINDOW if gpus > 0 else 1))


def embedded_ray_cpus(runtime, actors: int, machine_cpus: int) -> int:
    """Logical CPUs for an embedded local Ray: actors hold theirs for the whole run, so reserve
    logical CPUs for them on top of the machine's, or read/decode tasks could never be scheduled."""
    need = actors * runtime.cpus_per_actor + runtime.decode_cpus
    return int(max(machine_cpus, math.ceil(need + OTHER_CPUS)))


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "<quota> <period>" in microseconds, or "max <period>"


def cgroup_cpu_limit(path: str = CGROUP_CPU_MAX) -> int | None:
    """The CPUs a cgroup v2 quota allows (quota / period, rounded down as Ray does, at least 1), or None
    when no quota is set (``max``) or the file is absent or unreadable (no cgroup v2, not a container)."""
    try:
        with open(path) as f:
            fields = f.read().split()
    except OSError:
        return None
    if not fields or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, quota // period)


def count_from_env(name: str, limit: int, what: str) -> int | None:
    """The integer of environment variable ``name`` (1 to ``limit``), or None when it is not set.
    Raises ValueError, one line naming it and ``what`` it counts, otherwise (preflight calls the
    settings' checks before any work)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= limit:
        raise ValueError(f"${name}={text!r}: not an integer from 1 to {limit} ({what})")
    return n


def usable_cpus(cpu_max: str = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: those it may run on (sched_getaffinity: taskset, cpusets), at
    most what its container's CPU quota allows (cgroup v2 ``cpu.max``: a Kubernetes CPU limit, docker
    --cpus). os.cpu_count() counts the machine's, whatever the container is given."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cpu_max)
    return max(1, min(n, limit) if limit is not None else n)


def local_machine(device: str) -> Cluster:
    """This machine's resources, for a run that starts its own local Ray. The GPUs' memory is not
    read here: only when the actors per GPU need it (``Cluster.gpu_memory_probe``, see
    :func:`actors_per_gpu`), so a device check or a run with ``gpus_per_actor`` set starts no probe."""
    gpus = 0
    if device != "cpu":
        import torch

        gpus = torch.cuda.device_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Cluster(cpus=float(usable_cpus()), gpus=float(gpus), memory_bytes=memory, embedded=True,
                   gpu_memory_probe=local_gpu_memory if gpus else None)


_GPU_MEMORY_PROBE = ("import torch; n = torch.cuda.device_count(); "
                     "print(min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) if n else 0)")


@functools.lru_cache(maxsize=1)
def local_gpu_memory() -> int:
    """The total memory of this machine's smallest visible GPU, in bytes (torch's figure, which
    follows CUDA_VISIBLE_DEVICES and MIG slices); 0 when it cannot be read. Read in a child process
    unless this one has initialised CUDA already: the run's driver holds no CUDA context (hundreds
    of MB of the GPU), and torch initialising CUDA here would make decode.device_decode_supported
    probe in this process, taking one."""
    try:
        import torch

        if torch.cuda.is_initialized():
            return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
        r = subprocess.run([sys.executable, "-c", _GPU_MEMORY_PROBE], capture_output=True, text=True, timeout=60)
        return int(r.stdout.split()[-1]) if r.returncode == 0 and r.stdout.split() else 0
    except Exception:  # noqa: BLE001 - no torch, no CUDA, a probe that failed: unknown
        return 0


def joined_cluster(resources: dict) -> Cluster:
    """A running Ray cluster's resources (``ray.cluster_resources()``). Ray does not report the GPUs'
    memory; it is read from the accelerator types Ray labels GPU nodes with (``GPU_MEMORY_BY_TYPE``,
    the smallest of the cluster's), unknown when a type is not in the table or none is given."""
    types = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    known = [GPU_MEMORY_BY_TYPE[t] for t in types if t in GPU_MEMORY_BY_TYPE]
    gpu_memory = int(min(known) * 2**30) if types and len(known) == len(types) else 0
    unknown = ", ".join(t for t in types if t not in GPU_MEMORY_BY_TYPE)
    source = (f"accelerator type {', '.join(types)}" if gpu_memory else
              f"accelerator type {unknown} not in sizing.GPU_MEMORY_BY_TYPE" if types else
              "Ray reports no accelerator type")
    return Cluster(cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)),
                   memory_bytes=int(resources.get("memory", 0)), embedded=False,
                   gpu_memory_bytes=gpu_memory, gpu_memory_from=source)


WRITERS_PER_GPUS = 4  # output.writers auto: one writer per this many GPUs, plus one
WRITERS_AUTO_MAX = 16


def plan_writers(setting: int | str, cluster_gpus: float, local_output: bool, driver_cpus: int) -> tuple[int, str]:
    """Writer actors (``output.writers``) and why, for the log. ``auto``: one, plus one per
    WRITERS_PER_GPUS GPUs of the cluster, at most WRITERS_AUTO_MAX: a writer encodes and stages about
    8,000 rows/s of 100-mask photos on a core (benchmarks/RESULTS.md), a GPU makes a few hundred, and
    each writer's files are cut by commit_interval_s on its share of the rows, so fewer writers make
    bigger files. A local output's writers run on the driver's node (they share its disk and
    cores), so there at most half its cores."""
    if setting != "auto":
        return int(setting), "output.writers"
    k = min(WRITERS_AUTO_MAX, 1 + int(cluster_gpus // WRITERS_PER_GPUS))
    why = f"auto: 1 + 1 per {WRITERS_PER_GPUS} GPUs" if cluster_gpus else "auto: 1 without GPUs"
    if local_output and k > max(1, driver_cpus // 2):
        k = max(1, driver_cpus // 2)
        why += f"; a local output: at most half the driver node's {driver_cpus} cores"
    return k, why
