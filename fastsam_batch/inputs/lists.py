"""Lists: Parquet, CSV or JSONL files (or a folder / prefix / glob of them) naming one image per
row in a ``uri`` column, as img2dataset's ``url_list``.

``image_id``: the ``input.id_column`` (default ``image_id`` when the list has one), else the URI
without its scheme. Every other column is carried into the output under its own name, as text
(``input.carry`` chooses which; names of the output schema are refused before any work). A URI
without a scheme is relative to the list file's folder. An image id that comes again is skipped
and counted (one row per distinct ``image_id``; the first row wins). Rows with an empty URI are
skipped and counted. Nothing is read from the objects while planning (no size or ETag: an image
with a row is done, whatever happens to its object later).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import posixpath
from collections.abc import Iterator

import numpy as np

from ..index import KeyRuns, id_keys
from ..storage import Storage, protocol_of, strip_protocol, to_uri
from . import InputError, InputForm, Skipped, as_text, check_carried, unit
from .files import iter_files

EXTENSIONS = (".parquet", ".csv", ".jsonl", ".ndjson", ".csv.gz", ".jsonl.gz", ".ndjson.gz")


def format_of(path: str, given: str | None) -> str:
    if given:
        return given
    name = path.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise InputError(f"input.uri: {path}: not a list file by its extension (.parquet, .csv, .jsonl); set "
                     "input.list_format")


def iter_rows(uri: str, storage: Storage, fmt: str) -> tuple[list[str], Iterator[dict]]:
    """(column names, rows as dicts), streaming: Parquet a batch at a time, CSV and JSONL a line at a time."""
    fs = storage.fs(uri)
    raw = fs.open(strip_protocol(uri), "rb")
    f = gzip.GzipFile(fileobj=raw) if uri.lower().endswith(".gz") else raw
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"input.uri: {uri}: not a Parquet file ({e})") from None
        names = pf.schema_arrow.names

        def parquet_rows():
            with raw:
                for batch in pf.iter_batches(batch_size=4096):
                    yield from batch.to_pylist()
        return names, parquet_rows()
    text = io.TextIOWrapper(f, encoding="utf-8", newline="" if fmt == "csv" else None)
    if fmt == "csv":
        reader = csv.DictReader(text)
        names = list(reader.fieldnames or [])

        def csv_rows():
            with raw:
                yield from reader
        return names, csv_rows()
    first = ""
    for line in text:
        if line.strip():
            first = line
            break
    try:
        head = json.loads(first) if first else {}
    except json.JSONDecodeError as e:
        raise InputError(f"input.uri: {uri}: line 1 is not JSON ({e})") from None

    def json_rows():
        with raw:
            if head:
                yield head
            for n, line in enumerate(text, start=2):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"input.uri: {uri}: line {n} is not JSON ({e})") from None
    return list(head), json_rows()


SEEN_BATCH = 4096  # rows read before their ids are checked for repeats, together
SEEN_MEMORY_KEYS = 1 << 23  # ids held in memory (16 bytes each) before sorted runs spill to local disk


class SeenIds:
    """Image ids seen so far, as 128-bit keys (:class:`.index.KeyRuns`: sorted runs merged
    geometrically, spilled to a local scratch folder past ``memory_keys``), to find ids that come
    again. Checked a batch at a time: a batch is hashed, then one ``searchsorted`` per run."""

    def __init__(self, memory_keys: int = SEEN_MEMORY_KEYS, spill_dir: str | None = None):
        self.keys = KeyRuns(memory_keys, spill_dir)

    def add_batch(self, image_ids: list[str]) -> np.ndarray:
        """For each id, True when new: not seen before, and the first of its repeats in the batch."""
        return self.keys.add(*id_keys(image_ids))

    def add(self, image_id: str) -> bool:
        """True when new (one id: :meth:`add_batch` is the fast way)."""
        return bool(self.add_batch([image_id])[0])

    def close(self) -> None:
        self.keys.close()


def iter_list(cfg, storage: Storage, form: InputForm, skipped: Skipped) -> Iterator[dict]:
    """The list's units, in order; repeated ids skipped and counted (checked :data:`SEEN_BATCH` rows
    at a time, so a unit is yielded once its batch is checked)."""
    seen = SeenIds()
    batch: list[tuple[str, str, dict]] = []

    def flush() -> Iterator[dict]:
        new = seen.add_batch([image_id for image_id, _, _ in batch])
        for (image_id, uri, extra), fresh in zip(batch, new.tolist()):
            if not fresh:
                form.duplicates += 1
                if len(form.duplicate_examples) < 5:
                    form.duplicate_examples.append(image_id)
                continue
            yield unit(image_id, uri, extra=extra)
        batch.clear()

    try:
        yield from _list_rows(cfg, storage, form, skipped, batch, flush)
        yield from flush()
    finally:
        seen.close()


def _list_rows(cfg, storage: Storage, form: InputForm, skipped: Skipped, batch: list, flush) -> Iterator[dict]:
    files = iter_files(cfg.uri, storage, skipped, lambda k: k.lower().endswith(EXTENSIONS))
    carried: list[str] | None = None
    for f in files:
        names, rows = iter_rows(f["uri"], storage, format_of(f["uri"], cfg.list_format))
        where = f"input.uri: {f['uri']}"
        if cfg.uri_column not in names:
            raise InputError(f"{where}: no {cfg.uri_column!r} column (input.uri_column); its columns: "
                             f"{', '.join(names) or 'none'}")
        id_column = cfg.id_column or ("image_id" if "image_id" in names else None)
        if id_column and id_column not in names:
            raise InputError(f"{where}: no {id_column!r} column (input.id_column)")
        if carried is None:
            carried = list(cfg.carry) if cfg.carry is not None else [
                c for c in names if c not in (cfg.uri_column, id_column)]
            missing = [c for c in carried if c not in names]
            if missing:
                raise InputError(f"{where}: input.carry names {', '.join(map(repr, missing))}, not among its columns")
            check_carried(carried, where)
            form.carried = carried
        folder = posixpath.dirname(strip_protocol(f["uri"]))
        protocol = protocol_of(f["uri"])
        for n, row in enumerate(rows):
            uri = as_text(row.get(cfg.uri_column)) or ""
            if not uri.strip():
                skipped.add(f"{f['image_id']} row {n + 1}: empty {cfg.uri_column}")
                continue
            if "://" not in uri and not uri.startswith("/"):
                uri = to_uri(protocol, posixpath.normpath(posixpath.join(folder, uri)))
            image_id = as_text(row.get(id_column)) if id_column else None
            image_id = image_id or uri.split("://", 1)[-1]
            batch.append((image_id, uri, {c: as_text(row.get(c)) for c in carried}))
            if len(batch) >= SEEN_BATCH:
                yield from flush()


def open_form(cfg, storage: Storage) -> InputForm:
    form = InputForm("list", lambda skipped: iter_list(cfg, storage, form, skipped))
    return form
