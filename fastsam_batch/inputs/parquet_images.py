"""Parquet files holding the images themselves: a Hugging Face ``Image`` column (a struct of
``bytes`` and ``path``) or a plain binary column (img2dataset's parquet output). ``input.uri`` is a
folder, prefix or glob of ``.parquet`` files (or one); one file is one unit of the plan, read a row
group at a time.

``image_id`` = ``<file key>/<input.id_column value>`` (default: ``<file key>/<row number>``),
``uri`` = ``<file uri>#row=<row number>``, ``shard`` = the file's URI. ``input.carry`` names
columns carried into the output. Each file's schema is checked while planning, before any work: a
missing column, or an image column that is neither binary nor an ``Image`` struct, is an input
error naming the file and column. A row without image bytes is an error row; a file that cannot be
read from some row on gives one error row for the rest (``<file key>#rows=<n>-``).
"""

from __future__ import annotations

from collections.abc import Iterator

from ..resume import id_key
from ..storage import Storage, strip_protocol
from . import PARQUET, Image, InputError, InputForm, Skipped, as_text, check_carried, encode_extra
from .files import iter_files


def image_field(schema, column: str, where: str) -> str | None:
    """How the image bytes sit in ``column``: None (the column is binary) or the struct field
    ``bytes``. Raises InputError for anything else."""
    import pyarrow as pa

    if column not in schema.names:
        raise InputError(f"{where}: no {column!r} column (input.image_column); its columns: {', '.join(schema.names)}")
    t = schema.field(column).type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return None
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and (
            pa.types.is_binary(t.field("bytes").type) or pa.types.is_large_binary(t.field("bytes").type)):
        return "bytes"
    raise InputError(f"{where}: column {column!r} (input.image_column) is {t}, neither binary nor a Hugging Face "
                     "Image struct of bytes and path")


def check_file(uri: str, storage: Storage, cfg) -> int:
    """The file's schema checked (image column, id column, carried columns); returns its row count."""
    import pyarrow.parquet as pq

    where = f"input.uri: {uri}"
    try:
        with storage.fs(uri).open(strip_protocol(uri), "rb") as f:
            meta = pq.ParquetFile(f)
            schema, rows = meta.schema_arrow, meta.metadata.num_rows
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{where}: not a Parquet file ({type(e).__name__}: {e})") from None
    image_field(schema, cfg.image_column, where)
    for name, what in [(cfg.id_column, "input.id_column"), *((c, "input.carry") for c in cfg.carry or ())]:
        if name and name not in schema.names:
            raise InputError(f"{where}: no {name!r} column ({what})")
    return rows


def read_images(u: dict, storage: Storage, cfg, done: frozenset[bytes]) -> Iterator[Image]:
    """The images of one file, a row group at a time."""
    import pyarrow.parquet as pq

    key, uri = u["image_id"], u["uri"]
    carried = list(cfg.carry or ())
    columns = list(dict.fromkeys([cfg.image_column, *([cfg.id_column] if cfg.id_column else []), *carried]))
    row, seen = 0, set()
    try:
        with storage.fs(uri).open(strip_protocol(uri), "rb") as f:
            pf = pq.ParquetFile(f)
            field = image_field(pf.schema_arrow, cfg.image_column, f"input.uri: {uri}")
            for batch in pf.iter_batches(batch_size=16, columns=columns):
                images = batch.column(cfg.image_column)
                if field:
                    paths = images.field("path").to_pylist() if images.type.get_field_index("path") >= 0 else None
                    images = images.field(field)
                else:
                    paths = None
                ids = batch.column(cfg.id_column).to_pylist() if cfg.id_column else None
                extras = {c: batch.column(c).to_pylist() for c in carried}
                for i in range(batch.num_rows):
                    n, row = row, row + 1
                    name = as_text(ids[i]) if ids is not None else str(n)
                    if name in seen:
                        continue
                    seen.add(name)
                    image_id = f"{key}/{name}"
                    if id_key(image_id) in done:
                        continue
                    extra = {c: as_text(v[i]) for c, v in extras.items()}
                    data = images[i].as_py()
                    error = None
                    if not data:
                        error = "read_failed: no image bytes in this row" + (
                            f" (its path is {paths[i]!r}: images stored as paths are not read)" if paths and paths[i] else "")
                    yield Image(image_id, f"{uri}#row={n}", data or None, error, encode_extra(extra))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - the rest of the file is one error row; the run goes on
        yield Image(f"{key}#rows={row}-", f"{uri}#row={row}", None,
                    f"read_failed: the Parquet file could not be read from row {row} on: {type(e).__name__}: {e}")
    return 0


def open_form(cfg, storage: Storage) -> InputForm:
    form = InputForm("parquet_images", lambda skipped: units(skipped))
    form.carried = list(cfg.carry or ())

    def units(skipped: Skipped):
        check_carried(form.carried, "input.carry")
        for u in iter_files(cfg.uri, storage, skipped, lambda k: k.lower().endswith(".parquet"), cfg.list_workers,
                            PARQUET):
            u["rows"] = check_file(u["uri"], storage, cfg)
            yield u
    return form


def read_row(uri: str, row: int, storage: Storage) -> bytes:
    """The image bytes of one row: of the file's one binary column or Image struct."""
    import pyarrow.parquet as pq

    with storage.fs(uri).open(strip_protocol(uri), "rb") as f:
        pf = pq.ParquetFile(f)
        columns = []
        for name in pf.schema_arrow.names:
            try:
                columns.append((name, image_field(pf.schema_arrow, name, uri)))
            except InputError:
                pass
        if len(columns) != 1:
            raise InputError(f"{uri}: {len(columns)} columns of image bytes; cannot tell which to read")
        name, field = columns[0]
        start = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row < start + n:
                value = pf.read_row_group(g, columns=[name]).column(name)[row - start]
                data = value.as_py()
                data = data.get(field) if field else data
                if not data:
                    raise InputError(f"{uri}#row={row}: no image bytes")
                return bytes(data) if not isinstance(data, bytes) else data
            start += n
    raise IndexError(f"{uri}: no row {row}")
