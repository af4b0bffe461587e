"""What the user sees in the terminal: Ray's own noise kept out of it unless ``--debug``.

A successful run used to print Ray's token-auth notice, Ray Data's INFO lines and its advice to
enable progress bars (which a CLI user cannot follow), and an ERROR-level line from Ray's C++ core
about actor constructor arguments (https://github.com/ray-project/ray/issues/53727: Ray Data
always passes them through the object store; harmless here), and at exit, now and then, the GCS's
line about an actor it could not kill (its worker had already exited). Python loggers are set
quiet; the C++ lines are written straight to file descriptor 2, so stderr passes through a line
filter, kept until Ray has shut down.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import select
import struct
import sys
import termios
import threading
import time

# Lines of Ray's that say nothing a user of this tool can act on.
RAY_NOISE = re.compile(
    r"has constructor arguments in the object store and max_restarts"
    r"|Token authentication is enabled for this Ray cluster"
    r"|Progress bars (for operators )?disabled\. To enable"
    # At shutdown the GCS may try to kill an actor whose worker has already exited.
    r"|gcs_actor_scheduler\.cc.*Failed to kill actor .*Socket closed"
)
# The raylet's own lines relayed to the driver (colour-coded): after a Ctrl-C they are about the
# workers the stop ended, so they are kept out then; before it they may matter (a worker killed for
# memory) and pass.
RAYLET_LINE = re.compile(r"^(\x1b\[[0-9;]*m)*\(raylet(, ip=[^)]*)?\)")
_interrupted = threading.Event()
# Ray Data's advice for a plan with fewer blocks than the actor pool's minimum (a small job): nothing to act on.
RAY_WARNINGS = ("The minimum number of concurrent actors for",)
QUIET_LOGGERS = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "ray.data": logging.WARNING,
    "ray.data._internal.progress": logging.ERROR,
}


def quiet_ray_loggers() -> None:
    import warnings

    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for text in RAY_WARNINGS:
        warnings.filterwarnings("ignore", message=text)


def shutdown_ray(ray) -> None:
    """``ray.shutdown()`` at exit; a Ctrl-C (or Ray's own error) while it runs ends it quietly: the
    run has already said how it ended, and what it did is committed."""
    try:
        ray.shutdown()
    except (KeyboardInterrupt, Exception):  # noqa: BLE001
        pass


def silence_ray(debug: bool = False) -> None:
    """After a Ctrl-C: the stream cut off mid-way, Ray's workers and Ray Data log warnings (with
    tracebacks) while Ray shuts down; nothing in them is the user's (shown with ``debug``)."""
    if not debug:
        _interrupted.set()
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


class StderrFilter:
    """File descriptor 2 through a pipe; a thread copies every line but those matching ``pattern``
    to the real stderr. :meth:`close` restores fd 2 once everything written has been copied."""

    def __init__(self, pattern: re.Pattern = RAY_NOISE):
        self.pattern = pattern
        sys.stderr.flush()
        self.real = os.dup(2)
        self.read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.busy = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._copy, name="fastsam-batch-stderr", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        rest = b""
        while not self.closed:
            ready, _, _ = select.select([self.read_end], [], [], 0.1)
            if not ready:
                continue
            with self.busy:
                data = os.read(self.read_end, 65536)
                if not data:
                    return
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                out = b"".join(line + b"\n" for line in lines if not self.noise(line.decode("utf-8", "replace")))
                if out:
                    os.write(self.real, out)
        if rest:
            os.write(self.real, rest)

    def noise(self, line: str) -> bool:
        return bool(self.pattern.search(line) or (_interrupted.is_set() and RAYLET_LINE.search(line)))

    def _unread(self) -> int:
        buf = fcntl.ioctl(self.read_end, termios.FIONREAD, struct.pack("i", 0))
        return struct.unpack("i", buf)[0]

    def close(self) -> None:
        sys.stderr.flush()
        os.dup2(self.real, 2)  # this process now writes to the real stderr again
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # until the thread has copied what was written before
            with self.busy:
                if self._unread() == 0:
                    break
            time.sleep(0.01)
        self.closed = True
