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
import json
from collections.abc import Iterator
from urllib.parse import unquote_plus

from ..decode import looks_like_image
from ..storage import Storage, strip_protocol
from . import (UNIT_BATCH, InputError, InputForm, Skipped, UnitBatch, batches_of_units, unit, unit_batch,
               units_of_batches)

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


def _csv_rows(data_uri: str, storage: Storage, fields: list[str]) -> Iterator[dict]:
    with storage.fs(data_uri).open(strip_protocol(data_uri), "rb") as raw:
        text = io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8", newline="")
        for values in csv.reader(text):
            row = dict(zip(fields, values))
            row["Key"] = unquote_plus(row.get("Key", ""))  # keys are URL-encoded in CSV reports
            yield row


def _parquet_batches(data_uri: str, storage: Storage, batch_rows: int = UNIT_BATCH) -> Iterator:
    """The report's record batches, of the columns of :data:`_PARQUET_NAMES` it has."""
    import pyarrow.parquet as pq

    with storage.fs(data_uri).open(strip_protocol(data_uri), "rb") as raw:
        pf = pq.ParquetFile(raw)
        want = [c for c in _PARQUET_NAMES.values() if c in pf.schema_arrow.names]
        yield from pf.iter_batches(batch_size=batch_rows, columns=want)


def _parquet_rows(batch) -> Iterator[dict]:
    for r in batch.to_pylist():
        yield {field: r.get(col) for field, col in _PARQUET_NAMES.items()}


def _true(v) -> bool:
    return v is True or str(v).lower() == "true"


def _units(rows: Iterator[dict], skip_non_images: bool, skipped: Skipped) -> Iterator[dict]:
    """The units of report rows (dicts of the CSV field names), a row at a time."""
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


def iter_inventory_batches(cfg, storage: Storage, skipped: Skipped, batch_rows: int = UNIT_BATCH
                           ) -> Iterator[UnitBatch]:
    """The report's units as :class:`.UnitBatch` es, in order: Parquet reports a record batch at a
    time as Arrow columns (:func:`parquet_units`), CSV reports a row at a time."""
    manifest, files = read_manifest(cfg.uri, storage)
    csv_report = str(manifest["fileFormat"]).upper() == "CSV"
    fields = [f.strip() for f in str(manifest.get("fileSchema", "")).split(",")] if csv_report else []
    if csv_report and not {"Bucket", "Key"} <= set(fields):
        raise InputError(f"input.uri: {cfg.uri}: the manifest's fileSchema has no Bucket and Key fields")
    for data_uri in files:
        if csv_report:
            yield from batches_of_units(_units(_csv_rows(data_uri, storage, fields), cfg.skip_non_images, skipped),
                                        batch_rows)
            continue
        for batch in _parquet_batches(data_uri, storage, batch_rows):
            units = parquet_units(batch, cfg.skip_non_images, skipped)
            if units is None:  # a column of a type the fast path does not take: the rows one at a time
                yield from batches_of_units(_units(_parquet_rows(batch), cfg.skip_non_images, skipped), batch_rows)
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
        skip |= keep & ~_image_keys(key)
    for j in np.flatnonzero(skip).tolist():
        skipped.add(key[j].as_py())
    keep &= ~skip
    mask = pa.array(keep)
    key, bucket = key.filter(mask), bucket.filter(mask)
    uris = pc.binary_join_element_wise("s3://", bucket, "/", key, "")  # f"s3://{bucket}/{key}"
    sizes = pc.fill_null(size.filter(mask), 0).cast(pa.int64()) if size is not None else None
    etags = pc.utf8_trim(pc.fill_null(etag.filter(mask), ""), '"') if etag is not None else None
    return unit_batch(key, uris, sizes, etags)


def _image_keys(key) -> "np.ndarray":
    """:func:`.decode.looks_like_image` of each key: its extension (from its last dot), lowercased,
    one of the image extensions. ASCII extensions column-wise; others (str.lower of a non-ASCII
    letter can be ASCII) by Python."""
    import numpy as np
    import pyarrow.compute as pc

    from ..decode import IMAGE_EXTENSIONS

    ext = pc.struct_field(pc.extract_regex(key, r"(?s)(?P<ext>\.[^.]*)$"), [0])  # null: no dot
    ascii_ = pc.fill_null(pc.string_is_ascii(ext), True).to_numpy(zero_copy_only=False)
    out = pc.fill_null(pc.is_in(pc.ascii_lower(ext), value_set=pa_strings(sorted(IMAGE_EXTENSIONS))),
                       False).to_numpy(zero_copy_only=False).copy()
    for j in np.flatnonzero(~ascii_).tolist():
        out[j] = looks_like_image(key[j].as_py())
    return out


def pa_strings(values):
    import pyarrow as pa

    return pa.array(values, pa.string())


def open_form(cfg, storage: Storage) -> InputForm:
    return InputForm("s3_inventory", lambda skipped: iter_inventory(cfg, storage, skipped),
                     batches=lambda skipped, pool=None: iter_inventory_batches(cfg, storage, skipped))
