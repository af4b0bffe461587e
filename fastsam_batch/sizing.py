"""How many segmentation actors a run starts, and what each reserves: plain functions of the
manifest's runtime section and the cluster's resources, so that the defaults can be tested
without Ray. The defaults come from benchmarks/RESULTS.md (see "Defaults" there)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Cluster:
    cpus: float
    gpus: float
    memory_bytes: int
    embedded: bool  # an embedded local Ray started by this run (the machine's own resources)


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


def plan_actors(runtime, device: str, cluster: Cluster) -> ActorPlan:
    """Segmentation actors for a run. ``runtime`` is the manifest's runtime section.

    - Set in the manifest (``runtime.num_actors``): that many.
    - With the model on GPUs: one actor per ``gpus_per_actor`` of the cluster's GPUs (one per GPU).
    - On the CPU: one actor per core (each then runs torch with one thread), as many as memory
      holds at 2 GiB each. On 2 cores, 2 actors x 1 thread ran workload 1 1.76x faster than
      1 actor x 2 threads: much of an image's time is single-threaded post-processing, which a
      second actor overlaps with the first one's forward pass. An embedded local Ray gets extra
      logical CPUs for read/decode (see ``embedded_ray_cpus``); on a joined CPU-only cluster the
      actors leave ``decode_cpus`` plus one CPU free for the other stages.

    Read/decode workers (``runtime.decode_workers``, else): on the CPU two per actor (decoding is
    2% of an image's time there); on GPUs every CPU the actors leave, at least two per actor: a
    2250x1500 JPEG takes about 75 ms to decode on one core, so one decoder feeds about 13 images/s,
    far below what a GPU segments.

    Batch size (``runtime.batch_size``, else): 16 on GPUs, 4 on the CPU. On GPUs an actor call takes
    ``GPU_BUCKET_WINDOW`` batches' worth of rows and cuts them, by letterboxed shape, into forward
    passes of at most the batch size (segment.SegmentActor), so mixed aspects still fill them.

    Batches in an actor at once: on GPUs two, so that the host part of one batch (mask rules,
    prompts, RLE) runs while the device works on the next (the device part holds a lock; see
    ``segment.SegmentActor``); on the CPU one, where both parts compete for the same core.
    """
    gpus = runtime.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if uses_cuda(device, cluster.gpus) else 0.0
    if runtime.num_actors:
        actors, why = runtime.num_actors, "runtime.num_actors"
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
    in_flight = runtime.in_flight_mb or actors * (1024 if gpus else CPU_IN_FLIGHT_MB)
    if runtime.decode_workers:
        decoders = runtime.decode_workers
    elif gpus > 0:
        free = cluster.cpus - actors * runtime.cpus_per_actor - OTHER_CPUS
        decoders = max(2 * actors, int(free // runtime.decode_cpus))
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


def local_machine(device: str) -> Cluster:
    """This machine's resources, for a run that starts its own local Ray."""
    gpus = 0
    if device != "cpu":
        import torch

        gpus = torch.cuda.device_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Cluster(cpus=float(os.cpu_count() or 1), gpus=float(gpus), memory_bytes=memory, embedded=True)


def joined_cluster(resources: dict) -> Cluster:
    """A running Ray cluster's resources (``ray.cluster_resources()``)."""
    return Cluster(cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)),
                   memory_bytes=int(resources.get("memory", 0)), embedded=False)
