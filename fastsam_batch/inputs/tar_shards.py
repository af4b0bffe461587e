"""Tar shards (WebDataset, SA-1B's ``sa_000000.tar``, img2dataset's output): ``input.uri`` is a
folder, prefix or glob of ``.tar`` files (``.tar.gz`` / ``.tgz`` too); one shard is one unit of the
plan, read in one streaming GET (see read.ObjectStream), never held whole.

Every image member becomes a row: ``image_id`` = ``<shard key>/<member>``, ``uri`` =
``tar://<member>::<shard uri>`` (fsspec opens it), ``shard`` = the shard's URI. Members that are
not images by extension (``sa_1.json``, ``.txt``, ``.cls``) are counted and skipped. A member that
does not decode is its own error row (as a loose file); a shard cut short gives an error row for
the member it cut (``read_failed``), and one for the rest it could not read
(``<shard key>#byte=<offset>``) when it breaks in a header; a shard that cannot be read at all is
one error row (``image_id`` = its key). The run goes on.
"""

from __future__ import annotations

import gzip
import tarfile
from collections.abc import Iterator
from types import SimpleNamespace

from ..decode import looks_like_image
from ..read import ObjectStream
from ..resume import id_key
from ..storage import Storage
from . import TAR, Image, InputForm, Skipped
from .files import iter_files

EXTENSIONS = (".tar", ".tar.gz", ".tgz")


class ShardBroken(Exception):
    """The shard's bytes stop being a tar archive (cut short, or a bad header)."""

    def __init__(self, message: str, offset: int, member: str | None = None):
        super().__init__(message)
        self.offset, self.member = offset, member


class _Forward:
    """A stream with the forward-only ``seek`` and exact ``read`` that tar headers need."""

    def __init__(self, f):
        self.f, self.pos = f, 0

    def read(self, n: int) -> bytes:
        chunks, want = [], n
        while want > 0:
            chunk = self.f.read(min(want, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            want -= len(chunk)
        data = b"".join(chunks)
        self.pos += len(data)
        return data

    def seek(self, pos: int) -> None:
        while self.pos < pos:
            if not self.read(min(pos - self.pos, 1 << 20)):
                break

    def tell(self) -> int:
        return self.pos


def iter_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a tar stream, in order, one member in memory at a
    time (no member list is kept, unlike tarfile's). Raises ShardBroken where the archive breaks."""
    tar = SimpleNamespace(fileobj=_Forward(f), offset=0, encoding=tarfile.ENCODING, errors="surrogateescape",
                          pax_headers={})
    while True:
        tar.fileobj.seek(tar.offset)
        at = tar.offset
        try:
            info = tarfile.TarInfo.fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the end-of-archive block
            return
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            raise ShardBroken(f"the shard ends at byte {tar.fileobj.tell()} without its end-of-archive blocks "
                              "(cut short?)", at) from None
        except (tarfile.InvalidHeaderError, tarfile.SubsequentHeaderError) as e:
            raise ShardBroken(f"bad tar header at byte {at} ({e})", at) from None
        if not info.isreg():
            continue
        name = info.name.removeprefix("./")
        data = tar.fileobj.read(info.size)
        if len(data) < info.size:
            raise ShardBroken(f"the shard is cut short inside member {name!r} ({len(data)} of its {info.size} bytes)",
                              at, name)
        yield name, data


def open_shard(uri: str, storage: Storage, etag: str = "") -> tuple[ObjectStream, object]:
    """(the object's stream, the tar bytes: the stream itself, or gunzipped for .gz / .tgz)."""
    stream = ObjectStream(uri, storage, etag)
    return stream, gzip.GzipFile(fileobj=stream) if uri.lower().endswith((".gz", ".tgz")) else stream


def read_images(u: dict, storage: Storage, cfg, done: frozenset[bytes]) -> Iterator[Image]:
    """The images of one shard, streaming; ``done``: id keys of members already committed. The
    count of non-image members skipped is the last thing returned (StopIteration.value)."""
    key, uri = u["image_id"], u["uri"]
    stream, f = open_shard(uri, storage, u.get("etag", ""))
    seen: set[str] = set()
    skipped = 0
    try:
        for name, data in iter_members(f):
            if name in seen or (cfg.skip_non_images and not looks_like_image(name)):
                skipped += 1  # side files (sa_1.json, .txt, .cls), and a name that came before
                continue
            seen.add(name)
            image_id = f"{key}/{name}"
            if id_key(image_id) in done:
                continue
            yield Image(image_id, f"tar://{name}::{uri}", data, retries=stream.retries)
    except ShardBroken as e:
        if e.member is not None and e.member not in seen:
            yield Image(f"{key}/{e.member}", f"tar://{e.member}::{uri}", None, f"read_failed: {e}", retries=stream.retries)
        else:
            yield Image(f"{key}#byte={e.offset}", f"{uri}#byte={e.offset}", None,
                        f"read_failed: {e}; the members after it could not be read", retries=stream.retries)
    except (OSError, EOFError, gzip.BadGzipFile, tarfile.TarError) as e:
        where = f" after {len(seen)} members" if seen else ""
        yield Image(key if not seen else f"{key}#byte={stream.tell()}", uri, None,
                    f"read_failed: the shard could not be read{where}: {type(e).__name__}: {e}", retries=stream.retries)
    finally:
        stream.close()
    return skipped


def open_form(cfg, storage: Storage) -> InputForm:
    def units(skipped: Skipped):
        return iter_files(cfg.uri, storage, skipped, lambda k: k.lower().endswith(EXTENSIONS), cfg.list_workers, TAR)
    return InputForm("tar", units)


def read_member(shard: str, member: str, storage: Storage) -> bytes:
    """One member's bytes, reading the shard up to it."""
    stream, f = open_shard(shard, storage)
    try:
        for name, data in iter_members(f):
            if name == member:
                return data
    finally:
        stream.close()
    raise FileNotFoundError(f"{shard}: no member {member!r}")
