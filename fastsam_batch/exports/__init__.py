"""Exports: an output's rows -> the files other tools read. One module per format, each one entry
point ``export_<format>(output_uri, storage, out, ...) -> counts`` built from the pieces here:

    OutputRows    the output's rows, streamed a Parquet file at a time (never the whole output),
                  rows written twice kept once as the job's repair would
    Destination   ``--out`` (a local folder or ``s3://`` prefix): checked before any image is read
                  (one line when it cannot be written, or holds files without --overwrite), then
                  files put whole (local: a hidden temporary renamed into place; S3: one upload), so
                  an export cut short leaves no partial file
    TarShard      a tar file written member by member to a local temporary, then put whole
    groups()      the ok rows with their images, in shards: aligned with the input's tar shards
                  (each read in one streaming pass) or ``shard_size`` rows at a time
    ExportProgress the progress line (reading the output, then images)

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

ROW_COLUMNS = ["image_id", "uri", "shard", "source_version", "width", "height", "status", "masks", "prompts"]
READ_AHEAD = 8  # images read at once (objects on S3: one GET each)


class OutputRows:
    """The output's rows, streamed a Parquet file at a time: only one file's batches in memory.

    Rows of one image written twice (a run killed before its end-of-run repair: two runs at once,
    a rewrite cut short) are reduced to one as that repair would (:func:`.resume.duplicate_rows`:
    an ok row over an error row, else the first); rows of several versions of one image (an object
    that changed, the run cut short before it dropped the old rows) stop the export with one line,
    since only a run that lists the input knows which version is current. The check holds about
    40 bytes per row (:class:`.resume.Committed`; twice that while sorting) while it runs."""

    def __init__(self, output_uri: str, storage: Storage):
        self.output_uri = output_uri
        self.ds = output_dataset(output_uri, storage)
        self.drop, self.keep_one = self._duplicates(output_uri, storage)
        self.duplicates = sum(len(v) for v in self.drop.values()) + sum(len(v) for v in self.keep_one.values())

    @staticmethod
    def _duplicates(output_uri: str, storage: Storage) -> tuple[dict, dict]:
        import numpy as np

        from ..resume import duplicate_rows, read_committed

        c = read_committed(output_uri, storage)
        if c.rows > 1:  # another version of the same image (rows of no recorded version, 0, match any)
            cols = [c.hi, c.lo] if hasattr(c, "hi") else [c.keys]  # the index's 128-bit key columns, or S16 keys
            order = np.lexsort((c.versions, *cols[::-1]))
            same = np.ones(len(order) - 1, bool)
            for col in cols:
                sorted_col = col[order]
                same &= sorted_col[1:] == sorted_col[:-1]
            versions = c.versions[order]
            other = np.flatnonzero(same & (versions[1:] != versions[:-1]) & (versions[:-1] != 0))
            if len(other):
                images = len({tuple(col[order[i]].tolist() for col in cols) for i in other.tolist()})
                raise OutputError(
                    f"{output_uri!r}: {images:,} images have rows of two versions of their "
                    "object (a run stopped before it replaced the old rows); run the job again (it keeps "
                    "the current version's rows), then export")
        twice = duplicate_rows(c)
        name = lambda p: p.rstrip("/").rsplit("/", 1)[-1]  # noqa: E731
        return ({name(p): v for p, v in twice.drop.items()}, {name(p): v for p, v in twice.keep_one.items()})

    def _dropped(self, fragment) -> set[int] | None:
        """Indices of the rows of ``fragment`` (a part file) left out as duplicates; None: none."""
        from ..resume import id_key, version_keys_arrow

        name = fragment.path.rstrip("/").rsplit("/", 1)[-1]
        gone, once = self.drop.get(name, set()), self.keep_one.get(name, set())
        if not gone and not once:
            return None
        cols = ["image_id", "status"] + (["source_version"] if "source_version" in self.ds.schema.names else [])
        t = fragment.to_table(columns=cols)
        ids, statuses = t.column("image_id").to_pylist(), t.column("status").to_pylist()
        versions = (version_keys_arrow(t.column("source_version")).tolist() if "source_version" in cols
                    else [0] * len(ids))
        pairs = [(id_key(i), v) for i, v in zip(ids, versions)]
        out = {i for i, p in enumerate(pairs) if p in gone}
        chosen: dict = {}
        for i, p in enumerate(pairs):  # as repair.drop_rows: an ok row, else the first
            if p in once and (p not in chosen or (statuses[i] == "ok" and statuses[chosen[p]] != "ok")):
                chosen[p] = i
        out |= {i for i, p in enumerate(pairs) if p in chosen and chosen[p] != i}
        return out

    def fragments(self) -> list:
        return list(self.ds.get_fragments())

    def rows(self, columns: list[str], on_file=None) -> Iterator[dict]:
        """The rows (duplicates left out), a file at a time; ``on_file()`` after each file."""
        columns = [c for c in columns if c in self.ds.schema.names]
        for fragment in self.ds.get_fragments():  # one file after another, in the dataset's order
            dropped = self._dropped(fragment)
            i = 0
            for batch in fragment.to_batches(columns=columns):
                for row in batch.to_pylist():
                    if dropped is None or i not in dropped:
                        yield row
                    i += 1
            if on_file is not None:
                on_file()


def sample_name(image_id: str) -> str:
    """A file name (no folder, no dot) for an image: its id without the image extension, in safe
    characters, and 8 hex digits of the id's SHA-1, so two ids never share a name
    (``shapes/500.png`` -> ``shapes_500-1f0e3d2c``). The same id always gets the same name."""
    stem, ext = posixpath.splitext(image_id)
    if ext.lower() not in IMAGE_EXTENSIONS:
        stem = image_id
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "image"
    return f"{slug[-100:]}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


_HIDDEN_TMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # Destination's temporaries: .<name>.<8 hex>.tmp


def public_uri(uri: str | None) -> str | None:
    """A row's ``uri`` without what must not travel with a dataset: the user info (``user:pass@``)
    of each URL in it (``tar://m::URL`` too) and an http(s) URL's query string (a presigned URL's
    signature; its ``#row=N`` stays)."""
    from urllib.parse import urlsplit, urlunsplit

    def clean(u: str) -> str:
        if "://" not in u:
            return u
        try:
            p = urlsplit(u)
        except ValueError:
            return u.split("?", 1)[0]
        if p.scheme.lower() not in ("http", "https"):  # an s3:// key may hold '?' or '#' itself
            return f"{p.scheme}://{p.netloc.rpartition('@')[2]}{u.split('://', 1)[1][len(p.netloc):]}"
        return urlunsplit((p.scheme, p.netloc.rpartition("@")[2], p.path, "", p.fragment))

    if not uri:
        return uri
    if uri.startswith("tar://") and "::" in uri:
        member, _, shard = uri.partition("::")
        return f"{member}::{clean(shard)}"
    return clean(uri)


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

    def prepare(self, command: str, owns, overwrite: bool) -> None:
        """Before an export writes: :meth:`check`; hidden temporaries a killed export left
        (``.*.tmp``, local) removed; and a ``--out`` holding files refused (one line) unless
        ``overwrite``, which removes the files ``owns(relative path)`` says this export kind writes
        (an earlier export's shards would otherwise stay beside the new ones) and nothing else."""
        self.check()
        names = self.listing()
        stale = [n for n in names if _HIDDEN_TMP.match(posixpath.basename(n))]
        if stale and self.local:
            for n in stale:
                os.unlink(self.path(n))
            names = [n for n in names if n not in set(stale)]
        if not names:
            return
        mine = [n for n in names if owns(n)]
        if not overwrite:
            raise OutputError(f"--out {self.uri!r}: not empty ({len(names):,} files, e.g. {names[0]}); give an empty "
                              f"or new folder, or --overwrite to replace an earlier {command}'s files there "
                              "(only those are removed)")
        if mine:
            if self.local:
                for n in mine:
                    os.unlink(self.path(n))
            else:
                self.storage.fs(self.uri).rm([strip_protocol(self.path(n)) for n in mine])

    def listing(self) -> list[str]:
        """The files under ``--out``, as paths relative to it (sorted)."""
        if self.local:
            if not os.path.isdir(self.uri):
                return []
            return sorted(os.path.relpath(os.path.join(d, f), self.uri).replace(os.sep, "/")
                          for d, _, files in os.walk(self.uri) for f in files)
        fs = self.storage.fs(self.uri)
        root = strip_protocol(self.uri).rstrip("/")
        fs.invalidate_cache(root)
        try:
            found = fs.find(root)
        except FileNotFoundError:
            return []
        return sorted(posixpath.relpath(p, root) for p in found if p.rstrip("/") != root)

    def path(self, name: str) -> str:
        parts = name.split("/")
        if not name or name.startswith("/") or ".." in parts or "" in parts:
            raise OutputError(f"--out: {name!r} would be written outside {self.uri} (an input shard key with "
                              "'..' or a leading '/'?)")
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
    """``(extension, bytes)`` of an image to store beside its masks, in the orientation its row's
    width, height and masks are in (as displayed, decode.py): a JPEG or PNG without an EXIF
    rotation as it is (its bytes untouched); a JPEG with one (orientation 2-8) turned as displayed
    and saved as JPEG, quality 95 (readers that ignore EXIF would misplace every mask on the
    original bytes); any other format, or a PNG with a rotation, decoded, turned as displayed and
    saved as PNG (lossless). Raises ImageUnavailable when it is not the ``width`` x ``height``
    image (as displayed) of its row."""
    from PIL import Image, ImageOps

    try:
        img = Image.open(io.BytesIO(data))
        orientation = img.getexif().get(0x0112, 1)
        turned = orientation in (2, 3, 4, 5, 6, 7, 8)
        size = img.size[::-1] if orientation in (5, 6, 7, 8) else img.size
        if size != (width, height):
            raise ImageUnavailable(f"it is {size[0]}x{size[1]} now, its row says {width}x{height} "
                                   "(changed since it was segmented?)")
        if img.format in ("JPEG", "PNG") and not turned:
            return ("jpg" if img.format == "JPEG" else "png"), data
        jpeg = img.format == "JPEG"
        img = ImageOps.exif_transpose(img)
        buf = io.BytesIO()
        if jpeg:
            if img.mode not in ("L", "RGB", "CMYK"):
                img = img.convert("RGB")
            img.save(buf, format="JPEG", quality=95)
            return "jpg", buf.getvalue()
        if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
            img = img.convert("RGBA" if "A" in img.mode else "RGB")
        img.save(buf, format="PNG")
        return "png", buf.getvalue()
    except ImageUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - said per image in the counts
        raise ImageUnavailable(f"not readable as an image now ({type(e).__name__}: {e})") from None


def changed_since(row: dict, uri: str, storage: Storage) -> str | None:
    """Why the object ``uri`` (the image, or its tar shard or Parquet file) is not the one the row
    was made from, or None: its version now (ETag on S3, modification time locally, and size)
    compared with the row's ``source_version``. Rows without a recorded version (URL lists, older
    outputs) are not checked."""
    want = row.get("source_version") or ""
    if not want.rpartition("/")[0]:
        return None
    from ..inputs.files import version_of

    info = storage.fs(uri).info(strip_protocol(uri))
    now = f"{version_of(info)}/{int(info.get('size') or 0)}"
    if now != want:
        return f"changed since it was segmented (its version is {now}, its row's {want})"
    return None


def _read_object(row: dict, storage: Storage) -> tuple[str, bytes]:
    """An image read on its own: an object, or (an output mixing tar rows with others, not aligned)
    a tar member, found by reading its shard up to it."""
    from ..inputs import read_image_at
    from ..storage import storage_error_cause

    try:
        at = _tar_member(row)
        why = changed_since(row, at[0] if at else row["uri"], storage)
        data = None if why else read_image_at(row["uri"], storage)
    except Exception as e:  # noqa: BLE001
        raise ImageUnavailable(f"cannot read it ({storage_error_cause(e)})") from None
    if why:
        raise ImageUnavailable(why)
    return image_file(data, row["width"], row["height"])


@dataclass
class Sample:
    row: dict
    image: tuple[str, bytes] | None = None  # (extension, bytes) when images are asked for
    missing: str | None = None  # why the image could not be had (the sample is then left out)
    member: str | None = None  # the tar member it came from (aligned shards)


def left_out(counts: dict, sample: Sample, shown) -> bool:
    """Whether ``sample`` is left out (its image could not be had): then counted as unavailable, one
    of the first three named in ``counts["examples"]``, and the progress stepped past it."""
    if sample.missing is None:
        return False
    counts["unavailable"] += 1
    if len(counts["examples"]) < 3:
        counts["examples"].append(f"{sample.row['image_id']}: {sample.missing}")
    if shown:
        shown.step()
    return True


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


def _parquet_row(row: dict) -> tuple[str, int] | None:
    """(Parquet file URI, row number) of a row read from a Parquet file of images."""
    uri = row["uri"] or ""
    if row.get("shard") and "#row=" in uri:
        path, _, n = uri.rpartition("#row=")
        if n.isdigit():
            return path, int(n)
    return None


def shard_key(row: dict, member: str) -> str:
    """The input shard's key relative to the input: the row's image_id without ``/<member>``."""
    return row["image_id"][: -len(member) - 1] if row["image_id"].endswith("/" + member) else posixpath.basename(
        row["shard"])


class Plan:
    """What the first, cheap pass over the output finds (status, shard and uri columns only): ok
    rows, error rows, and whether every ok row came from a tar shard (with its count per shard:
    memory of one entry per input shard)."""

    def __init__(self, rows: OutputRows, progress: "ExportProgress | None" = None):
        self.ok = self.errors = 0
        self.per_shard: dict[str, int] = {}  # input tar shard URI -> its ok rows
        self.keys: dict[str, str] = {}  # input tar shard URI -> its key relative to the input
        aligned = True
        files = len(rows.fragments())
        done = 0

        def on_file():
            nonlocal done
            done += 1
            if progress is not None:
                progress.reading(done, files)

        if progress is not None:
            progress.reading(0, files)
        for row in rows.rows(["image_id", "source_version", "status", "shard", "uri"], on_file):
            if row["status"] != "ok":
                self.errors += 1
                continue
            self.ok += 1
            at = _tar_member(row)
            if at is not None:
                self.per_shard[at[0]] = self.per_shard.get(at[0], 0) + 1
                if at[0] not in self.keys:
                    self.keys[at[0]] = shard_key(row, at[1])
            else:
                aligned = False
        self.aligned = aligned and bool(self.per_shard)


def groups(rows: OutputRows, plan: Plan, storage: Storage, shard_size: int, with_images: bool,
           align: bool = True) -> Iterator[Group]:
    """The ok rows in groups: with ``align`` and an output of tar shards, one group per input shard
    (rows spooled to one local file until the shard's last row is read, then its images read in one
    pass over the shard, in its member order); otherwise ``shard_size`` rows at a time in the
    output's order (objects read ``READ_AHEAD`` at a time, rows of Parquet files of images a file
    at a time, each row group read once)."""
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
    """The chunk's samples: objects first (in the chunk's order), then the rows of each Parquet
    file of images (in order of first appearance, each file's rows in row order)."""
    if pool is None:
        yield from (Sample(r) for r in chunk)
        return
    objects, files = [], {}
    for r in chunk:
        at = _parquet_row(r)
        if at is None:
            objects.append(r)
        else:
            files.setdefault(at[0], []).append((at[1], r))
    pending = [pool.submit(_read_object, r, storage) for r in objects[:READ_AHEAD]]
    for i, row in enumerate(objects):
        if i + READ_AHEAD < len(objects):
            pending.append(pool.submit(_read_object, objects[i + READ_AHEAD], storage))
        try:
            yield Sample(row, image=pending[i].result())
        except ImageUnavailable as e:
            yield Sample(row, missing=str(e))
        pending[i] = None  # its bytes go once written
    for path, wanted in files.items():
        yield from _parquet_samples(path, wanted, storage)


def _image_column(schema, uri: str) -> tuple[str, str | None]:
    from ..inputs import InputError
    from ..inputs.parquet_images import image_field

    columns = []
    for name in schema.names:
        try:
            columns.append((name, image_field(schema, name, uri)))
        except InputError:
            pass
    if len(columns) != 1:
        raise InputError(f"{len(columns)} columns of image bytes; cannot tell which to read")
    return columns[0]


def _parquet_samples(path: str, wanted: list[tuple[int, dict]], storage: Storage) -> Iterator[Sample]:
    """The samples of rows of one Parquet file of images: the file opened once, only the row
    groups holding wanted rows read, each once, a batch of its image column at a time."""
    import pyarrow.parquet as pq

    from ..storage import storage_error_cause

    wanted = sorted(wanted, key=lambda x: x[0])
    left = {n: r for n, r in wanted}
    why = "not in the file now"
    try:
        changed = changed_since(wanted[0][1], path, storage)
        if changed:
            why = changed
            raise LookupError
        with storage.fs(path).open(strip_protocol(path), "rb") as f:
            pf = pq.ParquetFile(f)
            name, field = _image_column(pf.schema_arrow, path)
            start = 0
            for g in range(pf.num_row_groups):
                n_rows = pf.metadata.row_group(g).num_rows
                if any(start <= n < start + n_rows for n in left):
                    n = start
                    for batch in pf.iter_batches(batch_size=64, row_groups=[g], columns=[name]):
                        col = batch.column(0)
                        for i in range(batch.num_rows):
                            row = left.pop(n + i, None)
                            if row is None:
                                continue
                            value = col[i].as_py()
                            data = value.get(field) if field and value else value
                            try:
                                if not data:
                                    raise ImageUnavailable("no image bytes in its row now")
                                yield Sample(row, image=image_file(data, row["width"], row["height"]))
                            except ImageUnavailable as e:
                                yield Sample(row, missing=str(e))
                        n += batch.num_rows
                start += n_rows
                if not left:
                    break
    except LookupError:
        pass
    except Exception as e:  # noqa: BLE001 - a missing file, refused credentials: said per image
        why = f"the Parquet file could not be read ({storage_error_cause(e)})"
    for row in left.values():
        yield Sample(row, missing=why)


def _aligned(rows: OutputRows, plan: Plan, storage: Storage, with_images: bool) -> Iterator[Group]:
    """One group per input tar shard. Rows go to one append-only spool file (one line each: the
    shard's number, the member, the row), and each open shard keeps only where its rows start
    and end there; when a shard's last row is read, its lines are read back (an index of its
    members built then) and the group yielded; the spool is emptied whenever no shard is open.
    The file list is fixed when the export starts (OutputRows), so the second pass sees exactly
    the rows the first counted."""
    order = {s: i for i, s in enumerate(sorted(plan.per_shard))}
    left = dict(plan.per_shard)
    span: dict[str, list[int]] = {}  # open shard -> [offset of its first line, offset after its last]
    with tempfile.TemporaryFile(prefix="fastsam-export-", suffix=".jsonl") as spool:
        for row in rows.rows(ROW_COLUMNS):
            if row["status"] != "ok":
                continue
            shard, member = _tar_member(row) or (row["shard"] or "", posixpath.basename(row["image_id"]))
            if not left.get(shard):
                raise OutputError(f"{rows.output_uri!r}: its files changed while it was exported; export again")
            if shard not in span:
                span[shard] = [spool.tell(), 0]
            spool.write(f"{order[shard]}\t{json.dumps(member)}\t{json.dumps(row, default=str)}\n".encode())
            span[shard][1] = spool.tell()
            left[shard] -= 1
            if not left[shard]:
                first, end = span.pop(shard)
                yield Group(order[shard], _shard_samples(shard, _spooled(spool, order[shard], first, end), storage,
                                                         with_images), shard=plan.keys[shard], size=plan.per_shard[shard])
                if span:
                    spool.seek(0, os.SEEK_END)
                else:  # no shard open: nothing in the spool is needed any more
                    spool.seek(0)
                    spool.truncate()
        if span:
            raise OutputError(f"{rows.output_uri!r}: its files changed while it was exported; export again")


class _Spooled:
    """One shard's rows in the spool: ``members`` (member -> offset of its line, in spool order),
    built when the shard is flushed, and :meth:`row`."""

    def __init__(self, spool, members: dict[str, int]):
        self.spool, self.members = spool, members

    def row(self, offset: int) -> dict:
        self.spool.seek(offset)
        return json.loads(self.spool.readline().split(b"\t", 2)[2])


def _spooled(spool, number: int, first: int, end: int) -> _Spooled:
    members: dict[str, int] = {}
    prefix = f"{number}\t".encode()
    spool.seek(first)
    offset = first
    while offset < end:
        line = spool.readline()
        if line.startswith(prefix):
            members[json.loads(line.split(b"\t", 2)[1])] = offset
        offset += len(line)
    return _Spooled(spool, members)


def _shard_samples(shard: str, spooled: _Spooled, storage: Storage, with_images: bool) -> Iterator[Sample]:
    if not with_images:
        for member, offset in spooled.members.items():
            yield Sample(spooled.row(offset), member=member)
        return
    from ..inputs.tar_shards import iter_members, open_shard
    from ..storage import storage_error_cause

    wanted = dict(spooled.members)
    stream = None
    why = "not in the shard now"
    try:
        changed = changed_since(spooled.row(next(iter(wanted.values()))), shard, storage) if wanted else None
        if changed:
            why = changed
        else:
            stream, tar = open_shard(shard, storage)
            for name, data in iter_members(tar):
                offset = wanted.pop(name, None)
                if offset is None:
                    continue
                row = spooled.row(offset)
                try:
                    yield Sample(row, image=image_file(data, row["width"], row["height"]), member=name)
                except ImageUnavailable as e:
                    yield Sample(row, missing=str(e), member=name)
                if not wanted:
                    break
    except Exception as e:  # noqa: BLE001 - a broken or missing shard, refused credentials: said per image
        why = f"the shard could not be read ({storage_error_cause(e)})"
    finally:
        if stream is not None:
            stream.close()
    for member, offset in wanted.items():
        yield Sample(spooled.row(offset), missing=why, member=member)


# --- progress -----------------------------------------------------------------------------------

class ExportProgress:
    """``<command>: reading the output: 3 / 12 files`` while the output is read first, then
    ``<command>: 1,234 / 5,000 images (24.7%), 3 files`` on stderr: redrawn on a terminal, else a
    line every ``interval_s`` (and the first of each phase at once); and a last line at :meth:`close`."""

    def __init__(self, command: str, total: int = 0, interval_s: float = 10.0, stream=None):
        self.command, self.total, self.interval_s = command, total, interval_s
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.done = self.files = 0
        self.last = 0.0
        self.t0 = time.monotonic()
        self.text: str | None = None  # the reading phase's line, while it lasts

    def line(self) -> str:
        if self.text is not None:
            return self.text
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate = self.done / max(time.monotonic() - self.t0, 1e-9)
        return f"{self.command}: {self.done:,} / {self.total:,} images ({pct:.1f}%), {self.files:,} files  {rate:.1f} images/s"

    def reading(self, done: int, files: int) -> None:
        self.text = f"{self.command}: reading the output: {done:,} / {files:,} files"
        now = time.monotonic()
        if done == 0 or now - self.last >= (0.5 if self.live else self.interval_s):
            self.last = now
            self._say()

    def start(self, total: int) -> None:
        """The reading phase is over: images from here on."""
        self.text, self.total, self.t0, self.last = None, total, time.monotonic(), 0.0

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
