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
class InputForm:
    """An opened input: its units (streaming) and the columns it carries into the output."""

    name: str
    units: Callable[[Skipped], Iterator[dict]]
    carried: list[str] = field(default_factory=list)  # filled in as the units are listed
    duplicates: int = 0  # units whose image_id came before (lists): skipped, counted
    duplicate_examples: list[str] = field(default_factory=list)


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
