"""Run fingerprints and resuming: what is already committed under ``output.uri``.

Every row carries the fingerprint of the run that wrote it: a hash of everything that decides
its masks (checkpoint SHA-256, model settings, prompt rules, decode limits, tool version).
Re-running a job reads only the ``image_id``, ``status`` and ``run_fingerprint`` columns of the
committed Parquet files; images that already have a row are skipped. Rows of another fingerprint mean
another configuration wrote there: that run is refused unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from . import __version__
from .manifest import Manifest
from .schema import error_reason
from .storage import Storage, protocol_of
from .write import PART_PREFIX


def run_fingerprint(m: Manifest, checkpoint_sha256: str, prompt_sources: dict | None = None) -> tuple[str, dict]:
    """(fingerprint, the material it hashes). The device is left out on purpose: cpu and cuda
    runs of the same settings may finish each other's work (fp16 is in, as ``model.half``).
    ``prompt_sources``: SHA-256 of the prompt table / COCO file and of the CLIP folder."""
    material = {
        "tool_version": __version__,
        "checkpoint_sha256": checkpoint_sha256,
        "model": m.model.model_dump(include={"imgsz", "conf", "iou", "max_det", "half"}),
        "prompts": m.prompts.model_dump(exclude={"table", "coco", "clip"}),
        "prompt_sources": prompt_sources or {},
        "mask_rules": m.mask_rules.model_dump(),
        "decode": {"max_pixels": m.input.max_pixels},
    }
    # Like the device, `auto` decoding is left out (a CPU and a GPU run may finish each other's work);
    # a reduced or device decode asked for explicitly is in. Exact decoding keeps the fingerprints it
    # always had.
    if m.input.decode in ("reduced", "device") and not (prompt_sources or {}).get("clip_sha256"):
        material["decode"][m.input.decode] = True
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]
    return digest, material


def id_key(image_id: str) -> bytes:
    """The 16-byte hash an image id is kept as (see :class:`Committed`)."""
    return hashlib.blake2b(image_id.encode(), digest_size=16).digest()


def version_key(version: str | None) -> int:
    """8-byte hash of a source version; 0 for rows written before versions were recorded."""
    if not version:
        return 0
    return int.from_bytes(hashlib.blake2b(version.encode(), digest_size=8).digest(), "little") | 1


def key_bytes(k) -> bytes:
    """An id key as :func:`id_key` made it: numpy's fixed-width bytes drop trailing NULs, put back."""
    return bytes(k).ljust(16, b"\0")


def unit_key(shard: str | None) -> int:
    """8-byte hash of a container's URI (tar shard, Parquet file); 0 for an image of its own."""
    return version_key(shard or "")


def _row_arrays(ids, versions, statuses, part_index, reasons, shards=None) -> tuple[np.ndarray, ...]:
    """Hashed columns of committed rows: id keys, version keys, status ok, file index, error reason
    code, container key."""
    return (np.array([id_key(i) for i in ids], "S16"), np.array([version_key(v or "") for v in versions], np.uint64),
            np.array([s == "ok" for s in statuses], bool), np.broadcast_to(np.asarray(part_index, np.int32), (len(ids),)),
            np.asarray(reasons, np.int16).reshape(len(ids)),
            np.array([unit_key(x) for x in shards] if shards is not None else np.zeros(len(ids)), np.uint64))


@dataclass
class Lookup:
    state: str  # "new" (no row), "fresh" (a row of the object as it is now), "changed" (rows of older versions only)
    ok: bool = False  # the fresh row's status is ok
    superseded: list[str] = field(default_factory=list)  # files holding rows of older versions, when fresh
    reason: str | None = None  # the fresh row's error reason (read_failed, ...) when it is an error row
    parts: list[str] = field(default_factory=list)  # every file holding a row of the image


@dataclass
class Committed:
    """The committed rows under ``output.uri``, compactly: about 30 bytes a row on the driver (a
    16-byte hash of the image id, an 8-byte hash of its source version, status, file index), sorted
    by id hash, so that resuming a run of ten million images holds about 300 MB, not the ids."""

    parts: list[str] = field(default_factory=list)
    rows: int = 0
    fingerprints: dict[str, int] = field(default_factory=dict)  # fingerprint -> rows
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, "S16"))
    versions: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    ok: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    part_of: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    reason_of: np.ndarray = field(default_factory=lambda: np.empty(0, np.int16))  # index in reasons; -1: ok
    reasons: list[str] = field(default_factory=list)  # the error reasons present
    units: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # container key (unit_key); 0: none
    _by_unit: np.ndarray | None = None  # row indices sorted by container key, made when first needed

    def reason_code(self, error: str | None, ok: bool) -> int:
        if ok:
            return -1
        reason = error_reason(error) or "error"
        if reason not in self.reasons:
            self.reasons.append(reason)
        return self.reasons.index(reason)

    def errors_by_reason(self) -> dict[str, int]:
        """Rows by error reason (every row: several versions of an image count each)."""
        codes, counts = np.unique(self.reason_of[self.reason_of >= 0], return_counts=True)
        return {self.reasons[c]: int(n) for c, n in sorted(zip(codes.tolist(), counts.tolist()),
                                                            key=lambda x: self.reasons[x[0]])}

    @classmethod
    def from_rows(cls, rows: list[tuple], fingerprints: dict[str, int] | None = None) -> "Committed":
        """From (image_id, source_version, status, part[, error[, shard]]) tuples."""
        parts = sorted({r[3] for r in rows})
        index = {p: i for i, p in enumerate(parts)}
        c = cls(parts=parts, fingerprints=dict(fingerprints or {}))
        if rows:
            ids, versions, statuses, in_parts = zip(*(r[:4] for r in rows))
            codes = [c.reason_code(r[4] if len(r) > 4 else None, r[2] == "ok") for r in rows]
            shards = [r[5] if len(r) > 5 else None for r in rows]
            c._index([_row_arrays(ids, versions, statuses, [index[p] for p in in_parts], codes, shards)])
        return c

    def _index(self, chunks: list[tuple[np.ndarray, ...]]) -> None:
        """Sets the row arrays from per-file (keys, versions, ok, part, reason) arrays, sorted once by id hash."""
        if not chunks:
            return
        keys, versions, ok, part_of, reason_of, units = (np.concatenate(col) for col in zip(*chunks))
        order = np.argsort(keys, kind="stable")
        self.keys, self.versions, self.ok, self.part_of = keys[order], versions[order], ok[order], part_of[order]
        self.reason_of, self.units = reason_of[order], units[order]
        self.rows = len(self.keys)

    @property
    def images(self) -> int:
        """Distinct image ids with a row."""
        if not len(self.keys):
            return 0
        return int(1 + np.count_nonzero(self.keys[1:] != self.keys[:-1]))

    def unit_rows(self, shard: str, version: str) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the rows of images read from the container ``shard``: (those of ``version``,
        those of other versions)."""
        if not len(self.keys):
            return np.empty(0, np.int64), np.empty(0, np.int64)
        if self._by_unit is None:
            self._by_unit = np.argsort(self.units, kind="stable")
        want = np.uint64(unit_key(shard))
        sorted_units = self.units[self._by_unit]
        lo, hi = np.searchsorted(sorted_units, want, "left"), np.searchsorted(sorted_units, want, "right")
        rows = self._by_unit[lo:hi]
        same = self.versions[rows] == np.uint64(version_key(version))
        return rows[same], rows[~same]

    def lookup(self, image_ids: list[str], versions: list[str]) -> list[Lookup]:
        """For each image (and the version of its object now): whether it has a row to keep, and
        which files hold rows of older versions of it that a current row replaces."""
        if not len(self.keys):
            return [Lookup("new") for _ in image_ids]
        q = np.array([id_key(i) for i in image_ids], "S16")
        lo = np.searchsorted(self.keys, q, "left")
        hi = np.searchsorted(self.keys, q, "right")
        out = []
        for j, v in enumerate(versions):
            if lo[j] == hi[j]:
                out.append(Lookup("new"))
                continue
            want = version_key(v)
            rows = range(lo[j], hi[j])
            fresh = [r for r in rows if self.versions[r] in (want, 0)]
            if not fresh:
                out.append(Lookup("changed"))
                continue
            old = sorted({self.parts[self.part_of[r]] for r in rows if self.versions[r] not in (want, 0)})
            code = int(self.reason_of[fresh[-1]])
            out.append(Lookup("fresh", bool(self.ok[fresh[-1]]), old, self.reasons[code] if code >= 0 else None,
                              sorted({self.parts[self.part_of[r]] for r in rows})))
        return out


def rows_outside(committed: Committed, image_ids: set[str], keep: set[str]) -> dict[str, set[str]]:
    """part -> those of ``image_ids`` with a row there, for every file not named in ``keep`` (the
    files this run wrote), counting only images that do have a row in one of ``keep``: the old rows
    of retried images whose new rows are committed."""
    c = committed
    ids = sorted(image_ids)
    out: dict[str, set[str]] = {}
    if not ids or not len(c.keys):
        return out
    q = np.array([id_key(i) for i in ids], "S16")
    lo, hi = np.searchsorted(c.keys, q, "left"), np.searchsorted(c.keys, q, "right")
    for image_id, a, b in zip(ids, lo.tolist(), hi.tolist()):
        parts = {c.parts[c.part_of[r]] for r in range(a, b)}
        if not any(p.rsplit("/", 1)[-1] in keep for p in parts):
            continue
        for part in parts:
            if part.rsplit("/", 1)[-1] not in keep:
                out.setdefault(part, set()).add(image_id)
    return out


def superseded_parts(committed: Committed, current: dict[str, str]) -> dict[str, dict[str, str]]:
    """part -> {image id: its version now} of the images with rows there made from an older version
    of the object while a row from the current version (``current``: image id -> version) is
    committed too."""
    out: dict[str, dict[str, str]] = {}
    ids = list(current)
    for image_id, found in zip(ids, committed.lookup(ids, [current[i] for i in ids])):
        for part in found.superseded:
            out.setdefault(part, {})[image_id] = current[image_id]
    return out


def source_version(item: dict) -> str:
    """What identifies the content of a planned object: its ETag (S3) or modification time (local), and size."""
    return f"{item.get('etag', '')}/{item.get('size', 0)}"


def _names_starting(output_uri: str, storage: Storage, prefix: str) -> list[str]:
    """Paths of the files directly under ``output_uri`` whose names start with ``prefix``."""
    fs = storage.fs(output_uri)
    fs.invalidate_cache(output_uri)  # s3fs caches listings: the writers have added files since
    try:
        names = fs.ls(output_uri, detail=False)
    except FileNotFoundError:
        return []
    return sorted(p for p in names if p.rsplit("/", 1)[-1].startswith(prefix))


def list_parts(output_uri: str, storage: Storage) -> list[str]:
    return _names_starting(output_uri, storage, PART_PREFIX)


def local_paths(output_uri: str, paths: list[str]) -> list[str]:
    """Paths as the filesystem of ``output_uri`` takes them (local: without ``file://``)."""
    return paths if protocol_of(output_uri) != "file" else [p.split("://", 1)[-1] for p in paths]


def read_committed(output_uri: str, storage: Storage) -> Committed:
    """Image ids, statuses, fingerprints and source versions of the committed rows (a few columns
    read, one file at a time, kept as hashes: see :class:`Committed`)."""
    import pyarrow.dataset as pads

    c = Committed(parts=list_parts(output_uri, storage))
    fs = storage.fs(output_uri)
    chunks = []
    for index, part in enumerate(local_paths(output_uri, c.parts)):
        t = pads.dataset(part, format="parquet", filesystem=fs)
        cols = ["image_id", "run_fingerprint", "status", "error"] + [x for x in ("source_version", "shard")
                                                                      if x in t.schema.names]
        table = t.to_table(columns=cols)
        ids = table.column("image_id").to_pylist()
        versions = table.column("source_version").to_pylist() if "source_version" in cols else [""] * len(ids)
        for fp in table.column("run_fingerprint").to_pylist():
            c.fingerprints[fp] = c.fingerprints.get(fp, 0) + 1
        statuses = table.column("status").to_pylist()
        codes = [c.reason_code(e, s == "ok") for e, s in zip(table.column("error").to_pylist(), statuses)]
        shards = table.column("shard").to_pylist() if "shard" in cols else None
        chunks.append(_row_arrays(ids, versions, statuses, index, codes, shards))
    c._index(chunks)  # one sort, not one per file
    c.parts = local_paths(output_uri, c.parts)
    return c


@dataclass
class Duplicates:
    """Rows to drop so that each image has one row per source version (see :func:`duplicate_rows`),
    as (id key, version key) pairs: ``drop``: part -> the pairs whose every row in that file goes;
    ``keep_one``: part -> pairs with several rows in that one file (the kept file), of which one
    stays (an ok one, else the first)."""

    drop: dict[str, set[tuple[bytes, int]]] = field(default_factory=dict)
    keep_one: dict[str, set[tuple[bytes, int]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.drop or self.keep_one)


def duplicate_rows(committed: Committed, prefer: set[str] | frozenset = frozenset()) -> Duplicates:
    """Of rows of the same image and version (in several files, or twice in one file), which to drop
    so that one stays: the row in a file named in ``prefer`` (the files this run wrote) is kept, else
    an ok one (a retried error row's replacement), else the first. Such duplicates come from two runs
    writing at once (a run whose lease was taken over, its last commit in flight; see lease.py), a
    rewrite cut short between its put and its delete, or a member a container's reader gave twice."""
    c = committed
    out = Duplicates()
    if c.rows < 2:
        return out
    order = np.lexsort((c.part_of, c.versions, c.keys))
    keys, versions, parts, ok = c.keys[order], c.versions[order], c.part_of[order], c.ok[order]
    same = (keys[1:] == keys[:-1]) & (versions[1:] == versions[:-1])
    if not same.any():
        return out
    starts = np.flatnonzero(np.concatenate(([True], ~same)))
    ends = np.concatenate((starts[1:], [len(keys)]))
    for a, b in zip(starts.tolist(), ends.tolist()):
        if b - a < 2:
            continue
        group, good = parts[a:b].tolist(), ok[a:b].tolist()
        keeper = next((p for p in group if c.parts[p].rsplit("/", 1)[-1] in prefer),
                      next((p for p, g in zip(group, good) if g), group[0]))
        key = (key_bytes(keys[a]), int(versions[a]))
        for p in set(group):
            if p != keeper:
                out.drop.setdefault(c.parts[p], set()).add(key)
        if group.count(keeper) > 1:
            out.keep_one.setdefault(c.parts[keeper], set()).add(key)
    return out


UNITS_DIR = "_units"  # records of completed containers: _units/<hash>.json


def write_units_record(output_uri: str, storage: Storage, fingerprint: str, units: list[tuple[str, str, int]],
                       fence) -> str:
    """Records containers (shard URI, version, rows given) whose every row is committed: a resumed
    run skips them without reading them again. Written after the commit that completed them, only
    while ``fence`` (lease.LeaseFence) passes; its name is a hash of its content. Returns its URI."""
    import json as _json

    from .storage import join_uri
    from .write import put_atomic

    body = _json.dumps({"run_fingerprint": fingerprint,
                        "units": [{"uri": u, "source_version": v, "rows": n} for u, v, n in sorted(units)]})
    name = hashlib.sha256(body.encode()).hexdigest()[:20]
    uri = join_uri(output_uri, UNITS_DIR, f"{name}.json")
    fence.check(storage)
    put_atomic(storage, uri, body.encode())
    return uri


def read_units_records(output_uri: str, storage: Storage) -> tuple[dict[str, dict[tuple[str, str], int]], list[str]]:
    """(shard URI -> {(version, fingerprint): rows} of its complete versions, the record files)."""
    from .storage import join_uri

    folder = join_uri(output_uri, UNITS_DIR)
    fs = storage.fs(folder)
    fs.invalidate_cache(folder)
    try:
        files = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return {}, []
    complete: dict[str, dict[tuple[str, str], int]] = {}
    for f in files:
        with fs.open(f, "rb") as fh:
            record = json.loads(fh.read())
        for u in record["units"]:
            complete.setdefault(u["uri"], {})[(u["source_version"], record["run_fingerprint"])] = u["rows"]
    return complete, files


def stale_unit_rows(committed: Committed, current: dict[str, str]) -> dict[str, set[bytes]]:
    """part -> id keys of rows read from an older version of a container (``current``: shard URI ->
    its version now) whose current version is complete: members changed or gone."""
    out: dict[str, set[bytes]] = {}
    for shard, version in current.items():
        _, old = committed.unit_rows(shard, version)
        for r in old.tolist():
            out.setdefault(committed.parts[committed.part_of[r]], set()).add(key_bytes(committed.keys[r]))
    return out


def rows_in_other_files(committed: Committed, keys: set[bytes], written: set[str]) -> dict[str, set[bytes]]:
    """part -> those of the id ``keys`` with a row there, for every file not named in ``written``."""
    out: dict[str, set[bytes]] = {}
    if not keys or not len(committed.keys):
        return out
    q = np.array(sorted(keys), "S16")
    lo, hi = np.searchsorted(committed.keys, q, "left"), np.searchsorted(committed.keys, q, "right")
    for k, a, b in zip(q.tolist(), lo.tolist(), hi.tolist()):
        for r in range(a, b):
            part = committed.parts[committed.part_of[r]]
            if part.rsplit("/", 1)[-1] not in written:
                out.setdefault(part, set()).add(key_bytes(k))
    return out
