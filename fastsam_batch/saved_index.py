"""The committed index saved under the output (``_index/``): a run's start reads it in place of the
committed files it covers, so that a resumed output of a billion rows is not read file by file
again (issue 23).

What is saved is a :class:`.index.Committed` as a run's end leaves it (current with the output as
last listed): its records as they are in memory or on the scratch disk (:data:`.index.ROW`, 40
bytes a row, in key order) in ``_index/<token>.rows``, and a header ``_index/<token>.json`` (the
files the rows are of, each with the listing entry it had when read, its fingerprints; the error
reasons; the row count, a checksum of the records, the key format). The header is written after
the records, so a header names records complete on storage; older saves are deleted after it.

Trusting it is checked file by file, as :func:`.resume.refresh_committed` trusts what a run read:
a committed file's rows are taken from the save only where the file is listed now with the same
listing entry as when its rows were read, and only an entry that tells content apart
(:func:`.resume.stamp_tells_content`: size and ETag; or a local file's size, modification time,
inode and ctime; not an object store's entry without an ETag). Files gone lose their rows; files
new or changed are read as before. A save that cannot be used (cut short, of another format or
byte order, a checksum that does not match, rows out of key order or naming a file or reason its
header does not have) is a warning, and every committed file is read: the save only ever saves
time. A save that covers none of the files listed is not read at all.

Keys persist across runs here (and only here): the id keys' BLAKE2b and the version and
container keys' hash (:func:`.index.hash_texts`) are named by :data:`KEY_FORMAT`, which must
change with either, so that a save of other keys is not used.

During a run (:class:`.checkpoints.IndexCheckpoints`) the files it publishes are read back every so
often and saved as a *delta*: ``_index/<token>.delta.rows`` and ``.delta.json``, the same records
and header for just those files. A start takes the newest full save and every delta there, each
file's rows from the newest delta that holds it as it is listed now, else from the full save (the
same trust, file by file), so a run that was killed has only the files since its last delta read again; a run's
end uses its own deltas in place of reading back what it wrote, and its full save deletes them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from typing import Iterator, NamedTuple

import numpy as np

from .index import ROW, Committed, FileGroup, _Scratch, _kept, _read, _spans
from .retry import with_retries
from .storage import Storage, join_uri, protocol_of, strip_protocol

_log = logging.getLogger(__name__)

INDEX_DIR = "_index"  # the committed index saved: _index/<token>.rows + _index/<token>.json
# the save's format: the keys (ids: BLAKE2b 128 bits; versions, containers: index.hash_texts), the
# record (index.ROW), the checksum (_verified), and how a committed file's rows become records
# (resume.read_file_rows: which rows are ok, the error reasons, index.error_reason's). A change of
# any of them changes this, and older saves are then not used (read again from the files, once).
KEY_FORMAT = ("saved-index-1;ids:blake2b-128;versions,containers:hash_texts-64-v1;row:40;checksum:word-sums-1;"
              "rows:resume.read_file_rows-1")  # (-1: how a file's rows become records: ok, error_reason, columns)
_BLOCK = 1 << 20  # records a step of a pass over the saved rows (40 MiB)


# A record is five 64-bit words (:data:`.index.ROW`): hi, lo, versions, units, and part_of,
# reason_of, ok with a byte of padding, the word's top byte on a little-endian machine (a copy need
# not keep it; a save of another byte order is not used).
_WORDS = ROW.itemsize // 8
_LAST_WORD = np.uint64((1 << 56) - 1) if sys.byteorder == "little" else np.uint64(((1 << 56) - 1) << 8)


def _verified(records: np.ndarray, parts: int | None = None, reasons: int | None = None) -> int:
    """A checksum of the records' fields: each of their five words summed modulo 2^64 (the last
    without its padding byte), the sums weighted by 1, 3, 5, 7, 9 and added (a changed bit of any
    field changes it; rows moved about are not: the key order below is checked for that), in a pass
    in blocks. With ``parts`` and ``reasons`` (their counts) the
    records are checked in the same pass: in key order (:func:`.index.sort_keys`' order of hi, then lo), each file index and
    reason within the header's (a :class:`SavedIndexError` otherwise)."""
    total = 0
    prev = None
    for a, b in _spans(len(records), _BLOCK):
        block = _read(records, a, b) if isinstance(records, np.memmap) else records[a:b]  # (a view: no copy)
        words = np.ascontiguousarray(block).view(np.uint64).reshape(-1, _WORDS)
        sums = np.add.reduce(words[:, :-1], axis=0, dtype=np.uint64).tolist()
        sums.append(int(np.add.reduce(words[:, -1] & _LAST_WORD, dtype=np.uint64)))
        total = (total + sum(int(s) * (2 * k + 1) for k, s in enumerate(sums))) % (1 << 64)
        if parts is None:
            continue
        hi, lo = block["hi"], block["lo"]
        if prev is not None and (prev[0], prev[1]) > (int(hi[0]), int(lo[0])):
            raise SavedIndexError(f"its rows are not in key order (at row {a})")
        later = hi[1:] > hi[:-1]
        if not np.all(later | ((hi[1:] == hi[:-1]) & (lo[1:] >= lo[:-1]))):
            raise SavedIndexError(f"its rows are not in key order (in rows {a}-{b})")
        prev = (int(hi[-1]), int(lo[-1]))
        part_of, reason_of = block["part_of"], block["reason_of"]
        if part_of.min() < 0 or part_of.max() >= parts or reason_of.min() < -1 or reason_of.max() >= reasons:
            raise SavedIndexError(f"a row's file or reason is not in its header (in rows {a}-{b})")
    return total


def _header(records: np.ndarray, rows: int, reasons: list[str], parts: list[list]) -> dict:
    """A save's header (full or delta): the format, the row count and checksum of ``records``, the
    reasons and the files ([name, listing entry, fingerprints]) their fields index (pure)."""
    return {"key_format": KEY_FORMAT, "byteorder": sys.byteorder, "dtype": str(ROW.descr),
            "itemsize": ROW.itemsize, "rows": rows, "checksum": _verified(records), "reasons": list(reasons),
            "parts": parts}


def header_of(committed: Committed) -> dict:
    """What the save says of ``committed`` besides its records (pure)."""
    return _header(committed.records, committed.rows, committed.reasons,
                   [[p.rsplit("/", 1)[-1], committed.stamps.get(p, ""), committed.part_fingerprints.get(p, {})]
                    for p in committed.parts])


def delta_header_of(group: FileGroup) -> dict:
    """What a delta says of ``group`` (files read back during a run) besides its records (pure): a
    full save's header of just those files (their records' ``part_of`` index its ``parts``)."""
    return {**_header(group.records, len(group.records), group.reasons,
                      [[p.rsplit("/", 1)[-1], stamp, fingerprints] for p, fingerprints, stamp in group.files]),
            "delta": True}


def _token() -> str:
    """A save's name: the time written first (zero-padded, so that names sort by it), then random."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


# _token() + .json / .rows (a full save), or + .delta.json / .delta.rows (a delta): nothing else is a save's
_SAVE_NAME = re.compile(r"^[0-9]{20}-[0-9a-f]{12}(\.delta)?\.(json|rows)$")
DELTA_HEAD = ".delta.json"


def _saves(folder: str, storage: Storage) -> list[str]:
    """The files of saves in ``folder`` (their headers and records), in name order: the newest last."""
    from .resume import _names_starting

    return [p for p in _names_starting(folder, storage, "") if _SAVE_NAME.match(p.rsplit("/", 1)[-1])]


def save_index(output_uri: str, storage: Storage, committed: Committed, *, fence) -> str:
    """Saves ``committed`` (current with the output) under ``_index/``, then deletes the older saves;
    every write and delete only while ``fence`` passes. Returns the header's path."""
    from .write import put_atomic, write_synced

    folder = join_uri(output_uri, INDEX_DIR)
    token = _token()
    header = header_of(committed)
    rows_uri = join_uri(folder, f"{token}.rows")
    fs = storage.fs(folder)
    fence.check(storage)
    if protocol_of(output_uri) == "file":
        path = strip_protocol(rows_uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if committed.on_disk:
            tmp = os.path.join(os.path.dirname(path), f"_tmp-{uuid.uuid4().hex}")
            shutil.copyfile(committed.records.filename, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            os.replace(write_synced(path, committed.records.tobytes(), f"_tmp-{uuid.uuid4().hex}"), path)
    elif committed.on_disk:  # a multipart upload, complete or absent (an open one is aborted by the next start)
        with_retries(lambda: fs.put_file(committed.records.filename, rows_uri))
    else:
        put_atomic(storage, rows_uri, committed.records.tobytes())
    fence.check(storage)
    head_uri = join_uri(folder, f"{token}.json")
    put_atomic(storage, head_uri, json.dumps(header).encode())
    old = [p for p in _saves(folder, storage) if not p.rsplit("/", 1)[-1].startswith(token)]
    if old:
        fence.check(storage)
        # the headers first (where the store deletes in order: S3's one request for several keys need
        # not): a start that read an old header as it went finds its records gone, and reads the files
        # (a warning; resume.read_committed reads them all again where the records went during its pass)
        fs.rm(sorted(old, key=lambda p: not p.endswith(".json")))
    return head_uri


def save_delta(output_uri: str, storage: Storage, group: FileGroup, *, fence) -> str:
    """Saves ``group`` (files this run published, read back) as a delta under ``_index/``: its
    records, then its header; each write only while ``fence`` passes. Returns the header's path.
    Nothing is deleted (a full save deletes the deltas older than it)."""
    from .write import put_atomic

    folder = join_uri(output_uri, INDEX_DIR)
    token = _token()
    header = delta_header_of(group)
    if protocol_of(output_uri) == "file":
        os.makedirs(strip_protocol(folder), exist_ok=True)
    fence.check(storage)
    put_atomic(storage, join_uri(folder, f"{token}.delta.rows"), group.records.tobytes())
    fence.check(storage)
    head_uri = join_uri(folder, token + DELTA_HEAD)
    put_atomic(storage, head_uri, json.dumps(header).encode())
    return head_uri


def saved_covers(output_uri: str, storage: Storage, committed: Committed) -> bool:
    """Whether the newest save holds just ``committed``'s files, each with the listing entry it has
    there (so a save of it now would save nothing new): an output of no files needs none. Any
    delta there: no (a full save then replaces them)."""
    folder = join_uri(output_uri, INDEX_DIR)
    heads = [p for p in _saves(folder, storage) if p.endswith(".json")]
    if any(p.endswith(DELTA_HEAD) for p in heads):
        return False
    heads = [p for p in heads if not p.endswith(DELTA_HEAD)]
    if not heads:
        return not committed.parts
    try:
        header = json.loads(storage.fs(folder).cat_file(heads[-1]))  # (a listed path has no protocol)
        saved = [(str(name), str(stamp)) for name, stamp, _ in header["parts"]]
    except Exception:  # noqa: BLE001 - a save that cannot be read covers nothing
        return False
    return header.get("key_format") == KEY_FORMAT and header.get("rows") == committed.rows and saved == [
        (p.rsplit("/", 1)[-1], committed.stamps.get(p, "")) for p in committed.parts]


class SavedIndexError(ValueError):
    """A save that cannot be used (the reason, one line)."""


def _load_records(fs, rows_path: str, header: dict, local: bool, bound: int) -> tuple[np.ndarray, _Scratch | None]:
    """The save's records: in memory up to ``bound`` rows; past it mapped, from the output's own file
    (a local output) or a copy on the scratch disk (object storage); checked (:func:`_verified`)."""
    n = int(header["rows"])
    size = fs.size(rows_path)
    if size != n * ROW.itemsize:
        raise SavedIndexError(f"{rows_path} holds {size} bytes, its header says {n} rows of {ROW.itemsize}")
    scratch = None
    try:
        if n <= bound:
            records = np.frombuffer(fs.cat_file(rows_path), ROW).copy() if n else np.empty(0, ROW)
        elif local:
            records = np.memmap(rows_path, ROW, mode="r", shape=(n,))
        else:
            scratch = _Scratch()
            path = scratch.new_path("saved", ".rows")
            with_retries(lambda: fs.get_file(rows_path, path))
            records = np.memmap(path, ROW, mode="r", shape=(n,))
        if _verified(records, len(header["parts"]), len(header["reasons"])) != int(header["checksum"]):
            raise SavedIndexError(f"{rows_path}: its checksum does not match its header's")
    except BaseException:
        if scratch is not None:
            scratch.close()
        raise
    return records, scratch


class Saved(NamedTuple):
    """What :func:`load_index` found: ``base`` (the newest full save's rows of the files it covers),
    ``drop`` (its files gone or changed since), ``read`` (the listed files no save covers: read
    them), ``deltas`` (the deltas' rows, :class:`DeltaGroups`: add them to ``base``)."""

    base: Committed
    drop: list[str]
    read: list[str]
    deltas: "DeltaGroups"


def _checked_header(fs, head: str) -> dict:
    """A save's header, read; a :class:`SavedIndexError` where it is of another format."""
    header = json.loads(fs.cat_file(head))
    for key, want in (("key_format", KEY_FORMAT), ("byteorder", sys.byteorder), ("dtype", str(ROW.descr))):
        if header.get(key) != want:
            raise SavedIndexError(f"its {key} is {header.get(key)!r}, this version's {want!r}")
    names = [str(name) for name, _, _ in header["parts"]]
    if len(set(names)) != len(names):
        raise SavedIndexError("it names a file twice")
    return header


def _trusted(stamp: str, path: str | None, listed: dict[str, str]) -> bool:
    """Whether a save's rows of a file (``stamp``: its entry then) stand for it as listed now."""
    from .resume import stamp_tells_content

    return path is not None and stamp == listed[path] and stamp_tells_content(stamp)


class DeltaGroups:
    """The rows the deltas ``heads`` (header paths, oldest first) hold of the files listed in ``listed``
    (path -> listing entry now) as they were when read, each file's from the newest delta that has
    it: ``covered`` (those files) is known at once from the headers (a header that cannot be read is
    a warning, its files not covered); iterating gives the rows as :class:`.index.FileGroup`, a delta
    at a time (what :meth:`.index.Committed.replaced` takes); a delta whose records cannot be used
    then is a warning, and its files are read instead."""

    def __init__(self, output_uri: str, storage: Storage, heads: list[str], listed: dict[str, str]):
        self.output_uri, self.storage, self.listed = output_uri, storage, listed
        self.covered: set[str] = set()
        self._taken: list[tuple[str, dict, dict[str, str]]] = []  # (head, header, name -> path taken)
        if not heads:
            return
        fs = storage.fs(join_uri(output_uri, INDEX_DIR))
        by_name = {p.rsplit("/", 1)[-1]: p for p in listed}
        for head in reversed(heads):  # the newest first: a file's rows from the newest delta that has it
            try:
                header = _checked_header(fs, head)
            except Exception as e:  # noqa: BLE001 - a save is only ever a saving: its files are read
                _log.warning("the index delta %s is not used (%s: %s): the files it covers are read", head,
                             type(e).__name__, e)
                continue
            keep = {}
            for name, stamp, _ in header["parts"]:
                path = by_name.get(str(name))
                if path not in self.covered and _trusted(str(stamp), path, listed):
                    keep[str(name)] = path
            self.covered.update(keep.values())
            if keep:
                self._taken.append((head, header, keep))

    def __iter__(self) -> Iterator[FileGroup]:
        from .resume import iter_files

        fs = self.storage.fs(join_uri(self.output_uri, INDEX_DIR))
        for head, header, keep in reversed(self._taken):  # (the oldest first: the order they were written)
            try:
                group = _delta_group(fs, head, header, keep)
            except Exception as e:  # noqa: BLE001 - see above
                _log.warning("the index delta %s could not be read (%s: %s): the %d files it covers are read",
                             head, type(e).__name__, e, len(keep))
                paths = sorted(keep.values())
                group = FileGroup.of(list(iter_files(self.output_uri, self.storage, paths, stamps=self.listed)))
            yield group


def _delta_group(fs, head: str, header: dict, keep: dict[str, str]) -> FileGroup:
    """The records of delta ``head`` of the files ``keep`` names (name -> path as listed now), checked."""
    rows_path = head[:-len(DELTA_HEAD)] + ".delta.rows"
    records, _ = _load_records(fs, rows_path, header, False, max(1, int(header["rows"])))  # (in memory)
    names = [str(name) for name, _, _ in header["parts"]]
    wanted = [j for j, name in enumerate(names) if name in keep]
    new_index = np.full(len(names), -1, np.int32)
    new_index[wanted] = np.arange(len(wanted), dtype=np.int32)
    counts = np.bincount(records["part_of"].astype(np.int64), minlength=len(names))
    said = [sum(int(n) for n in dict(fps).values()) for _, _, fps in header["parts"]]
    if counts.tolist() != said:  # (a file's rows are its fingerprints' counts: none left out)
        raise SavedIndexError(f"{rows_path}: its rows per file are not those its header counts")
    if len(wanted) < len(names):  # (where every file is taken, as a start after a kill: no copy)
        records = _kept(records, new_index[records["part_of"]] >= 0)
        records["part_of"] = new_index[records["part_of"]]
    rec = records
    files = [(keep[names[j]], {str(fp): int(n) for fp, n in dict(header["parts"][j][2]).items()},
              str(header["parts"][j][1])) for j in wanted]
    return FileGroup(files, rec, [str(r) for r in header["reasons"]])


def load_index(output_uri: str, storage: Storage, listed: dict[str, str],
               memory_rows: int | None = None) -> Saved | None:
    """The newest full save, as a :class:`.index.Committed` of every file it covers (its parts named
    as ``listed`` names them where listed), and every delta (:class:`Saved`).
    ``listed``: the committed files now -> their listing entry (:func:`.resume.list_parts_stamped`).
    A file's rows are taken from a save only where its entry then and now are the same and tell
    content (:func:`.resume.stamp_tells_content`). None where there is no save, or they cover none of
    the files listed (the records not even read). A full save that cannot be used is a warning, and
    the files it covers are read."""
    folder = join_uri(output_uri, INDEX_DIR)
    heads = [p for p in _saves(folder, storage) if p.endswith(".json")]
    fulls = [p for p in heads if not p.endswith(DELTA_HEAD)]
    head = fulls[-1] if fulls else None
    # every delta there (a full save deletes those before it; one left by a delete that failed, or
    # named by a clock behind the full save's, is as safe: its rows are trusted file by file)
    delta_heads = [p for p in heads if p.endswith(DELTA_HEAD)]
    if head is None and not delta_heads:
        return None
    deltas = DeltaGroups(output_uri, storage, delta_heads, listed)
    base, drop, covered = Committed(memory_rows=memory_rows), [], set(deltas.covered)
    if head is not None:
        try:
            loaded = _load_full(storage.fs(folder), head, listed, protocol_of(output_uri) == "file", memory_rows)
        except Exception as e:  # noqa: BLE001 - a save is only ever a saving: read the files instead
            _log.warning("the committed index saved in %s is not used (%s: %s): the committed files it covers are "
                         "read", head, type(e).__name__, e)
            loaded = None
        if loaded is not None:
            base, drop, in_base = loaded
            covered |= in_base
    if not covered:
        base.close()
        return None  # (an output written anew since: --overwrite, or files all changed)
    return Saved(base, drop, [p for p in listed if p not in covered], deltas)


def _load_full(fs, head: str, listed: dict[str, str], local: bool,
               memory_rows: int | None) -> tuple[Committed, list[str], set[str]] | None:
    """A full save ``head`` as (a Committed of it, its files to drop, the listed files it covers);
    None where it covers none (its records not read)."""
    by_name = {p.rsplit("/", 1)[-1]: p for p in listed}
    base = Committed(memory_rows=memory_rows)
    header = _checked_header(fs, head)
    parts, drop, covered = [], [], set()
    for name, stamp, fingerprints in header["parts"]:
        path = by_name.get(name)
        if _trusted(stamp, path, listed):
            covered.add(path)
            base.stamps[path] = stamp
        else:
            path = path or f"{INDEX_DIR}:gone/{name}"  # not listed: its rows are dropped at once
            drop.append(path)
        parts.append(path)
        base.part_fingerprints[path] = {str(fp): int(n) for fp, n in dict(fingerprints).items()}
    reasons = [str(r) for r in header["reasons"]]
    if not covered:
        return None
    records, scratch = _load_records(fs, head[:-len(".json")] + ".rows", header, local, base.bound)
    base.parts, base.rows, base.records, base.reasons = parts, len(records), records, reasons
    base._scratch = scratch
    for fps in base.part_fingerprints.values():
        for fp, n in fps.items():
            base.fingerprints[fp] = base.fingerprints.get(fp, 0) + n
    return base, drop, covered
