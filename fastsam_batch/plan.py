"""Plan stage: list the inputs under ``input.uri`` into work items with stable ids, streaming.

``image_id`` is the object's key relative to the listed folder/prefix (or to the part of a glob
before its first wildcard), so the same input always gets the same id, on any machine.

Listing streams: S3 prefixes are read one ``ListObjectsV2`` page (1,000 keys) at a time, local
folders one directory at a time, so a prefix of millions of keys is never held whole. Other
fsspec protocols fall back to ``fs.find`` (one list in memory). The planned items then go, in
parts of ``runtime.plan_part_rows``, to Parquet files under ``<output>/_plan/`` (see
:class:`PlanParts`), which the Ray workers read: the driver holds one part at a time.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .decode import looks_like_image
from .retry import with_retries
from .storage import Storage, join_uri, protocol_of, strip_protocol, to_uri

GLOB_CHARS = set("*?[")
PLAN_DIR = "_plan"
PLAN_FIELDS = ("image_id", "uri", "size", "etag", "prompts", "source_version")


@dataclass
class Plan:
    """A listing held whole (small inputs, tests): items and the keys skipped as not images."""

    items: list[dict] = field(default_factory=list)  # image_id, uri, size, etag
    skipped: list[str] = field(default_factory=list)


@dataclass
class Skipped:
    """Keys skipped as not images, by extension: a count and the first few, never the whole list."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    limit: int | None = 5  # None: keep every skipped key

    def add(self, rel: str) -> None:
        self.count += 1
        if self.limit is None or len(self.examples) < self.limit:
            self.examples.append(rel)


def glob_base(path: str) -> str:
    """The folder part of a glob before its first wildcard component (what ids are relative to)."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if GLOB_CHARS & set(part):
            return "/".join(parts[:i])
    return posixpath.dirname(path)


def _iter_s3(fs, prefix: str) -> Iterator[tuple[str, dict]]:
    """(bucket/key, info) for every object under ``bucket/prefix``, one ListObjectsV2 page at a time."""
    bucket, _, key_prefix = prefix.partition("/")
    kwargs = {"Bucket": bucket, "Prefix": key_prefix}
    while True:
        page, _ = with_retries(lambda: fs.call_s3("list_objects_v2", **kwargs))
        for obj in page.get("Contents", ()):
            if not obj["Key"].endswith("/"):  # "folder" marker objects
                yield f"{bucket}/{obj['Key']}", {"size": obj.get("Size", 0), "ETag": obj.get("ETag", "")}
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _iter_local(root: str) -> Iterator[tuple[str, dict]]:
    """(path, info) for every file under ``root``, one directory at a time, in name order."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        files = []
        for e in entries:
            if e.is_dir(follow_symlinks=False):  # no cycles through linked folders
                stack.append(e.path)
            elif e.is_file():
                files.append(e)
        for e in reversed(files):
            st = e.stat()
            yield e.path, {"size": st.st_size, "mtime": st.st_mtime}


def _iter_tree(fs, protocol: str, root: str) -> Iterator[tuple[str, dict]]:
    if protocol == "file":
        return _iter_local(root)
    if protocol in ("s3", "s3a") and hasattr(fs, "call_s3"):
        return _iter_s3(fs, root.rstrip("/") + "/")
    return iter(sorted(fs.find(root, detail=True).items()))  # other protocols: one list, as fsspec gives it


def iter_objects(uri: str, storage: Storage) -> tuple[str, Iterator[tuple[str, dict]]]:
    """(base the ids are relative to, iterator of (path, info)) for a folder, prefix, glob or file.
    Raises FileNotFoundError, naming the uri, when there is nothing there at all."""
    protocol = protocol_of(uri)
    fs = storage.fs(uri)
    path = strip_protocol(uri)
    if protocol == "file":
        path = path if path.startswith("/") else posixpath.abspath(path)
    if GLOB_CHARS & set(path):
        from fsspec.utils import glob_translate

        base = glob_base(path)
        pattern = re.compile(glob_translate(path))
        found = ((p, info) for p, info in _iter_tree(fs, protocol, base) if pattern.match(p))
    elif not path.endswith("/") and fs.isfile(path):
        base = posixpath.dirname(path)
        found = iter([(path, fs.info(path))])
    else:
        base = path.rstrip("/")
        if protocol == "file" and not os.path.isdir(base):
            raise FileNotFoundError(f"input.uri {uri!r}: no such file, folder or prefix")
        found = _iter_tree(fs, protocol, base)
    return base, _nonempty(found, uri)


def _nonempty(found: Iterator, uri: str) -> Iterator:
    first = next(found, None)
    if first is None:
        raise FileNotFoundError(f"input.uri {uri!r}: no such file, folder or prefix (nothing is listed there)")
    yield first
    yield from found


def iter_inputs(uri: str, storage: Storage, skipped: Skipped, skip_non_images: bool = True) -> Iterator[dict]:
    """The planned items ({image_id, uri, size, etag}), streaming; non-image keys go to ``skipped``.
    The first ``next()`` raises FileNotFoundError when nothing is listed."""
    protocol = protocol_of(uri)
    base, found = iter_objects(uri, storage)
    for p, info in found:
        rel = posixpath.relpath(p, base) if base else p
        if rel.startswith("../") or rel == ".":
            rel = p
        if skip_non_images and not looks_like_image(rel):
            skipped.add(rel)
            continue
        # What changes when the object does: S3's ETag; for local files the modification time.
        etag = info.get("ETag") or info.get("etag") or (f"mtime:{info['mtime']}" if info.get("mtime") else "")
        yield {"image_id": rel, "uri": to_uri(protocol, p), "size": int(info.get("size") or 0),
               "etag": str(etag).strip('"')}


def list_inputs(uri: str, storage: Storage, skip_non_images: bool = True) -> Plan:
    """The whole listing in memory (for small inputs and tests; the job streams, see :func:`iter_inputs`)."""
    skipped = Skipped(limit=None)
    items = list(iter_inputs(uri, storage, skipped, skip_non_images))
    return Plan(items=items, skipped=skipped.examples)


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

    def _write(self, part: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .write import put_atomic

        table = pa.table({k: [it.get(k, "" if k != "size" else 0) for it in part] for k in PLAN_FIELDS})
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


class PlanCount:
    """In place of :class:`PlanParts` for a dry run: the planned items counted, nothing written."""

    def __init__(self):
        self.count = 0
        self.files: list[str] = []
        self.in_memory: list[dict] = []

    def add(self, items: list[dict]) -> None:
        self.count += len(items)

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
