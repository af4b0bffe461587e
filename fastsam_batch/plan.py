"""Plan stage: the work units of an input (see :mod:`.inputs`) kept in parts as they come.

The planned units go, in parts of ``runtime.plan_part_rows``, to Parquet files under
``<output>/_plan/`` (see :class:`PlanParts`), which the Ray workers read: the driver holds one part
at a time, however long the listing.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterable, Iterator

from .retry import with_retries
from .storage import Storage, join_uri, protocol_of, strip_protocol

PLAN_DIR = "_plan"
PLAN_FIELDS = ("image_id", "uri", "size", "etag", "kind", "extra", "prompts", "source_version", "done")
_DEFAULTS = {"size": 0, "kind": "object"}


def chunked(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for it in items:
        chunk.append(it)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class PlanParts:
    """The planned items of a run, written in parts as they come.

    The first part stays in memory; when a second one comes, every part goes to a Parquet file
    under ``<output>/_plan/<run id>/`` instead (the workers read them; the driver keeps only their
    names). So a small job writes no plan file, and a job of any size holds one part on the driver.
    """

    def __init__(self, output_uri: str, storage: Storage, part_rows: int):
        self.output_uri = output_uri
        self.storage = storage
        self.part_rows = part_rows
        self.folder = join_uri(output_uri, f"{PLAN_DIR}/{uuid.uuid4().hex[:12]}")
        self.in_memory: list[dict] = []
        self.files: list[str] = []
        self.count = 0

    def add(self, items: list[dict]) -> None:
        for part in chunked(items, self.part_rows):
            self.count += len(part)
            if not self.files and not self.in_memory:
                self.in_memory = part
                continue
            if self.in_memory:
                self._write(self.in_memory)
                self.in_memory = []
            self._write(part)

    def add_table(self, table) -> None:
        """As :meth:`add`, the items as an Arrow table (columns of :data:`PLAN_FIELDS`; those
        missing take their defaults): the same parts, cut from the table without a dict per item
        (the one part kept in memory excepted)."""
        for a in range(0, table.num_rows, self.part_rows):
            part = table.slice(a, self.part_rows)
            self.count += part.num_rows
            if not self.files and not self.in_memory:
                self.in_memory = part.to_pylist()
                continue
            if self.in_memory:
                self._write(self.in_memory)
                self.in_memory = []
            self._write_table(part)

    def _write(self, part: list[dict]) -> None:
        import pyarrow as pa

        self._write_table(pa.table({k: [it.get(k, _DEFAULTS.get(k, "")) for it in part] for k in PLAN_FIELDS}))

    def _write_table(self, part) -> None:
        import pyarrow.parquet as pq

        from .write import put_atomic

        table = plan_table(part)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        uri = join_uri(self.folder, f"part-{len(self.files):06d}.parquet")
        put_atomic(self.storage, uri, buf.getvalue())
        self.files.append(uri)

    def remove(self) -> None:
        """Deletes this run's plan files (at the end of the run)."""
        if self.files:
            remove_plan_files(self.output_uri, self.storage, self.folder)
            if protocol_of(self.output_uri) == "file":  # no empty folder left behind (S3 has none)
                try:
                    os.rmdir(strip_protocol(join_uri(self.output_uri, PLAN_DIR)))
                except OSError:
                    pass


def plan_table(part):
    """``part``'s columns of :data:`PLAN_FIELDS`, in that order, those missing filled with their
    defaults (as :meth:`PlanParts._write` fills an item's missing keys)."""
    import pyarrow as pa

    n = part.num_rows
    cols = {}
    for k in PLAN_FIELDS:
        if k in part.column_names:
            cols[k] = part.column(k)
        elif k == "size":
            cols[k] = pa.array([0] * n, pa.int64())
        else:
            cols[k] = pa.array([_DEFAULTS.get(k, "")] * n, pa.string())
    return pa.table(cols)


class PlanCount:
    """In place of :class:`PlanParts` for a dry run: the planned items counted, nothing written."""

    def __init__(self):
        self.count = 0
        self.files: list[str] = []
        self.in_memory: list[dict] = []

    def add(self, items: list[dict]) -> None:
        self.count += len(items)

    def add_table(self, table) -> None:
        self.count += table.num_rows

    def remove(self) -> None:
        pass


def read_plan_part(uri: str, storage: Storage) -> list[dict]:
    import pyarrow.parquet as pq

    data, _ = with_retries(lambda: storage.read_bytes(uri))
    return pq.read_table(io.BytesIO(data)).to_pylist()


def remove_plan_files(output_uri: str, storage: Storage, folder: str | None = None) -> None:
    """Deletes ``folder`` (default: every run's plan files, left by runs that were cut short)."""
    target = folder or join_uri(output_uri, PLAN_DIR)
    fs = storage.fs(target)
    path = strip_protocol(target)
    try:
        fs.invalidate_cache(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
