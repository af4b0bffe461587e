"""Input forms: what ``input.uri`` holds, turned into work units (plan stage) and back into images
(read stage). One module per form, each behind the same small interface:

    units(cfg, storage, skipped) -> Iterator[unit dict]      on the driver, streaming (plan)
    read_images(unit, storage, cfg, done) -> Iterator[Image] on the workers (containers only)

A unit is a plan row: ``image_id``, ``uri``, ``size``, ``etag``, ``kind``, ``extra`` (carried
columns, a JSON object as a string). ``kind`` says how it is read: ``object`` (one image, one GET:
files, lists, inventories) or a container of many images (``tar``, ``parquet``), read in one
streaming pass by the form's own ``read_images``; a container's ``image_id`` is its key.

:func:`open_input` picks the form from ``input.format``; adding a form touches its own module and
the table here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable

from ..schema import OUTPUT_SCHEMA

# Columns a list or a Parquet of images may not carry into the output: the schema's own, and the
# pipeline's internal ones.
RESERVED_COLUMNS = frozenset(OUTPUT_SCHEMA.names) | {"image", "extra", "kind", "done", "size", "etag",
                                                      "_unit_end", "_unit_rows"}

OBJECT, TAR, PARQUET = "object", "tar", "parquet"
CONTAINERS = (TAR, PARQUET)


class InputError(ValueError):
    """The input as a whole cannot be read as its ``input.format`` says (names the file and column)."""


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

    def merge(self, other: "Skipped") -> None:
        """The keys ``other`` skipped, counted after this one's (a part of the listing done apart)."""
        self.count += other.count
        room = len(other.examples) if self.limit is None else max(0, self.limit - len(self.examples))
        self.examples.extend(other.examples[:room])


@dataclass
class Image:
    """One image as a container's reader yields it: bytes, or the error that stands for it."""

    image_id: str
    uri: str
    data: bytes | None
    error: str | None = None
    extra: str = ""
    retries: int = 0


@dataclass
class UnitBatch:
    """Object units as columns (planning a billion of them one dict at a time is hours): ``table``
    holds :data:`UNIT_FIELDS` (strings; ``size`` int64; no nulls), in listing order; ``hi``/``lo``
    the ids' keys (:func:`.index.id_keys`) where the form has hashed them already (lists do, to
    find repeats), else None."""

    table: "object"  # pyarrow.Table
    hi: "object" = None
    lo: "object" = None

    def __len__(self) -> int:
        return self.table.num_rows

    def slice(self, at: int, n: int) -> "UnitBatch":
        """Units ``at`` to ``at + n`` (fewer at the end), with their keys where known."""
        part = slice(at, at + n)
        return UnitBatch(self.table.slice(at, n), None if self.hi is None else self.hi[part],
                         None if self.lo is None else self.lo[part])

    def keys(self):
        if self.hi is None:
            from ..index import id_keys

            self.hi, self.lo = id_keys(self.table.column("image_id").to_pylist())
        return self.hi, self.lo


UNIT_FIELDS = ("image_id", "uri", "size", "etag", "kind", "extra")
UNIT_BATCH = 4096  # units a form gives at a time as a UnitBatch (listing order kept)


def unit_batch(image_ids, uris, sizes=None, etags=None, extras=None, hi=None, lo=None) -> UnitBatch:
    """A :class:`UnitBatch` of object units from columns (lists or Arrow string arrays; ``sizes``
    and ``etags`` as :func:`unit` makes them: ints, stripped strings; None: 0 and "" for all)."""
    import pyarrow as pa

    import numpy as np

    def col(values, typ):
        return values if isinstance(values, pa.Array) and values.type == typ else pa.array(values, typ)

    n = len(image_ids)
    empty = pa.repeat(pa.scalar("", pa.string()), n)
    return UnitBatch(pa.table({
        "image_id": col(image_ids, pa.string()), "uri": col(uris, pa.string()),
        "size": col(sizes if sizes is not None else np.zeros(n, np.int64), pa.int64()),
        "etag": col(etags, pa.string()) if etags is not None else empty,
        "kind": pa.repeat(pa.scalar(OBJECT, pa.string()), n),
        "extra": col(extras, pa.string()) if extras is not None else empty}), hi, lo)


def batches_of_units(units: Iterator[dict], size: int | None = None) -> Iterator[UnitBatch]:
    """Object units (dicts, as :func:`unit` makes them) grouped into :class:`UnitBatch` es of
    ``size`` (default :data:`UNIT_BATCH`)."""
    size = size or UNIT_BATCH
    chunk: list[dict] = []
    for u in units:
        chunk.append(u)
        if len(chunk) >= size:
            yield _batch_of(chunk)
            chunk = []
    if chunk:
        yield _batch_of(chunk)


def _batch_of(chunk: list[dict]) -> UnitBatch:
    return unit_batch([u["image_id"] for u in chunk], [u["uri"] for u in chunk], [u["size"] for u in chunk],
                      [u["etag"] for u in chunk], [u["extra"] for u in chunk])


def units_of_batches(batches: Iterator[UnitBatch]) -> Iterator[dict]:
    """The units of :class:`UnitBatch` es as dicts (what :func:`unit` gives), in order."""
    for b in batches:
        yield from b.table.to_pylist()


def image_keys(key) -> "np.ndarray":
    """:func:`.decode.looks_like_image` of each key: its extension (from its last dot), lowercased,
    one of the image extensions. ASCII extensions column-wise; others (str.lower of a non-ASCII
    letter can be ASCII) by Python."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..decode import IMAGE_EXTENSIONS, looks_like_image

    ext = pc.struct_field(pc.extract_regex(key, r"(?s)(?P<ext>\.[^.]*)$"), [0])  # null: no dot
    ascii_ = pc.fill_null(pc.string_is_ascii(ext), True).to_numpy(zero_copy_only=False)
    out = pc.fill_null(pc.is_in(pc.ascii_lower(ext), value_set=pa.array(sorted(IMAGE_EXTENSIONS), pa.string())),
                       False).to_numpy(zero_copy_only=False).copy()
    for j in np.flatnonzero(~ascii_).tolist():
        out[j] = looks_like_image(key[j].as_py())
    return out


@dataclass
class InputForm:
    """An opened input: its units (streaming) and the columns it carries into the output. A form
    of object units may give them as ``batches`` (:class:`UnitBatch`), which planning takes
    instead of ``units`` (then ``units`` gives the same units as dicts)."""

    name: str
    units: Callable[[Skipped], Iterator[dict]]
    carried: list[str] = field(default_factory=list)  # filled in as the units are listed
    duplicates: int = 0  # units whose image_id came before (lists): skipped, counted
    duplicate_examples: list[str] = field(default_factory=list)
    # (skipped, a parallel.PlanPool or None) -> the units as batches; None: this form gives dicts only
    batches: Callable[..., Iterator[UnitBatch]] | None = None


def as_text(value) -> str | None:
    """A carried value as the output holds it: text (lists and structs as JSON); null stays null."""
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def encode_extra(extra: dict | None) -> str:
    """Carried columns as they travel with a unit or image: a JSON object as a string ("" none)."""
    return json.dumps(extra, separators=(",", ":"), default=str) if extra else ""


def unit(image_id: str, uri: str, size: int = 0, etag: str = "", kind: str = OBJECT, extra: dict | None = None) -> dict:
    return {"image_id": image_id, "uri": uri, "size": int(size or 0), "etag": str(etag or "").strip('"'),
            "kind": kind, "extra": encode_extra(extra)}


def check_carried(columns: list[str], where: str) -> None:
    """Carried columns keep their names in the output: a name of the schema's is refused."""
    clash = sorted(c for c in columns if c in RESERVED_COLUMNS)
    if clash:
        raise InputError(f"{where}: column{'s' if len(clash) > 1 else ''} {', '.join(map(repr, clash))} would be "
                         "carried into the output under a name the output schema uses; rename "
                         f"{'them' if len(clash) > 1 else 'it'} or leave {'them' if len(clash) > 1 else 'it'} out "
                         "of input.carry")


def open_input(cfg, storage) -> InputForm:
    """The form ``cfg.format`` names (``cfg``: the manifest's InputConfig)."""
    from . import files, inventory, lists, parquet_images, tar_shards

    forms = {"files": files.open_form, "list": lists.open_form, "s3_inventory": inventory.open_form,
             "tar": tar_shards.open_form, "parquet_images": parquet_images.open_form}
    return forms[cfg.format](cfg, storage)


def read_images(unit_row: dict, storage, cfg, done: frozenset[bytes]) -> Iterator[Image]:
    """The images of a container unit (tar shard, Parquet file), streaming; ``done``: id keys of
    images already committed (a run resumed mid-container), not yielded again."""
    from . import parquet_images, tar_shards

    readers = {TAR: tar_shards.read_images, PARQUET: parquet_images.read_images}
    return readers[unit_row["kind"]](unit_row, storage, cfg, done)


def read_image_at(uri: str, storage) -> bytes:
    """The bytes of the image a row's ``uri`` names: an object, a tar member
    (``tar://<member>::<shard>``) or a Parquet row (``<file>#row=<n>``). For ``overlay`` and other
    readers of one image; the job itself reads containers in one pass."""
    from . import parquet_images, tar_shards

    if uri.startswith("tar://") and "::" in uri:
        member, _, shard = uri[len("tar://"):].partition("::")
        return tar_shards.read_member(shard, member, storage)
    if "#row=" in uri:
        path, _, row = uri.rpartition("#row=")
        return parquet_images.read_row(path, int(row), storage)
    return storage.read_bytes(uri)
