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
from . import InputError, InputForm, Skipped, batches_of_units, unit

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


def _parquet_rows(data_uri: str, storage: Storage) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with storage.fs(data_uri).open(strip_protocol(data_uri), "rb") as raw:
        pf = pq.ParquetFile(raw)
        want = [c for c in _PARQUET_NAMES.values() if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=8192, columns=want):
            for r in batch.to_pylist():
                yield {field: r.get(col) for field, col in _PARQUET_NAMES.items()}


def _true(v) -> bool:
    return v is True or str(v).lower() == "true"


def iter_inventory(cfg, storage: Storage, skipped: Skipped) -> Iterator[dict]:
    manifest, files = read_manifest(cfg.uri, storage)
    csv_report = str(manifest["fileFormat"]).upper() == "CSV"
    fields = [f.strip() for f in str(manifest.get("fileSchema", "")).split(",")] if csv_report else []
    if csv_report and not {"Bucket", "Key"} <= set(fields):
        raise InputError(f"input.uri: {cfg.uri}: the manifest's fileSchema has no Bucket and Key fields")
    for data_uri in files:
        rows = _csv_rows(data_uri, storage, fields) if csv_report else _parquet_rows(data_uri, storage)
        for r in rows:
            if _true(r.get("IsDeleteMarker")) or ("IsLatest" in r and r["IsLatest"] not in (None, "")
                                                  and not _true(r["IsLatest"])):
                continue
            key = r["Key"]
            if key.endswith("/") or (cfg.skip_non_images and not looks_like_image(key)):
                skipped.add(key)
                continue
            yield unit(key, f"s3://{r['Bucket']}/{key}", r.get("Size") or 0, r.get("ETag") or "")


def open_form(cfg, storage: Storage) -> InputForm:
    return InputForm("s3_inventory", lambda skipped: iter_inventory(cfg, storage, skipped),
                     batches=lambda skipped, pool=None: batches_of_units(iter_inventory(cfg, storage, skipped)))
