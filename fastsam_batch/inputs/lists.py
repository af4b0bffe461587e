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
from collections import deque
from collections.abc import Iterator

import numpy as np

from ..index import KeyRuns, id_keys
from ..parallel import PlanPool, SplitRepeatCheck, hash_ids
from ..storage import Storage, protocol_of, strip_protocol, to_uri
from . import (InputError, InputForm, Skipped, UnitBatch, as_text, check_carried, encode_extra, unit_batch,
               units_of_batches)
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
    names, parts, arrow = _open_list(uri, storage, fmt)
    if not arrow:
        return names, parts

    def rows():
        for batch in parts:
            yield from batch.to_pylist()
    return names, rows()


def _open_list(uri: str, storage: Storage, fmt: str, batch_rows: int = 4096) -> tuple[list[str], Iterator, bool]:
    """(column names, its rows, whether they come as Arrow record batches): Parquet a record batch
    of ``batch_rows`` at a time; CSV and JSONL a dict a line at a time."""
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

        def parquet_batches():
            with raw:
                yield from pf.iter_batches(batch_size=batch_rows)
        return names, parquet_batches(), True
    text = io.TextIOWrapper(f, encoding="utf-8", newline="" if fmt == "csv" else None)
    if fmt == "csv":
        reader = csv.DictReader(text)
        names = list(reader.fieldnames or [])

        def csv_rows():
            with raw:
                yield from reader
        return names, csv_rows(), False
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
    return list(head), json_rows(), False


LIST_BATCH = 1 << 16  # list rows read, checked for repeats and given to planning at a time
SPLIT_WINDOW = 2  # batches in the split repeat check (parallel.SplitRepeatCheck) besides the one given
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

    def add_keys(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """:meth:`add_batch` of ids already hashed (:func:`.index.id_keys`)."""
        return self.keys.add(hi, lo)

    def add(self, image_id: str) -> bool:
        """True when new (one id: :meth:`add_batch` is the fast way)."""
        return bool(self.add_batch([image_id])[0])

    def close(self) -> None:
        self.keys.close()


def iter_list(cfg, storage: Storage, form: InputForm, skipped: Skipped) -> Iterator[dict]:
    """The list's units, in order, as dicts (:func:`iter_list_batches`' units)."""
    return units_of_batches(iter_list_batches(cfg, storage, form, skipped))


def iter_list_batches(cfg, storage: Storage, form: InputForm, skipped: Skipped, pool: PlanPool | None = None,
                      batch_rows: int | None = None) -> Iterator[UnitBatch]:
    """The list's units, in order, as :class:`.UnitBatch` es (ids hashed once, here: by ``pool``'s
    processes when given); repeated ids skipped and counted (checked up to ``batch_rows`` rows at a
    time: a unit is given once its batch is checked)."""
    batch_rows = batch_rows or LIST_BATCH
    seen = SeenIds()
    split: SplitRepeatCheck | None = None  # the repeat check over processes, once the pool works
    pool = pool or PlanPool(1)
    columns = (c for c in _list_columns(cfg, storage, form, skipped, batch_rows) if len(c[0]))
    waiting: deque = deque()  # batches whose repeat check is under way in the split check, in order

    def checked(ids, uris, extras, hi, lo, new) -> UnitBatch:
        batch = unit_batch(ids, uris, extras=extras, hi=hi, lo=lo)
        if not new.all():
            again = np.flatnonzero(~new)
            form.duplicates += len(again)
            for j in again[:max(0, 5 - len(form.duplicate_examples))].tolist():
                form.duplicate_examples.append(ids[j] if isinstance(ids, list) else ids[j].as_py())
            batch = UnitBatch(batch.table.filter(_mask(new)), hi[new], lo[new])
        return batch

    finished = False
    hashed = pool.ordered(columns, lambda c: (hash_and_carry, (c[0], c[2])), size=lambda c: len(c[0]))
    try:
        rows = 0  # listed rows checked before this batch
        for (ids, uris, _), (hi, lo, extras) in hashed:
            if split is None and pool.active and rows >= pool.after_rows:  # a long list: the check goes to processes
                split = SplitRepeatCheck(pool.processes, SEEN_MEMORY_KEYS, seed=seen.keys.keys())
                seen.close()
            rows += len(hi)
            if split is None:
                yield checked(ids, uris, extras, hi, lo, seen.add_keys(hi, lo))
                continue
            split.submit(hi, lo)
            waiting.append((ids, uris, extras, hi, lo))
            if len(waiting) > SPLIT_WINDOW:
                yield checked(*waiting.popleft(), split.result())
        while waiting:
            yield checked(*waiting.popleft(), split.result())
        finished = True
    finally:
        hashed.close()
        if split is not None:
            split.close(abort=not finished)  # an error, Ctrl-C, the listing closed early: ended at once
        seen.close()


def _mask(mask: np.ndarray):
    import pyarrow as pa

    return pa.array(mask, pa.bool_())


def _list_columns(cfg, storage: Storage, form: InputForm, skipped: Skipped, batch_rows: int) -> Iterator[tuple]:
    """(image ids, URIs, extras or None) of the list's rows with a URI, in order, up to
    ``batch_rows`` at a time: Parquet lists as Arrow columns (Python only for rows with a relative
    URI, and for carried columns), CSV and JSONL a row at a time."""
    files = iter_files(cfg.uri, storage, skipped, lambda k: k.lower().endswith(EXTENSIONS))
    carried: list[str] | None = None
    for f in files:
        names, parts, arrow = _open_list(f["uri"], storage, format_of(f["uri"], cfg.list_format), batch_rows)
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
        ctx = _ListFile(f["image_id"], posixpath.dirname(strip_protocol(f["uri"])), protocol_of(f["uri"]),
                        cfg.uri_column, id_column, carried, skipped)
        if arrow:
            for batch in parts:
                cols = _arrow_columns(batch, ctx)
                if cols is None:  # a column type the fast path does not take: the rows one at a time
                    cols = ctx.rows(batch.to_pylist())
                ctx.base += batch.num_rows
                yield cols
            continue
        rows: list[dict] = []
        for row in parts:
            rows.append(row)
            if len(rows) >= batch_rows:
                yield ctx.rows(rows)
                ctx.base += len(rows)
                rows = []
        if rows:
            yield ctx.rows(rows)


class _ListFile:
    """What turning one list file's rows into units needs; ``base``: its rows given so far."""

    def __init__(self, name: str, folder: str, protocol: str, uri_column: str, id_column: str | None,
                 carried: list[str], skipped: Skipped):
        self.name, self.folder, self.protocol = name, folder, protocol
        self.uri_column, self.id_column, self.carried, self.skipped = uri_column, id_column, carried, skipped
        self.base = 0

    def empty(self, n: int) -> None:
        self.skipped.add(f"{self.name} row {self.base + n + 1}: empty {self.uri_column}")

    def resolve(self, uri: str) -> str:
        """A URI without a scheme, relative to the list file's folder."""
        if "://" not in uri and not uri.startswith("/"):
            return to_uri(self.protocol, posixpath.normpath(posixpath.join(self.folder, uri)))
        return uri

    def rows(self, rows: list[dict]) -> tuple[list[str], list[str], list[str] | None]:
        """(ids, URIs, extras) of rows as dicts, one at a time."""
        ids, uris, extras = [], [], ([] if self.carried else None)
        for n, row in enumerate(rows):
            uri = as_text(row.get(self.uri_column)) or ""
            if not uri.strip():
                self.empty(n)
                continue
            uri = self.resolve(uri)
            image_id = as_text(row.get(self.id_column)) if self.id_column else None
            ids.append(image_id or uri.split("://", 1)[-1])
            uris.append(uri)
            if self.carried:
                extras.append(encode_extra({c: as_text(row.get(c)) for c in self.carried}))
        return ids, uris, extras


def _text(t) -> bool:
    import pyarrow as pa

    return (pa.types.is_string(t) or pa.types.is_large_string(t)
            or (pa.types.is_dictionary(t) and (pa.types.is_string(t.value_type)
                                               or pa.types.is_large_string(t.value_type))))


def _as_string(col):
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    return col if pa.types.is_string(col.type) else pc.cast(col, pa.string())


def _arrow_columns(batch, ctx: _ListFile):
    """:meth:`_ListFile.rows` on an Arrow record batch, column-wise: the same ids, URIs and extras.
    None where a column's type is not text (the URI) or text or integer (the id): ``as_text`` of
    other types (floats, booleans, lists) is Python's ``str`` / JSON, left to the row path."""
    import pyarrow as pa
    import pyarrow.compute as pc

    uri_col = batch.column(ctx.uri_column)
    id_col = batch.column(ctx.id_column) if ctx.id_column else None
    if not _text(uri_col.type) or (id_col is not None and not (_text(id_col.type) or pa.types.is_integer(id_col.type))):
        return None
    uris = _as_string(uri_col)
    # Empty: null, or nothing but whitespace (as str.strip has it); a printable ASCII character rules
    # that out at once, the rest (rare) is asked of Python.
    empty = np.zeros(len(uris), bool)
    printable = pc.fill_null(pc.match_substring_regex(uris, "[!-~]"), False).to_numpy(zero_copy_only=False)
    for j in np.flatnonzero(~printable).tolist():
        empty[j] = not (uris[j].as_py() or "").strip()
    relative = ~pc.fill_null(pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/")),
                             True).to_numpy(zero_copy_only=False) & ~empty
    if relative.any():
        resolved = [ctx.resolve(uris[j].as_py()) for j in np.flatnonzero(relative).tolist()]
        uris = pc.replace_with_mask(uris, pa.array(relative), pa.array(resolved, pa.string()))
    ids = given = _as_string(id_col) if id_col is not None else None
    present = pc.fill_null(pc.not_equal(given, ""), False) if given is not None else None
    if given is None or not pc.all(present).as_py():  # an id from the URI: uri.split("://", 1)[-1]
        ids = pc.replace_substring_regex(uris, "^(?s:.*?)://", "", max_replacements=1)
        if given is not None:
            ids = pc.if_else(present, given, ids)
    if empty.any():
        for j in np.flatnonzero(empty).tolist():
            ctx.empty(j)
        keep = pa.array(~empty)
        uris, ids = uris.filter(keep), ids.filter(keep)
        batch = batch.filter(keep)
    # the carried columns as they are: made into each row's JSON by hash_and_carry, in the pool
    extras = Carried(ctx.carried, [batch.column(c) for c in ctx.carried]) if ctx.carried else None
    return ids, uris, extras


class Carried:
    """Carried columns of a batch as Arrow columns, made into each row's ``extra`` (a JSON object
    of their values as text, as :meth:`_ListFile.rows` makes it) by :meth:`texts`, where the ids
    are hashed (a process of planning's pool, when there is one)."""

    def __init__(self, names: list[str], columns: list):
        self.names, self.columns = names, columns

    def texts(self) -> list[str]:
        values = [[as_text(v) for v in col.to_pylist()] for col in self.columns]
        return [encode_extra(dict(zip(self.names, row))) for row in zip(*values)]


def hash_and_carry(ids, extras) -> tuple:
    """(hi, lo, extras as texts): :func:`.parallel.hash_ids` of the ids, and a batch's carried
    columns made into its rows' ``extra`` (:class:`Carried`; a list of texts already, or None: as is)."""
    hi, lo = hash_ids(ids)
    return hi, lo, extras.texts() if isinstance(extras, Carried) else extras


def open_form(cfg, storage: Storage) -> InputForm:
    form = InputForm("list", lambda skipped: iter_list(cfg, storage, form, skipped),
                     batches=lambda skipped, pool=None: iter_list_batches(cfg, storage, form, skipped, pool))
    return form
