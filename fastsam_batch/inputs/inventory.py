"""S3 Inventory reports: ``input.uri`` is a report's ``manifest.json``; its CSV (gzip) or Parquet
data files list the bucket's objects with size and ETag, so a bucket of a billion keys is planned
without a million sequential LIST requests. ORC reports are not read (configure the report as CSV
or Parquet). Delete markers and versions that are not the latest are left out; keys without an
image extension are skipped and counted, as for files. ``image_id`` is the object's key.

Every data file the manifest names is checked before any work: a missing one is an input error.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
from collections.abc import Iterable, Iterator
from urllib.parse import unquote, unquote_plus

from ..decode import looks_like_image
from ..storage import Storage, strip_protocol
from . import (UNIT_BATCH, InputError, InputForm, Skipped, UnitBatch, batches_of_units, image_keys, unit,
               unit_batch, units_of_batches)

# CSV field names (manifest fileSchema) -> the Parquet column names of the same fields.
_PARQUET_NAMES = {"Bucket": "bucket", "Key": "key", "Size": "size", "ETag": "e_tag", "IsLatest": "is_latest",
                  "IsDeleteMarker": "is_delete_marker"}


def read_manifest(uri: str, storage: Storage) -> tuple[dict, list[str]]:
    """The manifest and the URIs of its data files (each checked to exist)."""
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"input.uri {uri!r}: no such inventory manifest") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"input.uri: {uri}: not an S3 Inventory manifest.json (not JSON: {e})") from None
    if not isinstance(manifest, dict) or "files" not in manifest or "fileFormat" not in manifest:
        raise InputError(f"input.uri: {uri}: not an S3 Inventory manifest.json (no 'files' / 'fileFormat')")
    fmt = str(manifest["fileFormat"])
    if fmt.upper() not in ("CSV", "PARQUET"):
        raise InputError(f"input.uri: {uri}: inventory fileFormat {fmt!r} is not read; configure the report as CSV "
                         "or Parquet")
    bucket = str(manifest.get("destinationBucket", "")).rsplit(":", 1)[-1]
    if not bucket:
        raise InputError(f"input.uri: {uri}: the manifest names no destinationBucket")
    files = [f"s3://{bucket}/{f['key']}" for f in manifest["files"]]
    missing = missing_files(files, storage)
    if missing:
        raise InputError(f"input.uri: {uri}: {len(missing)} of the {len(files)} data files the manifest names are "
                         f"missing: {', '.join(missing[:3])}")
    return manifest, files


def missing_files(files: list[str], storage: Storage) -> list[str]:
    """Those of ``files`` that are not there: one listing per folder (a report's data files share
    one), not a request per file."""
    import posixpath

    present: set[str] = set()
    for folder in sorted({posixpath.dirname(strip_protocol(f)) for f in files}):
        fs = storage.fs(f"s3://{folder}")
        fs.invalidate_cache(folder)
        try:
            present.update(fs.ls(folder, detail=False))
        except FileNotFoundError:
            pass
    return [f for f in files if strip_protocol(f) not in present]


def _parquet_batches(data_uri: str, storage: Storage, batch_rows: int = UNIT_BATCH,
                     row_groups: list[int] | None = None) -> Iterator:
    """The report's record batches (of ``row_groups``; None: all), of the columns of
    :data:`_PARQUET_NAMES` it has."""
    import pyarrow.parquet as pq

    with storage.fs(data_uri).open(strip_protocol(data_uri), "rb") as raw:
        pf = pq.ParquetFile(raw)
        want = [c for c in _PARQUET_NAMES.values() if c in pf.schema_arrow.names]
        yield from pf.iter_batches(batch_size=batch_rows, columns=want, row_groups=row_groups)


def _parquet_rows(batch) -> Iterator[dict]:
    for r in batch.to_pylist():
        yield {field: r.get(col) for field, col in _PARQUET_NAMES.items()}


def _true(v) -> bool:
    return v is True or str(v).lower() == "true"


def _units(rows: Iterator[dict], skip_non_images: bool, skipped: Skipped) -> Iterator[dict]:
    """The units of report rows (dicts of the CSV field names), a row at a time (the rules
    :func:`parquet_units` applies column-wise)."""
    for r in rows:
        if _true(r.get("IsDeleteMarker")) or ("IsLatest" in r and r["IsLatest"] not in (None, "")
                                              and not _true(r["IsLatest"])):
            continue
        key = r["Key"]
        if key.endswith("/") or (skip_non_images and not looks_like_image(key)):
            skipped.add(key)
            continue
        yield unit(key, f"s3://{r['Bucket']}/{key}", r.get("Size") or 0, r.get("ETag") or "")


def iter_inventory(cfg, storage: Storage, skipped: Skipped) -> Iterator[dict]:
    """The report's units, in order, as dicts (:func:`iter_inventory_batches`' units)."""
    return units_of_batches(iter_inventory_batches(cfg, storage, skipped))


def iter_inventory_batches(cfg, storage: Storage, skipped: Skipped, batch_rows: int = UNIT_BATCH, pool=None
                           ) -> Iterator[UnitBatch]:
    """The report's units as :class:`.UnitBatch` es, in order, read column-wise: Parquet reports a
    record batch at a time as Arrow columns (:func:`parquet_units`), CSV reports a slice of lines at
    a time parsed by Arrow's CSV reader into the same columns (:func:`csv_piece`). With ``pool`` (a
    :class:`.parallel.PlanPool`, when active) the data files are read by its processes, about
    :data:`PIECE_ROWS` rows a task (:func:`_pieces`, :func:`_csv_pieces`; :func:`report_piece`,
    :func:`csv_piece`: their units and the ids' keys made there); the driver reads only each Parquet
    file's footer, and each CSV file's gzip trailer (4 bytes)."""
    manifest, files = read_manifest(cfg.uri, storage)
    csv_report = str(manifest["fileFormat"]).upper() == "CSV"
    fields = [f.strip() for f in str(manifest.get("fileSchema", "")).split(",")] if csv_report else []
    if csv_report and not {"Bucket", "Key"} <= set(fields):
        raise InputError(f"input.uri: {cfg.uri}: the manifest's fileSchema has no Bucket and Key fields")
    if csv_report and (pool is None or not pool.active):
        for data_uri in files:  # each file decompressed once, STREAM_BYTES of lines at a time
            for data in _line_slices(data_uri, storage, itertools.count(STREAM_BYTES, STREAM_BYTES), None):
                batches, its_skipped = _keyed(lambda its: _csv_units(data, fields, cfg.skip_non_images, its, batch_rows,
                                                                     data_uri), skipped.limit, False)
                skipped.merge(its_skipped)
                yield from batches
        return
    if csv_report:
        pieces = _csv_pieces(files, storage)

        def task(piece):
            return csv_piece, (*piece[:3], storage, fields, cfg.skip_non_images, skipped.limit, batch_rows)

        size = lambda piece: piece[3]  # noqa: E731 - its rows, estimated
    elif pool is None or not pool.active:
        for data_uri in files:
            yield from _report_units(_parquet_batches(data_uri, storage, batch_rows), cfg.skip_non_images, skipped,
                                     batch_rows)
        return
    else:
        pieces = _pieces(files, storage)

        def task(piece):
            return report_piece, (*piece[:4], storage, cfg.skip_non_images, skipped.limit, batch_rows)

        size = lambda piece: piece[3] - piece[2]  # noqa: E731
    for piece, done in pool.ordered(pieces, task, size=size):
        if done is None:  # its read failed in the process: read again here, which raises the error
            fn, args = task(piece)
            done = fn(*args, in_process=False)
        batches, its_skipped = done
        skipped.merge(its_skipped)
        yield from batches


PIECE_ROWS = 1 << 16  # report rows a task of the pool reads, about
MOST_SLICES = 8  # slices a large row group is cut in, at most


def _pieces(files: list[str], storage: Storage) -> Iterator[tuple[str, list[int], int, int]]:
    """(data file, row groups, first row, end row), rows counted within those row groups: each
    file's rows in order, about :data:`PIECE_ROWS` a piece. Small row groups are taken together; a
    large one is cut in slices (each slice's task reads the row group up to the slice's end) of
    :data:`PIECE_ROWS` rows, or of an :data:`MOST_SLICES`-th of the group where that is more, so a
    row group is read about 4.5 times over at most, whatever its size: a report written with row
    groups of a million rows is read in parallel at that cost. A file's footer is read here, its
    rows in the pool."""
    import pyarrow.parquet as pq

    for data_uri in files:
        with storage.fs(data_uri).open(strip_protocol(data_uri), "rb") as raw:
            meta = pq.ParquetFile(raw).metadata
        groups, rows = [], 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if n > PIECE_ROWS:
                if groups:
                    yield data_uri, groups, 0, rows
                    groups, rows = [], 0
                width = max(PIECE_ROWS, -(-n // MOST_SLICES))
                for at in range(0, n, width):
                    yield data_uri, [g], at, min(n, at + width)
                continue
            groups.append(g)
            rows += n
            if rows >= PIECE_ROWS:
                yield data_uri, groups, 0, rows
                groups, rows = [], 0
        if groups:
            yield data_uri, groups, 0, rows


def report_piece(data_uri: str, row_groups: list[int], first: int, end: int, storage: Storage, skip_non_images: bool,
                 limit: int | None, batch_rows: int, in_process: bool = True
                 ) -> tuple[list[UnitBatch], Skipped] | None:
    """The units of rows ``first`` to ``end`` of some row groups of a Parquet report's data file,
    with their ids' keys, and the keys skipped (``limit`` examples at most). In a process of the
    pool, an error gives None (the driver reads the piece again itself, to raise it as it always
    has)."""
    return _keyed(lambda skipped: list(_report_units(
        _rows_between(_parquet_batches(data_uri, storage, batch_rows, row_groups), first, end), skip_non_images, skipped,
        batch_rows)), limit, in_process)


def _keyed(units, limit: int | None, in_process: bool) -> tuple[list[UnitBatch], Skipped] | None:
    """A piece's unit batches (``units(skipped)``) with their ids' keys, and the keys it skipped
    (``limit`` examples at most); in a process of the pool an error gives None."""
    from ..index import id_keys

    skipped = Skipped(limit=limit)
    try:
        out = units(skipped)
    except Exception:  # noqa: BLE001 - raised by the driver's own read
        if in_process:
            return None
        raise
    for b in out:
        b.hi, b.lo = id_keys(b.table.column("image_id").to_pylist())
    return out, skipped


def _rows_between(batches: Iterator, first: int, end: int) -> Iterator:
    """The rows ``first`` to ``end`` of ``batches``, as batches (sliced where they straddle)."""
    at = 0
    for batch in batches:
        lo, hi = max(first, at), min(end, at + batch.num_rows)
        if hi > lo:
            yield batch.slice(lo - at, hi - lo)
        at += batch.num_rows
        if at >= end:
            return


def _report_units(batches: Iterator, skip_non_images: bool, skipped: Skipped, batch_rows: int) -> Iterator[UnitBatch]:
    for batch in batches:
        units = parquet_units(batch, skip_non_images, skipped)
        if units is None:  # a column of a type the fast path does not take: the rows one at a time
            yield from batches_of_units(_units(_parquet_rows(batch), skip_non_images, skipped), batch_rows)
        elif len(units):
            yield units


def parquet_units(batch, skip_non_images: bool, skipped: Skipped) -> UnitBatch | None:
    """:func:`_units` of a Parquet report's record batch, column-wise: the same units and the same
    keys skipped, in order. None where a column is not of the type reports write (strings, an
    integer size, boolean flags) or holds a null where the row path would fail or write "None":
    those batches go row by row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    names = batch.schema.names
    if "key" not in names or "bucket" not in names:
        return None
    key, bucket = batch.column("key"), batch.column("bucket")
    size = batch.column("size") if "size" in names else None
    etag = batch.column("e_tag") if "e_tag" in names else None
    flags = [batch.column(c) for c in ("is_delete_marker", "is_latest") if c in names]
    if not (pa.types.is_string(key.type) and pa.types.is_string(bucket.type)) or key.null_count or bucket.null_count \
            or (size is not None and not pa.types.is_integer(size.type)) \
            or (etag is not None and not pa.types.is_string(etag.type)) \
            or any(not pa.types.is_boolean(f.type) for f in flags):
        return None
    n = batch.num_rows
    keep = np.ones(n, bool)
    if "is_delete_marker" in names:  # a delete marker: out
        keep &= ~pc.fill_null(batch.column("is_delete_marker"), False).to_numpy(zero_copy_only=False)
    if "is_latest" in names:  # a version not the latest (False; null: no versioning): out
        keep &= pc.fill_null(batch.column("is_latest"), True).to_numpy(zero_copy_only=False)
    skip = pc.ends_with(key, "/").to_numpy(zero_copy_only=False) & keep
    if skip_non_images:
        skip |= keep & ~image_keys(key)
    for j in np.flatnonzero(skip).tolist():
        skipped.add(key[j].as_py())
    keep &= ~skip
    mask = pa.array(keep)
    key, bucket = key.filter(mask), bucket.filter(mask)
    uris = pc.binary_join_element_wise("s3://", bucket, "/", key, "")  # f"s3://{bucket}/{key}"
    sizes = pc.fill_null(size.filter(mask), 0).cast(pa.int64()) if size is not None else None
    etags = pc.utf8_trim(pc.fill_null(etag.filter(mask), ""), '"') if etag is not None else None
    return unit_batch(key, uris, sizes, etags)


LINE_BYTES = 100  # a CSV report's line, about (bucket, key, size, ETag, flags): rows estimated from bytes
PIECE_BYTES = PIECE_ROWS * LINE_BYTES  # a CSV report's uncompressed bytes a task of the pool reads, about
STREAM_BYTES = 1 << 22  # without a pool: a CSV report's uncompressed bytes parsed at a time (one pass a file)


def _text_bytes(data_uri: str, storage: Storage) -> int:
    """A gzip'd data file's uncompressed size, from its trailer (ISIZE: the size modulo 2^32, of its
    last member), one 4-byte read: where that is well below the compressed size (text is not
    smaller than its gzip, give or take the header and a stored block's 5 bytes in 65,535), the
    size wrapped past 4 GiB, and the smallest size of that remainder the compressed size allows is
    taken. A file past 4 GiB, or of several members, can so be taken for smaller than it is: its
    last slice is then larger (nothing is lost, see :func:`_line_slices`)."""
    fs = storage.fs(data_uri)
    path = strip_protocol(data_uri)
    compressed = fs.size(path)
    if compressed < 18:  # not a gzip file: its read raises as it always did
        return 0
    with fs.open(path, "rb") as f:
        f.seek(compressed - 4)
        size = int.from_bytes(f.read(4), "little")
    floor = compressed - compressed // 64 - 4096
    while size < floor:
        size += 1 << 32
    return size


def _cuts(text_bytes: int) -> list[int]:
    """Where a file of ``text_bytes`` uncompressed bytes is cut: :data:`PIECE_BYTES` a slice, or an
    :data:`MOST_SLICES`-th of the file where that is more (so a file is decompressed about 4.5
    times over at most in the pool); [] for one slice."""
    if text_bytes <= PIECE_BYTES:
        return []
    width = max(PIECE_BYTES, -(-text_bytes // MOST_SLICES))
    return list(range(width, text_bytes, width))


def _csv_pieces(files: list[str], storage: Storage) -> Iterator[tuple[str, int, list[int], int]]:
    """(data file, slice number, the file's cuts, rows estimated) of a CSV report, each file cut by
    :func:`_cuts` of its uncompressed size (its trailer, :func:`_text_bytes`, read here): a gzip'd
    file cannot be read from its middle, so a slice's task decompresses the file up to its end
    (:func:`_line_slices`); the slices hold every line once whatever the sizes say."""
    for data_uri in files:
        size = _text_bytes(data_uri, storage)
        cuts = _cuts(size)
        edges = [0, *cuts, max(size, cuts[-1] if cuts else 0)]
        for k in range(len(cuts) + 1):
            yield data_uri, k, cuts, max(1, (edges[k + 1] - edges[k]) // LINE_BYTES)


def _line_slices(data_uri: str, storage: Storage, cuts: Iterable[int], keep: int | None,
                 chunk: int = 1 << 22) -> Iterator[bytes]:
    """The lines of a gzip'd CSV data file in slices, decompressed in one pass: slice k holds the
    lines that start at an uncompressed offset from ``cuts[k - 1]`` (0 for the first) up to
    ``cuts[k]`` (the file's end for the last), a line ending at a newline outside quotes (the
    quotes counted from the file's start: a field quoted over a line break stays whole, as CSV
    readers read it): every line is in one slice, whatever the cuts. ``cuts``: rising offsets, a
    list (a slice each and one more, empty past the file's end) or an endless iterator (slices to
    the file's end). ``keep``: only that slice (its bytes, empty past the file's end; the pass ends
    after it, the slices before it not kept); None: every slice, in order. A UTF-8 byte order
    mark at the file's start is left out."""
    left = iter(cuts)
    bound = next(left, None)  # slice k's cut (None: the last slice, to the file's end)
    k, at, start, parts = 0, 0, 0, []  # ``at``: the uncompressed offset of ``block``'s first byte
    quoted, seen = 0, 0  # the parity of the quotes before block[seen]
    with storage.fs(data_uri).open(strip_protocol(data_uri), "rb") as raw, gzip.GzipFile(fileobj=raw) as text:
        block = text.read(max(chunk, 3))
        if block.startswith(b"\xef\xbb\xbf"):
            block, at = block[3:], 3
        first = at  # the offset of slice k's first line
        while True:
            stop = None  # where slice k ends in ``block``: after the first line end at or past its cut - 1
            if bound is not None:
                if first >= bound:  # its first line starts at its cut or past it: the slice is empty
                    stop = start
                else:
                    j = block.find(b"\n", max(start, bound - 1 - at))
                    while j >= 0:
                        quoted ^= block.count(b'"', seen, j) & 1
                        seen = j
                        if not quoted:
                            break
                        j = block.find(b"\n", j + 1)  # a newline inside quotes: not a line's end
                    stop = j + 1 if j >= 0 else None
            if keep is None or keep == k:
                parts.append(block[start:stop])
            if stop is None:
                more = text.read(chunk)
                if not more:  # the file's end: slice k ends here, those after it are empty
                    if keep is None:
                        yield b"".join(parts)
                        if isinstance(cuts, (list, tuple)):
                            yield from (b"" for _ in range(len(cuts) - k))
                    else:
                        yield b"".join(parts) if keep == k else b""
                    return
                quoted ^= block.count(b'"', seen) & 1
                at += len(block)
                block, start, seen = more, 0, 0
                continue
            if keep is None or keep == k:
                yield b"".join(parts)
                if keep == k:
                    return
            parts, k, start, first = [], k + 1, stop, at + stop
            bound = next(left, None)


def csv_piece(data_uri: str, k: int, cuts: list[int], storage: Storage, fields: list[str], skip_non_images: bool,
              limit: int | None, batch_rows: int, in_process: bool = True) -> tuple[list[UnitBatch], Skipped] | None:
    """The units of slice ``k`` of a CSV report's data file cut at ``cuts`` (:func:`_line_slices`;
    :func:`_csv_units`), with their ids' keys, and the keys skipped. In a process of the pool an
    error gives None (the driver reads the slice again, to raise it)."""
    def units(skipped: Skipped) -> list[UnitBatch]:
        data = next(_line_slices(data_uri, storage, cuts, k))
        return _csv_units(data, fields, skip_non_images, skipped, batch_rows, data_uri)

    return _keyed(units, limit, in_process)


def _csv_units(data: bytes, fields: list[str], skip_non_images: bool, skipped: Skipped, batch_rows: int,
               data_uri: str) -> list[UnitBatch]:
    """The units of a CSV report's lines: read by Arrow's CSV reader into the Parquet report's
    columns (:func:`csv_report_batches`, then :func:`parquet_units`), or, where Arrow does not read
    them as ``fields`` (a row of another length), the whole slice row by row (Python's csv reader,
    :func:`_units` of :func:`_decoded` rows: the rules the report was always read by), strictly: a
    quoted field left open at the slice's end (a quote inside an unquoted field, which no CSV
    reader takes for one, threw the count of quotes off, so a slice ended inside a field) is an
    error naming the file, not rows made of a field's halves."""
    try:
        batches = csv_report_batches(data, fields, batch_rows)
    except Exception:  # noqa: BLE001 - not as Arrow reads it: row by row (which raises on what fails there)
        try:
            rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline=""), strict=True))
        except csv.Error as e:
            raise InputError(f"input.uri: {data_uri}: not CSV as an S3 Inventory report is written ({e}): its "
                             "fields are quoted, its keys URL-encoded") from None
        return list(batches_of_units(_units(_decoded(rows, fields), skip_non_images, skipped), batch_rows))
    return list(_report_units(batches, skip_non_images, skipped, batch_rows))


def csv_report_batches(data: bytes, fields: list[str], batch_rows: int) -> list:
    """A CSV report's lines (``data``) as record batches of the Parquet report's columns: keys
    URL-decoded, sizes as integers (empty: null), the flags as booleans (empty: null), every
    other field dropped; blank lines left out. A size that is not an integer stays text (every
    batch of the slice then goes row by row in :func:`_report_units`, and fails there as the row
    reader does)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    if not data or data.isspace():
        return []
    table = pcsv.read_csv(pa.BufferReader(data), read_options=pcsv.ReadOptions(column_names=fields, use_threads=False),
                          parse_options=pcsv.ParseOptions(newlines_in_values=True),  # (as Python's csv reader)
                          convert_options=pcsv.ConvertOptions(column_types={f: pa.string() for f in fields}))
    cols = {}
    for field, name in _PARQUET_NAMES.items():
        if field not in fields:
            continue
        col = table.column(field).combine_chunks()
        if field == "Key":
            col = _unquoted_plus(col)
        elif field == "Size":
            empty = pc.equal(col, "")
            try:
                col = pc.if_else(empty, pa.scalar(None, pa.int64()), pc.cast(pc.if_else(empty, "0", col), pa.int64()))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass  # text: its rows go one at a time
        elif field in ("IsLatest", "IsDeleteMarker"):
            col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.bool_()), pc.equal(pc.utf8_lower(col), "true"))
        cols[name] = col
    return pa.table(cols).to_batches(max_chunksize=batch_rows)


def _unquoted_plus(keys):
    """``urllib.parse.unquote_plus`` of each key (CSV reports URL-encode them): ``+`` made a space
    and ``%2F`` a slash column-wise (a slash is no hex digit, so this makes no new escape), then
    only the keys with a ``%`` still decoded one by one (``unquote``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = pc.replace_substring(pc.replace_substring(keys, "+", " "), "%2F", "/")
    coded = pc.match_substring(keys, "%")
    if not pc.any(coded).as_py():
        return keys
    decoded = pa.array([unquote(k) for k in keys.filter(coded).to_pylist()], pa.string())
    return pc.replace_with_mask(keys, coded, decoded)


def _decoded(values_rows, fields: list[str]) -> Iterator[dict]:
    """Rows of a CSV report's values as dicts of ``fields``, keys URL-decoded; blank lines left
    out (as Arrow's CSV reader leaves them)."""
    for values in values_rows:
        if not values:
            continue
        row = dict(zip(fields, values))
        row["Key"] = unquote_plus(row.get("Key", ""))  # keys are URL-encoded in CSV reports
        yield row


def open_form(cfg, storage: Storage) -> InputForm:
    return InputForm("s3_inventory", lambda skipped: iter_inventory(cfg, storage, skipped),
                     batches=lambda skipped, pool=None: iter_inventory_batches(cfg, storage, skipped, pool=pool))
