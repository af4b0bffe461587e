"""Exports: an output's rows -> the files other tools read. One module per format, each one entry
point ``export_<format>(output_uri, storage, out, ...) -> counts`` built from the pieces here:

    OutputRows    the output's rows, streamed a Parquet file at a time (never the whole output)
    Destination   ``--out`` (a local folder or ``s3://`` prefix): checked first (one line when it
                  cannot be written), then files put whole (local: a hidden temporary renamed into
                  place; S3: one upload), so an export cut short leaves no partial file
    TarShard      a tar file written member by member to a local temporary, then put whole
    groups()      the ok rows with their images, in shards: aligned with the input's tar shards
                  (each read in one streaming pass) or ``shard_size`` rows at a time
    ExportProgress the progress line

  coco.py        ``export-coco``: COCO results or dataset, one JSON file
  sa1b.py        ``export-sa1b``: SA-1B per-image records, JSON files or ``sa_000000.tar`` shards
  webdataset.py  ``export-webdataset``: ``{key}.jpg|png`` + ``{key}.json`` tar shards

Exports are cheap to redo rather than resumable: the same output exports to the same names and
contents, each file is put whole, and a re-run writes every file again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..decode import IMAGE_EXTENSIONS
from ..stats import OutputError, output_dataset
from ..storage import Storage, join_uri, protocol_of, strip_protocol

ROW_COLUMNS = ["image_id", "uri", "shard", "width", "height", "status", "masks", "prompts"]
READ_AHEAD = 8  # images read at once (objects on S3: one GET each)


class OutputRows:
    """The output's rows, streamed a Parquet file at a time: only one file's batches in memory."""

    def __init__(self, output_uri: str, storage: Storage):
        self.output_uri = output_uri
        self.ds = output_dataset(output_uri, storage)

    def batches(self, columns: list[str]):
        columns = [c for c in columns if c in self.ds.schema.names]
        for fragment in self.ds.get_fragments():  # one file after another, in the dataset's order
            yield from fragment.to_batches(columns=columns)

    def rows(self, columns: list[str]) -> Iterator[dict]:
        for batch in self.batches(columns):
            yield from batch.to_pylist()


def sample_name(image_id: str) -> str:
    """A file name (no folder, no dot) for an image: its id without the image extension, in safe
    characters, and 8 hex digits of the id's SHA-1, so two ids never share a name
    (``shapes/500.png`` -> ``shapes_500-1f0e3d2c``). The same id always gets the same name."""
    stem, ext = posixpath.splitext(image_id)
    if ext.lower() not in IMAGE_EXTENSIONS:
        stem = image_id
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "image"
    return f"{slug[-100:]}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


def rle(row: dict, m: dict) -> dict:
    """A mask's COCO RLE, as pycocotools takes it (``size`` is ``[height, width]``)."""
    return {"size": [row["height"], row["width"]], "counts": m["counts"]}


class Destination:
    """Where an export writes: a local folder (created) or an ``s3://`` prefix."""

    def __init__(self, out: str, storage: Storage, output_uri: str):
        self.uri = out.rstrip("/") if "://" in out else os.path.abspath(out)
        self.storage = storage
        self.local = protocol_of(self.uri) == "file"
        if strip_protocol(self.uri).rstrip("/") == strip_protocol(output_uri if "://" in output_uri
                                                                  else os.path.abspath(output_uri)).rstrip("/"):
            raise OutputError(f"--out {out!r}: that is the output itself; give another folder")

    def check(self) -> None:
        """The destination takes writes (locally: the folder is made), or one line says why not."""
        from ..preflight import PreflightError, check_writable

        if self.local and os.path.exists(self.uri) and not os.path.isdir(self.uri):
            raise OutputError(f"--out {self.uri!r}: a file is there, not a folder")
        try:
            check_writable("--out", self.uri, self.storage.for_checks())
        except PreflightError as e:
            raise OutputError(str(e)) from None

    def path(self, name: str) -> str:
        return os.path.join(self.uri, name) if self.local else join_uri(self.uri, name)

    def put_bytes(self, name: str, data: bytes) -> None:
        if self.local:
            target = self.path(name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        else:
            from ..retry import with_retries

            with_retries(lambda: self.storage.fs(self.uri).pipe_file(self.path(name), data))

    def temporary(self, name: str) -> str:
        """A local file to build ``name`` in (beside it when local), for :meth:`commit`."""
        if self.local:
            target = self.path(name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{uuid.uuid4().hex[:8]}.tmp")
        fd, tmp = tempfile.mkstemp(prefix="fastsam-export-", suffix=".tmp")
        os.close(fd)
        return tmp

    def commit(self, tmp: str, name: str) -> None:
        if self.local:
            os.replace(tmp, self.path(name))
            return
        from ..retry import with_retries

        try:
            with_retries(lambda: self.storage.fs(self.uri).put_file(tmp, self.path(name)))
        finally:
            os.unlink(tmp)


class TarShard:
    """A tar file written member by member (one member in memory), put whole when closed without an
    error; an error leaves nothing behind. Members are in the order added (WebDataset reads the
    files of a sample from consecutive members)."""

    def __init__(self, dest: Destination, name: str):
        self.dest, self.name = dest, name
        self.tmp = dest.temporary(name)
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self.members = 0

    def add(self, member: str, data: bytes) -> None:
        info = tarfile.TarInfo(member)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: the same export, the same bytes
        self.tar.addfile(info, io.BytesIO(data))
        self.members += 1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.tar.close()
        if exc_type is None:
            self.dest.commit(self.tmp, self.name)
        elif os.path.exists(self.tmp):
            os.unlink(self.tmp)
        return False


# --- images -------------------------------------------------------------------------------------

class ImageUnavailable(Exception):
    """The image of an ok row cannot be read now, or is not the image its row describes."""


def image_file(data: bytes, width: int, height: int) -> tuple[str, bytes]:
    """``(extension, bytes)`` of an image to store beside its masks: a JPEG or PNG as it is (its
    bytes untouched), any other format decoded, oriented as displayed and saved as PNG (lossless).
    Raises ImageUnavailable when it is not the ``width`` x ``height`` image (as displayed) of its row."""
    from PIL import Image, ImageOps

    try:
        img = Image.open(io.BytesIO(data))
        orientation = img.getexif().get(0x0112, 1)
        size = img.size[::-1] if orientation in (5, 6, 7, 8) else img.size
        if size != (width, height):
            raise ImageUnavailable(f"it is {size[0]}x{size[1]} now, its row says {width}x{height} "
                                   "(changed since it was segmented?)")
        if img.format in ("JPEG", "PNG"):
            return ("jpg" if img.format == "JPEG" else "png"), data
        img = ImageOps.exif_transpose(img)
        if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
            img = img.convert("RGBA" if "A" in img.mode else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "png", buf.getvalue()
    except ImageUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - said per image in the counts
        raise ImageUnavailable(f"not readable as an image now ({type(e).__name__}: {e})") from None


def _read_object(row: dict, storage: Storage) -> tuple[str, bytes]:
    from ..inputs import read_image_at

    try:
        data = read_image_at(row["uri"], storage)
    except Exception as e:  # noqa: BLE001
        from ..storage import storage_error_cause

        raise ImageUnavailable(f"cannot read it ({storage_error_cause(e)})") from None
    return image_file(data, row["width"], row["height"])


@dataclass
class Sample:
    row: dict
    image: tuple[str, bytes] | None = None  # (extension, bytes) when images are asked for
    missing: str | None = None  # why the image could not be had (the sample is then left out)
    member: str | None = None  # the tar member it came from (aligned shards)


@dataclass
class Group:
    """Rows exported together (one shard): ``index`` counts groups from 0; ``shard`` is the input
    tar shard's key (relative to the input) when aligned with it."""

    index: int
    samples: Iterator[Sample]
    shard: str | None = None
    size: int = 0


def _tar_member(row: dict) -> tuple[str, str] | None:
    """(shard URI, member) of a row read from a tar shard."""
    uri = row["uri"] or ""
    if row.get("shard") and uri.startswith("tar://") and "::" in uri:
        member, _, shard = uri[len("tar://"):].partition("::")
        return shard, member
    return None


def shard_key(row: dict, member: str) -> str:
    """The input shard's key relative to the input: the row's image_id without ``/<member>``."""
    return row["image_id"][: -len(member) - 1] if row["image_id"].endswith("/" + member) else posixpath.basename(
        row["shard"])


class Plan:
    """What the first, cheap pass over the output finds (status, shard and uri columns only): ok
    rows, error rows, and whether every ok row came from a tar shard (with its count per shard)."""

    def __init__(self, rows: OutputRows):
        self.ok = self.errors = 0
        self.per_shard: dict[str, int] = {}
        aligned = True
        for batch in rows.batches(["status", "shard", "uri"]):
            for status, shard, uri in zip(*(batch.column(c).to_pylist() for c in ("status", "shard", "uri"))):
                if status != "ok":
                    self.errors += 1
                    continue
                self.ok += 1
                if shard and (uri or "").startswith("tar://"):
                    self.per_shard[shard] = self.per_shard.get(shard, 0) + 1
                else:
                    aligned = False
        self.aligned = aligned and bool(self.per_shard)


def groups(rows: OutputRows, plan: Plan, storage: Storage, shard_size: int, with_images: bool,
           align: bool = True) -> Iterator[Group]:
    """The ok rows in groups: with ``align`` and an output of tar shards, one group per input shard
    (rows spooled to a local file until the shard's last row is read, then its images read in one
    pass over the shard, in its member order); otherwise ``shard_size`` rows at a time in the
    output's order (images read ``READ_AHEAD`` at a time)."""
    if align and plan.aligned:
        yield from _aligned(rows, plan, storage, with_images)
        return
    pool = ThreadPoolExecutor(READ_AHEAD) if with_images else None
    try:
        it = (r for r in rows.rows(ROW_COLUMNS) if r["status"] == "ok")
        index = 0
        while True:
            chunk = [r for _, r in zip(range(shard_size), it)]
            if not chunk:
                return
            yield Group(index, _with_images(chunk, storage, pool), size=len(chunk))
            index += 1
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _with_images(chunk: list[dict], storage: Storage, pool) -> Iterator[Sample]:
    if pool is None:
        yield from (Sample(r) for r in chunk)
        return
    pending = [pool.submit(_read_object, r, storage) for r in chunk[:READ_AHEAD]]
    for i, row in enumerate(chunk):
        if i + READ_AHEAD < len(chunk):
            pending.append(pool.submit(_read_object, chunk[i + READ_AHEAD], storage))
        try:
            yield Sample(row, image=pending[i].result())
        except ImageUnavailable as e:
            yield Sample(row, missing=str(e))
        pending[i] = None  # its bytes go once written


def _aligned(rows: OutputRows, plan: Plan, storage: Storage, with_images: bool) -> Iterator[Group]:
    order = {s: i for i, s in enumerate(sorted(plan.per_shard))}
    left = dict(plan.per_shard)
    spools: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory(prefix="fastsam-export-") as folder:
        for row in rows.rows(ROW_COLUMNS):
            if row["status"] != "ok":
                continue
            shard, member = _tar_member(row) or (row["shard"] or "", posixpath.basename(row["image_id"]))
            if shard not in order:  # a row the first pass did not see (a run wrote since): flushed at the end
                order[shard], left[shard] = len(order), -1
            if shard not in spools:
                spools[shard] = (open(os.path.join(folder, f"{order[shard]}.jsonl"), "w+b"), [],
                                 shard_key(row, member))
            f, members, key = spools[shard]
            members.append((member, f.tell()))
            f.write(json.dumps(row, default=str).encode() + b"\n")
            left[shard] -= 1
            if not left[shard]:
                del spools[shard]
                yield Group(order[shard], _shard_samples(shard, f, members, storage, with_images), shard=key,
                            size=len(members))
                f.close()
        for shard, (f, members, key) in spools.items():  # counts the first pass did not see (a run wrote since)
            yield Group(order[shard], _shard_samples(shard, f, members, storage, with_images), shard=key,
                        size=len(members))
            f.close()


def _shard_samples(shard: str, f, members: list[tuple[str, int]], storage: Storage,
                   with_images: bool) -> Iterator[Sample]:
    def row_at(offset: int) -> dict:
        f.seek(offset)
        return json.loads(f.readline())

    if not with_images:
        for member, offset in members:
            yield Sample(row_at(offset), member=member)
        return
    from ..inputs.tar_shards import ShardBroken, iter_members, open_shard
    from ..storage import storage_error_cause

    wanted = dict(members)
    stream = None
    try:
        stream, tar = open_shard(shard, storage)
        for name, data in iter_members(tar):
            offset = wanted.pop(name, None)
            if offset is None:
                continue
            row = row_at(offset)
            try:
                yield Sample(row, image=image_file(data, row["width"], row["height"]), member=name)
            except ImageUnavailable as e:
                yield Sample(row, missing=str(e), member=name)
            if not wanted:
                break
        why = "not in the shard now"
    except (ShardBroken, OSError, EOFError, tarfile.TarError) as e:
        why = f"the shard could not be read ({storage_error_cause(e)})"
    except Exception as e:  # noqa: BLE001 - a missing shard, refused credentials: said per image
        why = f"the shard could not be read ({storage_error_cause(e)})"
    finally:
        if stream is not None:
            stream.close()
    for member, offset in wanted.items():
        yield Sample(row_at(offset), missing=why, member=member)


# --- progress -----------------------------------------------------------------------------------

class ExportProgress:
    """``<command>: 1,234 / 5,000 images (24.7%), 3 shards`` on stderr: redrawn on a terminal,
    else a line every ``interval_s``; and a last line at :meth:`close`."""

    def __init__(self, command: str, total: int, interval_s: float = 10.0, stream=None):
        self.command, self.total, self.interval_s = command, total, interval_s
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.done = self.files = 0
        self.last = 0.0
        self.t0 = time.monotonic()

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate = self.done / max(time.monotonic() - self.t0, 1e-9)
        return f"{self.command}: {self.done:,} / {self.total:,} images ({pct:.1f}%), {self.files:,} files  {rate:.1f} images/s"

    def step(self, images: int = 1, files: int = 0) -> None:
        self.done += images
        self.files += files
        now = time.monotonic()
        if now - self.last >= (0.5 if self.live else self.interval_s):
            self.last = now
            self._say()

    def _say(self, end: bool = False) -> None:
        if self.live:
            self.stream.write("\r\033[K" + self.line() + ("\n" if end else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._say(end=True)


def job_storage(output_uri: str, storage: Storage, manifest: str | None = None) -> Storage:
    """How an export reads the images: with the job's ``storage_options``, from ``manifest`` (the
    job's YAML) when given, else from the ``_manifest.json`` the run left in the output, whose
    secrets are redacted (``***``): those are left out, and the standard AWS environment supplies
    them. No manifest in the output: the environment alone (as ``overlay``)."""
    if manifest is not None:
        from ..manifest import load_manifest

        return Storage(load_manifest(manifest).storage_options)
    try:
        doc = json.loads(storage.read_bytes(join_uri(output_uri, "_manifest.json")))
    except Exception:  # noqa: BLE001 - no record of the job: the environment's defaults
        return storage
    options = doc.get("storage_options") or {}

    def known(v):
        if isinstance(v, dict):
            return {k: known(x) for k, x in v.items() if x != "***"}
        return v

    return Storage(known(options)) if options else storage
