#!/usr/bin/env bash
# The container image's install step (cluster/Dockerfile runs it; the tests run it in a clean
# virtual environment with FASTSAM_BATCH_INSTALL_DRY_RUN=1, where pip only resolves): the package
# with every dependency pinned by constraints.txt (torch and torchvision as a matching pair, Ray
# at the cluster's version), then a check that the command and its imports work.
#   bash cluster/install.sh [SOURCE_DIR]
set -euo pipefail
src="${1:-/opt/fastsam-batch}"
if [ -n "${FASTSAM_BATCH_INSTALL_DRY_RUN:-}" ]; then
  python -m pip install --no-cache-dir --dry-run --ignore-installed -c "$src/constraints.txt" "$src"
  exit 0
fi
python -m pip install --no-cache-dir -c "$src/constraints.txt" "$src"
fastsam-batch --help >/dev/null
python -c "import fastsam_batch, ray, torch, ultralytics; print('fastsam-batch', fastsam_batch.__version__, '| ray', ray.__version__, '| torch', torch.__version__, '| ultralytics', ultralytics.__version__)"
