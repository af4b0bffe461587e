#!/usr/bin/env bash
# The container image's install step, and the only one: cluster/Dockerfile runs it, and
# tests/test_install.py replays the Dockerfile's COPY lines and runs it for real into a fresh virtual
# environment. It installs the package (built from SOURCE_DIR, not editable) with every dependency
# pinned by constraints.txt (torch and torchvision as a matching pair, Ray at the cluster's version),
# then checks that the command answers and that every module of the package imports: a module left
# out of the wheel fails the image's build, not its first job.
#   bash cluster/install.sh [SOURCE_DIR]
set -euo pipefail
src="${1:-/opt/fastsam-batch}"
python -m pip install --no-cache-dir -c "$src/constraints.txt" "$src"
cd /  # nothing of SOURCE_DIR on the path: what imports below is what was installed
fastsam-batch --help >/dev/null
python -I -c "
import importlib, pkgutil
import fastsam_batch, ray, torch, ultralytics
for m in pkgutil.walk_packages(fastsam_batch.__path__, 'fastsam_batch.'):
    importlib.import_module(m.name)
print('fastsam-batch', fastsam_batch.__version__, '| ray', ray.__version__, '| torch', torch.__version__, '| ultralytics', ultralytics.__version__)
"
