"""The committed-row index and the listing's repeat detection: pure logic on 128-bit id keys.

Nothing here reads or writes the output (:mod:`.resume` reads the committed files into a
:class:`Committed`; :mod:`.repair` rewrites them): every function is a computation on arrays, tested
against a plain ``set``/``dict`` (tests/test_index.py). The one exception is the spill to a local
scratch folder past a memory bound: :class:`KeyRuns`'s sorted runs, and :class:`Committed`'s rows
(an external sort: sorted runs merged in blocks, the result memory-mapped read-only).

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
import mmap
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
    """8-byte hash of a source version (:func:`hash_texts`, here for one text in plain Python: a few
    microseconds, not numpy's fixed cost); 0 for rows written before versions were recorded."""
    data = (version or "").encode()
    if not data:
        return 0
    m = (1 << 64) - 1
    h = (len(data) * int(_C2)) & m
    for at in range(0, len(data), 8):
        k = (_rotl_int((int.from_bytes(data[at:at + 8], "little") * int(_C1)) & m, 31) * int(_C2)) & m
        h = (_rotl_int(h ^ k, 27) * 5 + 0x52DCE729) & m
    h ^= len(data)
    for mult in (int(_F1), int(_F2)):
        h = ((h ^ (h >> 33)) * mult) & m
    return (h ^ (h >> 33)) | 1


def _rotl_int(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & ((1 << 64) - 1)


def unit_key(shard: str | None) -> int:
    """8-byte hash of a container's URI (tar shard, Parquet file); 0 for an image of its own."""
    return version_key(shard or "")


def version_keys(versions: Sequence[str | None]) -> np.ndarray:
    """:func:`version_key` of each (a list of texts; None as "")."""
    data = [(v or "").encode() for v in versions]
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    return hash_texts(offsets, np.frombuffer(b"".join(data), np.uint8))


def version_keys_arrow(column) -> np.ndarray:
    """:func:`version_key` of each value of an Arrow string column (array or chunked; a null as
    ""), from its buffers: no Python object a value."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):  # one pass over its chunks put together (numpy's cost is per call)
        return version_keys_arrow(column.combine_chunks()) if column.num_chunks else np.zeros(0, U64)
    arr = column if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) \
        else column.cast(pa.large_string())
    n = len(arr)
    if not n:
        return np.zeros(0, U64)
    _, offsets_buf, data_buf = arr.buffers()
    wide = pa.types.is_large_string(arr.type)
    offsets = np.frombuffer(offsets_buf, np.int64 if wide else np.int32)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    keys = hash_texts(offsets.astype(np.int64), data)
    if arr.null_count:
        keys[np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)] = 0
    return keys


_C1, _C2 = U64(0x87C37B91114253D5), U64(0x4CF5AD432745937F)  # MurmurHash3 x64's multipliers
_F1, _F2 = U64(0xFF51AFD7ED558CCD), U64(0xC4CEB9FE1A85EC53)  # and its finaliser's


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << U64(r)) | (x >> U64(64 - r))


def _fmix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> U64(33))
    h = h * _F1
    h = h ^ (h >> U64(33))
    h = h * _F2
    return h ^ (h >> U64(33))


def hash_texts(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each text ``data[offsets[i]:offsets[i + 1]]`` (UTF-8 bytes), computed for
    all at once, 8 bytes a step: MurmurHash3-style (one lane of MurmurHash3 x64's block mixing over
    little-endian words, the last zero-padded, seeded and finalised with the length, then its
    finaliser; not the library's MurmurHash3 values), 0 for an empty text, odd otherwise (63 free
    bits). Not a cryptographic hash. A version key is compared only between the rows of one image
    (two versions of it sharing a key: about 10^-19 a change); a container key is searched among
    every row's, where two of C containers' URIs share one with a chance of about C^2 / 2^64 (5x10^-8
    at 10^6 containers), as with the 64-bit BLAKE2b key before. Image ids keep BLAKE2b's 128 bits
    (:func:`id_key`). :func:`version_key` is the same for one text."""
    offsets = np.asarray(offsets, np.int64)
    n = len(offsets) - 1
    if n <= 0:
        return np.zeros(0, U64)
    base, end = int(offsets[0]), int(offsets[-1])
    starts, lengths = offsets[:-1] - base, np.diff(offsets)
    padded = np.zeros(end - base + 8, np.uint8)  # 8 bytes past the end: the last word read whole
    padded[:end - base] = data[base:end]
    # the little-endian 8-byte word starting at each byte (a view: one gather a step, no copy)
    word_at = np.ndarray((end - base + 1,), "<u8", padded, 0, (1,))
    h = lengths.astype(U64) * _C2
    words = -(-lengths // 8)  # 8-byte steps of each text
    every = int(words.min())  # steps that every text takes: no rows picked out
    active = np.arange(n)
    for w in range(int(words.max())):
        if w >= every:
            active = active[words[active] > w]
        rows = slice(None) if w < every else active
        k = word_at[starts[rows] + 8 * w]
        left = np.minimum(lengths[rows] - 8 * w, 8)  # bytes of this word in the text
        short = left < 8
        if short.any():  # the last word: the next text's bytes masked off
            k[short] &= (U64(1) << (left[short] * 8).astype(U64)) - U64(1)
        k = _rotl(k.astype(U64) * _C1, 31) * _C2
        h[rows] = _rotl(h[rows] ^ k, 27) * U64(5) + U64(0x52DCE729)
    h = _fmix(h ^ lengths.astype(U64))
    return np.where(lengths > 0, h | U64(1), U64(0))


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


def key_ranges(hi: np.ndarray, lo: np.ndarray, qh: np.ndarray, ql: np.ndarray,
               queries_sorted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of the rows of each query key in arrays ordered as :func:`sort_keys` orders them
    (empty where absent): one vectorised ``searchsorted``, exact on all 128 bits. Many queries are
    searched in sorted order (neighbouring searches touch the same pages: on a mapped file of 10^6
    rows, 7x faster than in their own order; ``queries_sorted``: they are already)."""
    if not queries_sorted and len(qh) > 64 and len(hi) > 1 << 16:
        order = np.argsort(qh, kind="stable")
        a, b = np.empty(len(qh), np.int64), np.empty(len(qh), np.int64)
        a[order], b[order] = _hi_ranges(hi, qh[order])
    else:
        a, b = _hi_ranges(hi, qh)
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


def _hi_ranges(hi: np.ndarray, qh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``searchsorted(hi, qh)`` left and right: the right end searched only where ``hi`` holds
    the query twice or more (an image of several rows, rare); else it is found from the left end
    by one look at the rows there."""
    a = np.asarray(np.searchsorted(hi, qh, "left"), np.int64)
    n = len(hi)
    if not n:
        return a, a.copy()
    at = np.minimum(a, n - 1)
    b = a + (np.asarray(hi[at]) == qh) * (a < n)  # one row of the query's hi, or none
    more = np.flatnonzero((b > a) & (b < n))
    if len(more):
        more = more[np.asarray(hi[b[more]]) == qh[more]]  # a second row of that hi: searched
        if len(more):
            b[more] = np.searchsorted(hi, qh[more], "right")
    return a, b


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
        """For each query (sorted by hi), whether the run holds it: one ``searchsorted`` (a run's
        keys are distinct, so a key is at the first row of its hi, or among the rare other keys
        sharing that hi, which :func:`key_ranges` then looks through)."""
        n = len(self.hi)
        if not n or not len(qh):
            return np.zeros(len(qh), bool)
        a = np.searchsorted(self.hi, qh, "left")
        at = np.minimum(a, n - 1)
        same_hi = (a < n) & (np.asarray(self.hi[at]) == qh)
        found = same_hi & (np.asarray(self.lo[at]) == ql)
        other = np.flatnonzero(same_hi & ~found)  # its hi there, not its lo: another key shares the hi
        if len(other):
            s, e = key_ranges(self.hi, self.lo, qh[other], ql[other], queries_sorted=True)
            found[other] = e > s
        return found


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
        self._scratch: _Scratch | None = None  # made at the first spill

    def __len__(self) -> int:
        return self.count

    def contains(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hi), bool)
        if not len(hi):
            return found
        order = np.argsort(hi, kind="stable")  # sorted queries: searchsorted narrows as it goes
        found[order] = self._contains_sorted(hi[order], lo[order])
        return found

    def _contains_sorted(self, qh: np.ndarray, ql: np.ndarray) -> np.ndarray:
        found = np.zeros(len(qh), bool)
        for run in self.disk + self.mem:
            found |= run.contains(qh, ql)
        return found

    def add(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Adds a batch of keys; returns the mask of those new (not held before, and the first of
        their repeats within the batch). The batch is sorted once (:func:`sort_keys`): repeats
        within it, the search of the runs and the new run all use that order."""
        hi, lo = np.asarray(hi, U64), np.asarray(lo, U64)
        new = np.zeros(len(hi), bool)
        if not len(hi):
            return new
        order = sort_keys(hi, lo)
        h, l = hi[order], lo[order]
        head = np.ones(len(h), bool)  # the first of each key in the sorted batch: its earliest (stable)
        head[1:] = (h[1:] != h[:-1]) | (l[1:] != l[:-1])
        head &= ~self._contains_sorted(h, l)
        new[order] = head
        if head.any():
            self.mem.append(_Run(h[head], l[head]))  # sorted, distinct
            self.count += int(np.count_nonzero(head))
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
    @property
    def _dir(self) -> str | None:
        """Its scratch folder, once it has spilled."""
        return self._scratch.dir if self._scratch is not None else None

    def _new_path(self) -> str:
        if self._scratch is None:
            self._scratch = _Scratch(self._spill_parent)
        return self._scratch.new_path("run", "")

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

    def keys(self) -> tuple[np.ndarray, np.ndarray]:
        """Every key held (hi, lo), run after run (each key once)."""
        runs = self.disk + self.mem
        if not runs:
            return np.zeros(0, U64), np.zeros(0, U64)
        return (np.concatenate([np.asarray(r.hi, U64) for r in runs]),
                np.concatenate([np.asarray(r.lo, U64) for r in runs]))

    def close(self) -> None:
        self.mem, self.disk = [], []
        if self._scratch is not None:
            self._scratch.close()


def _merge_in_memory(a: _Run, b: _Run) -> _Run:
    """Two sorted runs merged as a stable sort of their concatenation would (``b``'s keys after
    ``a``'s of the same hi): each of ``b``'s keys placed by one search in ``a``, linear, no sort."""
    n = len(a) + len(b)
    at = np.searchsorted(a.hi, b.hi, "right") + np.arange(len(b))
    from_a = np.ones(n, bool)
    from_a[at] = False
    h, l = np.empty(n, U64), np.empty(n, U64)
    h[at], l[at] = b.hi, b.lo
    h[from_a], l[from_a] = a.hi, a.lo
    return _Run(h, l)


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
    stamp: str = ""  # the file's listing entry when read (resume.listing_stamp): "" unknown (read again)

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
        return cls(part, hi, lo, version_keys([r[1] for r in rows]),
                   np.array([r[2] == "ok" for r in rows], bool), np.array(codes, np.int16), reasons,
                   version_keys([r[4] if len(r) > 4 else None for r in rows]), dict(fingerprints or {}))


@dataclass
class FileGroup:
    """The rows of several committed files (in their order) as :data:`ROW` records sorted by key,
    stably (:func:`sort_keys`): what :meth:`Committed.replaced` takes in place of their
    :class:`FileRows`, with the same result, when the records are made and sorted elsewhere (by
    planning's process pool: :mod:`.parallel`); a run of presorted groups then sorts in about
    linear time. ``part_of``: the file's index in ``files`` ((part, fingerprints, stamp) each);
    ``reason_of``: index in ``reasons`` (the files' reasons in order of first appearance), -1 ok."""

    files: list[tuple[str, dict[str, int], str]]
    records: np.ndarray
    reasons: list[str]

    @classmethod
    def of(cls, files: Sequence[FileRows]) -> "FileGroup":
        reasons: list[str] = []
        blocks = []
        for j, f in enumerate(files):
            for r in f.reasons:
                if r not in reasons:
                    reasons.append(r)
            codes = np.array([reasons.index(r) for r in f.reasons] + [-1], np.int16)
            n = len(f.hi)
            rec = np.empty(n, ROW)
            rec["hi"], rec["lo"] = np.asarray(f.hi).reshape(n), np.asarray(f.lo).reshape(n)
            rec["versions"], rec["units"] = np.asarray(f.versions).reshape(n), np.asarray(f.units).reshape(n)
            rec["ok"] = np.asarray(f.ok).reshape(n)
            rec["part_of"] = j
            rec["reason_of"] = codes[np.asarray(f.reason_of, np.int64).reshape(n)]
            blocks.append(rec)
        return cls([(f.part, dict(f.fingerprints), f.stamp) for f in files], _sorted(_concat(blocks, ROW)),
                   reasons)


def _empty(dtype) -> np.ndarray:
    return np.empty(0, dtype)


# ---------------------------------------------------------------------------------------------
# Rows past a memory bound: sorted runs on local disk, merged in blocks (an external sort)

# One committed row: 40 bytes (aligned). ``hi``/``lo``: the id key; ``versions``: version_key;
# ``units``: unit_key of its container; ``part_of``: index in the parts; ``reason_of``: index in the
# reasons (-1: ok).
ROW = np.dtype([("hi", U64), ("lo", U64), ("versions", U64), ("units", U64), ("part_of", np.int32),
                ("reason_of", np.int16), ("ok", bool)], align=True)
# (container key, row index): the rows by container (:meth:`Committed.unit_rows`), sorted the same way
_UNIT_ROW = np.dtype([("hi", U64), ("lo", U64)])
MEMORY_ROWS_ENV = "FASTSAM_BATCH_INDEX_ROWS"
# rows a Committed holds in memory (40 bytes each); past it, its rows are a file under scratch_dir()
MIN_MEMORY_ROWS = 1024  # a smaller bound: a run per ~1,000 rows, merges of hours at 10^9 rows


def memory_rows_setting(text: str | None) -> int:
    """The bound ``$FASTSAM_BATCH_INDEX_ROWS`` sets (unset or empty: 2^21): an integer of at least
    :data:`MIN_MEMORY_ROWS`, else a ValueError naming the variable (tests force smaller bounds with
    ``Committed(memory_rows=...)``, which is not checked)."""
    if text is None or not text.strip():
        return 1 << 21
    try:
        n = int(text.strip().replace("_", ""))
    except ValueError:
        raise ValueError(f"${MEMORY_ROWS_ENV}={text!r}: not an integer (rows of the committed index held "
                         f"in memory; at least {MIN_MEMORY_ROWS}, default {1 << 21})") from None
    if n < MIN_MEMORY_ROWS:
        raise ValueError(f"${MEMORY_ROWS_ENV}={text!r}: at least {MIN_MEMORY_ROWS} rows (a smaller bound "
                         f"sorts the index in runs that small: hours of merging at 10^9 rows; default {1 << 21})")
    return n


MEMORY_ROWS = memory_rows_setting(os.environ.get(MEMORY_ROWS_ENV))
MERGE_FAN_IN = 64  # sorted runs merged at once (more: merged in passes)
SCAN_BLOCK = 1 << 20  # rows read at a time by the scans over every row (images, errors, duplicates)


def _remove_own(folder: str, pid: int) -> None:
    """Removes ``folder``, only from the process that made it (not from a forked child's exit)."""
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


class _Scratch:
    """A private folder under :func:`scratch_dir` (``fastsam-keys-<pid>-*``, so that
    :func:`remove_stale_scratch` finds those of killed processes), removed with the object; under
    ``parent`` if given, else :func:`scratch_dir`. Committed's rows and KeyRuns' spilled runs."""

    def __init__(self, parent: str | None = None) -> None:
        parent = parent or scratch_dir()
        os.makedirs(parent, exist_ok=True)
        remove_stale_scratch(parent)
        self.dir = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=parent)
        self._files = 0
        self._cleanup = weakref.finalize(self, _remove_own, self.dir, os.getpid())

    def new_path(self, what: str, suffix: str = ".bin") -> str:
        self._files += 1
        return os.path.join(self.dir, f"{what}-{self._files:06d}{suffix}")

    def close(self) -> None:
        self._cleanup()


def _sorted(rec: np.ndarray) -> np.ndarray:
    """Records in key order (:func:`sort_keys`: stably by (hi, lo))."""
    return rec if len(rec) < 2 else _at(rec, sort_keys(rec["hi"], rec["lo"]))


def _as_bytes(rec: np.ndarray) -> np.ndarray:
    """Records seen as opaque rows of bytes (``V<itemsize>``), a view: numpy moves those with one
    memcpy a row, where a structured array's fancy index or mask goes field by field (a gather of
    2^21 records: 0.07 s against 0.77 s, measured on this machine)."""
    return np.asarray(rec).view(f"V{rec.dtype.itemsize}")


def _at(rec: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``rec[rows]`` (integer indices), as a copy made by the rows' bytes."""
    return np.take(_as_bytes(rec), rows).view(rec.dtype)


def _kept(rec: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``rec[mask]`` (a boolean mask), as a copy made by the rows' bytes."""
    return np.compress(mask, _as_bytes(rec)).view(rec.dtype)


def _concat(blocks: list[np.ndarray], dtype) -> np.ndarray:
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks) if blocks else np.empty(0, dtype)


def _mapped(path: str, dtype, n: int) -> np.ndarray:
    """A file of ``n`` records, memory-mapped read-only (written before with buffered writes)."""
    return np.memmap(path, dtype, "r", shape=(n,)) if n else np.empty(0, dtype)


def _read(arr: np.ndarray, a: int, b: int) -> np.ndarray:
    """A copy of records [a, b) of ``arr``; of a mapped file, read with an ordinary read (a scan's
    pages go to the page cache, not into this process's resident memory as a mapping's would)."""
    whole_file = isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.offset == 0
    if whole_file and arr.filename:
        return np.fromfile(arr.filename, arr.dtype, count=b - a, offset=a * arr.dtype.itemsize)
    return np.array(arr[a:b])


def _blocks(arr: np.ndarray, block: int):
    """Copies of ``block`` records of ``arr`` at a time."""
    for a in range(0, len(arr), block):
        yield _read(arr, a, min(a + block, len(arr)))


def _file_blocks(path: str, dtype, block: int):
    """The records of a run file, ``block`` at a time (ordinary reads); the file removed once read."""
    try:
        with open(path, "rb") as f:
            while True:
                rec = np.fromfile(f, dtype, count=block)
                if not len(rec):
                    return
                yield rec
    finally:
        try:
            os.remove(path)
        except OSError:
            pass


def _merge(sources: list, emit) -> None:
    """K-way merge of sorted sources (iterators of sorted record blocks) in key order, stably:
    rows of one key in the order of their sources, then of their positions (as :func:`sort_keys`
    orders the sources concatenated). Each step emits every buffered row up to the least of the
    sources' last buffered rows, compared on (hi, lo, source): no row not yet read can come before
    it, and that source's whole block goes, so the steps are at most the blocks read."""
    heads: list = [next((b for b in it if len(b)), None) for it in sources]
    # each head block's hi as a contiguous array, sliced along with it: searchsorted copies a strided
    # field view (a record array's "hi") whole at every call, k blocks a step
    his: list = [np.ascontiguousarray(b["hi"]) if b is not None else None for b in heads]
    active = [s for s, h in enumerate(heads) if h is not None]
    while active:
        if len(active) == 1:
            s = active[0]
            emit(heads[s])
            for b in sources[s]:
                if len(b):
                    emit(b)
            return
        least = min((int(heads[s]["hi"][-1]), int(heads[s]["lo"][-1]), s) for s in active)
        qh, ql, at = np.array([least[0]], U64), np.array([least[1]], U64), least[2]
        pieces = []
        for s in active:
            b = heads[s]
            if s == at:
                n = len(b)
            else:
                h = his[s]
                a0, a1 = int(np.searchsorted(h, qh, "left")[0]), int(np.searchsorted(h, qh, "right")[0])
                n = a0
                if a1 > a0:  # rows of the same hi: sorted by lo there; of the same key, an earlier source's first
                    n += int(np.searchsorted(b["lo"][a0:a1], ql, "right" if s < at else "left")[0])
            if n:
                pieces.append(b[:n])
                heads[s] = b[n:]
                his[s] = his[s][n:]
        emit(_sorted(_concat(pieces, heads[at].dtype)))
        still = []
        for s in active:
            if not len(heads[s]):
                heads[s] = next((b for b in sources[s] if len(b)), None)
                his[s] = np.ascontiguousarray(heads[s]["hi"]) if heads[s] is not None else None
            if heads[s] is not None:
                still.append(s)
        active = still


class _Output:
    """Merged rows: in memory up to ``limit`` rows, past it written (buffered writes) to a file,
    memory-mapped read-only at the end. ``fix``: applied to each block on its way (part indices)."""

    def __init__(self, scratch, dtype, limit: int, fix=None):
        self.scratch, self.dtype, self.limit, self.fix = scratch, dtype, limit, fix
        self.pieces: list[np.ndarray] = []
        self.n = 0
        self.file = None
        self.path: str | None = None

    def emit(self, block: np.ndarray) -> None:
        if self.fix is not None:
            block = self.fix(np.array(block))
        if self.file is None and self.n + len(block) > self.limit:
            self.path = self.scratch().new_path("rows")
            self.file = open(self.path, "wb")
            for p in self.pieces:
                p.tofile(self.file)
            self.pieces = []
        if self.file is None:
            self.pieces.append(block)
        else:
            block.tofile(self.file)
        self.n += len(block)

    def result(self) -> np.ndarray:
        if self.file is None:
            return _concat(self.pieces, self.dtype)
        self.file.close()
        return _mapped(self.path, self.dtype, self.n)


def _external_sort(blocks, dtype, limit: int, scratch, presorted=None, presorted_rows: int = 0, fix=None,
                   fan_in: int | None = None) -> np.ndarray:
    """The records of ``blocks`` (an iterable of record arrays), after those of ``presorted`` (a
    function of a block size giving sorted blocks, ``presorted_rows`` of them at most), in key
    order, stably. Up to ``limit`` rows at a time in memory: each ``limit`` rows read are sorted
    and written as a run to ``scratch()`` (a :class:`_Scratch`), then the runs are merged in blocks,
    ``fan_in`` at a time (in passes), into a result in memory (``limit`` rows at most) or on disk."""
    fan_in = max(2, fan_in or MERGE_FAN_IN)
    buf: list[np.ndarray] = []
    held = 0
    runs: list[tuple[str, int]] = []
    for b in blocks:
        if not len(b):
            continue
        buf.append(b)
        held += len(b)
        if held >= limit:
            rec = _concat(buf, dtype)
            buf, held = [], 0  # the blocks freed before the sort's copies are made
            rec = _sorted(rec)
            path = scratch().new_path("run")
            rec.tofile(path)
            runs.append((path, len(rec)))
            del rec
    rest = _concat(buf, dtype) if buf else None
    del buf
    rest = _sorted(rest) if rest is not None else None
    if not runs and presorted_rows + held <= limit:  # all in memory: one stable sort
        first = list(presorted(max(presorted_rows, 1))) if presorted is not None else []
        rec = _concat(first + ([rest] if rest is not None else []), dtype)
        rec = _sorted(rec) if first and rest is not None else rec
        return fix(np.array(rec)) if fix is not None else rec
    k = min(len(runs) + (presorted is not None) + (rest is not None), fan_in)
    block = max(1, limit // (2 * k + 2))  # k blocks buffered, and as many merged: about ``limit`` rows
    sources = ([presorted(block)] if presorted is not None else []) + \
        [_file_blocks(p, dtype, block) for p, _ in runs] + ([_blocks(rest, block)] if rest is not None else [])
    while len(sources) > fan_in:  # merged in passes, neighbours together: the order of sources kept
        merged = []
        for g in range(0, len(sources), fan_in):
            group = sources[g:g + fan_in]
            if len(group) == 1:
                merged.append(group[0])
                continue
            path = scratch().new_path("run")
            with open(path, "wb") as f:
                _merge(group, lambda b, f=f: b.tofile(f))
            merged.append(_file_blocks(path, dtype, block))
        sources = merged
    out = _Output(scratch, dtype, limit, fix)
    _merge(sources, out.emit)
    return out.result()


def _spans(n: int, block: int = 0):
    block = max(1, block or SCAN_BLOCK)
    for a in range(0, n, block):
        yield a, min(a + block, n)


def _same_as_next(records: np.ndarray, block: int = 0):
    """(a, records [a, b], mask) per block of rows (ordinary reads): mask[i]: row a+i has the key of
    row a+i+1 (every pair once)."""
    n = len(records)
    for a, b in _spans(max(n - 1, 0), block):
        rec = _read(records, a, b + 1)
        h, l = rec["hi"], rec["lo"]
        yield a, rec, (h[1:] == h[:-1]) & (l[1:] == l[:-1])


@dataclass
class Lookup:
    state: str  # "new" (no row), "fresh" (a row of the object as it is now), "changed" (rows of older versions only)
    ok: bool = False  # the fresh row's status is ok
    superseded: list[str] = field(default_factory=list)  # files holding rows of older versions, when fresh
    reason: str | None = None  # the fresh row's error reason (read_failed, ...) when it is an error row
    parts: list[str] = field(default_factory=list)  # every file holding a row of the image


@dataclass(eq=False)
class Committed:
    """The committed rows under ``output.uri``, compactly: a 40-byte record a row (:data:`ROW`: the
    16-byte id key as hi/lo, an 8-byte hash of its source version, an 8-byte container key, file
    index, error reason, status), sorted by key (:func:`sort_keys`). Built once per run from every
    file (:meth:`from_files`, files streamed in), then kept current by :meth:`replaced` (files gone,
    files added or rewritten) instead of read again.

    Memory is bounded: up to ``memory_rows`` rows (default :data:`MEMORY_ROWS`, 2^21, about 80 MB;
    ``$FASTSAM_BATCH_INDEX_ROWS``) the records are an array in memory; past it they are a file in a
    private folder under :func:`scratch_dir` (removed with the object, or by :meth:`close`),
    memory-mapped read-only, made by an external sort (sorted runs of ``memory_rows`` rows, merged
    in blocks) and made again by each :meth:`replaced` (the kept rows and the new ones merged as
    streams: a pass over the rows, no sort of them all). The rows by container
    (:meth:`unit_rows`) are sorted the same way. Lookups are binary searches in the mapped file
    (the pages they touch count in RSS as file pages, which the kernel may reclaim); the scans
    over every row (:attr:`images`, :meth:`errors_by_reason`, :attr:`ok_rows`,
    :func:`duplicate_rows`, the kept rows of :meth:`replaced`) read it a block at a time with
    ordinary reads. What stays per file (``parts``, fingerprints, stamps) is not per row."""

    parts: list[str] = field(default_factory=list)  # sorted
    rows: int = 0
    fingerprints: dict[str, int] = field(default_factory=dict)  # fingerprint -> rows
    reasons: list[str] = field(default_factory=list)  # the error reasons present
    part_fingerprints: dict[str, dict[str, int]] = field(default_factory=dict)  # part -> fingerprint -> rows
    # part -> its listing entry when it was read (size and ETag, or size, mtime, inode and ctime): a file
    # rewritten under its own name (names are hashes of the ids a file holds) is told by this
    stamps: dict[str, str] = field(default_factory=dict)
    memory_rows: int | None = None  # rows held in memory before they go to disk (None: MEMORY_ROWS)
    records: np.ndarray = field(default_factory=lambda: _empty(ROW), repr=False)  # ROW, in key order
    _scratch: _Scratch | None = field(default=None, repr=False)  # the folder of its files, if any
    _by_unit: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # (rows by container, their keys)

    # the columns (views of the records)
    hi = property(lambda self: self.records["hi"])
    lo = property(lambda self: self.records["lo"])
    versions = property(lambda self: self.records["versions"])
    ok = property(lambda self: self.records["ok"])
    part_of = property(lambda self: self.records["part_of"])
    reason_of = property(lambda self: self.records["reason_of"])  # index in reasons; -1: ok
    units = property(lambda self: self.records["units"])  # container key (unit_key); 0: none

    @property
    def bound(self) -> int:
        return max(1, self.memory_rows if self.memory_rows is not None else MEMORY_ROWS)

    @property
    def on_disk(self) -> bool:
        return isinstance(self.records, np.memmap)

    def _folder(self) -> _Scratch:
        if self._scratch is None:
            self._scratch = _Scratch()
        return self._scratch

    def close(self) -> None:
        """Removes its scratch files now (else when it is garbage collected)."""
        if self._scratch is not None:
            self._scratch.close()

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
        counts = np.zeros(len(self.reasons) + 1, np.int64)
        for a, b in _spans(self.rows):
            counts += np.bincount(_read(self.records, a, b)["reason_of"].astype(np.int64) + 1, minlength=len(counts))
        found = [(c, int(n)) for c, n in enumerate(counts[1:].tolist()) if n]
        return {self.reasons[c]: n for c, n in sorted(found, key=lambda x: self.reasons[x[0]])}

    @property
    def ok_rows(self) -> int:
        """Rows whose status is ok."""
        return sum(int(np.count_nonzero(_read(self.records, a, b)["ok"])) for a, b in _spans(self.rows))

    @classmethod
    def from_rows(cls, rows: list[tuple], fingerprints: dict[str, int] | None = None,
                  memory_rows: int | None = None) -> "Committed":
        """From (image_id, source_version, status, part[, error[, shard]]) tuples."""
        by_part: dict[str, list[tuple]] = {}
        for r in rows:
            by_part.setdefault(r[3], []).append((r[0], r[1], r[2], r[4] if len(r) > 4 else None,
                                                 r[5] if len(r) > 5 else None))
        c = cls.from_files([FileRows.from_rows(p, rs) for p, rs in by_part.items()], memory_rows)
        if fingerprints is not None:
            c.fingerprints = dict(fingerprints)
        return c

    @classmethod
    def from_files(cls, files: Iterable[FileRows], memory_rows: int | None = None) -> "Committed":
        """The index of these files (read as they come: an iterable holds one at a time)."""
        return cls(memory_rows=memory_rows).replaced((), files)

    def replaced(self, removed: Iterable[str], added: Iterable[FileRows]) -> "Committed":
        """A new index: the rows of the files ``removed`` (deleted, or rewritten) gone, those of
        ``added`` (new files, rewrites, or files read again: their old rows go) in. The new rows
        are sorted (externally past the bound); then one pass merges them with the sorted kept rows.
        ``added`` is read once, a file at a time (a generator of files being read is fine; it is
        closed when this returns or raises, so that its queued reads are cancelled at once)."""
        c = Committed(reasons=list(self.reasons), memory_rows=self.memory_rows)
        added_parts: list[str] = []  # in the order read: the rows of the j-th carry len(self.parts) + j
        base = len(self.parts)
        state: dict = {}  # the added files are all read (their rows sorted, spilled past the bound) first

        def new_rows():
            for f in added:
                codes = np.array([c.reason_code(r, False) for r in f.reasons] + [-1], np.int16)
                if isinstance(f, FileGroup):  # files' rows made into records (and sorted) elsewhere
                    rec = f.records
                    rec["part_of"] += base + len(added_parts)
                    rec["reason_of"] = codes[rec["reason_of"].astype(np.int64)]  # -1 -> the last: -1
                    for part, fingerprints, stamp in f.files:
                        c.part_fingerprints[part] = dict(fingerprints)
                        c.stamps[part] = stamp
                        added_parts.append(part)
                    yield rec
                    continue
                n = len(f.hi)
                rec = np.empty(n, ROW)
                rec["hi"], rec["lo"] = np.asarray(f.hi).reshape(n), np.asarray(f.lo).reshape(n)
                rec["versions"], rec["units"] = np.asarray(f.versions).reshape(n), np.asarray(f.units).reshape(n)
                rec["ok"] = np.asarray(f.ok).reshape(n)
                rec["part_of"] = base + len(added_parts)
                rec["reason_of"] = codes[np.asarray(f.reason_of, np.int64).reshape(n)]  # -1 -> the last: -1
                c.part_fingerprints[f.part] = dict(f.fingerprints)
                c.stamps[f.part] = f.stamp
                added_parts.append(f.part)
                yield rec
            # every added file read: the files gone are known, and where each part goes
            gone = set(removed) | set(added_parts)
            kept_parts = [p for p in self.parts if p not in gone]
            parts = sorted(set(kept_parts) | set(added_parts))
            index = {p: i for i, p in enumerate(parts)}
            state.update(gone=gone, parts=parts, kept_parts=kept_parts,
                         final=np.array([-1 if p in gone else index[p] for p in self.parts]
                                        + [index[p] for p in added_parts], np.int32))

        def kept(block: int):
            gone = state["gone"]
            drop = np.array([p in gone for p in self.parts] + [True], bool)
            for a, b in _spans(self.rows, block):
                rec = _read(self.records, a, b)
                rec = _kept(rec, ~drop[rec["part_of"]])
                if len(rec):
                    yield rec

        def fix(rec: np.ndarray) -> np.ndarray:
            rec["part_of"] = state["final"][rec["part_of"]]
            return rec

        try:
            records = _external_sort(new_rows(), ROW, c.bound, c._folder, presorted=kept if self.rows else None,
                                     presorted_rows=self.rows, fix=fix)
        except BaseException:
            c.close()  # the runs and the partial file of the index not made
            raise
        finally:  # a generator of files being read (resume.iter_files): its queued reads cancelled now
            close = getattr(added, "close", None)
            if close is not None:
                close()
        c.parts = state["parts"]
        for p in state["kept_parts"]:
            c.part_fingerprints.setdefault(p, self.part_fingerprints.get(p, {}))
            if p in self.stamps:
                c.stamps.setdefault(p, self.stamps[p])
        c.records = records
        c.rows = len(records)
        if c._scratch is not None and not c.on_disk:  # runs spilled, the result small: no file kept
            c._scratch.close()
            c._scratch = None
        for fps in c.part_fingerprints.values():
            for fp, n in fps.items():
                c.fingerprints[fp] = c.fingerprints.get(fp, 0) + n
        return c

    @property
    def images(self) -> int:
        """Distinct image ids with a row."""
        if not self.rows:
            return 0
        return self.rows - sum(int(np.count_nonzero(same)) for _, _, same in _same_as_next(self.records))

    def key_list(self, rows: np.ndarray) -> list[bytes]:
        """The 16-byte id keys of these rows."""
        return keys_to_bytes(self.hi[rows], self.lo[rows])

    def ranges(self, image_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        qh, ql = id_keys(image_ids)
        return key_ranges(self.hi, self.lo, qh, ql)

    def _rows_by_unit(self) -> tuple[np.ndarray, np.ndarray]:
        """(row indices ordered by container key, stably; their container keys), made once."""
        if self._by_unit is None:
            if not self.on_disk:
                order = np.argsort(self.units, kind="stable")
                self._by_unit = (order, self.units[order])
            else:  # (container key, row index) pairs sorted externally, like the rows
                def pairs():
                    for a, b in _spans(self.rows, min(SCAN_BLOCK, self.bound)):
                        rec = np.empty(b - a, _UNIT_ROW)
                        rec["hi"], rec["lo"] = _read(self.records, a, b)["units"], np.arange(a, b, dtype=U64)
                        yield rec

                by = _external_sort(pairs(), _UNIT_ROW, self.bound, self._folder)
                self._by_unit = (by["lo"], by["hi"])
        return self._by_unit

    def unit_rows(self, shard: str, version: str) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the rows of images read from the container ``shard``: (those of ``version``,
        those of other versions). The rows sorted by container are made once (then cached)."""
        if not self.rows:
            return _empty(np.int64), _empty(np.int64)
        order, sorted_units = self._rows_by_unit()
        want = np.array([unit_key(shard)], U64)
        lo = int(np.searchsorted(sorted_units, want, "left")[0])
        hi = int(np.searchsorted(sorted_units, want, "right")[0])
        rows = np.asarray(order[lo:hi], np.int64)
        same = np.asarray(self.versions[rows]) == U64(version_key(version))
        return rows[same], rows[~same]

    def lookup(self, image_ids: list[str], versions: list[str]) -> list[Lookup]:
        """For each image (and the version of its object now): whether it has a row to keep, and
        which files hold rows of older versions of it that a current row replaces. Of several
        current rows, the last (by file, then row) speaks for the image. (:meth:`lookup_keys` is the
        same on arrays, without building an object per image.)"""
        if not self.rows:
            return [Lookup("new") for _ in image_ids]
        hi, lo = id_keys(image_ids)
        found = self.lookup_keys(hi, lo, version_keys(versions), with_parts=True)
        out = []
        for j, (s, ok, code) in enumerate(zip(found.state.tolist(), found.ok.tolist(), found.code.tolist())):
            if s != FRESH:
                out.append(Lookup(STATES[s]))
                continue
            out.append(Lookup("fresh", ok, [self.parts[p] for p in found.superseded.get(j, [])],
                              self.reasons[code] if code >= 0 else None,
                              [self.parts[p] for p in found.parts.get(j, [found.part[j]])]))
        return out

    def lookup_keys(self, hi: np.ndarray, lo: np.ndarray, versions: np.ndarray,
                    with_parts: bool = False) -> "Lookups":
        """:meth:`lookup` on id keys and :func:`version_key` hashes, as arrays: one vectorised
        range search and one read of each image's first row; only images with more than one row
        (several versions, or rows in two files) are looked at one at a time."""
        n = len(hi)
        found = Lookups(np.zeros(n, np.int8), np.zeros(n, bool), np.full(n, -1, np.int16), np.zeros(n, np.int64))
        if not self.rows or not n:
            return found
        start, end = key_ranges(self.hi, self.lo, np.asarray(hi, U64), np.asarray(lo, U64))
        versions = np.asarray(versions, U64)
        count = end - start
        one = np.flatnonzero(count == 1)
        if len(one):
            first = _take(self.records, start[one])  # the one row of each, read for all at once
            current = (first["versions"] == versions[one]) | (first["versions"] == 0)
            found.state[one] = np.where(current, FRESH, CHANGED)
            fresh = one[current]
            found.ok[fresh] = first["ok"][current]
            found.code[fresh] = first["reason_of"][current]
            found.part[fresh] = first["part_of"][current]
        for j in np.flatnonzero(count > 1).tolist():  # several rows: few (changed objects, a run cut short)
            a, b = int(start[j]), int(end[j])
            rec = _read(self.records, a, b)
            vs, ps = rec["versions"].tolist(), rec["part_of"].tolist()
            want = int(versions[j])
            fresh = [i for i, x in enumerate(vs) if x in (want, 0)]
            if not fresh:
                found.state[j] = CHANGED
                continue
            last = max(fresh, key=lambda i: (ps[i], i))
            found.state[j] = FRESH
            found.ok[j] = bool(rec["ok"][last])
            found.code[j] = int(rec["reason_of"][last])
            found.part[j] = ps[last]
            old = sorted({p for x, p in zip(vs, ps) if x not in (want, 0)})  # parts are sorted by name
            if old:
                found.superseded[j] = old
            if with_parts:
                found.parts[j] = sorted(set(ps))
        return found


NEW, FRESH, CHANGED = 0, 1, 2
STATES = ("new", "fresh", "changed")


@dataclass
class Lookups:
    """:meth:`Committed.lookup_keys`' answer, an entry per image: ``state`` (:data:`NEW`: no row;
    :data:`FRESH`: a row of the object as it is now; :data:`CHANGED`: rows of older versions only),
    and for fresh ones the row that speaks for the image: ``ok``, ``code`` (index in
    ``Committed.reasons``; -1: ok), ``part`` (its file's index in ``Committed.parts``). Only for
    images with several rows: ``superseded`` (entry -> indices in ``Committed.parts``, sorted, of
    the files holding rows of older versions) and, when asked for, ``parts`` (entry -> those of
    every file holding a row of it). Files as indices: a process of planning's pool that looks up
    a mapped index (:mod:`.parallel`) has no names."""

    state: np.ndarray
    ok: np.ndarray
    code: np.ndarray
    part: np.ndarray
    superseded: dict[int, list[int]] = field(default_factory=dict)
    parts: dict[int, list[int]] = field(default_factory=dict)


def _take(records: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The records at ``rows`` (a mapped file: read in the order of the rows, then put back)."""
    if not isinstance(records, np.memmap) or len(rows) < 2:
        return _at(records, rows)
    order = np.argsort(rows, kind="stable")
    out = np.empty(len(rows), records.dtype)
    out[order] = _at(records, rows[order])
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
    gave twice. One vectorised pass (a block at a time) finds the images with several rows; only those
    are sorted."""
    c = committed
    out = Duplicates()
    if c.rows < 2:
        return out
    found = []  # (row indices, their records) of the images with several rows, a block at a time
    for a, rec, same in _same_as_next(c.records):
        if same.any():
            first = np.flatnonzero(same)
            local = np.union1d(first, first + 1)
            found.append((local + a, rec[local]))
    if not found:
        return out
    # a block's last row is the next block's first: once
    rows, keep = np.unique(np.concatenate([r for r, _ in found]), return_index=True)
    rec = np.concatenate([x for _, x in found])[keep]  # in key order: an image's rows contiguous
    h, l = rec["hi"], rec["lo"]
    image = np.cumsum(np.concatenate(([True], (h[1:] != h[:-1]) | (l[1:] != l[:-1]))))
    sub = np.lexsort((rec["part_of"], rec["versions"], image))
    rec, image = rec[sub], image[sub]
    versions, parts, ok = rec["versions"], rec["part_of"], rec["ok"]
    g = np.concatenate(([True], (image[1:] != image[:-1]) | (versions[1:] != versions[:-1])))
    starts = np.flatnonzero(g)
    ends = np.concatenate((starts[1:], [len(rec)]))
    names = [_name(p) in prefer for p in c.parts] if prefer else None
    for a, b in zip(starts.tolist(), ends.tolist()):
        if b - a < 2:
            continue
        group_parts, good = parts[a:b].tolist(), ok[a:b].tolist()
        keeper = next((p for p in group_parts if names is not None and names[p]),
                      next((p for p, x in zip(group_parts, good) if x), group_parts[0]))
        key = (key_bytes((rec['hi'][a], rec['lo'][a])), int(versions[a]))
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
