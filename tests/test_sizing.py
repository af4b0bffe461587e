"""How many segmentation actors a run starts (sizing.py): the defaults, without Ray."""

from __future__ import annotations

from fastsam_batch.manifest import RuntimeConfig
from fastsam_batch.sizing import CPU_ACTOR_BYTES, Cluster, embedded_ray_cpus, plan_actors

GIB = 2**30


def machine(cpus, gpus=0, memory=64 * GIB, embedded=True):
    return Cluster(cpus=cpus, gpus=gpus, memory_bytes=memory, embedded=embedded)


def test_on_cpu_one_actor_per_core_with_room_for_decode_on_the_embedded_ray():
    rt = RuntimeConfig()
    got = plan_actors(rt, "auto", machine(2))
    assert (got.actors, got.gpus_per_actor, got.in_flight_mb) == (2, 0.0, 128)
    # Each actor holds a logical CPU for the run: read/decode (1) and the writer still get theirs.
    assert embedded_ray_cpus(rt, got.actors, 2) == 4
    assert plan_actors(rt, "cpu", machine(16)).actors == 16


def test_on_cpu_memory_bounds_the_actor_count():
    assert plan_actors(RuntimeConfig(), "cpu", machine(16, memory=5 * CPU_ACTOR_BYTES)).actors == 5
    assert plan_actors(RuntimeConfig(), "cpu", machine(16, memory=CPU_ACTOR_BYTES // 2)).actors == 1


def test_on_a_joined_cpu_cluster_the_actors_leave_cpus_for_the_other_stages():
    rt = RuntimeConfig(decode_cpus=1)
    assert plan_actors(rt, "auto", machine(8, embedded=False)).actors == 6
    assert plan_actors(rt, "auto", machine(2, embedded=False)).actors == 1
    assert plan_actors(RuntimeConfig(cpus_per_actor=2), "cpu", machine(10, embedded=False)).actors == 4


def test_on_gpus_one_actor_per_gpu_or_per_share():
    got = plan_actors(RuntimeConfig(), "auto", machine(64, gpus=8, embedded=False))
    assert (got.actors, got.gpus_per_actor, got.in_flight_mb) == (8, 1.0, 8 * 1024)
    assert plan_actors(RuntimeConfig(gpus_per_actor=0.5), "cuda", machine(16, gpus=1)).actors == 2
    # device cpu on a GPU machine: the CPU rule
    assert plan_actors(RuntimeConfig(), "cpu", machine(16, gpus=1)).gpus_per_actor == 0.0


def test_what_the_manifest_sets_wins():
    got = plan_actors(RuntimeConfig(num_actors=3, in_flight_mb=64), "auto", machine(2))
    assert (got.actors, got.in_flight_mb, got.why) == (3, 64, "runtime.num_actors")
    assert embedded_ray_cpus(RuntimeConfig(num_actors=3, decode_cpus=0.5), 3, 2) == 5


def test_read_decode_workers_two_per_actor_on_cpu_and_every_free_cpu_on_gpus():
    assert plan_actors(RuntimeConfig(), "cpu", machine(2)).decode_workers == 4
    # one GPU and 16 cores: the actor holds one CPU, the writer and plan readers one more
    assert plan_actors(RuntimeConfig(), "auto", machine(16, gpus=1)).decode_workers == 14
    assert plan_actors(RuntimeConfig(decode_cpus=0.5), "auto", machine(16, gpus=1)).decode_workers == 28
    # few CPUs per GPU: still two per actor
    assert plan_actors(RuntimeConfig(), "auto", machine(4, gpus=4, embedded=False)).decode_workers == 8
    assert plan_actors(RuntimeConfig(decode_workers=3), "auto", machine(16, gpus=1)).decode_workers == 3


def test_two_batches_at_once_per_gpu_actor_one_on_cpu():
    """On GPUs the host part of a batch overlaps the device part of the next (two calls per actor);
    on the CPU both parts would compete for the same core."""
    assert plan_actors(RuntimeConfig(), "auto", machine(16, gpus=2)).calls_per_actor == 2
    assert plan_actors(RuntimeConfig(), "auto", machine(16)).calls_per_actor == 1
    assert plan_actors(RuntimeConfig(), "cpu", machine(16, gpus=2)).calls_per_actor == 1


def test_batch_size_16_on_gpus_4_on_the_cpu_and_rows_bucketed_on_gpus():
    """runtime.batch_size by default: 16 images per forward on GPUs, where an actor call takes two
    batches' worth of rows and groups them by letterboxed shape; 4 on the CPU, one batch per call."""
    gpus = Cluster(cpus=16, gpus=2, memory_bytes=64 * 2**30, embedded=False)
    gpu = plan_actors(RuntimeConfig(), "auto", gpus)
    assert (gpu.batch_size, gpu.rows_per_call) == (16, 32)
    cpu = plan_actors(RuntimeConfig(), "cpu", Cluster(cpus=4, gpus=0, memory_bytes=16 * 2**30, embedded=True))
    assert (cpu.batch_size, cpu.rows_per_call) == (4, 4)
    set_ = plan_actors(RuntimeConfig(batch_size=8), "auto", gpus)
    assert (set_.batch_size, set_.rows_per_call) == (8, 16)
