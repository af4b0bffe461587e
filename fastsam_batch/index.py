"""The committed-row index and the listing's repeat detection: pure logic on 128-bit id keys.

Nothing here reads or writes the output (:mod:`.resume` reads the committed files into a
:class:`Committed`; :mod:`.repair` rewrites them): every function is a computation on arrays, tested
against a plain ``set``/``dict`` (tests/test_index.py). The one exception is :class:`KeyRuns`'s
optional spill of sorted runs to a local scratch folder, past a memory bound.

**Keys.** An image id is kept as the 16-byte BLAKE2b digest of its UTF-8 text (:func:`id_key`),
held as two ``uint64`` columns, ``hi`` and ``lo`` (the digest's two big-endian halves, so the
order of (hi, lo) is the order of the bytes). 128 bits: at 10^9 ids the chance that two distinct
ids share a key is about 10^-21 (64-bit hashes: about 3%).

**Sorted by hi.** Arrays of keys are sorted by ``hi`` with the rows of one full key contiguous
(:func:`sort_keys`: a stable ``argsort`` on ``hi``, then the rare groups of distinct keys sharing a
``hi`` regrouped by ``lo``). A batch of queries is one vectorised ``searchsorted`` on ``hi``
(:func:`key_ranges`), checked against ``lo``; only a range holding two distinct keys (two ids
whose hashes share 64 bits: about one pair at 6*10^9 rows) is scanned in Python. No query ever
casts or copies the array (the old ``SeenIds`` did, per id: O(n) each).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

U64 = np.uint64


# ---------------------------------------------------------------------------------------------
# Keys


def id_key(image_id: str) -> bytes:
    """The 16-byte hash an image id is kept as."""
    return hashlib.blake2b(image_id.encode(), digest_size=16).digest()


def _halves(buf: bytes) -> tuple[np.ndarray, np.ndarray]:
    a = np.frombuffer(buf, ">u8").reshape(-1, 2)
    return a[:, 0].astype(U64), a[:, 1].astype(U64)


def id_keys(image_ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) uint64 columns of the ids' 16-byte keys."""
    return _halves(b"".join([hashlib.blake2b(i.encode(), digest_size=16).digest() for i in image_ids]))


def keys_of_bytes(keys: Iterable[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) of 16-byte keys as :func:`id_key` made them."""
    return _halves(b"".join(keys))


def keys_to_bytes(hi: np.ndarray, lo: np.ndarray) -> list[bytes]:
    """16-byte keys back from (hi, lo) (never losing a trailing NUL, as numpy's ``S16`` did)."""
    buf = np.stack([np.asarray(hi, U64), np.asarray(lo, U64)], axis=1).astype(">u8").tobytes()
    return [buf[i:i + 16] for i in range(0, len(buf), 16)]


def key_bytes(k) -> bytes:
    """An id key as bytes: from 16 bytes (a NUL-stripped ``S16`` put back) or a (hi, lo) pair."""
    if isinstance(k, tuple):
        return int(k[0]).to_bytes(8, "big") + int(k[1]).to_bytes(8, "big")
    return bytes(k).ljust(16, b"\0")


def version_key(version: str | None) -> int:
    """8-byte hash of a source version; 0 for rows written before versions were recorded."""
    if not version:
        return 0
    return int.from_bytes(hashlib.blake2b(version.encode(), digest_size=8).digest(), "little") | 1


def unit_key(shard: str | None) -> int:
    """8-byte hash of a container's URI (tar shard, Parquet file); 0 for an image of its own."""
    return version_key(shard or "")


def sort_keys(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """The permutation that sorts keys by ``hi``, stably, with the rows of one full key contiguous
    (distinct keys sharing a ``hi``, rare, regrouped by ``lo``, still stably). Sorted runs
    concatenated sort in about linear time (numpy's stable sort is a timsort for 64-bit ints)."""
    order = np.argsort(hi, kind="stable")
    if len(order) < 2:
        return order
    h, l = hi[order], lo[order]
    mixed = np.flatnonzero((h[1:] == h[:-1]) & (l[1:] != l[:-1]))
    if not len(mixed):
        return order
    where = np.flatnonzero(np.isin(h, np.unique(h[mixed + 1])))  # every row of a shared hi
    order[where] = order[where[np.lexsort((l[where], h[where]))]]  # lexsort is stable
    return order


def key_ranges(hi: np.ndarray, lo: np.ndarray, qh: np.ndarray, ql: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of the rows of each query key in arrays ordered as :func:`sort_keys` orders them
    (empty where absent): one vectorised ``searchsorted``, exact on all 128 bits."""
    a = np.searchsorted(hi, qh, "left")
    b = np.searchsorted(hi, qh, "right")
    if not len(hi):
        return a, b
    first = lo[np.minimum(a, len(hi) - 1)]
    last = lo[np.maximum(b - 1, 0)]
    hit = (b > a) & (first == ql) & (last == ql)
    start, end = a.copy(), np.where(hit, b, a)
    for j in np.flatnonzero((b - a > 1) & (first != last)).tolist():  # distinct keys share a hi: scan
        r = np.flatnonzero(lo[a[j]:b[j]] == ql[j])
        start[j], end[j] = (a[j] + r[0], a[j] + r[-1] + 1) if len(r) else (a[j], a[j])
    return start, end


def first_occurrences(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Mask of the keys seen for the first time in this batch (the earliest of each repeat)."""
    if not len(hi):
        return np.zeros(0, bool)
    order = sort_keys(hi, lo)
    h, l = hi[order], lo[order]
    head = np.ones(len(h), bool)
    head[1:] = (h[1:] != h[:-1]) | (l[1:] != l[:-1])
    out = np.zeros(len(h), bool)
    out[order[head]] = True  # stable: the head of a group is its earliest position
    return out


# ---------------------------------------------------------------------------------------------
# Sorted runs of distinct keys: the listing's repeat detection


class _Run:
    """A sorted run of distinct keys (by hi, see :func:`sort_keys`), in memory or memory-mapped."""

    __slots__ = ("hi", "lo", "path")

    def __init__(self, hi: np.ndarray, lo: np.ndarray, path: str | None = None):
        self.hi, self.lo, self.path = hi, lo, path

    def __len__(self) -> int:
        return len(self.hi)

    def contains(self, qh: np.ndarray, ql: np.ndarray) -> np.ndarray:
        a, b = key_ranges(self.hi, self.lo, qh, ql)
        return b > a


SCRATCH_ENV = "FASTSAM_BATCH_SCRATCH"  # where sorted runs spill (default: tempfile.gettempdir())
SCRATCH_PREFIX = "fastsam-keys-"  # fastsam-keys-<pid>-<random>: one folder per KeyRuns that spilled
STALE_SCRATCH_S = 86400.0


def scratch_dir() -> str:
    """The folder spilled runs go under: ``$FASTSAM_BATCH_SCRATCH``, else the temporary folder (which
    may be a tmpfs, i.e. memory: point the variable at a local disk for lists of billions)."""
    return os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's, or cannot tell: kept
    return True


def remove_stale_scratch(parent: str, max_age_s: float = STALE_SCRATCH_S, now: float | None = None) -> list[str]:
    """Removes the ``fastsam-keys-*`` folders under ``parent`` left by a killed process: none of its
    files changed for ``max_age_s`` (a day), and the pid in its name not running here (a name
    without a pid: the age alone). Returns the folders removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return removed
    for name in names:
        if not name.startswith(SCRATCH_PREFIX):
            continue
        path = os.path.join(parent, name)
        try:
            newest = max([os.stat(path).st_mtime] + [os.stat(os.path.join(path, f)).st_mtime
                                                     for f in os.listdir(path)])
        except OSError:
            continue  # gone meanwhile, or not a folder of ours
        if now - newest < max_age_s:
            continue
        pid = name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and "-" in name[len(SCRATCH_PREFIX):] and _pid_running(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class KeyRuns:
    """A set of 128-bit keys built a batch at a time, LSM-style: each batch's new keys are a sorted
    run; the two newest runs are merged while the older is at most twice the newer, so runs grow
    geometrically: O(log n) runs, each key merged O(log n) times (O(n log n) in all), a batch's
    lookup one ``searchsorted`` per run. Runs are merged by a stable sort of two sorted runs (a
    timsort merge: linear).

    Memory is bounded: past ``memory_keys`` keys held (16 bytes each), the largest run in memory
    is written (buffered writes, :func:`numpy.save`) to a private folder under ``spill_dir``
    (default :func:`scratch_dir`: ``$FASTSAM_BATCH_SCRATCH``, else the temporary folder; removed
    with the object, and folders of killed processes a day old removed when the next one is made)
    and memory-mapped read-only; spilled runs are merged the same way, a block of ``block`` keys
    at a time, written with buffered writes. The keys held in memory stay under ``memory_keys`` x
    16 bytes; while two runs merge in memory the peak is about 3.5 times that (the two runs, their
    concatenation, the sort order, the merged run), plus the page cache of the mapped runs, which
    the kernel may reclaim."""

    def __init__(self, memory_keys: int = 1 << 23, spill_dir: str | None = None, block: int = 1 << 20):
        self.memory_keys = memory_keys
        self.block = block
        self.mem: list[_Run] = []
        self.disk: list[_Run] = []
        self.count = 0
        self._spill_parent = spill_dir
        self._dir: str | None = None
        self._files = 0
        self._cleanup = None

    def __len__(self) -> int:
        return self.count

    def contains(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hi), bool)
        if not len(hi):
            return found
        order = np.argsort(hi, kind="stable")  # sorted queries: searchsorted narrows as it goes
        qh, ql = hi[order], lo[order]
        for run in self.disk + self.mem:
            found[order] |= run.contains(qh, ql)
        return found

    def add(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Adds a batch of keys; returns the mask of those new (not held before, and the first of
        their repeats within the batch)."""
        hi, lo = np.asarray(hi, U64), np.asarray(lo, U64)
        new = first_occurrences(hi, lo)
        new &= ~self.contains(hi, lo)
        if new.any():
            h, l = hi[new], lo[new]
            order = np.argsort(h, kind="stable")  # distinct keys: rows of a key are trivially contiguous
            self.mem.append(_Run(h[order], l[order]))
            self.count += len(h)
            self._settle()
        return new

    def _settle(self) -> None:
        while len(self.mem) > 1 and len(self.mem[-2]) <= 2 * len(self.mem[-1]):
            b, a = self.mem.pop(), self.mem.pop()
            self.mem.append(_merge_in_memory(a, b))
        while sum(len(r) for r in self.mem) > self.memory_keys and self.mem:
            self.disk.append(self._write(self.mem.pop(0)))
            while len(self.disk) > 1 and len(self.disk[-2]) <= 2 * len(self.disk[-1]):
                b, a = self.disk.pop(), self.disk.pop()
                self.disk.append(self._merge_on_disk(a, b))

    # spilling
    def _folder(self) -> str:
        if self._dir is None:
            parent = self._spill_parent or scratch_dir()
            os.makedirs(parent, exist_ok=True)
            remove_stale_scratch(parent)
            self._dir = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=parent)
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    def _new_path(self) -> str:
        self._files += 1
        return os.path.join(self._folder(), f"run-{self._files:06d}")

    def _write(self, run: _Run) -> _Run:
        """A run written with ordinary (buffered) writes, then memory-mapped read-only: a full disk
        is an OSError here, never a SIGBUS on a later write to a mapped page."""
        path = self._new_path()
        np.save(path + ".hi.npy", np.asarray(run.hi, U64))
        np.save(path + ".lo.npy", np.asarray(run.lo, U64))
        return self._open(path)

    @staticmethod
    def _open(path: str) -> _Run:
        return _Run(np.load(path + ".hi.npy", mmap_mode="r"), np.load(path + ".lo.npy", mmap_mode="r"), path)

    def _merge_on_disk(self, a: _Run, b: _Run) -> _Run:
        """Two spilled runs merged into a new file, a block at a time (each step takes every key up
        to a bound from both: at most about ``block`` keys from each), written with buffered writes."""
        path = self._new_path()
        n = len(a) + len(b)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(U64)), "fortran_order": False, "shape": (n,)}
        with open(path + ".hi.npy", "wb") as fh, open(path + ".lo.npy", "wb") as fl:
            np.lib.format.write_array_header_1_0(fh, header)
            np.lib.format.write_array_header_1_0(fl, header)
            i = j = 0
            while i < len(a) or j < len(b):
                bounds = [x.hi[min(s + self.block, len(x)) - 1] for x, s in ((a, i), (b, j)) if s < len(x)]
                bound = min(bounds)
                ie = int(np.searchsorted(a.hi, bound, "right")) if i < len(a) else i
                je = int(np.searchsorted(b.hi, bound, "right")) if j < len(b) else j
                h = np.concatenate((a.hi[i:ie], b.hi[j:je]))
                l = np.concatenate((a.lo[i:ie], b.lo[j:je]))
                order = np.argsort(h, kind="stable")
                fh.write(np.ascontiguousarray(h[order], U64).tobytes())
                fl.write(np.ascontiguousarray(l[order], U64).tobytes())
                i, j = ie, je
        merged = self._open(path)
        for old in (a, b):
            p = old.path
            del old
            for suffix in (".hi.npy", ".lo.npy"):
                try:
                    os.remove(p + suffix)  # an open map keeps its pages until it is dropped
                except OSError:
                    pass
        return merged

    def close(self) -> None:
        self.mem, self.disk = [], []
        if self._cleanup is not None:
            self._cleanup()


def _merge_in_memory(a: _Run, b: _Run) -> _Run:
    h = np.concatenate((a.hi, b.hi))
    l = np.concatenate((a.lo, b.lo))
    order = np.argsort(h, kind="stable")
    return _Run(h[order], l[order])


# ---------------------------------------------------------------------------------------------
# Committed rows


@dataclass
class FileRows:
    """The hashed columns of one committed file (what :mod:`.resume` reads, a file at a time)."""

    part: str
    hi: np.ndarray
    lo: np.ndarray
    versions: np.ndarray  # version_key per row
    ok: np.ndarray
    reason_of: np.ndarray  # int16 index into ``reasons``; -1: ok
    reasons: list[str]
    units: np.ndarray  # unit_key per row
    fingerprints: dict[str, int]
    stamp: str = ""  # the file's listing entry when read (size and ETag, or mtime): "" unknown (read again)

    @classmethod
    def from_rows(cls, part: str, rows: Sequence[tuple], fingerprints: dict[str, int] | None = None) -> "FileRows":
        """From (image_id, source_version, status[, error[, shard]]) tuples (pure; tests, small files)."""
        from .schema import error_reason

        reasons: list[str] = []
        codes = []
        for r in rows:
            if r[2] == "ok":
                codes.append(-1)
                continue
            reason = error_reason(r[3] if len(r) > 3 else None) or "error"
            if reason not in reasons:
                reasons.append(reason)
            codes.append(reasons.index(reason))
        hi, lo = id_keys([r[0] for r in rows])
        return cls(part, hi, lo, np.array([version_key(r[1] or "") for r in rows], U64),
                   np.array([r[2] == "ok" for r in rows], bool), np.array(codes, np.int16), reasons,
                   np.array([unit_key(r[4] if len(r) > 4 else None) for r in rows], U64), dict(fingerprints or {}))


@dataclass
class Lookup:
    state: str  # "new" (no row), "fresh" (a row of the object as it is now), "changed" (rows of older versions only)
    ok: bool = False  # the fresh row's status is ok
    superseded: list[str] = field(default_factory=list)  # files holding rows of older versions, when fresh
    reason: str | None = None  # the fresh row's error reason (read_failed, ...) when it is an error row
    parts: list[str] = field(default_factory=list)  # every file holding a row of the image


def _empty(dtype) -> np.ndarray:
    return np.empty(0, dtype)


@dataclass
class Committed:
    """The committed rows under ``output.uri``, compactly: 39 bytes a row (the 16-byte id key as
    hi/lo, an 8-byte hash of its source version, an 8-byte container key, status, error reason,
    file index), sorted by key (:func:`sort_keys`), so that a resume of ten million images holds
    about 400 MB, not the ids. Built once per run from every file (:meth:`from_files`), then kept
    current by :meth:`replaced` (files gone, files added or rewritten) instead of read again."""

    parts: list[str] = field(default_factory=list)  # sorted
    rows: int = 0
    fingerprints: dict[str, int] = field(default_factory=dict)  # fingerprint -> rows
    hi: np.ndarray = field(default_factory=lambda: _empty(U64))
    lo: np.ndarray = field(default_factory=lambda: _empty(U64))
    versions: np.ndarray = field(default_factory=lambda: _empty(U64))
    ok: np.ndarray = field(default_factory=lambda: _empty(bool))
    part_of: np.ndarray = field(default_factory=lambda: _empty(np.int32))
    reason_of: np.ndarray = field(default_factory=lambda: _empty(np.int16))  # index in reasons; -1: ok
    reasons: list[str] = field(default_factory=list)  # the error reasons present
    units: np.ndarray = field(default_factory=lambda: _empty(U64))  # container key (unit_key); 0: none
    part_fingerprints: dict[str, dict[str, int]] = field(default_factory=dict)  # part -> fingerprint -> rows
    # part -> its listing entry when it was read (size and ETag, or size, mtime and inode): a file
    # rewritten under its own name (names are hashes of the ids a file holds) is told by this
    stamps: dict[str, str] = field(default_factory=dict)
    _by_unit: tuple[np.ndarray, np.ndarray] | None = None  # (row indices by container key, their keys), cached

    def reason_code(self, error: str | None, ok: bool) -> int:
        from .schema import error_reason

        if ok:
            return -1
        reason = error_reason(error) or "error"
        if reason not in self.reasons:
            self.reasons.append(reason)
        return self.reasons.index(reason)

    def errors_by_reason(self) -> dict[str, int]:
        """Rows by error reason (every row: several versions of an image count each)."""
        codes, counts = np.unique(self.reason_of[self.reason_of >= 0], return_counts=True)
        return {self.reasons[c]: int(n) for c, n in sorted(zip(codes.tolist(), counts.tolist()),
                                                            key=lambda x: self.reasons[x[0]])}

    @classmethod
    def from_rows(cls, rows: list[tuple], fingerprints: dict[str, int] | None = None) -> "Committed":
        """From (image_id, source_version, status, part[, error[, shard]]) tuples."""
        by_part: dict[str, list[tuple]] = {}
        for r in rows:
            by_part.setdefault(r[3], []).append((r[0], r[1], r[2], r[4] if len(r) > 4 else None,
                                                 r[5] if len(r) > 5 else None))
        c = cls.from_files([FileRows.from_rows(p, rs) for p, rs in by_part.items()])
        if fingerprints is not None:
            c.fingerprints = dict(fingerprints)
        return c

    @classmethod
    def from_files(cls, files: list[FileRows]) -> "Committed":
        """The index of these files (one sort over all of them)."""
        return cls().replaced((), files)

    def replaced(self, removed: Iterable[str], added: list[FileRows]) -> "Committed":
        """A new index: the rows of the files ``removed`` (deleted, or rewritten) gone, those of
        ``added`` (new files, rewrites, or files read again: their old rows go) in. One pass over
        the rows kept and a sort that merges the sorted kept rows with the new ones."""
        gone = set(removed) | {f.part for f in added}
        kept_parts = [p for p in self.parts if p not in gone]
        parts = sorted(set(kept_parts) | {f.part for f in added})
        index = {p: i for i, p in enumerate(parts)}
        # the old rows of a file read again (a rewrite under its own name) go, like those of a file gone
        remap = np.array([-1 if p in gone else index[p] for p in self.parts] + [-1], np.int32)
        new_of = remap[self.part_of] if self.rows else _empty(np.int32)
        keep = new_of >= 0
        c = Committed(parts=parts, reasons=list(self.reasons),
                      part_fingerprints={p: self.part_fingerprints.get(p, {}) for p in kept_parts},
                      stamps={p: self.stamps[p] for p in kept_parts if p in self.stamps})
        cols = {"hi": [self.hi[keep]], "lo": [self.lo[keep]], "versions": [self.versions[keep]],
                "ok": [self.ok[keep]], "part_of": [new_of[keep]], "reason_of": [self.reason_of[keep]],
                "units": [self.units[keep]]}
        for f in added:
            codes = np.array([c.reason_code(r, False) for r in f.reasons] + [-1], np.int16)
            n = len(f.hi)
            for name, arr in (("hi", f.hi), ("lo", f.lo), ("versions", f.versions), ("ok", f.ok),
                              ("units", f.units)):
                cols[name].append(np.asarray(arr).reshape(n))
            cols["part_of"].append(np.full(n, index[f.part], np.int32))
            cols["reason_of"].append(codes[np.asarray(f.reason_of, np.int64).reshape(n)])  # -1 -> the last: -1
            c.part_fingerprints[f.part] = dict(f.fingerprints)
            c.stamps[f.part] = f.stamp
        arrays = {k: np.concatenate(v) for k, v in cols.items()}
        if added:
            order = sort_keys(arrays["hi"], arrays["lo"])
            arrays = {k: v[order] for k, v in arrays.items()}
        for k, v in arrays.items():
            setattr(c, k, v)
        c.rows = len(c.hi)
        for fps in c.part_fingerprints.values():
            for fp, n in fps.items():
                c.fingerprints[fp] = c.fingerprints.get(fp, 0) + n
        return c

    @property
    def images(self) -> int:
        """Distinct image ids with a row."""
        if not self.rows:
            return 0
        return int(1 + np.count_nonzero((self.hi[1:] != self.hi[:-1]) | (self.lo[1:] != self.lo[:-1])))

    def key_list(self, rows: np.ndarray) -> list[bytes]:
        """The 16-byte id keys of these rows."""
        return keys_to_bytes(self.hi[rows], self.lo[rows])

    def ranges(self, image_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        qh, ql = id_keys(image_ids)
        return key_ranges(self.hi, self.lo, qh, ql)

    def unit_rows(self, shard: str, version: str) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the rows of images read from the container ``shard``: (those of ``version``,
        those of other versions). The rows sorted by container are made once (then cached)."""
        if not self.rows:
            return _empty(np.int64), _empty(np.int64)
        if self._by_unit is None:
            order = np.argsort(self.units, kind="stable")
            self._by_unit = (order, self.units[order])
        order, sorted_units = self._by_unit
        want = U64(unit_key(shard))
        lo, hi = np.searchsorted(sorted_units, want, "left"), np.searchsorted(sorted_units, want, "right")
        rows = order[lo:hi]
        same = self.versions[rows] == U64(version_key(version))
        return rows[same], rows[~same]

    def lookup(self, image_ids: list[str], versions: list[str]) -> list[Lookup]:
        """For each image (and the version of its object now): whether it has a row to keep, and
        which files hold rows of older versions of it that a current row replaces. Of several
        current rows, the last (by file, then row) speaks for the image."""
        if not self.rows:
            return [Lookup("new") for _ in image_ids]
        start, end = self.ranges(image_ids)
        at = np.minimum(start, self.rows - 1)  # each image's first row, read for all at once
        first_v, first_ok = self.versions[at].tolist(), self.ok[at].tolist()
        first_code, first_part = self.reason_of[at].tolist(), self.part_of[at].tolist()
        cache: dict[str, int] = {}
        out = []
        for j, (a, b, v) in enumerate(zip(start.tolist(), end.tolist(), versions)):
            if a == b:
                out.append(Lookup("new"))
                continue
            want = cache.get(v)
            if want is None:
                want = cache[v] = version_key(v)
            if b - a == 1:  # one row: the common case
                if first_v[j] != want and first_v[j] != 0:
                    out.append(Lookup("changed"))
                    continue
                code = first_code[j]
                out.append(Lookup("fresh", first_ok[j], [], self.reasons[code] if code >= 0 else None,
                                  [self.parts[first_part[j]]]))
                continue
            vs, ps = self.versions[a:b].tolist(), self.part_of[a:b].tolist()
            fresh = [i for i, x in enumerate(vs) if x in (want, 0)]
            if not fresh:
                out.append(Lookup("changed"))
                continue
            last = a + max(fresh, key=lambda i: (ps[i], i))
            old = sorted({self.parts[p] for x, p in zip(vs, ps) if x not in (want, 0)})
            code = int(self.reason_of[last])
            out.append(Lookup("fresh", bool(self.ok[last]), old, self.reasons[code] if code >= 0 else None,
                              sorted({self.parts[p] for p in ps})))
        return out


def _name(part: str) -> str:
    return part.rsplit("/", 1)[-1]


def rows_outside(committed: Committed, image_ids: set[str], keep: set[str]) -> dict[str, set[str]]:
    """part -> those of ``image_ids`` with a row there, for every file not named in ``keep`` (the
    files this run wrote), counting only images that do have a row in one of ``keep``: the old rows
    of retried images whose new rows are committed."""
    c = committed
    ids = sorted(image_ids)
    out: dict[str, set[str]] = {}
    if not ids or not c.rows:
        return out
    start, end = c.ranges(ids)
    for image_id, a, b in zip(ids, start.tolist(), end.tolist()):
        parts = {c.parts[p] for p in c.part_of[a:b].tolist()}
        if not any(_name(p) in keep for p in parts):
            continue
        for part in parts:
            if _name(part) not in keep:
                out.setdefault(part, set()).add(image_id)
    return out


def superseded_parts(committed: Committed, current: dict[str, str]) -> dict[str, dict[str, str]]:
    """part -> {image id: its version now} of the images with rows there made from an older version
    of the object while a row from the current version (``current``: image id -> version) is
    committed too."""
    out: dict[str, dict[str, str]] = {}
    ids = list(current)
    for image_id, found in zip(ids, committed.lookup(ids, [current[i] for i in ids])):
        for part in found.superseded:
            out.setdefault(part, {})[image_id] = current[image_id]
    return out


@dataclass
class Duplicates:
    """Rows to drop so that each image has one row per source version (see :func:`duplicate_rows`),
    as (id key, version key) pairs: ``drop``: part -> the pairs whose every row in that file goes;
    ``keep_one``: part -> pairs with several rows in that one file (the kept file), of which one
    stays (an ok one, else the first); ``kept``: part -> the pairs whose kept copy is there (the
    repair checks that file still exists before it deletes the other copies)."""

    drop: dict[str, set[tuple[bytes, int]]] = field(default_factory=dict)
    keep_one: dict[str, set[tuple[bytes, int]]] = field(default_factory=dict)
    kept: dict[str, set[tuple[bytes, int]]] = field(default_factory=dict, compare=False)

    def __bool__(self) -> bool:
        return bool(self.drop or self.keep_one)


def duplicate_rows(committed: Committed, prefer: set[str] | frozenset = frozenset()) -> Duplicates:
    """Of rows of the same image and version (in several files, or twice in one file), which to drop
    so that one stays: the row in a file named in ``prefer`` (the files this run wrote) is kept, else
    an ok one (a retried error row's replacement), else the first (by file). Such duplicates come
    from two runs writing at once (a run whose lease was taken over, its last commit in flight; see
    lease.py), a rewrite cut short between its put and its delete, or a member a container's reader
    gave twice. One vectorised pass finds the images with several rows; only those are sorted."""
    c = committed
    out = Duplicates()
    if c.rows < 2:
        return out
    same_key = (c.hi[1:] == c.hi[:-1]) & (c.lo[1:] == c.lo[:-1])
    if not same_key.any():
        return out
    multi = np.zeros(c.rows, bool)
    multi[1:] |= same_key
    multi[:-1] |= same_key
    rows = np.flatnonzero(multi)  # the rows of images with several rows (key order: an image's rows contiguous)
    h, l = c.hi[rows], c.lo[rows]
    image = np.cumsum(np.concatenate(([True], (h[1:] != h[:-1]) | (l[1:] != l[:-1]))))
    sub = np.lexsort((c.part_of[rows], c.versions[rows], image))
    order, image = rows[sub], image[sub]
    versions, parts, ok = c.versions[order], c.part_of[order], c.ok[order]
    g = np.concatenate(([True], (image[1:] != image[:-1]) | (versions[1:] != versions[:-1])))
    starts = np.flatnonzero(g)
    ends = np.concatenate((starts[1:], [len(order)]))
    names = [_name(p) in prefer for p in c.parts] if prefer else None
    for a, b in zip(starts.tolist(), ends.tolist()):
        if b - a < 2:
            continue
        group_parts, good = parts[a:b].tolist(), ok[a:b].tolist()
        keeper = next((p for p in group_parts if names is not None and names[p]),
                      next((p for p, x in zip(group_parts, good) if x), group_parts[0]))
        key = (key_bytes((c.hi[order[a]], c.lo[order[a]])), int(versions[a]))
        out.kept.setdefault(c.parts[keeper], set()).add(key)
        for p in set(group_parts):
            if p != keeper:
                out.drop.setdefault(c.parts[p], set()).add(key)
        if group_parts.count(keeper) > 1:
            out.keep_one.setdefault(c.parts[keeper], set()).add(key)
    return out


def stale_unit_rows(committed: Committed, current: dict[str, str]) -> dict[str, set[bytes]]:
    """part -> id keys of rows read from an older version of a container (``current``: shard URI ->
    its version now) whose current version is complete: members changed or gone."""
    out: dict[str, set[bytes]] = {}
    for shard, version in current.items():
        _, old = committed.unit_rows(shard, version)
        for r, k in zip(old.tolist(), committed.key_list(old)):
            out.setdefault(committed.parts[committed.part_of[r]], set()).add(k)
    return out


def rows_in_other_files(committed: Committed, keys: set[bytes], written: set[str]) -> dict[str, set[bytes]]:
    """part -> those of the id ``keys`` with a row there, for every file not named in ``written``."""
    out: dict[str, set[bytes]] = {}
    if not keys or not committed.rows:
        return out
    q = sorted(keys)
    qh, ql = keys_of_bytes(q)
    start, end = key_ranges(committed.hi, committed.lo, qh, ql)
    for k, a, b in zip(q, start.tolist(), end.tolist()):
        for p in committed.part_of[a:b].tolist():
            part = committed.parts[p]
            if _name(part) not in written:
                out.setdefault(part, set()).add(k)
    return out
