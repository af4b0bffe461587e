"""Write stage: output rows -> Parquet files under ``output.uri``, each visible only when complete.

File names are content-addressed (a hash of the image ids they hold), so a retried write of the
same rows replaces the same file instead of adding a duplicate. A file is built in memory and
then put in one operation: on S3 a single PUT / completed multipart upload (never a partial
object), locally a temporary file renamed into place. Metadata files start with ``_``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from .retry import with_retries
from .schema import error_reason
from .storage import Storage, join_uri, protocol_of, strip_protocol

PART_PREFIX = "part-"


def part_name(image_ids: list[str]) -> str:
    h = hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()[:20]
    return f"{PART_PREFIX}{h}.parquet"


def put_atomic(storage: Storage, uri: str, data: bytes) -> None:
    fs = storage.fs(uri)
    if protocol_of(uri) == "file":
        path = strip_protocol(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f"_tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        # One PUT: the object is complete or absent. Retried on transient errors (same bytes, same key).
        with_retries(lambda: fs.pipe_file(uri, data))


class DriverGone(RuntimeError):
    """The run's driver has died: its workers must not commit anything more."""


class DriverWatch:
    """Whether the process that started an embedded Ray (the run's driver, on this host) still lives.

    An embedded Ray outlives a killed driver for a moment (its raylet and workers notice the loss
    and exit), long enough for a writer to commit a few more files that the next run, already
    planning, would not see. The writer asks before every commit. The process is identified by pid
    and start time, so a recycled pid is not taken for the driver."""

    def __init__(self, pid: int):
        self.pid = pid
        self.started = _process_start(pid)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            pass
        return _process_start(self.pid) == self.started

    def check(self) -> None:
        if not self.alive():
            raise DriverGone(f"the run's driver (pid {self.pid}) is gone: nothing more is committed")


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where /proc is absent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class ParquetWriter:
    """Ray Data callable: a pyarrow batch of output rows -> one Parquet file + a one-row stats table.
    Before each commit it checks ``driver`` (with an embedded Ray: the driver still lives, see
    DriverWatch) and ``fence`` (the run still holds the output's lease, see lease.py)."""

    def __init__(self, output_uri: str, storage: Storage, compression: str = "zstd", driver: DriverWatch | None = None,
                 fence=None):
        self.output_uri = output_uri
        self.storage = storage
        self.compression = None if compression == "none" else compression
        self.driver = driver
        self.fence = fence  # lease.LeaseFence: commit only while the run holds the output's lease

    def __call__(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return stats_table([])
        t0 = time.perf_counter()
        ids = table.column("image_id").to_pylist()
        name = part_name(ids)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=self.compression)
        if self.driver is not None:
            self.driver.check()
        if self.fence is not None:
            self.fence.check(self.storage)
        put_atomic(self.storage, join_uri(self.output_uri, name), buf.getvalue())
        write_s = time.perf_counter() - t0
        statuses = table.column("status").to_pylist()
        prompts = table.column("prompts").to_pylist()
        retries = [r or 0 for r in table.column("read_retries").to_pylist()]
        reasons = Counter(error_reason(e) for e, s in zip(table.column("error").to_pylist(), statuses) if s != "ok")
        return stats_table(
            [
                {
                    "file": name,
                    "rows": table.num_rows,
                    "ok": sum(s == "ok" for s in statuses),
                    "errors": json.dumps(dict(reasons)),
                    "masks": int(sum(table.column("num_masks").to_pylist())),
                    "retried": sum(1 for r in retries if r),
                    "retries": sum(retries),
                    "prompts": sum(len(ps) for ps in prompts),
                    "prompt_errors": json.dumps(dict(Counter(
                        error_reason(p["error"]) for ps in prompts for p in ps if p["error"] is not None))),
                    "write_s": write_s,
                }
            ]
        )


STATS_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("rows", pa.int64()),
        ("ok", pa.int64()),
        ("errors", pa.string()),
        ("masks", pa.int64()),
        ("retried", pa.int64()),
        ("retries", pa.int64()),
        ("prompts", pa.int64()),
        ("prompt_errors", pa.string()),
        ("write_s", pa.float64()),
    ]
)


def stats_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=STATS_SCHEMA)
