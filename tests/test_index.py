"""The committed-row index and the listing's repeat detection (issue 23), against plain Python
sets and dicts (hypothesis). Pure: no Ray, no storage but a scratch folder for spilled runs."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsam_batch.index import (Committed, FileRows, KeyRuns, duplicate_rows, id_key, id_keys, key_bytes,
                                 key_ranges, keys_to_bytes, rows_in_other_files, rows_outside, sort_keys,
                                 stale_unit_rows, superseded_parts, unit_key, version_key)
from fastsam_batch.inputs.lists import SeenIds

IDS = st.text(alphabet="abcdef/.0123", min_size=0, max_size=4)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _reference_rows_outside(rows, retried) -> dict[str, set]:
    """What rows_outside should give when out/p2.parquet holds this run's rows: for each retried id
    with a row there, its other files (rows: (image_id, version, status, part) tuples)."""
    want: dict[str, set] = {}
    for i in retried:
        parts = {r[3] for r in rows if r[0] == i}
        if "out/p2.parquet" in parts:
            for p in parts - {"out/p2.parquet"}:
                want.setdefault(p, set()).add(i)
    return want


@FAST
@given(st.lists(st.lists(IDS, max_size=40), max_size=12), st.integers(1, 40))
def test_seen_ids_agree_with_a_set_in_memory_and_spilled(batches, memory_keys):
    seen, spilled, ref = SeenIds(), SeenIds(memory_keys=memory_keys), set()
    spilled.keys.block = 3  # spilled runs merged a few keys at a time: every block boundary taken
    for batch in batches:
        want = []
        for i in batch:
            want.append(i not in ref)
            ref.add(i)
        assert seen.add_batch(batch).tolist() == want
        assert spilled.add_batch(batch).tolist() == want
    assert len(seen.keys) == len(spilled.keys) == len(ref)
    spilled.close()


def test_seen_ids_spill_to_disk_and_stay_exact_over_many_batches(tmp_path):
    seen = SeenIds(memory_keys=1000, spill_dir=str(tmp_path))
    seen.keys.block = 257
    rng = np.random.default_rng(3)
    ref: set[str] = set()
    for _ in range(60):
        batch = [f"img/{x}.jpg" for x in rng.integers(0, 20_000, 500).tolist()]
        want = []
        for i in batch:
            want.append(i not in ref)
            ref.add(i)
        assert seen.add_batch(batch).tolist() == want
    assert seen.keys.disk and len(seen.keys) == len(ref)
    assert len(seen.keys.disk) + len(seen.keys.mem) <= 2 * int(np.log2(len(ref))) + 2  # geometric runs
    folder = seen.keys._dir
    seen.close()
    assert not (tmp_path / folder).exists()


def test_keys_sharing_their_high_64_bits_stay_apart():
    """Two distinct keys with the same hi (about one pair in 6*10^9 ids) are told apart by lo, in
    the sort, the range search and the runs."""
    hi = np.array([5, 5, 5, 7, 5, 2], np.uint64)
    lo = np.array([9, 1, 9, 0, 4, 3], np.uint64)
    order = sort_keys(hi, lo)
    h, l = hi[order], lo[order]
    assert h.tolist() == sorted(hi.tolist())
    a, b = key_ranges(h, l, np.array([5, 5, 5, 5, 7, 8], np.uint64), np.array([9, 1, 4, 2, 0, 0], np.uint64))
    assert (b - a).tolist() == [2, 1, 1, 0, 1, 0]
    assert all((h[x:y] == qh).all() and (l[x:y] == ql).all()
               for x, y, qh, ql in zip(a.tolist(), b.tolist(), [5, 5, 5], [9, 1, 4]))
    runs = KeyRuns(memory_keys=2)
    runs.block = 1
    assert runs.add(hi, lo).tolist() == [True, True, False, True, True, True]
    assert runs.add(np.array([5, 5], np.uint64), np.array([4, 8], np.uint64)).tolist() == [False, True]
    runs.close()


@FAST
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 3)), max_size=60),
       st.lists(st.tuples(st.integers(0, 14), st.integers(0, 3)), max_size=80), st.booleans())
def test_key_ranges_agree_with_a_scan(keys, queries, large):
    """The rows of each query key, found by the range search (the right end searched only where a
    high half repeats), against a plain scan of the sorted keys; ``large``: the keys past 2^16
    rows and many queries, the branch that searches the queries in sorted order."""
    hi = np.array([k[0] for k in keys], np.uint64)
    lo = np.array([k[1] for k in keys], np.uint64)
    if large:  # the same keys among 2^16 + 1 larger ones, which no query asks for
        hi = np.concatenate([hi, np.arange(100, 101 + (1 << 16), dtype=np.uint64)])
        lo = np.concatenate([lo, np.zeros(1 + (1 << 16), np.uint64)])
        queries = queries * (65 // max(1, len(queries)) + 1)
    order = sort_keys(hi, lo)
    h, l = hi[order], lo[order]
    qh = np.array([q[0] for q in queries], np.uint64)
    ql = np.array([q[1] for q in queries], np.uint64)
    a, b = key_ranges(h, l, qh, ql)
    rows: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(zip(h[:len(keys)].tolist(), l[:len(keys)].tolist())):  # the filler sorts last
        rows.setdefault(p, []).append(i)
    for (x, y), q in zip(zip(a.tolist(), b.tolist()), queries):
        assert (list(range(x, y)) == rows[q]) if q in rows else x == y


def test_id_keys_are_the_16_byte_digests_also_with_trailing_nuls():
    image_id = next(f"img{i}.jpg" for i in range(100_000) if id_key(f"img{i}.jpg").endswith(b"\0"))
    ids = ["a", image_id, ""]
    hi, lo = id_keys(ids)
    assert keys_to_bytes(hi, lo) == [id_key(i) for i in ids]


ROW = st.tuples(st.sampled_from("abcdefg"), st.sampled_from(["", "v1/1", "v2/1"]), st.sampled_from(["ok", "error"]),
                st.sampled_from(["out/p1.parquet", "out/p2.parquet", "out/p3.parquet"]),
                st.sampled_from([None, "read_failed: x", "timeout: y"]), st.sampled_from([None, "s1", "s2"]))


def _reference_lookup(rows, image_id, version):
    mine = [(n, r) for n, r in enumerate(rows) if r[0] == image_id]
    if not mine:
        return ("new",)
    fresh = [(n, r) for n, r in mine if version_key(r[1]) in (version_key(version), 0)]
    if not fresh:
        return ("changed",)
    _, last = max(fresh, key=lambda x: (x[1][3], x[0]))  # the last current row, by file then position
    reason = None if last[2] == "ok" else (last[4] or "error").split(":")[0]
    return ("fresh", last[2] == "ok", sorted({r[3] for n, r in mine if (n, r) not in fresh}), reason,
            sorted({r[3] for _, r in mine}))


@FAST
@given(st.lists(ROW, max_size=30), st.sampled_from(["v1/1", "v2/1", "v3/1"]))
def test_committed_index_agrees_with_a_dict(rows, version):
    """The index in memory (its rows under the bound) against plain Python: the same checks as the
    disk path's below (:func:`_check_against_rows`)."""
    c = Committed.from_rows(rows)
    assert not c.on_disk
    _check_against_rows(c, rows, version)
    assert unit_key(None) == 0


M64 = (1 << 64) - 1


def _reference_text_hash(text: str | None) -> int:
    """index.hash_texts written out a text at a time in plain Python integers, from its docstring:
    MurmurHash3 x64's block mixing over the UTF-8 bytes as little-endian 8-byte words (the last
    zero-padded), seeded and finalised with the length, then its finaliser; 0 for an empty text,
    odd otherwise."""
    def rotl(x, r):
        return ((x << r) | (x >> (64 - r))) & M64

    def fmix(h):
        h ^= h >> 33
        h = (h * 0xFF51AFD7ED558CCD) & M64
        h ^= h >> 33
        h = (h * 0xC4CEB9FE1A85EC53) & M64
        return h ^ (h >> 33)

    data = (text or "").encode()
    if not data:
        return 0
    h = (len(data) * 0x4CF5AD432745937F) & M64
    for at in range(0, len(data), 8):
        k = int.from_bytes(data[at:at + 8], "little")  # a short last word: zero-padded
        k = (rotl((k * 0x87C37B91114253D5) & M64, 31) * 0x4CF5AD432745937F) & M64
        h = (rotl(h ^ k, 27) * 5 + 0x52DCE729) & M64
    return fmix(h ^ len(data)) | 1


TEXTS = st.lists(st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["", "a", "a\0", "x" * 8, "x" * 9,
                                                                            "\0" * 8, "é" * 5])), max_size=40)


@FAST
@given(TEXTS, st.integers(0, 5), st.integers(0, 5))
def test_version_keys_of_arrow_buffers_and_of_lists_agree_with_plain_python(texts, cut_front, cut_back):
    """The version (and container) keys, hashed for a whole column at once from its Arrow buffers
    (a slice of a larger array, chunked, string or large_string, nulls as ""), and from a list,
    against the same hash computed a text at a time in plain Python integers."""
    import pyarrow as pa

    from fastsam_batch.index import version_keys, version_keys_arrow

    want = [_reference_text_hash(t) for t in texts]
    assert version_keys(texts).tolist() == want
    assert [version_key(t) for t in texts] == want and [unit_key(t) for t in texts] == want
    padded = pa.array(["front"] * cut_front + texts + ["back"] * cut_back, pa.string())
    part = padded.slice(cut_front, len(texts))  # offsets into a larger buffer
    assert version_keys_arrow(part).tolist() == want
    assert version_keys_arrow(part.cast(pa.large_string())).tolist() == want
    half = len(texts) // 2
    assert version_keys_arrow(pa.chunked_array([part.slice(0, half), part.slice(half)], pa.string())).tolist() == want


def test_version_keys_tell_a_million_versions_apart():
    """Distinct texts of the kinds a version is made of (ETag/size, mtime) get distinct keys, odd."""
    import pyarrow as pa

    from fastsam_batch.index import version_keys_arrow

    texts = [f"{i:032x}/{i % 977}" for i in range(500_000)] + [f"mtime:{1.7e9 + i / 8}/0" for i in range(500_000)]
    keys = version_keys_arrow(pa.array(texts))
    assert len(np.unique(keys)) == len(texts) and bool(np.all(keys & np.uint64(1)))


PARTS = ["out/p1.parquet", "out/p2.parquet", "out/p3.parquet"]


@FAST
@given(st.lists(ROW, max_size=30), st.lists(ROW, max_size=10), st.sets(st.sampled_from(PARTS)),
       st.sets(st.sampled_from(PARTS)))
def test_an_index_kept_current_equals_one_built_again(rows, new_rows, removed, renamed):
    """Committed.replaced (files gone, rewritten or added) gives the index a fresh read would; an
    added file may carry a name the index already holds (a file rewritten under its own name, read
    again: its old rows go), or a new one (``renamed``)."""
    start = Committed.from_files([FileRows.from_rows(p, [(r[0], r[1], r[2], r[4], r[5]) for r in rows if r[3] == p],
                                                     {"fp": sum(r[3] == p for r in rows)})
                                  for p in sorted({r[3] for r in rows})])

    def name(p: str) -> str:
        return "out/q" + p[-9:] if p in renamed else p

    added = [FileRows.from_rows(name(p), [(r[0], r[1], r[2], r[4], r[5]) for r in new_rows if r[3] == p],
                                {"fp2": sum(r[3] == p for r in new_rows)})
             for p in sorted({r[3] for r in new_rows})]
    added_names = {f.part for f in added}
    updated = start.replaced(removed, added)
    after = [r for r in rows if r[3] not in removed and r[3] not in added_names] + \
        [(r[0], r[1], r[2], name(r[3]), r[4], r[5]) for r in new_rows]
    again = Committed.from_rows(after)
    assert (updated.rows, updated.images, updated.parts) == (again.rows, again.images, again.parts)
    assert (updated.rows, updated.images) == (len(after), len({r[0] for r in after}))  # plain Python
    assert updated.errors_by_reason() == again.errors_by_reason()
    ids = list("abcdefgh")
    assert updated.lookup(ids, ["v1/1"] * 8) == again.lookup(ids, ["v1/1"] * 8)
    for i in ids:
        want = _reference_lookup(after, i, "v1/1")
        found = updated.lookup([i], ["v1/1"])[0]
        assert (found.state,) + ((found.ok, found.superseded, found.reason, found.parts)
                                 if found.state == "fresh" else ()) == want
    assert duplicate_rows(updated) == duplicate_rows(again)
    want_fp = {}
    for r in after:
        fp = "fp2" if any(r[3] == f.part for f in added) else "fp"
        want_fp[fp] = want_fp.get(fp, 0) + 1
    assert updated.fingerprints == want_fp


KEY_ROW = st.tuples(st.integers(0, 5), st.sampled_from(["", "v1/1", "v2/1"]), st.sampled_from(["ok", "error"]),
                    st.sampled_from(PARTS), st.sampled_from([None, "read_failed: x", "timeout: y"]))


@FAST
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)), min_size=6, max_size=6, unique=True),
       st.lists(KEY_ROW, max_size=30), st.sampled_from(["v1/1", "v2/1"]))
def test_committed_index_with_keys_sharing_their_high_half_agrees_with_a_dict(keys, rows, version):
    """Keys injected directly (hi from 3 values, lo from 4: most keys share their hi with another),
    so that every range holding two distinct keys is taken: lookups, images, duplicates and
    rows in other files against a plain dict of the rows."""
    from unittest import mock

    import fastsam_batch.index as index

    ids = [f"k{j}" for j in range(6)] + ["absent"]
    table = dict(zip(ids, keys + [(keys[0][0], 99)]))  # "absent" shares its hi with k0

    def injected(image_ids):
        pairs = [table[i] for i in image_ids]
        return np.array([h for h, _ in pairs], np.uint64), np.array([lo for _, lo in pairs], np.uint64)

    named = [(f"k{r[0]}", r[1], r[2], r[3], r[4], None) for r in rows]
    files = []
    for p in sorted({r[3] for r in named}):
        mine = [r for r in named if r[3] == p]
        f = FileRows.from_rows(p, [(r[0], r[1], r[2], r[4]) for r in mine])
        f.hi, f.lo = injected([r[0] for r in mine])
        files.append(f)
    c = Committed.from_files(files)
    assert (c.rows, c.images) == (len(named), len({r[0] for r in named}))
    with mock.patch.object(index, "id_keys", injected):
        for i, found in zip(ids, c.lookup(ids, [version] * len(ids))):
            got = (found.state,) + ((found.ok, found.superseded, found.reason, found.parts)
                                    if found.state == "fresh" else ())
            assert got == _reference_lookup(named, i, version), (i, keys, rows)
        retried = {"k0", "k1", "absent"}
        assert rows_outside(c, retried, {"p2.parquet"}) == _reference_rows_outside(named, retried)
    as_bytes = {i: key_bytes(table[i]) for i in ids}
    query = {as_bytes[i] for i in ("k0", "k3", "absent")}
    want_other: dict[str, set] = {}
    for r in named:
        if as_bytes[r[0]] in query and r[3] != "out/p1.parquet":
            want_other.setdefault(r[3], set()).add(as_bytes[r[0]])
    assert rows_in_other_files(c, query, {"p1.parquet"}) == want_other
    # duplicates: each (key, version) with rows in several files keeps them in one file only
    twice = duplicate_rows(c)
    kept: dict[tuple, set] = {}
    for r in named:
        k = (as_bytes[r[0]], version_key(r[1]))
        if not (r[3] in twice.drop and k in twice.drop[r[3]]):
            kept.setdefault(k, set()).add(r[3])
    assert set(kept) == {(as_bytes[r[0]], version_key(r[1])) for r in named}
    assert all(len(files) == 1 for files in kept.values())
    for k, files in kept.items():
        n = sum((as_bytes[r[0]], version_key(r[1])) == k and r[3] in files for r in named)
        assert (k in twice.keep_one.get(next(iter(files)), set())) == (n > 1)


def test_unit_rows_sorts_the_containers_once():
    c = Committed.from_rows([(f"m{i}", "v/1", "ok", "out/p1.parquet", None, f"s{i % 3}") for i in range(30)])
    c.unit_rows("s0", "v/1")
    cached = c._by_unit
    for s in ("s0", "s1", "s2", "s9"):
        fresh, old = c.unit_rows(s, "v/1")
        assert len(fresh) == (10 if s != "s9" else 0) and not len(old)
    assert c._by_unit is cached


def test_spilled_runs_are_written_with_buffered_writes_and_mapped_read_only(tmp_path, monkeypatch):
    """No run is a writable memory map (a full disk would be a SIGBUS on a mapped page, not an
    OSError); the scratch folder comes from FASTSAM_BATCH_SCRATCH."""
    import fastsam_batch.index as index

    real = np.lib.format.open_memmap

    def read_only(filename, mode="r+", *a, **k):
        assert mode == "r", f"a run written through a writable memory map (mode {mode!r})"
        return real(filename, mode, *a, **k)

    monkeypatch.setattr(np.lib.format, "open_memmap", read_only)
    monkeypatch.setenv("FASTSAM_BATCH_SCRATCH", str(tmp_path / "scratch"))
    seen, ref = SeenIds(memory_keys=50), set()
    seen.keys.block = 7
    rng = np.random.default_rng(5)
    for _ in range(20):
        batch = [f"k{x}" for x in rng.integers(0, 2000, 60).tolist()]
        want = []
        for i in batch:
            want.append(i not in ref)
            ref.add(i)
        assert seen.add_batch(batch).tolist() == want
    assert len(seen.keys.disk) >= 1
    for run in seen.keys.disk:
        assert isinstance(run.hi, np.memmap) and not run.hi.flags.writeable and not run.lo.flags.writeable
    folder = seen.keys._dir
    assert os.path.dirname(folder) == str(tmp_path / "scratch")
    assert os.path.basename(folder).startswith(f"{index.SCRATCH_PREFIX}{os.getpid()}-")
    seen.close()
    assert not os.path.exists(folder)


def test_scratch_folders_of_killed_processes_a_day_old_are_removed_when_a_run_spills(tmp_path):
    import fastsam_batch.index as index

    gone_pid = 99_999_999  # above any pid_max: no such process
    old = 2 * 86400
    made = {}
    for name, age in ((f"fastsam-keys-{gone_pid}-abc", old), (f"fastsam-keys-{os.getpid()}-def", old),
                      (f"fastsam-keys-{gone_pid}-new", 0), ("fastsam-keys-legacy1", old), ("other-folder", old)):
        path = tmp_path / name
        path.mkdir()
        (path / "run-000001.hi.npy").write_bytes(b"x")
        t = time.time() - age
        for p in (path / "run-000001.hi.npy", path):
            os.utime(p, (t, t))
        made[name] = path
    runs = KeyRuns(memory_keys=2, spill_dir=str(tmp_path))
    runs.add(*id_keys(["a", "b", "c", "d"]))
    assert runs.disk
    left = {p.name for p in tmp_path.iterdir()} - {os.path.basename(runs._dir)}
    assert left == {f"fastsam-keys-{os.getpid()}-def", f"fastsam-keys-{gone_pid}-new", "other-folder"}
    runs.close()
    assert index.remove_stale_scratch(str(tmp_path)) == []  # nothing more to remove


# ---------------------------------------------------------------------------------------------
# The committed index past its memory bound: rows in a scratch file, built by an external sort


def _on_disk(fan_in: int = 2):
    """The merge's fan-in made small, so that runs are merged in passes too."""
    from unittest import mock

    import fastsam_batch.index as index

    return mock.patch.object(index, "MERGE_FAN_IN", fan_in)


def _check_against_rows(c: Committed, rows, version: str) -> None:
    """Every query of ``c`` against plain Python over ``rows`` ((id, version, status, part, error,
    shard) tuples): counts, lookups, errors, duplicates, rows outside, superseded, units."""
    assert c.rows == len(rows)
    assert c.images == len({r[0] for r in rows})
    assert c.ok_rows == sum(r[2] == "ok" for r in rows)
    assert c.parts == sorted({r[3] for r in rows})
    ids = list("abcdefgh")
    for i, found in zip(ids, c.lookup(ids, [version] * len(ids))):
        got = (found.state,) if found.state != "fresh" else (found.state, found.ok, found.superseded, found.reason,
                                                             found.parts)
        assert got == _reference_lookup(rows, i, version), (i, rows)
    errors: dict[str, int] = {}
    for r in rows:
        if r[2] != "ok":
            reason = (r[4] or "error").split(":")[0]
            errors[reason] = errors.get(reason, 0) + 1
    assert c.errors_by_reason() == errors
    twice = duplicate_rows(c, prefer={"p3.parquet"})
    kept: dict[tuple, list] = {}
    for r in rows:
        k = (id_key(r[0]), version_key(r[1]))
        if not (r[3] in twice.drop and k in twice.drop[r[3]]):
            kept.setdefault(k, []).append(r)
    assert set(kept) == {(id_key(r[0]), version_key(r[1])) for r in rows}
    for k, rs in kept.items():
        assert len({r[3] for r in rs}) == 1, rs
        assert (k in twice.keep_one.get(rs[0][3], set())) == (len(rs) > 1)
        group = [r for r in rows if (id_key(r[0]), version_key(r[1])) == k]
        if len({r[3] for r in group}) > 1:
            if "out/p3.parquet" in {r[3] for r in group}:
                assert rs[0][3] == "out/p3.parquet"
            elif any(r[2] == "ok" for r in group):
                assert any(r[2] == "ok" for r in rs)
    retried = {"a", "b", "c"}
    assert rows_outside(c, retried, {"p2.parquet"}) == _reference_rows_outside(rows, retried)
    keys = {id_key(i) for i in "abz"}
    want_other: dict[str, set] = {}
    for r in rows:
        if id_key(r[0]) in keys and r[3] != "out/p1.parquet":
            want_other.setdefault(r[3], set()).add(id_key(r[0]))
    assert rows_in_other_files(c, keys, {"p1.parquet"}) == want_other
    current = {i: version for i in "abcdh"}
    want_sup: dict[str, dict] = {}
    for i, v in current.items():
        look = _reference_lookup(rows, i, v)
        for p in (look[2] if look[0] == "fresh" else []):
            want_sup.setdefault(p, {})[i] = v
    assert superseded_parts(c, current) == want_sup
    shards = {"s1": version, "s2": "v1/1"}
    want_stale: dict[str, set] = {}
    for r in rows:
        if r[5] in shards and version_key(r[1]) != version_key(shards[r[5]]):
            want_stale.setdefault(r[3], set()).add(id_key(r[0]))
    assert stale_unit_rows(c, shards) == want_stale
    for shard in ("s1", "s2", "s9"):
        fresh, old = c.unit_rows(shard, version)
        for got, same in ((fresh, True), (old, False)):
            want = sorted((id_key(r[0]), version_key(r[1]), r[3]) for r in rows if r[5] == shard
                          and (version_key(r[1]) == version_key(version)) == same)
            assert sorted(zip(c.key_list(got), c.versions[got].tolist(), [c.parts[p] for p in c.part_of[got]])) \
                == want
            assert got.tolist() == sorted(got.tolist())  # by container, stably: in row order


def _check_order(c: Committed, rows) -> None:
    """The records are the rows (as read: ``rows`` in the order the index was given them) sorted by
    key, stably: (key, version, status, file) of each, in order."""
    want = sorted(rows, key=lambda r: id_key(r[0]))  # stable: a key's rows in the order given
    assert [key_bytes((h, lo)) for h, lo in zip(c.hi.tolist(), c.lo.tolist())] == [id_key(r[0]) for r in want]
    assert c.versions.tolist() == [version_key(r[1]) for r in want]
    assert c.ok.tolist() == [r[2] == "ok" for r in want]
    assert [c.parts[p] for p in c.part_of.tolist()] == [r[3] for r in want]


@FAST
@given(st.lists(ROW, max_size=40), st.lists(st.tuples(st.lists(ROW, max_size=12), st.sets(st.sampled_from(PARTS)),
                                                      st.sets(st.sampled_from(PARTS))), max_size=3),
       st.integers(1, 7), st.sampled_from(["v1/1", "v2/1"]),
       st.one_of(st.none(), st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)), min_size=9, max_size=9,
                                     unique=True)),
       st.integers(1, 5))
def test_an_index_on_disk_agrees_with_plain_python_through_replaced_chains(rows, steps, bound, version, keys,
                                                                           scan_block):
    """Past its bound (1-7 rows here) the index is a scratch file made by an external sort (runs
    of ``bound`` rows, merged two at a time in passes, in blocks of a row or a few): every query
    agrees with plain Python over the rows, and the records are in the order a stable sort of the
    rows (by file, then key) gives, after each of a chain of ``replaced`` (files gone, rewritten
    under their own name, added under a new one). ``keys``: the ids' keys injected (hi from 3
    values, lo from 4: most keys share their hi with another), else hashed; the scans over every
    row read ``scan_block`` rows at a time, so that groups of rows cross block boundaries."""
    import sys
    from contextlib import ExitStack
    from unittest import mock

    import fastsam_batch.index as index

    with ExitStack() as stack:
        stack.enter_context(_on_disk())
        stack.enter_context(mock.patch.object(index, "SCAN_BLOCK", scan_block))
        if keys is not None:
            table = dict(zip("abcdefghz", keys))

            def injected(image_ids):
                pairs = [table[i] for i in image_ids]
                return np.array([h for h, _ in pairs], np.uint64), np.array([lo for _, lo in pairs], np.uint64)

            stack.enter_context(mock.patch.object(index, "id_keys", injected))
            stack.enter_context(mock.patch.object(sys.modules[__name__], "id_key",
                                                  lambda i: key_bytes(table[i])))
        files = [FileRows.from_rows(p, [(r[0], r[1], r[2], r[4], r[5]) for r in rows if r[3] == p],
                                    {"fp": sum(r[3] == p for r in rows)}) for p in sorted({r[3] for r in rows})]
        c = Committed.from_files(iter(files), memory_rows=bound)
        assert c.on_disk == (len(rows) > bound)
        now = sorted(rows, key=lambda r: r[3])  # as read: by file, in each file in order
        _check_against_rows(c, now, version)
        _check_order(c, now)
        for new_rows, removed, renamed in steps:
            def name(p: str) -> str:
                return "out/q" + p[-9:] if p in renamed else p

            added = [FileRows.from_rows(name(p), [(r[0], r[1], r[2], r[4], r[5]) for r in new_rows if r[3] == p],
                                        {"fp2": sum(r[3] == p for r in new_rows)})
                     for p in sorted({r[3] for r in new_rows})]
            names = {f.part for f in added}
            c = c.replaced(removed, (f for f in added))
            now = [r for r in now if r[3] not in removed and r[3] not in names] + \
                [(r[0], r[1], r[2], name(r[3]), r[4], r[5]) for r in sorted(new_rows, key=lambda r: r[3])]
            assert c.on_disk == (len(now) > bound)
            _check_against_rows(c, now, version)
            _check_order(c, now)  # the kept rows first, then the added files' (in the order given)
            want_fp: dict[str, int] = {}
            for f in [f for f in files if f.part not in removed and f.part not in names] + added:
                for fp, n in f.fingerprints.items():
                    want_fp[fp] = want_fp.get(fp, 0) + n
            files = [f for f in files if f.part not in removed and f.part not in names] + added
            assert c.fingerprints == {k: v for k, v in want_fp.items()}


def _random_files(n_files: int, rows_per_file: int, seed: int, ids: int):
    """Files of random rows, made as they are read (keys injected: no hashing), and the same rows as
    (key, version, ok, part) tuples."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**63, (ids, 2), dtype=np.int64).astype(np.uint64)
    keys[1::7, 0] = keys[0::7, 0][:len(keys[1::7])]  # some distinct keys share their hi
    plain = []
    files = []
    for j in range(n_files):
        pick = rng.integers(0, ids, rows_per_file)
        part = f"out/p{j:04d}.parquet"
        f = FileRows.from_rows(part, [("x", "v", "ok")] * rows_per_file, {"fp": rows_per_file})
        f.hi, f.lo = keys[pick, 0].copy(), keys[pick, 1].copy()
        f.versions = rng.integers(1, 3, rows_per_file).astype(np.uint64)
        f.ok = rng.random(rows_per_file) < 0.8
        f.reason_of = np.where(f.ok, -1, 0).astype(np.int16)
        f.reasons = ["read_failed"]
        f.units = rng.integers(0, 5, rows_per_file).astype(np.uint64)
        files.append(f)
        plain += [((int(keys[p, 0]), int(keys[p, 1])), int(v), bool(o), part, int(u))
                  for p, v, o, u in zip(pick.tolist(), f.versions.tolist(), f.ok.tolist(), f.units.tolist())]
    return files, plain, keys


def test_a_large_index_on_disk_is_exact_and_its_scratch_files_go(tmp_path, monkeypatch):
    """12,000 rows, 1,000 held in memory, runs merged four at a time: the rows are those of the
    files, in key order with the rows of one key in file order (the order lookups and duplicates
    rely on), as a plain sort gives; each image's rows by file; units; the scratch folder holds the
    rows file (and the rows by container) only, and goes on close() or with the object."""
    import gc

    import fastsam_batch.index as index

    monkeypatch.setenv("FASTSAM_BATCH_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setattr(index, "MERGE_FAN_IN", 4)
    files, plain, keys = _random_files(24, 500, 7, 5_000)
    c = Committed.from_files(iter(files), memory_rows=1_000)
    assert c.on_disk and isinstance(c.records, np.memmap) and not c.records.flags.writeable
    folder = c._scratch.dir
    assert os.path.dirname(folder) == str(tmp_path / "scratch")
    assert len(os.listdir(folder)) == 1  # the runs merged and removed: the rows file stays
    # ground truth: a plain sort of (key, file, position) tuples
    want = sorted(range(len(plain)), key=lambda n: (plain[n][0], plain[n][3], n))
    got = list(zip(c.hi.tolist(), c.lo.tolist()))
    assert got == [plain[n][0] for n in want]
    assert [c.parts[p] for p in c.part_of.tolist()] == [plain[n][3] for n in want]
    assert c.versions.tolist() == [plain[n][1] for n in want] and c.ok.tolist() == [plain[n][2] for n in want]
    assert c.units.tolist() == [plain[n][4] for n in want]
    assert c.images == len({r[0] for r in plain}) and c.ok_rows == sum(r[2] for r in plain)
    assert c.errors_by_reason() == {"read_failed": sum(not r[2] for r in plain)}
    with monkeypatch.context() as m:  # the containers and versions named by the keys the files carry
        m.setattr(index, "unit_key", lambda s: int(s))
        m.setattr(index, "version_key", lambda v: int(v))
        for u in range(6):
            fresh, old = c.unit_rows(str(u), "1")
            assert fresh.tolist() == [i for i, n in enumerate(want) if plain[n][4] == u and plain[n][1] == 1]
            assert old.tolist() == [i for i, n in enumerate(want) if plain[n][4] == u and plain[n][1] != 1]
    assert len(os.listdir(folder)) == 2  # and the rows by container
    # duplicates: each (key, version) in several files keeps its rows in one file
    twice = duplicate_rows(c)
    groups: dict[tuple, set] = {}
    for k, v, _, part, _ in plain:
        groups.setdefault((key_bytes(k), v), set()).add(part)
    assert {k for fs in twice.drop.values() for k in fs} == {k for k, ps in groups.items() if len(ps) > 1}
    # replaced: half the files gone, one rewritten under its own name: a new folder, the old one kept
    # until closed
    gone = {f.part for f in files[::2]}
    again = FileRows.from_rows(files[1].part, [("zz", "v", "ok")], {"fp": 1})
    d = c.replaced(gone, [again])
    left = [r for r in plain if r[3] not in gone and r[3] != files[1].part]
    zz = tuple(int(x[0]) for x in id_keys(["zz"]))  # (hi, lo), as the keys of plain are
    assert zz not in {r[0] for r in plain}
    assert d.rows == len(left) + 1 and d.images == len({r[0] for r in left} | {zz}) == len({r[0] for r in left}) + 1
    assert d.on_disk and d._scratch.dir != folder
    c.close()
    assert not os.path.exists(folder)
    folder = d._scratch.dir
    del d
    gc.collect()
    assert not os.path.exists(folder)
    assert not os.listdir(tmp_path / "scratch")


def test_the_memory_held_while_building_and_querying_does_not_grow_with_the_rows(monkeypatch, tmp_path):
    """numpy's allocations (traced by tracemalloc) at their peak while the index is built from files
    read one at a time, replaced, scanned (images, errors, duplicates) and looked up: about the
    same for 20,000 and 80,000 rows (8,000 held in memory), and far below the rows' 40 bytes each."""
    import tracemalloc

    import fastsam_batch.index as index
    import fastsam_batch.schema  # noqa: F401 - imported before: its import is not the index's memory

    monkeypatch.setenv("FASTSAM_BATCH_SCRATCH", str(tmp_path))
    monkeypatch.setattr(index, "SCAN_BLOCK", 8_000)
    peaks = {}
    for n_files in (12, 20, 80):  # the first: a warm-up (numpy's first calls allocate caches)
        files, _, keys = _random_files(1, 1_000, 1, 10 ** 6)
        template = files[0]

        def made():
            rng = np.random.default_rng(n_files)
            for j in range(n_files):
                f = FileRows(f"out/p{j:05d}.parquet", rng.integers(0, 2**63, 1000).astype(np.uint64),
                             rng.integers(0, 2**63, 1000).astype(np.uint64), template.versions, template.ok,
                             template.reason_of, template.reasons, template.units, {"fp": 1000})
                if j % 10 == 0:  # some images in two files
                    f.hi[:50], f.lo[:50] = keys[:50, 0], keys[:50, 1]
                yield f

        tracemalloc.start()
        c = Committed.from_files(made(), memory_rows=8_000 if n_files > 12 else 2_000)
        c = c.replaced(["out/p00003.parquet"], [])
        assert c.images < c.rows and c.errors_by_reason() and duplicate_rows(c)
        c.unit_rows("s", "v")
        c.lookup([f"i{j}" for j in range(1000)], ["v"] * 1000)
        peaks[n_files] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert c.on_disk and c.rows == n_files * 1000 - 1000
        c.close()
    assert peaks[80] < 1.3 * peaks[20], peaks
    assert peaks[80] < 4 * 8_000 * 40, peaks  # about three times the records held (a run sorted), not the rows'
    assert peaks[80] < 80_000 * 40 / 2, peaks  # (an index in memory: more than all the rows' records)


def test_replaced_closes_the_generator_of_added_files_when_it_raises():
    """An error while the added files are consumed (here: a file whose arrays do not match) closes
    the generator at once (resume.iter_files then cancels its queued reads), not at garbage collection."""
    from fastsam_batch.index import Committed, FileRows

    closed: list[bool] = []

    def files():
        try:
            yield FileRows.from_rows("p0", [("a", "v", "ok")])
            bad = FileRows.from_rows("p1", [("b", "v", "ok"), ("c", "v", "ok")])
            bad.ok = np.ones(3, bool)  # a broken file: the row counts do not match
            yield bad
            yield FileRows.from_rows("p2", [("d", "v", "ok")])
        finally:
            closed.append(True)

    gen = files()
    with pytest.raises(ValueError):
        Committed().replaced((), gen)
    assert closed == [True]


def test_the_index_rows_setting_is_checked():
    from fastsam_batch.index import MIN_MEMORY_ROWS, memory_rows_setting

    assert memory_rows_setting(None) == memory_rows_setting("") == 1 << 21
    assert memory_rows_setting(" 250_000 ") == 250_000
    assert memory_rows_setting(str(MIN_MEMORY_ROWS)) == MIN_MEMORY_ROWS
    for bad in ("lots", "1e6", "0", "1", str(MIN_MEMORY_ROWS - 1)):
        with pytest.raises(ValueError, match="FASTSAM_BATCH_INDEX_ROWS"):
            memory_rows_setting(bad)
    tiny = Committed.from_rows([("a", "v", "ok", "p"), ("b", "v", "ok", "p")], memory_rows=1)  # tests' bounds
    assert tiny.on_disk and tiny.rows == 2


def test_spilled_runs_are_removed_only_by_the_process_that_made_them(tmp_path, monkeypatch):
    """KeyRuns' finalizer, like Committed's scratch, removes its folder only in the process that made it
    (a forked child exiting must not remove its parent's runs)."""
    from fastsam_batch import index

    runs = KeyRuns(memory_keys=4, spill_dir=str(tmp_path))
    runs.add(*id_keys([f"k{i}" for i in range(20)]))
    assert runs.disk and os.path.isdir(runs._dir)
    real = os.getpid()
    monkeypatch.setattr(index.os, "getpid", lambda: real + 1)  # as a forked child sees it
    runs.close()
    assert os.path.isdir(runs._dir)
    monkeypatch.undo()
    runs._scratch._cleanup = index.weakref.finalize(runs._scratch, index._remove_own, runs._dir, real)
    runs.close()
    assert not os.path.exists(runs._dir)
