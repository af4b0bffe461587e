"""Write stage: output rows -> Parquet files under ``output.uri``, each visible only when complete.

:class:`Committer` is the cutting: it commits a file when the rows waiting make about
``output.target_file_mb`` (never above it), or when the oldest row waiting has waited
``output.commit_interval_s`` seconds, or every ``output.rows_per_file`` rows when that is set,
whichever comes first. In a run it works inside each writer actor (writers.BlockWriter), where a
"commit" stages the file (not visible) and the driver publishes it behind the lease fence
(writers.py); :class:`ParquetWriter` (encode, fence, put) is the same cutting's writer in one
process, for tools and tests. So a kill or Ctrl-C loses the rows waiting (none older than
``commit_interval_s``: each block keeps its arrival time, also after a cut by size) plus the few
blocks on their way to a writer and the files being staged; a killed driver publishes nothing more.
Files reach ``target_file_mb`` only when that many bytes of output reach one writer within
``commit_interval_s``; below that rate the interval cuts them.

File names are content-addressed (a hash of the image ids they hold), so a retried write of the
same rows replaces the same file instead of adding a duplicate. Metadata files start with ``_``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from .retry import with_retries
from .schema import INTERNAL_COLUMNS, UNIT_END, UNIT_SKIPPED, error_reason
from .storage import Storage, join_uri, protocol_of, strip_protocol

PART_PREFIX = "part-"
# Row groups of at most this many bytes in memory (Arrow): readers that load a row group at a time
# (the Hugging Face Hub's dataset viewer refuses groups above 286 MiB and recommends 100-300 MB;
# pyarrow's default is a million rows, one group per file) stay within it. A photo's row is tens of
# KB, so a file of the default output.target_file_mb (128 MiB of Parquet, about 1.5-3x that in
# Arrow with zstd) is one to a few groups; a file cut by the interval is usually one.
ROW_GROUP_BYTES = 128 << 20


def rows_that_fit(table: pa.Table, start: int, max_bytes: float) -> int:
    """How many rows of ``table`` from ``start`` on fit in ``max_bytes`` of Arrow memory, measured
    on the rows themselves; at least 1 (a single row larger than ``max_bytes`` goes alone)."""
    n = table.num_rows
    fits, step = 1, 1  # 1 row always goes; grow while the slice fits, then bisect
    while start + fits < n and table.slice(start, min(fits + step, n - start)).nbytes <= max_bytes:
        fits = min(fits + step, n - start)
        step *= 2
    lo, hi = fits, min(fits + step, n - start)  # fits rows fit; hi rows do not (or hi is the end)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if table.slice(start, mid).nbytes <= max_bytes:
            lo = mid
        else:
            hi = mid
    if hi == n - start and table.slice(start, hi).nbytes <= max_bytes:
        lo = hi
    return lo


def row_group_slices(table: pa.Table, row_group_bytes: int) -> list[tuple[int, int]]:
    """(offset, rows) of consecutive slices of ``table``, each as many rows as fit in
    ``row_group_bytes`` of Arrow memory, measured on the rows themselves (so large rows clustered
    together make smaller groups, not one above the cap); a single row larger than the cap is a
    group of its own."""
    out, start, n = [], 0, table.num_rows
    while start < n:
        rows = rows_that_fit(table, start, row_group_bytes)
        out.append((start, rows))
        start += rows
    return out


def parquet_file_bytes(table: pa.Table, compression: str | None, row_group_bytes: int | None = None) -> bytes:
    """``table`` as Parquet bytes, in row groups of at most ``row_group_bytes`` (default
    :data:`ROW_GROUP_BYTES`) of Arrow memory each (:func:`row_group_slices`), with a page index
    (random access without reading whole groups)."""
    cap = ROW_GROUP_BYTES if row_group_bytes is None else row_group_bytes
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, compression=compression, write_page_index=True) as w:
        for start, rows in row_group_slices(table, cap):
            w.write_table(table.slice(start, rows), row_group_size=rows)
    # getvalue() copies (for a moment the file's bytes twice): S3's put (botocore) takes bytes or a
    # file, not a memoryview or an Arrow buffer, so the copy stays.
    return buf.getvalue()


def part_name(image_ids: list[str], rewrite_of: str | None = None) -> str:
    """A committed file's name: a hash of the image ids it holds, so a retried write of the same
    rows replaces the same file. A rewrite (repair.drop_rows) also hashes the name of the file it
    rewrites: its kept rows may be exactly the ids of another file, which it must never replace."""
    text = "\n".join(sorted(image_ids))
    if rewrite_of is not None:
        text += "\n\0rewrite of " + rewrite_of.rstrip("/").rsplit("/", 1)[-1]
    h = hashlib.sha256(text.encode()).hexdigest()[:20]
    return f"{PART_PREFIX}{h}.parquet"


def write_synced(path: str, data: bytes, tmp_name: str) -> str:
    """``data`` written to ``tmp_name`` in ``path``'s folder (made if absent), flushed and fsync'd:
    that file's path, for the caller to rename over ``path`` (or leave staged)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), tmp_name)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def put_atomic(storage: Storage, uri: str, data: bytes) -> None:
    fs = storage.fs(uri)
    if protocol_of(uri) == "file":
        path = strip_protocol(uri)
        os.replace(write_synced(path, data, f"_tmp-{uuid.uuid4().hex}"), path)
    else:
        # One PUT: the object is complete or absent. Retried on transient errors (same bytes, same key).
        with_retries(lambda: fs.pipe_file(uri, data))


class Encoder:
    """What :class:`Committer` measures files with (its writer's ``encode``)."""

    def __init__(self, compression: str = "zstd"):
        self.compression = None if compression == "none" else compression
        # Time spent in encode() since the last commit, added to that commit's write_s: it includes
        # encodes the Committer threw away (a file measured too big or too small and built again), so
        # write_s is the writer's time for the file, not one encode and one put.
        self.encode_s = 0.0

    def encode(self, table: pa.Table) -> bytes:
        """The bytes of the file ``table`` makes (what the Committer measures to size files)."""
        t0 = time.perf_counter()
        try:
            return parquet_file_bytes(table, self.compression)
        finally:
            self.encode_s += time.perf_counter() - t0


class ParquetWriter(Encoder):
    """A pyarrow table of output rows -> one Parquet file + a one-row stats table. Before each
    commit it checks ``fence`` (the run still holds the output's lease, see lease.py)."""

    def __init__(self, output_uri: str, storage: Storage, compression: str = "zstd", fence=None, metrics=None):
        super().__init__(compression)
        self.output_uri = output_uri
        self.storage = storage
        self.fence = fence  # lease.LeaseFence: commit only while the run holds the output's lease
        self.metrics = metrics  # metrics.CommitMetrics: counts of what is committed

    def __call__(self, table: pa.Table, data: bytes | None = None) -> pa.Table:
        """Commits ``table`` as one file; ``data``: its bytes, when :meth:`encode` made them already."""
        if table.num_rows == 0:
            return stats_table([])
        t0 = time.perf_counter()
        ids = table.column("image_id").to_pylist()
        name = part_name(ids)
        if data is None:
            data = parquet_file_bytes(table, self.compression)
        if self.fence is not None:
            self.fence.check(self.storage)
        put_atomic(self.storage, join_uri(self.output_uri, name), data)
        write_s = time.perf_counter() - t0 + self.encode_s
        self.encode_s = 0.0
        if self.metrics is not None:
            self.metrics.committed(table)
        return stats_table([file_stats(table, name, write_s)])


def file_stats(table: pa.Table, name: str, write_s: float) -> dict:
    """The stats row of a file of ``table``'s rows (see :data:`STATS_SCHEMA`)."""
    statuses = table.column("status").to_pylist()
    prompts = table.column("prompts").to_pylist()
    retries = [r or 0 for r in table.column("read_retries").to_pylist()]
    reasons = Counter(error_reason(e) for e, s in zip(table.column("error").to_pylist(), statuses) if s != "ok")
    return {
        "file": name,
        "rows": table.num_rows,
        "ok": sum(s == "ok" for s in statuses),
        "errors": json.dumps(dict(reasons)),
        "masks": int(sum(table.column("num_masks").to_pylist())),
        "duplicates": int(sum(d or 0 for d in table.column("num_duplicates").to_pylist()))
        if "num_duplicates" in table.column_names else 0,
        "retried": sum(1 for r in retries if r),
        "retries": sum(retries),
        "prompts": sum(len(ps) for ps in prompts),
        "prompt_errors": json.dumps(dict(Counter(
            error_reason(p["error"]) for ps in prompts for p in ps if p["error"] is not None))),
        "write_s": write_s,
    }


def split_unit_ends(table: pa.Table) -> tuple[pa.Table, list[tuple[str, str, int, int]]]:
    """A block's rows without its end-of-unit rows (containers: never written) and without the
    internal columns; and those rows as (shard, version, rows it gave, members skipped)."""
    if UNIT_END not in table.column_names:
        return table, []
    import pyarrow.compute as pc

    ends = pc.greater_equal(table[UNIT_END], 0)
    found = []
    if pc.any(ends).as_py():
        for r in table.filter(ends).select(["shard", "source_version", UNIT_END, UNIT_SKIPPED]).to_pylist():
            found.append((r["shard"], r["source_version"] or "", int(r[UNIT_END]), int(r[UNIT_SKIPPED])))
        table = table.filter(pc.invert(ends))
    return table.drop_columns(list(INTERNAL_COLUMNS)), found


STATS_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("rows", pa.int64()),
        ("ok", pa.int64()),
        ("errors", pa.string()),
        ("masks", pa.int64()),
        ("duplicates", pa.int64()),  # masks dropped as duplicates (mask_rules.max_overlap)
        ("retried", pa.int64()),
        ("retries", pa.int64()),
        ("prompts", pa.int64()),
        ("prompt_errors", pa.string()),
        ("write_s", pa.float64()),
    ]
)


def stats_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=STATS_SCHEMA)


class Interrupted(Exception):
    """The run was interrupted (Ctrl-C): what had reached the writer is committed."""

# Sizing files by bytes (Committer, ``output.target_file_mb``). The Parquet size of waiting rows is
# estimated from their Arrow size times the ratio (file bytes / Arrow bytes) measured on this run's
# files. The first guess is FIRST_RATIO (Arrow bytes = file bytes: compressed Parquet is smaller, so
# the first cut is at most a file), and it stays in the measured sums as a prior of one target's
# weight, decaying like any measurement; files of rows below MEASURED_LOW of the target in Arrow
# memory (cut by the interval: often one small block, compressing far better or worse than most) do
# not move the ratio (a cut by size always does: its rows are at least target x FILE_AIM / RATIO_MAX);
# and the ratio is kept within [RATIO_MIN, RATIO_MAX]. Every file is measured before it is put (its bytes are built once and
# reused): one above the target is cut shorter, so no file exceeds the target (bar a single row
# larger than it, which is a file of its own).
FIRST_RATIO = 1.0
FILE_AIM = 0.95  # cut files at this share of the target by the estimate: a small misestimate still fits
FILE_LOW = 0.75  # a measured file below this share of the target is grown (once) by the new estimate
RATIO_DECAY = 0.5  # weight of the earlier measurements at each new one (sums of bytes: big files count most)
MEASURED_LOW = 0.25  # files of fewer Arrow bytes than this share of the target do not move the ratio
RATIO_MIN, RATIO_MAX = 0.05, 2.0
# Driver memory, whatever the data: a cut is forced once the waiting rows hold more than
# MAX_PENDING_FACTOR x target_file_bytes of Arrow memory (a realistic file of masks with zstd is
# about 1.5-3x its Parquet bytes in Arrow, so this rarely cuts; rows that compress better still get
# files below the target). So the waiting rows are at most that plus the one block just added; while
# a file is cut the driver also holds its encoded bytes (at most the target, twice for a moment: see
# parquet_file_bytes). The file's rows are zero-copy slices of the waiting blocks. Peak: about
# MAX_PENDING_FACTOR + 2 targets, plus a block (~0.8 GiB at the default 128 MiB).
MAX_PENDING_FACTOR = 4.0


class UnitCompletion:
    """Containers (tar shards, Parquet files of images) each end with an end-of-unit row giving
    the images it gave (:meth:`ended`); once that many of its distinct images have a committed row
    (:meth:`committed`), the unit is complete: :meth:`check` calls ``on_complete([(shard, version,
    rows), ...])``, after the commit that completes it. Distinct images, not rows: a member given
    twice (a read task Ray retried) must not stand in for a member without a row."""

    def __init__(self, on_complete: Callable[[list[tuple[str, str, int]]], None] | None = None):
        self.on_complete = on_complete or (lambda units: None)
        self.ends: dict[str, tuple[int, str]] = {}  # shard -> (rows it gave, version)
        self.done: dict[str, set[str]] = {}  # shard -> its image ids with a committed row

    def ended(self, shard: str, version: str, rows: int) -> None:
        self.ends[shard] = (rows, version)

    def committed(self, shard: str, image_id: str) -> None:
        self.done.setdefault(shard, set()).add(image_id)

    def check(self) -> None:
        complete = [(shard, version, rows) for shard, (rows, version) in self.ends.items()
                    if len(self.done.get(shard, ())) >= rows]
        if complete:
            self.on_complete(complete)
            for shard, _, _ in complete:
                del self.ends[shard]
                self.done.pop(shard, None)


class Committer:
    """A writer's cutting: output blocks in, a Parquet file out when the waiting rows make a file
    of about ``target_file_bytes`` (measured, never above it: see :data:`FIRST_RATIO`), or
    ``rows_per_file`` rows when that is set, or when the oldest row waiting has waited ``interval_s``
    seconds, or (a bound on memory) when the waiting rows exceed :data:`MAX_PENDING_FACTOR` x
    ``target_file_bytes`` of Arrow memory, whichever comes first. ``on_commit`` gets each file's
    stats row."""

    def __init__(self, writer: ParquetWriter, rows_per_file: int | None, interval_s: float,
                 on_commit: Callable[[dict], None], on_unit_end: Callable[[int, int], None] | None = None,
                 on_units_complete: Callable[[list[tuple[str, str, int]]], None] | None = None,
                 target_file_bytes: int | None = None):
        self.writer = writer
        self.on_unit_end = on_unit_end or (lambda rows, skipped: None)
        self.units = UnitCompletion(on_units_complete)  # containers complete once their rows are committed
        self.rows_per_file = rows_per_file  # None: no cap on rows
        self.target_file_bytes = target_file_bytes  # None: files are not sized by bytes
        self.interval_s = interval_s
        self.on_commit = on_commit
        # (when it arrived, rows, tag) of each waiting block; the tag (writers.BlockWriter: the block's
        # number) says which block a file's rows came from (:meth:`head_tags`)
        self.pending: list[tuple[float, pa.Table, object]] = []
        self.pending_rows = 0
        self.pending_nbytes = 0  # Arrow bytes of the waiting rows
        self.oldest: float | None = None  # when the oldest waiting row arrived
        # Decayed sums (RATIO_DECAY) of the measured files, seeded with FIRST_RATIO at one target's weight.
        prior = float(target_file_bytes or 0)
        self._arrow_bytes, self._file_bytes = prior, prior * FIRST_RATIO

    def add(self, table: pa.Table, tag: object = None) -> None:
        if UNIT_END in table.column_names:
            table, ends = split_unit_ends(table)
            for shard, version, rows, skipped in ends:  # end-of-unit rows (containers only): noted, never written
                self.units.ended(shard, version, rows)
                self.on_unit_end(rows, skipped)
            if ends:
                self.units.check()
        if table.num_rows == 0:
            return
        now = time.monotonic()
        if self.oldest is None:
            self.oldest = now
        self.pending.append((now, table, tag))
        self.pending_rows += table.num_rows
        self.pending_nbytes += table.nbytes
        while self._due():
            rows = self._rows()
            cut = self._cut(rows, final=self._over_memory())
            del rows
            if cut is None:  # measured: the waiting rows make less than a file
                break
            self._commit(*cut[1:])
            self._drop(cut[0])

    @property
    def ratio(self) -> float:
        """Parquet file bytes per Arrow byte: measured on this run's files (with FIRST_RATIO as a
        prior), within [RATIO_MIN, RATIO_MAX]."""
        r = self._file_bytes / self._arrow_bytes if self._arrow_bytes else FIRST_RATIO
        return min(RATIO_MAX, max(RATIO_MIN, r))

    def _measure(self, file_bytes: int, arrow_bytes: int) -> None:
        if self.target_file_bytes is not None and arrow_bytes >= self.target_file_bytes * MEASURED_LOW:
            self._file_bytes = self._file_bytes * RATIO_DECAY + file_bytes
            self._arrow_bytes = self._arrow_bytes * RATIO_DECAY + arrow_bytes

    def _rows_due(self) -> bool:
        return self.rows_per_file is not None and self.pending_rows >= self.rows_per_file

    def _over_memory(self) -> bool:
        return (self.target_file_bytes is not None
                and self.pending_nbytes > self.target_file_bytes * MAX_PENDING_FACTOR)

    def _due(self) -> bool:
        if not self.pending_rows:
            return False
        return self._rows_due() or self._over_memory() or (
            self.target_file_bytes is not None and self.pending_nbytes * self.ratio > self.target_file_bytes * FILE_AIM)

    def _rows(self) -> pa.Table:
        """The waiting rows as one table (zero-copy: the blocks' chunks)."""
        return pa.concat_tables([t for _, t, _ in self.pending], promote_options="default")

    def _drop(self, k: int) -> None:
        """Drops the first ``k`` waiting rows (committed); ``oldest`` becomes the arrival time of the
        first block still (partly) waiting, so rows left by a cut by size keep their age."""
        kept = []
        for arrived, t, tag in self.pending:
            if k >= t.num_rows:
                k -= t.num_rows
                continue
            kept.append((arrived, t.slice(k) if k else t, tag))
            k = 0
        self.pending = kept
        self.pending_rows = sum(t.num_rows for _, t, _ in kept)
        self.pending_nbytes = sum(t.nbytes for _, t, _ in kept)
        self.oldest = kept[0][0] if kept else None

    def head_tags(self, k: int) -> list[tuple[object, int]]:
        """(tag, rows) of the blocks the first ``k`` waiting rows come from, in order (the rows of a
        file about to be committed: files are always cut from the head)."""
        out = []
        for _, t, tag in self.pending:
            if k <= 0:
                break
            n = min(k, t.num_rows)
            if out and out[-1][0] == tag:
                out[-1] = (tag, out[-1][1] + n)
            else:
                out.append((tag, n))
            k -= n
        return out

    def _fit(self, rows: pa.Table, ratio: float | None = None) -> int:
        return rows_that_fit(rows, 0, self.target_file_bytes * FILE_AIM / (ratio or self.ratio))

    def _cut(self, rows: pa.Table, final: bool) -> tuple[int, pa.Table, bytes | None] | None:
        """(rows, table, its bytes or None) of the next file from the head of ``rows``: at most
        ``rows_per_file`` rows, and as many as fit in ``target_file_bytes`` as measured. None (only
        when not ``final``) when, measured, all of ``rows`` make less than a file: wait for more."""
        n = rows.num_rows
        cap = n if self.rows_per_file is None else min(n, self.rows_per_file)
        target = self.target_file_bytes
        if target is None:
            return cap, rows.slice(0, cap).combine_chunks(), None
        k = min(cap, self._fit(rows))
        encode = getattr(self.writer, "encode", None)
        if encode is None:  # a writer that cannot say its bytes: cut by the estimate alone
            return k, rows.slice(0, k).combine_chunks(), None
        regrown = False
        while True:
            part = rows.slice(0, k)  # zero-copy: no second copy of the file's rows
            data = encode(part)
            size, arrow = len(data), part.nbytes
            self._measure(size, arrow)
            if size > target and k > 1:  # too big: fewer rows, by the ratio of this very file
                part = data = None  # freed before the next encode
                k, regrown = min(k - 1, self._fit(rows, size / arrow)), True
                continue
            if not regrown and k < cap and size < target * FILE_LOW:  # too small (the guess was off)
                regrown = True
                more = min(cap, self._fit(rows))
                if more == n and not final and not self._rows_due():
                    return None
                if more > k:
                    k = more
                    part = data = None
                    continue
            return k, part, data

    def seconds_to_due(self) -> float:
        if self.oldest is None:
            return self.interval_s
        return max(0.0, self.oldest + self.interval_s - time.monotonic())

    def flush(self) -> None:
        """Commits every waiting row (in more than one file only where they are above the target)."""
        while self.pending_rows:
            rows = self._rows()
            k, part, data = self._cut(rows, final=True)
            del rows
            self._commit(part, data)
            del part, data
            self._drop(k)
        self.pending, self.pending_rows, self.pending_nbytes, self.oldest = [], 0, 0, None

    def _commit(self, table: pa.Table, data: bytes | None = None) -> None:
        stats = self.writer(table) if data is None else self.writer(table, data)
        for row in stats.to_pylist():
            self.on_commit(row)
        if "shard" in table.column_names:
            for shard, image_id in zip(table.column("shard").to_pylist(), table.column("image_id").to_pylist()):
                if shard:
                    self.units.committed(shard, image_id)
            self.units.check()
