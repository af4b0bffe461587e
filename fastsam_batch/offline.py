"""Keep ultralytics offline: no online checks, no settings sync, no auto-installs, no downloads.

Call :func:`configure_ultralytics` before the first ``import ultralytics`` in a process (the
driver, every Ray worker and the test process). Ultralytics reads these variables at import.
"""

from __future__ import annotations

import os
import tempfile

OFFLINE_ENV = {
    "YOLO_OFFLINE": "true",  # is_online() returns False: no DNS probes, no hub/GitHub asset fetches
    "YOLO_AUTOINSTALL": "false",  # never pip-install a missing requirement at run time
    "YOLO_VERBOSE": "false",
}


def configure_ultralytics() -> dict[str, str]:
    """Set the environment that keeps ultralytics offline; returns it for Ray's runtime_env."""
    env = dict(OFFLINE_ENV)
    env["YOLO_CONFIG_DIR"] = os.environ.get("YOLO_CONFIG_DIR") or os.path.join(tempfile.gettempdir(), "fastsam-batch-yolo")
    os.makedirs(env["YOLO_CONFIG_DIR"], exist_ok=True)
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in env}
