#!/usr/bin/env bash
# The GPU measurement of issue 11, as ONE call on the lent GPU machine (see README "Benchmark"):
#
#   bash ../shared/device/bundle.sh 10          # here: packs ray, ultralytics, ... and 10 photos into .device/
#   device run, carry [".device"], timeout 480:
#     source .device/setup.sh && bash benchmarks/gpu.sh
#
# FastSAM-s and FastSAM-x architectures (realistic random-weight load, conf 0.4, imgsz 1024, fp16,
# batch 16) on the carried photos repeated to 160 images: the model alone (and alone at batch 8, 16
# and 32: a short sweep), the plain ultralytics loop, `fastsam-batch run` end to end (GPU
# utilisation, ms per stage, agreement with the loop); the decode agreement (reduced, device and
# exact decodes against the reference, trained fixture model: generated JPEGs and the carried
# photos); then host and GPU memory at 160 and 1,600 images (the default: several actors per GPU,
# sizing.actors_per_gpu), and the 1,600 images of FastSAM-x once more with one actor per GPU
# (`gpus_per_actor: 1`, the old default; `end_to_end_one_actor_per_gpu` in gpu-report.json, about
# 45 s more). Writes results under $OUT (the device tool's output folder) or benchmarks/out/;
# gpu-report.json after each architecture and each memory run.
#
# First (about a minute) the CUDA-only tests, tests/test_cuda.py (benchmarks/cuda_checks.py: pytest
# when installed, else each test called directly): the GPU path's no-sync steps under
# torch.cuda.set_sync_debug_mode("error"), its mask intervals against the CPU path's, pinned
# uploads, the device decode's waits, nvJPEG's differences from Pillow (recorded) and its masks
# against the reference. Their outcomes and measurements are in cuda-checks.json either way, the
# benchmark still runs after a failure, and the script's exit status is theirs. Then the writers'
# scaling on the machine's CPU cores (below).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
checks=0
python3 benchmarks/cuda_checks.py "$out" 2>&1 | tee "$out/cuda-checks.log" || checks=$?
python3 benchmarks/bench.py --gpu-report --device cuda --half --photos "${PHOTOS:-160}" --batch-size "${BATCH:-16}" \
  --baseline-photos "${BASELINE_PHOTOS:-40}" --photo-dir "${DEVICE_PHOTOS:-../shared/real-images}" \
  --out "$out/gpu-report.json" 2>&1 | tee "$out/gpu-report.log"
# Last (about 2-3 minutes; no GPU): the writers with 1, 2, 4 and 8 actors on this machine's cores
# (issue 23: writer throughput linear in writers up to the cores; the 2-core CPU machine shows only
# one to two), 36,000 realistic rows to local disk, benchmarks/writers.py. Cut off after 200 s
# (what it printed is kept; the machine is given back after); its outcome does not change the exit status.
timeout 200 python3 benchmarks/writers.py --rows 36000 --pool 600 --writers 1 2 4 8 \
  --out "$out/writers-gpu-machine.json" 2>&1 | tee "$out/writers.log" || true
exit $checks
