"""How many segmentation actors a run starts (sizing.py): the defaults, without Ray."""

from __future__ import annotations

from fastsam_batch.manifest import RuntimeConfig
from fastsam_batch.sizing import CPU_ACTOR_BYTES, Cluster, embedded_ray_cpus, joined_cluster, plan_actors

GIB = 2**30
# total_memory as torch reports it (bytes) for GPUs of these sizes
H100_80GB = 85_029_158_912  # 79.2 GiB
A100_40GB = 42_505_273_344  # 39.6 GiB
L4_24GB = 23_580_639_232  # 22.0 GiB
T4_16GB = 15_835_660_288  # 14.7 GiB


def machine(cpus, gpus=0, memory=64 * GIB, embedded=True, gpu_memory=0):
    return Cluster(cpus=cpus, gpus=gpus, memory_bytes=memory, embedded=embedded, gpu_memory_bytes=gpu_memory)


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


def test_on_gpus_by_default_several_actors_per_gpu_as_its_memory_holds():
    """runtime.gpus_per_actor unset: at most 4 per GPU, one per 10 GiB of the GPU's memory."""
    # 80 GB: 79.2 GiB holds 7, capped at 4; 64 CPUs: (64 - 1 - 2 x 8) / 8 = 5.9 per GPU, not the limit
    got = plan_actors(RuntimeConfig(), "auto", machine(64, gpus=8, embedded=False, gpu_memory=H100_80GB))
    assert (got.actors, got.gpus_per_actor) == (32, 0.25)
    assert got.why.startswith("4 per GPU of the cluster's 8") and "; 79.2 GiB per GPU, 7 at 10 GiB each;" in got.why
    assert "64 CPUs allow 5 per GPU" in got.why and "runtime.gpus_per_actor: 1" in got.why
    # a 40 GB A100 (39.6 GiB): 3 per GPU, a third of it each
    a100 = plan_actors(RuntimeConfig(), "cuda", machine(64, gpus=8, embedded=False, gpu_memory=A100_40GB))
    assert (a100.actors, a100.gpus_per_actor) == (24, 1 / 3)
    # 24 GB (22 GiB): 2; 16 GB and less: 1, the old default
    assert (plan_actors(RuntimeConfig(), "auto", machine(16, gpus=1, gpu_memory=L4_24GB)).actors,
            plan_actors(RuntimeConfig(), "auto", machine(16, gpus=1, gpu_memory=L4_24GB)).gpus_per_actor) == (2, 0.5)
    t4 = plan_actors(RuntimeConfig(), "auto", machine(16, gpus=2, gpu_memory=T4_16GB))
    assert (t4.actors, t4.gpus_per_actor) == (2, 1.0) and t4.why.startswith("one per GPU of this machine's 2")
    assert plan_actors(RuntimeConfig(), "auto", machine(16, gpus=1, gpu_memory=8 * GIB)).actors == 1
    # device cpu on a GPU machine: the CPU rule
    assert plan_actors(RuntimeConfig(), "cpu", machine(16, gpus=1, gpu_memory=H100_80GB)).gpus_per_actor == 0.0


def test_on_gpus_of_unknown_memory_one_actor_per_gpu():
    """Unknown memory (often a consumer card of 8-16 GB): one per GPU, the old default."""
    got = plan_actors(RuntimeConfig(), "auto", machine(64, gpus=8, embedded=False))
    assert (got.actors, got.gpus_per_actor) == (8, 1.0)
    assert "; GPU memory unknown, 1 assumed;" in got.why


def test_the_cpus_limit_the_actors_per_gpu():
    # 8 GPUs of 80 GB, 32 CPUs: (32 - 1 - 2 x 8 read/decode) / 8 = 1.9: one per GPU
    got = plan_actors(RuntimeConfig(), "auto", machine(32, gpus=8, embedded=False, gpu_memory=H100_80GB))
    assert (got.actors, got.gpus_per_actor) == (8, 1.0)
    assert "32 CPUs allow 1 per GPU" in got.why
    # 40 CPUs: (40 - 1 - 16) / 8 = 2.9: two per GPU
    assert plan_actors(RuntimeConfig(), "auto", machine(40, gpus=8, embedded=False, gpu_memory=H100_80GB)).actors == 16
    # 2 CPUs per actor, one GPU, 8 CPUs: (8 - 1 - 2) / 2 = 2.5: two
    got = plan_actors(RuntimeConfig(cpus_per_actor=2), "auto", machine(8, gpus=1, gpu_memory=H100_80GB))
    assert (got.actors, got.gpus_per_actor) == (2, 0.5)
    # half a CPU per read/decode worker: (8 - 1 - 1) / 2 = 3
    assert plan_actors(RuntimeConfig(cpus_per_actor=2, decode_cpus=0.5), "auto",
                       machine(8, gpus=1, gpu_memory=H100_80GB)).actors == 3
    # fewer CPUs than the GPUs need: still one per GPU
    got = plan_actors(RuntimeConfig(), "auto", machine(4, gpus=4, embedded=False, gpu_memory=H100_80GB))
    assert (got.actors, got.gpus_per_actor) == (4, 1.0) and "at least one" in got.why


def test_gpus_per_actor_set_in_the_manifest_is_kept():
    got = plan_actors(RuntimeConfig(gpus_per_actor=1), "auto", machine(64, gpus=8, embedded=False, gpu_memory=H100_80GB))
    assert (got.actors, got.gpus_per_actor, got.in_flight_mb, got.why) == (8, 1.0, 8 * 1024, "one per 1 GPU of the cluster's 8")
    assert plan_actors(RuntimeConfig(gpus_per_actor=0.5), "cuda", machine(16, gpus=1, gpu_memory=H100_80GB)).actors == 2
    # on a 16 GB GPU too: what is set wins over what its memory would give
    assert plan_actors(RuntimeConfig(gpus_per_actor=0.25), "cuda", machine(16, gpus=1, gpu_memory=T4_16GB)).actors == 4


def test_num_actors_on_gpus_one_gpu_each_or_equal_shares():
    cluster = machine(64, gpus=8, embedded=False, gpu_memory=H100_80GB)
    got = plan_actors(RuntimeConfig(num_actors=8), "auto", cluster)
    assert (got.actors, got.gpus_per_actor, got.why) == (8, 1.0, "runtime.num_actors")
    assert plan_actors(RuntimeConfig(num_actors=2), "auto", cluster).gpus_per_actor == 1.0
    # more actors than GPUs: equal shares of 1/m of a GPU, m = actors / GPUs rounded up, so that all
    # fit; when the actors are not a multiple of the GPUs Ray packs the shares onto fewer GPUs than
    # the cluster's (12 on 8: half a GPU each, 6 GPUs used, 2 idle), and the log says so
    twelve = plan_actors(RuntimeConfig(num_actors=12), "auto", cluster)
    assert twelve.gpus_per_actor == 0.5
    assert "warning: 12 actors at 1/2 GPU each on 8 GPUs: Ray packs them onto 6 GPUs, so 2 may sit idle" in twelve.why
    assert "warning" not in plan_actors(RuntimeConfig(num_actors=16), "auto", cluster).why
    fifteen = plan_actors(RuntimeConfig(num_actors=15), "auto", cluster)  # 8 GPUs used, unevenly
    assert fifteen.gpus_per_actor == 0.5 and "do not divide evenly over 8 GPUs" in fifteen.why
    assert plan_actors(RuntimeConfig(num_actors=3), "auto", machine(16, gpus=1)).gpus_per_actor == 1 / 3
    assert "warning" not in plan_actors(RuntimeConfig(num_actors=3), "auto", machine(16, gpus=1)).why
    assert plan_actors(RuntimeConfig(num_actors=3, gpus_per_actor=1), "auto", machine(16, gpus=1)).gpus_per_actor == 1.0


def test_in_flight_per_gpu_not_per_actor_on_gpus():
    # 4 actors on each of 8 GPUs: 1 GiB per GPU, as with one actor per GPU
    assert plan_actors(RuntimeConfig(), "auto", machine(64, gpus=8, embedded=False, gpu_memory=H100_80GB)).in_flight_mb == 8192
    assert plan_actors(RuntimeConfig(), "auto", machine(16, gpus=1, gpu_memory=H100_80GB)).in_flight_mb == 1024
    assert plan_actors(RuntimeConfig(gpus_per_actor=0.5), "auto", machine(16, gpus=2)).in_flight_mb == 2048
    # 3 actors at half a GPU use 2 GPUs
    assert plan_actors(RuntimeConfig(num_actors=3, gpus_per_actor=0.5), "auto", machine(16, gpus=2)).in_flight_mb == 2048
    assert plan_actors(RuntimeConfig(in_flight_mb=300), "auto", machine(16, gpus=1, gpu_memory=H100_80GB)).in_flight_mb == 300


def test_joined_cluster_gpu_memory_from_the_accelerator_type():
    h100 = joined_cluster({"CPU": 64.0, "GPU": 8.0, "memory": 500 * GIB, "accelerator_type:H100": 1.0})
    assert h100.gpu_memory_bytes == 79 * GIB and h100.gpu_memory_from == "accelerator type H100"
    h100_plan = plan_actors(RuntimeConfig(), "auto", h100)
    assert h100_plan.actors == 32 and "accelerator type H100: 79.0 GiB per GPU, 7 at 10 GiB each" in h100_plan.why
    a10g = joined_cluster({"CPU": 48.0, "GPU": 4.0, "accelerator_type:A10G": 1.0})
    assert plan_actors(RuntimeConfig(), "auto", a10g).actors == 8  # 22 GiB: 2 per GPU
    # the smallest of the cluster's types: T4 (14.5 GiB), one per GPU
    mixed = joined_cluster({"CPU": 64.0, "GPU": 8.0, "accelerator_type:H100": 1.0, "accelerator_type:T4": 1.0})
    assert mixed.gpu_memory_bytes == int(14.5 * GIB) and plan_actors(RuntimeConfig(), "auto", mixed).actors == 8
    # a type not in the table, or none: unknown (one per GPU)
    other = joined_cluster({"CPU": 64.0, "GPU": 8.0, "accelerator_type:GeForce-RTX-4090": 1.0})
    assert other.gpu_memory_bytes == 0 and "GeForce-RTX-4090 not in" in other.gpu_memory_from
    other_plan = plan_actors(RuntimeConfig(), "auto", other)
    assert other_plan.actors == 8 and "not in sizing.GPU_MEMORY_BY_TYPE: GPU memory unknown, 1 assumed" in other_plan.why
    assert joined_cluster({"CPU": 8.0, "GPU": 1.0}).gpu_memory_bytes == 0
    assert joined_cluster({"CPU": 8.0}).gpus == 0.0


def test_local_gpu_memory_is_read_in_a_child_process(monkeypatch):
    """The driver takes no CUDA context: torch's figure comes from a child process (its last line);
    a probe that fails is unknown (0)."""
    import subprocess

    import torch

    from fastsam_batch import sizing

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    calls = []

    def child(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="a warning\n85029158912\n", stderr="")

    monkeypatch.setattr(sizing.subprocess, "run", child)
    assert sizing.local_gpu_memory.__wrapped__() == H100_80GB
    assert calls and calls[0][1] == "-c" and "get_device_properties" in calls[0][2]
    monkeypatch.setattr(sizing.subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 1, "", "boom"))
    assert sizing.local_gpu_memory.__wrapped__() == 0


def test_local_machine_reads_gpu_memory_only_when_the_actors_per_gpu_need_it(monkeypatch):
    """local_machine never starts the memory probe (job.py calls it for the GPU count alone, before
    the lease and in dry runs); plan_actors does, once, only when it picks the actors per GPU."""
    import subprocess

    import torch

    from fastsam_batch import sizing

    probed = []

    def no_probe(*a, **kw):  # local_gpu_memory would swallow the error: recorded too
        probed.append(a)
        raise AssertionError("probed")

    monkeypatch.setattr(sizing.subprocess, "run", no_probe)
    cpu = sizing.local_machine("cpu")
    assert cpu.gpus == 0 and cpu.embedded and cpu.cpus >= 1 and cpu.gpu_memory_probe is None
    assert plan_actors(RuntimeConfig(), "cpu", cpu).gpus_per_actor == 0.0

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(sizing, "local_gpu_memory", sizing.local_gpu_memory.__wrapped__)  # no cache
    monkeypatch.setattr(sizing, "usable_cpus", lambda cpu_max=None: 8)
    gpu = sizing.local_machine("auto")  # no probe yet
    assert gpu.gpus == 1.0 and gpu.gpu_memory_bytes == 0
    assert plan_actors(RuntimeConfig(gpus_per_actor=1), "auto", gpu).actors == 1  # set: no probe either
    assert plan_actors(RuntimeConfig(num_actors=2), "auto", gpu).actors == 2
    assert probed == []
    calls = []

    def child(argv, **kw):
        calls.append(kw.get("timeout"))
        return subprocess.CompletedProcess(argv, 0, stdout=f"{H100_80GB}\n", stderr="")

    monkeypatch.setattr(sizing.subprocess, "run", child)
    # embedded, 8 cores, one 80 GB GPU: by memory 7, by CPUs (8 - 1 - 2) / 1 = 5, at most 4: k = 4
    plan = plan_actors(RuntimeConfig(), "auto", gpu)
    assert calls == [60]  # probed once, with a 60 s timeout
    assert (plan.actors, plan.gpus_per_actor) == (4, 0.25)
    assert "torch: 79.2 GiB per GPU, 7 at 10 GiB each" in plan.why
    # the embedded Ray: max(8 cores, 4 actors + 1 decode + 1 other = 6) = 8 logical CPUs;
    # read/decode: 8 - 4 actors - 1 other = 3 free, at least 2 for the GPU: 3
    assert embedded_ray_cpus(RuntimeConfig(), plan.actors, 8) == 8
    assert plan.decode_workers == 3
    # a probe that fails: unknown, one per GPU
    monkeypatch.setattr(sizing.subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 1, "", "x"))
    failed = plan_actors(RuntimeConfig(), "auto", sizing.local_machine("auto"))
    assert failed.actors == 1 and "torch could not say: GPU memory unknown, 1 assumed" in failed.why


def test_what_the_manifest_sets_wins():
    got = plan_actors(RuntimeConfig(num_actors=3, in_flight_mb=64), "auto", machine(2))
    assert (got.actors, got.in_flight_mb, got.why) == (3, 64, "runtime.num_actors")
    assert embedded_ray_cpus(RuntimeConfig(num_actors=3, decode_cpus=0.5), 3, 2) == 5


def test_read_decode_workers_two_per_actor_on_cpu_and_every_free_cpu_on_gpus():
    assert plan_actors(RuntimeConfig(), "cpu", machine(2)).decode_workers == 4
    # one GPU of 80 GB and 16 cores: 4 actors hold one CPU each, the writer and plan readers one more
    assert plan_actors(RuntimeConfig(), "auto", machine(16, gpus=1, gpu_memory=H100_80GB)).decode_workers == 11
    assert plan_actors(RuntimeConfig(decode_cpus=0.5), "auto", machine(16, gpus=1, gpu_memory=H100_80GB)).decode_workers == 22
    # one actor per GPU (set, or a 16 GB GPU): as before, 16 - 1 - 1
    assert plan_actors(RuntimeConfig(gpus_per_actor=1), "auto", machine(16, gpus=1)).decode_workers == 14
    assert plan_actors(RuntimeConfig(), "auto", machine(16, gpus=1, gpu_memory=T4_16GB)).decode_workers == 14
    # 8 GPUs of 80 GB, 64 CPUs: 32 actors, 64 - 32 - 1 = 31
    assert plan_actors(RuntimeConfig(), "auto", machine(64, gpus=8, embedded=False, gpu_memory=H100_80GB)).decode_workers == 31
    # few CPUs per GPU: still two per GPU (one actor on each here)
    assert plan_actors(RuntimeConfig(), "auto", machine(4, gpus=4, embedded=False)).decode_workers == 8
    # four actors on one GPU and 5 CPUs: 5 - 4 - 1 = 0 free, still two for the GPU
    assert plan_actors(RuntimeConfig(gpus_per_actor=0.25), "auto", machine(5, gpus=1)).decode_workers == 2
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


def test_usable_cpus_follow_the_affinity_and_a_cgroup_v2_quota(tmp_path):
    """A container's CPU limit (cgroup v2 cpu.max: quota and period in microseconds) caps the cores
    counted, rounded down (at least one); ``max`` or no file: no cap; never above the affinity mask."""
    import os

    from fastsam_batch.sizing import cgroup_cpu_limit, usable_cpus

    cpu_max = tmp_path / "cpu.max"
    for text, want in [("400000 100000\n", 4), ("150000 100000", 1), ("50000 100000", 1), ("200000 50000", 4),
                       ("max 100000\n", None), ("", None), ("garbage 100000", None), ("-1 100000", None)]:
        cpu_max.write_text(text)
        assert cgroup_cpu_limit(str(cpu_max)) == want, text
    assert cgroup_cpu_limit(str(tmp_path / "absent")) is None
    mine = len(os.sched_getaffinity(0))
    assert usable_cpus(str(tmp_path / "absent")) == mine
    cpu_max.write_text("100000 100000")
    assert usable_cpus(str(cpu_max)) == 1
    cpu_max.write_text(f"{(mine + 8) * 100000} 100000")  # a quota above the cores: the cores
    assert usable_cpus(str(cpu_max)) == mine
