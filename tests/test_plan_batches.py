"""Planning on Arrow batches, and over a process pool (issue 23: a billion images), against ground
truth: a Parquet list read column-wise gives the units the row-at-a-time reader gives for the same
rows as JSONL; a plan decides for each listed image what plain Python over the committed rows
says (new, done, changed, retried, superseded), in the listing's order, with and without the
process pool and with the committed index in memory and on disk; committed files read by the pool
give the index the threads give, and a bad file the same error. No Ray, local files only."""

from __future__ import annotations

import glob
import itertools
import json
import os
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fastsam_batch import parallel
from fastsam_batch.index import Committed, version_key
from fastsam_batch.inputs import InputError, Skipped, open_input
from fastsam_batch.inputs.lists import iter_list_batches
from fastsam_batch.job import ALL_ERRORS, PromptAttacher, plan_job
from fastsam_batch.manifest import InputConfig, parse_manifest
from fastsam_batch.plan import PlanParts, read_plan_part
from fastsam_batch.resume import (CommittedFileError, iter_files, iter_files_spread, list_parts_stamped,
                                  source_version)
from fastsam_batch.storage import Storage
from fastsam_batch.summary import RunSummary

# URIs and ids the fast path must treat as the row path does: empty and whitespace-only (Python's
# str.strip has more whitespace than ASCII: \x1c, \u3000, \xa0), relative, schemes, newlines.
URIS = ["a.jpg", "/abs/b.png", "s3://bk/c.jpg", "", " ", "\x1c", "\u3000", "\xa0", None, " x.jpg", "../up.jpg",
        "./d/./e.jpg", "file:///f.jpg", "x://y://z", "dir/a.jpg", "nl\n://q", "é.jpg"]
IDS = [None, "", "id1", " ", "é", "0", "a.jpg"]


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        uri = rng.choice(URIS)
        if uri is not None and rng.random() < 0.7:
            uri += str(rng.randint(0, n // 2))  # repeats across batches too
        image_id = rng.choice(IDS)
        if image_id is not None and rng.random() < 0.5:
            image_id += str(rng.randint(0, n // 2))
        out.append({"uri": uri, "image_id": image_id, "cap": rng.choice(["x", None, "y \"q\""]),
                    "n": rng.randint(0, 3)})
    return out


def _units(uri: str, batch_rows: int, carry=None, pool=None):
    cfg = InputConfig(uri=uri, format="list", carry=carry)
    form = open_input(cfg, Storage())
    skipped = Skipped(limit=None)
    units = [u for b in iter_list_batches(cfg, Storage(), form, skipped, pool, batch_rows=batch_rows)
             for u in b.table.to_pylist()]
    return units, skipped.count, skipped.examples, form.duplicates, form.duplicate_examples, form.carried


@pytest.mark.parametrize("columns", ["text", "dictionary-and-large", "integer-ids", "float-ids"])
@pytest.mark.parametrize("carry", [None, ["n"]])
def test_a_parquet_list_read_column_wise_gives_the_units_of_the_row_reader(tmp_path, columns, carry):
    """The same rows as Parquet (Arrow columns; Python only for the rows that need it) and as JSONL
    (read a row at a time, as every list was before): the same units in the same order, the same
    rows skipped (with their row numbers), the same repeats. Batches of 97 rows: repeats across
    batches and row numbers past the first batch are checked; the Parquet file has row groups of
    250 (batches do not line up with them)."""
    rows = _rows(1200, seed=len(columns) + len(carry or []))
    if columns == "integer-ids":
        for j, r in enumerate(rows):
            r["image_id"] = None if j % 7 == 0 else (j % 400) - 3
    if columns == "float-ids":  # not taken by the fast path: the batch goes row by row
        for j, r in enumerate(rows):
            r["image_id"] = None if j % 7 == 0 else float(j % 400) / 4
    table = pa.Table.from_pylist(rows)
    if columns == "dictionary-and-large":
        table = table.set_column(0, "uri", table.column("uri").dictionary_encode())
        table = table.set_column(1, "image_id", table.column("image_id").cast(pa.large_string()))
    pq.write_table(table, tmp_path / "list.parquet", row_group_size=250)
    with open(tmp_path / "list.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    fast = _units(str(tmp_path / "list.parquet"), 97, carry)
    slow = _units(str(tmp_path / "list.jsonl"), 97, carry)
    assert fast[0] == slow[0] and len(fast[0]) > 100
    assert fast[1:] == (slow[1], [e.replace("list.jsonl", "list.parquet") for e in slow[2]], *slow[3:])
    assert fast[1] > 50 and fast[3] > 50  # empty URIs skipped, repeated ids counted: both happened


@pytest.mark.parametrize("after_rows", [0, 100])
def test_list_ids_hashed_by_the_pool_give_the_same_units(tmp_path, after_rows):
    """Hashing the listed ids in the pool's processes and checking them for repeats in the split
    check's (from the first batch, or after two batches checked on the driver, whose keys the split
    check is then given) changes nothing: same units, same repeats found, in order."""
    rows = _rows(900, seed=3)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "list.parquet")
    pool = parallel.PlanPool(2, after_rows=after_rows)
    try:
        pooled = _units(str(tmp_path / "list.parquet"), 64, None, pool)
        assert pool._pool is not None  # the processes did the hashing
    finally:
        pool.close()
    assert pooled == _units(str(tmp_path / "list.parquet"), 64)


def test_the_split_repeat_check_agrees_with_a_set():
    """SplitRepeatCheck (3 processes, a few keys in memory each: their runs spill) against a plain
    set, batch after batch, with a window of batches in flight: keys repeated within and across
    batches, distinct keys sharing their high 64 bits, and a seed of keys seen before."""
    rng = np.random.default_rng(9)
    batches = [(rng.integers(0, 2**12, 3000, dtype=np.uint64) << np.uint64(52),
                rng.integers(0, 3, 3000, dtype=np.uint64)) for _ in range(12)]
    seen = set(zip(batches[0][0].tolist(), batches[0][1].tolist()))
    seed = sorted(seen)
    check = parallel.SplitRepeatCheck(3, 600, seed=(np.array([h for h, _ in seed], np.uint64),
                                                    np.array([l for _, l in seed], np.uint64)))
    try:
        want, got = [], []
        for h, l in batches[1:]:
            mask = []
            for key in zip(h.tolist(), l.tolist()):
                mask.append(key not in seen)
                seen.add(key)
            want.append(mask)
            check.submit(h, l)
            if len(check.pending) > 2:
                got.append(check.result().tolist())
        while check.pending:
            got.append(check.result().tolist())
    finally:
        check.close()
    assert got == want
    assert 0 < sum(map(sum, want)) < sum(map(len, want))  # new keys and repeats both


def _images(root, n: int) -> None:
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        (root / ("sub" if i % 3 else "") / f"{i}.jpg").write_bytes(b"x" * (i % 7))


def _committed_rows(units: list[dict], seed: int) -> list[tuple]:
    """Committed rows for these units, of every kind the plan must tell apart: current ok and error
    rows, rows of an older version only, an older and a current row in two files, a row written
    before versions were recorded, two current rows (one per file), none."""
    rng = random.Random(seed)
    rows = []
    for u in units:
        v, i, r = source_version(u), u["image_id"], rng.random()
        part = rng.choice(["out/p1", "out/p2", "out/p3"])
        if r < 0.25:
            continue
        if r < 0.4:
            rows.append((i, "old/1", "ok", part))
        elif r < 0.5:
            rows.append((i, v, "error", part, rng.choice(["read_failed: x", "timeout: y", None])))
        elif r < 0.58:
            rows += [(i, "old/2", "ok", "out/p1"), (i, v, rng.choice(["ok", "error"]), "out/p2", "timeout: z")]
        elif r < 0.62:
            rows += [(i, "", "ok", "out/p3"), (i, v, "ok", "out/p2")]
        elif r < 0.66:
            rows += [(i, v, "ok", "out/p3"), (i, v, "error", "out/p1", "read_failed: q")]
        else:
            rows.append((i, v, "ok", part))
    return rows


def _expected(units: list[dict], rows: list[tuple], retry: frozenset[str] | None) -> dict:
    """What the plan must be, by plain Python over the rows: for each image its rows, the current
    ones (version as now, or none recorded), the last current one (by file, then row) speaking."""
    mine: dict[str, list[tuple[int, tuple]]] = {}
    for n, r in enumerate(rows):
        mine.setdefault(r[0], []).append((n, r))
    todo, changed, retried, superseded = [], {}, set(), {}
    done = ok = 0
    for u in units:
        v = source_version(u)
        have = mine.get(u["image_id"], [])
        current = [(n, r) for n, r in have if version_key(r[1]) in (version_key(v), 0)]
        if not have:
            todo.append(u["image_id"])
            continue
        if not current:
            changed[u["image_id"]] = v
            todo.append(u["image_id"])
            continue
        _, last = max(current, key=lambda x: (x[1][3], x[0]))
        reason = None if last[2] == "ok" else ((last[4] if len(last) > 4 else None) or "error").split(":")[0]
        if retry is not None and last[2] != "ok" and (ALL_ERRORS in retry or reason in retry):
            retried.add(u["image_id"])
            todo.append(u["image_id"])
            continue
        done += 1
        ok += last[2] == "ok"
        for part in sorted({r[3] for n, r in have if (n, r) not in current}):
            superseded.setdefault(part, {})[u["image_id"]] = v
    return {"todo": todo, "changed": changed, "retried": retried, "superseded": superseded, "done": done, "ok": ok}


# The plan's sizes scaled down (batches of 4,096 units, chunks of 1,000 listed, parts of 700 in a
# run; here 256, 250, 175), so that 1,000 files cross several batches, chunks and parts.
BATCH, CHUNK, PART, N_FILES = 256, 250, 175, 1000


@pytest.mark.parametrize("where, retry", [(w, r) for w in ("memory", "disk")
                                          for r in (None, frozenset({"timeout"}), frozenset({ALL_ERRORS}))]
                         + [("disk-pool", frozenset({"timeout"})), ("memory-pool", None)])
def test_a_plan_decides_each_image_as_plain_python_over_the_committed_rows(tmp_path, monkeypatch, where, retry):
    """Files on disk (sizes and mtimes: a version per image), planned in batches of BATCH against
    an index of every kind of row; the plan's items (read back from its parts of PART), in listing
    order, are the images plain Python says are to do, and the changed, retried and superseded
    images and the counts are its too. ``disk``: the index past its memory bound (a mapped file);
    ``-pool``: two processes hash the ids (and, ``disk-pool``, look them up in the mapped index)
    for every batch."""
    import fastsam_batch.inputs as inputs
    import fastsam_batch.job as job

    monkeypatch.setattr(inputs, "UNIT_BATCH", BATCH)
    monkeypatch.setattr(job, "LIST_CHUNK", CHUNK)
    if where.endswith("pool"):
        monkeypatch.setenv(parallel.PROCESSES_ENV, "2")
        monkeypatch.setattr(parallel, "POOL_AFTER_ROWS", 0)
    else:
        monkeypatch.setenv(parallel.PROCESSES_ENV, "1")
    _images(tmp_path / "imgs", N_FILES)
    m = parse_manifest({"name": "t", "input": {"uri": str(tmp_path / "imgs") + "/"},
                        "output": {"uri": str(tmp_path / "out")}, "model": {"checkpoint": "/x.pt"},
                        "runtime": {"plan_part_rows": PART}})
    storage = Storage()
    units = list(open_input(m.input, storage).units(Skipped()))
    assert len(units) == N_FILES
    _plan_is_plain_pythons(tmp_path, m, storage, units, where, retry)


def test_a_list_planned_by_the_pool_against_an_index_on_disk_is_plain_pythons(tmp_path, monkeypatch):
    """A list (its ids hashed in the pool's processes, repeats dropped by the split check), planned
    with the committed index on disk: the pool's lookups are given the keys already hashed; the
    plan is what plain Python over the committed rows says, as for files."""
    import fastsam_batch.inputs.lists as lists
    import fastsam_batch.job as job

    monkeypatch.setattr(lists, "LIST_BATCH", BATCH)
    monkeypatch.setattr(job, "LIST_CHUNK", CHUNK)
    monkeypatch.setattr(parallel, "POOL_AFTER_ROWS", 0)
    monkeypatch.setenv(parallel.PROCESSES_ENV, "1")  # the ground truth's units: on the driver
    rng = random.Random(4)
    ids = [f"img/{rng.randint(0, 1100)}.jpg" for _ in range(1300)]  # repeats: dropped, counted
    pq.write_table(pa.table({"uri": [f"s3://b/{i}" for i in ids], "image_id": ids}), tmp_path / "list.parquet")
    m = parse_manifest({"name": "t", "input": {"uri": str(tmp_path / "list.parquet"), "format": "list"},
                        "output": {"uri": str(tmp_path / "out")}, "model": {"checkpoint": "/x.pt"},
                        "runtime": {"plan_part_rows": PART}})
    storage = Storage()
    units = list(open_input(m.input, storage).units(Skipped()))
    assert len(units) == len(set(ids)) and [u["image_id"] for u in units] == list(dict.fromkeys(ids))
    monkeypatch.setenv(parallel.PROCESSES_ENV, "2")
    _plan_is_plain_pythons(tmp_path, m, storage, units, "disk-pool", frozenset({"timeout"}))


def _plan_is_plain_pythons(tmp_path, m, storage, units, where, retry) -> None:
    rows = _committed_rows(units, seed=11)
    committed = Committed.from_rows(rows, memory_rows=250 if where.startswith("disk") else None)
    assert committed.on_disk == where.startswith("disk")
    summary = RunSummary(name="t")
    plan = PlanParts(str(tmp_path / "out"), storage, PART)
    planned = plan_job(m, storage, summary, committed, PromptAttacher(m, storage), retry, plan, {})
    items = plan.in_memory + [r for f in plan.files for r in read_plan_part(f, storage)]
    want = _expected(units, rows, retry)
    assert [it["image_id"] for it in items] == want["todo"] and plan.count == len(want["todo"])
    by_id = {u["image_id"]: u for u in units}
    assert all(it["uri"] == by_id[it["image_id"]]["uri"] and it["source_version"] == source_version(it)
               and it["size"] == by_id[it["image_id"]]["size"] for it in items)
    # the parts are the per-item loop's: the items to do of each CHUNK listed, in parts of PART at most
    position = {u["image_id"]: j for j, u in enumerate(units)}
    chunks: dict[int, int] = {}
    for i in want["todo"]:
        chunks[position[i] // CHUNK] = chunks.get(position[i] // CHUNK, 0) + 1
    sizes = [len(plan.in_memory)] if plan.in_memory else [len(read_plan_part(f, storage)) for f in plan.files]
    expected = [p for n in chunks.values() for p in [PART] * (n // PART) + ([n % PART] if n % PART else [])]
    assert sizes == expected, (sizes[:12], expected[:12])
    assert planned.changed == want["changed"] and planned.retried == want["retried"]
    assert planned.superseded == want["superseded"] and want["superseded"]
    assert (summary.images_planned, summary.images_skipped_done, summary.images_ok) == \
        (len(units), want["done"], want["ok"])
    assert summary.images_error == want["done"] - want["ok"]
    if retry is not None:
        assert want["retried"]
    assert len(sizes) >= len(chunks) == -(-len(units) // CHUNK) > 2  # several parts, every chunk has some to do
    committed.close()


def test_plan_parts_cut_from_a_table_are_those_of_the_items(tmp_path):
    """add_table makes the parts add makes for the same items, given in the same pieces."""
    items = [{"image_id": f"{i}.jpg", "uri": f"/x/{i}.jpg", "size": i, "etag": "e", "kind": "object", "extra": "",
              "prompts": "", "source_version": f"e/{i}", "done": ""} for i in range(11)]
    by_dicts = PlanParts(str(tmp_path / "a"), Storage(), part_rows=3)
    by_table = PlanParts(str(tmp_path / "b"), Storage(), part_rows=3)
    for a, b in ((0, 2), (2, 9), (9, 11)):
        by_dicts.add(items[a:b])
        by_table.add_table(pa.Table.from_pylist(items[a:b]).drop_columns(["prompts", "done"]))  # defaults
    assert by_table.count == by_dicts.count == 11 and len(by_table.files) == len(by_dicts.files) == 5
    for f, g in zip(by_dicts.files, by_table.files):
        assert read_plan_part(f, Storage()) == read_plan_part(g, Storage())
    small = PlanParts(str(tmp_path / "c"), Storage(), part_rows=20)
    small.add_table(pa.Table.from_pylist(items))
    assert small.in_memory == items and not small.files


def _committed_files(out, n_files: int, rows: int) -> None:
    out.mkdir()
    rng = np.random.default_rng(5)
    for f in range(n_files):
        ids = [f"img/{x}.jpg" for x in rng.integers(0, n_files * rows // 2, rows).tolist()]  # repeats too
        status = rng.choice(["ok", "error"], rows).tolist()
        pq.write_table(pa.table({
            "image_id": ids, "run_fingerprint": rng.choice(["fpA", "fpB"], rows).tolist(), "status": status,
            "error": [None if s == "ok" else str(rng.choice(["read_failed: a", "timeout: b", "decode: c"]))
                      for s in status],
            "source_version": rng.choice(["e1/1", "e2/2", ""], rows).tolist(),
            "shard": rng.choice([None, "s3://b/s1.tar"], rows).tolist()}), out / f"part-{f:04d}.parquet")


def test_committed_files_read_by_the_pool_make_the_index_the_threads_make(tmp_path):
    """Read in groups by two processes (every group: none on the driver first; 3 files a group, then
    2 once 300 rows a file are seen: about 700 rows a group), the committed files give the index
    read by threads: every record, file, stamp, fingerprint and reason."""
    out = tmp_path / "out"
    _committed_files(out, 40, 300)
    storage = Storage()
    listed = list_parts_stamped(str(out), storage)
    paths = list(listed)
    threads = Committed.from_files(iter_files(str(out), storage, paths, stamps=listed), memory_rows=5000)
    pooled = Committed.from_files(iter_files_spread(str(out), storage, paths, listed, processes=2, group=3,
                                                    after_rows=0, group_rows=700),
                                  memory_rows=5000)
    assert threads.on_disk and pooled.on_disk
    assert (np.asarray(threads.records) == np.asarray(pooled.records)).all()
    assert (threads.parts, threads.stamps, threads.fingerprints, threads.reasons, threads.part_fingerprints) == \
        (pooled.parts, pooled.stamps, pooled.fingerprints, pooled.reasons, pooled.part_fingerprints)
    assert threads.rows == 40 * 300 and {"read_failed", "timeout", "decode"} <= set(threads.reasons)
    threads.close()
    pooled.close()


def test_a_bad_committed_file_read_by_the_pool_fails_as_the_threads_fail(tmp_path):
    """A file the pool cannot read is read again on the driver, which raises the error the
    threads raise (its cause kept: it does not cross processes)."""
    out = tmp_path / "out"
    _committed_files(out, 12, 10)
    (out / "part-0007.parquet").write_bytes(b"not parquet at all")
    storage = Storage()
    paths = list(list_parts_stamped(str(out), storage))
    with pytest.raises(CommittedFileError) as by_threads:
        list(iter_files(str(out), storage, paths))
    with pytest.raises(CommittedFileError) as by_pool:
        list(iter_files_spread(str(out), storage, paths, processes=2, group=2, after_rows=0))
    assert str(by_pool.value) == str(by_threads.value) and "part-0007.parquet" in str(by_pool.value)
    assert type(by_pool.value.__cause__) is type(by_threads.value.__cause__) and by_pool.value.__cause__ is not None


def test_read_threads_setting_and_the_same_index_whatever_the_threads(monkeypatch, tmp_path):
    """Committed files read by 16 threads from object storage, 2 from a local path, 1 in a process of
    planning's pool; $FASTSAM_BATCH_READ_THREADS sets it (1 to 64, else one line, refused by
    preflight before any work). One thread or sixteen, the files give the same index."""
    from fastsam_batch.job import check_plan_processes
    from fastsam_batch.preflight import PreflightError
    from fastsam_batch.resume import READ_THREADS_ENV, read_threads

    monkeypatch.delenv(READ_THREADS_ENV, raising=False)
    assert (read_threads("s3://b/out"), read_threads("s3://b/out", pool_process=True)) == (16, 16)
    assert (read_threads(str(tmp_path)), read_threads(str(tmp_path), pool_process=True)) == (2, 1)
    monkeypatch.setenv(READ_THREADS_ENV, "12")
    assert read_threads(str(tmp_path), pool_process=True) == 12 and read_threads("s3://b/out") == 12
    check_plan_processes()
    for bad in ("0", "65", "many", "2.5"):
        monkeypatch.setenv(READ_THREADS_ENV, bad)
        with pytest.raises(PreflightError, match=f"FASTSAM_BATCH_READ_THREADS='{bad}': not an integer from 1 to 64"):
            check_plan_processes()
    monkeypatch.delenv(READ_THREADS_ENV)
    out = tmp_path / "out"
    _committed_files(out, 30, 50)
    storage = Storage()
    listed = list_parts_stamped(str(out), storage)
    one, many = (Committed.from_files(iter_files(str(out), storage, list(listed), threads, stamps=listed))
                 for threads in (1, 16))
    assert one.rows == 30 * 50 and (one.records == many.records).all()
    assert (one.parts, one.stamps, one.reasons, one.part_fingerprints) == \
        (many.parts, many.stamps, many.reasons, many.part_fingerprints)


def test_plan_processes_setting(monkeypatch, tmp_path):
    """The setting: 1 to LIMIT_PROCESSES, else one line; unset: the usable cores (affinity, and a
    cgroup v2 quota: cpu.max), none below MIN_CORES, at most MAX_PROCESSES."""
    monkeypatch.setenv(parallel.PROCESSES_ENV, "3")
    assert parallel.plan_processes() == 3
    monkeypatch.setenv(parallel.PROCESSES_ENV, str(parallel.LIMIT_PROCESSES))
    assert parallel.plan_processes() == parallel.LIMIT_PROCESSES
    for bad in ("0", "-2", str(parallel.LIMIT_PROCESSES + 1), "many", "2.5"):
        monkeypatch.setenv(parallel.PROCESSES_ENV, bad)
        with pytest.raises(ValueError, match=f"FASTSAM_BATCH_PLAN_PROCESSES='{bad}': not an integer from 1 to 64"):
            parallel.plan_processes()
    monkeypatch.delenv(parallel.PROCESSES_ENV)
    cpu_max = tmp_path / "cpu.max"  # the quota itself: tests/test_sizing.py (sizing.usable_cpus)
    affinity = len(os.sched_getaffinity(0))
    cpu_max.write_text("50000 100000\n")  # half a CPU: one
    assert parallel.plan_processes(str(cpu_max)) == 1
    cpu_max.write_text("390000 100000\n")  # 3.9 CPUs: 3, under MIN_CORES: no pool, whatever the affinity
    assert parallel.plan_processes(str(cpu_max)) == 1
    cpu_max.write_text("max 100000\n")
    assert parallel.plan_processes(str(cpu_max)) == (1 if affinity < parallel.MIN_CORES
                                                     else min(parallel.MAX_PROCESSES, affinity))


def test_a_bad_processes_setting_stops_a_run_before_any_work(tmp_path, monkeypatch):
    """Preflight says what is wrong with the setting, one line, before the lease or the output."""
    from fastsam_batch.job import run_job
    from fastsam_batch.preflight import PreflightError

    monkeypatch.setenv(parallel.PROCESSES_ENV, "100")
    m = parse_manifest({"name": "t", "input": {"uri": str(tmp_path / "imgs") + "/"},
                        "output": {"uri": str(tmp_path / "out")}, "model": {"checkpoint": "/x.pt"}})
    with pytest.raises(PreflightError, match="FASTSAM_BATCH_PLAN_PROCESSES='100': not an integer from 1 to 64"):
        run_job(m)
    assert not (tmp_path / "out").exists()


def test_the_pools_window_is_bounded_by_rows(monkeypatch):
    """Two ordered() windows sharing one pool (a list's hashing under the plan's lookups): the
    rows given to the processes and not yet taken back stay within window_rows plus one item per
    window, and every result comes back, in order."""
    pool = parallel.PlanPool(2, after_rows=0, window_rows=100)
    sizes = [30, 70, 10, 90, 50, 40, 60, 20, 80, 5] * 3
    most = 0
    try:
        inner = pool.ordered(([f"{k}:{j}" for j in range(n)] for k, n in enumerate(sizes)),
                             lambda ids: (parallel.hash_ids, (ids,)), size=len)
        outer = pool.ordered(((ids, keys) for ids, keys in inner),
                             lambda it: (parallel.hash_ids, (it[0][::-1],)), size=lambda it: len(it[0]))
        got = []
        for (ids, (hi, lo)), (hi2, _) in outer:
            most = max(most, pool.in_flight)
            got.append((ids, hi.tolist(), hi2.tolist()))
        assert pool.in_flight == 0
    finally:
        pool.close()
    assert most <= 100 + 2 * max(sizes)
    assert [len(ids) for ids, _, _ in got] == sizes
    for ids, hi, hi2 in got:
        assert hi == parallel.hash_ids(ids)[0].tolist() and hi2 == parallel.hash_ids(ids[::-1])[0].tolist()


def test_an_aborted_split_check_ends_its_processes_and_their_spilled_runs(tmp_path, monkeypatch):
    """close(abort=True) (an error, Ctrl-C): the processes terminated together, and the scratch
    folders of their spilled runs (which they could not remove) removed by the driver."""
    monkeypatch.setenv("FASTSAM_BATCH_SCRATCH", str(tmp_path))
    check = parallel.SplitRepeatCheck(2, 200)
    rng = np.random.default_rng(1)
    for _ in range(6):
        check.submit(rng.integers(0, 2**63, 1000, dtype=np.uint64), rng.integers(0, 2**63, 1000, dtype=np.uint64))
    check.result()
    assert list(tmp_path.glob("fastsam-keys-*"))  # spilled runs (200 keys in memory each)
    procs = list(check.procs)
    check.close(abort=True)
    assert _all_gone([p.pid for p in procs]) and not list(tmp_path.glob("fastsam-keys-*"))
    check.close()  # again: nothing to do


def test_a_pool_closed_on_an_error_ends_its_processes(tmp_path):
    pool = parallel.PlanPool(2, after_rows=0)
    it = pool.ordered(([str(j)] * 10 for j in range(50)), lambda ids: (parallel.hash_ids, (ids,)), size=len)
    next(it)
    procs = list(pool._pool._processes.values())
    assert procs
    it.close()
    pool.close(abort=True)
    assert _all_gone([p.pid for p in procs])



INVENTORY_KEYS = ["a.jpg", "b.PNG", "dir/", "c.txt", "noext", "d.JpEg", "e.\u212Apg", "f.t\u0130f", "g.jpg.txt", ".png",
                  "x/y.webp", "h.jpe\n", "i.GIF", "été.jpg", "j."]


@pytest.mark.parametrize("columns", [("bucket", "key", "size", "e_tag", "is_latest", "is_delete_marker"),
                                     ("bucket", "key"), ("bucket", "key", "e_tag", "is_latest")])
@pytest.mark.parametrize("skip_non_images", [True, False])
def test_a_parquet_inventory_batch_read_column_wise_gives_the_units_of_the_row_reader(columns, skip_non_images):
    """A Parquet inventory report's record batch, column-wise, against the row-at-a-time reader on
    the same rows: delete markers and older versions left out, folder markers and non-images
    skipped (in order), sizes and quoted ETags as a unit has them. Extensions whose lowercase is
    Python's and not ASCII's (the Kelvin sign, dotted capital I) are among the keys."""
    from fastsam_batch.inputs.inventory import _parquet_rows, _units, parquet_units

    rng = random.Random(len(columns) + skip_non_images)
    n = 3000
    cols = {"bucket": pa.array([rng.choice(["bk", "b2"]) for _ in range(n)]),
            "key": pa.array([rng.choice(INVENTORY_KEYS) + (str(rng.randint(0, 9)) if rng.random() < 0.3 else "")
                             for _ in range(n)]),
            "size": pa.array([rng.choice([None, 0, 5, 123456789012]) for _ in range(n)], pa.int64()),
            "e_tag": pa.array([rng.choice([None, "", '"abc"', 'x"y', '""q""']) for _ in range(n)]),
            "is_latest": pa.array([rng.choice([None, True, False, True]) for _ in range(n)], pa.bool_()),
            "is_delete_marker": pa.array([rng.choice([None, False, False, True]) for _ in range(n)], pa.bool_())}
    batch = pa.RecordBatch.from_pydict({k: v for k, v in cols.items() if k in columns})
    fast_skipped, slow_skipped = Skipped(limit=None), Skipped(limit=None)
    fast = parquet_units(batch, skip_non_images, fast_skipped)
    slow = list(_units(_parquet_rows(batch), skip_non_images, slow_skipped))
    assert fast is not None and fast.table.to_pylist() == slow and len(slow) > 300
    assert (fast_skipped.count, fast_skipped.examples) == (slow_skipped.count, slow_skipped.examples)
    assert fast_skipped.count > 50
    # a null bucket (the row reader's f-string writes s3://None/...): the batch is left to the row reader
    as_text = batch.set_column(0, "bucket", pa.array([None] * n, pa.string()))
    assert parquet_units(as_text, skip_non_images, Skipped()) is None


def _same_error_with_and_without(pool, cfg, storage) -> list[tuple]:
    """The report of ``cfg`` fails with the same error read on the driver and read by ``pool``:
    (type, text) of each."""
    from fastsam_batch.inputs import inventory

    errors = []
    for p in (None, pool):
        with pytest.raises(Exception) as e:
            list(inventory.iter_inventory_batches(cfg, storage, Skipped(), pool=p))
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1], errors
    return errors


def _same_report_units(batches, skipped: Skipped, want: list[dict], want_skipped: Skipped) -> None:
    """A report read in pieces gave the units ``want`` in order, the keys skipped ``want_skipped``
    skipped, and each batch the keys of its ids."""
    from fastsam_batch.index import id_keys

    assert [r for b in batches for r in b.table.to_pylist()] == want
    assert (skipped.count, skipped.examples) == (want_skipped.count, want_skipped.examples)
    for b in batches:
        hi, lo = id_keys(b.table.column("image_id").to_pylist())
        assert b.hi.tolist() == hi.tolist() and b.lo.tolist() == lo.tolist()


def test_a_parquet_inventory_read_by_the_pool_gives_the_units_read_on_the_driver(s3_env, s3fs_client, walk_pool,
                                                                                monkeypatch):
    """A Parquet inventory report on S3 (the moto server) of three data files, read by planning's
    pool in pieces (row groups together, or a row group in slices; a file whose sizes are text
    goes row by row), against the same report read on the driver: the same units in order, the
    same keys skipped, the ids' keys those of the ids; a data file that is not Parquet, or whose
    pages are torn, the same error."""
    import io

    from conftest import FAKE_KEY, FAKE_SECRET, make_bucket
    from fastsam_batch.inputs import inventory

    make_bucket(s3_env, "inv-pool")
    rng = random.Random(11)

    def data_file(name: str, n: int, size_type=pa.int64()) -> None:
        buf = io.BytesIO()
        pq.write_table(pa.table({
            "bucket": ["bk"] * n,
            "key": [rng.choice(INVENTORY_KEYS) + str(j) * rng.randint(0, 1) for j in range(n)],
            "size": pa.array([rng.choice([None, 0, 5, 123456789012]) for _ in range(n)], pa.int64()).cast(size_type),
            "e_tag": [rng.choice([None, "", '"abc"', f'"{j}"']) for j in range(n)],
            "is_latest": pa.array([rng.choice([None, True, False, True]) for _ in range(n)], pa.bool_()),
            "is_delete_marker": pa.array([rng.choice([None, False, False, True]) for _ in range(n)], pa.bool_())}),
            buf, row_group_size=300)
        s3fs_client.pipe_file(f"inv-pool/data/{name}", buf.getvalue())

    data_file("a.parquet", 2000)
    data_file("b.parquet", 700, pa.string())
    data_file("c.parquet", 1500)
    s3fs_client.pipe_file("inv-pool/data/bad.parquet", b"not parquet at all")
    torn = bytearray(s3fs_client.cat_file("inv-pool/data/c.parquet"))
    torn[4:2004] = bytes(2000)  # its data pages torn, its footer whole: the error comes from the process's read
    s3fs_client.pipe_file("inv-pool/data/torn.parquet", bytes(torn))
    storage = Storage({"endpoint_url": s3_env["AWS_ENDPOINT_URL"], "key": FAKE_KEY, "secret": FAKE_SECRET})

    def report(files: list[str]):
        s3fs_client.pipe_file("inv-pool/r/manifest.json", json.dumps({
            "destinationBucket": "arn:aws:s3:::inv-pool", "fileFormat": "Parquet",
            "files": [{"key": f"data/{f}"} for f in files]}).encode())
        return InputConfig(uri="s3://inv-pool/r/manifest.json", format="s3_inventory")

    cfg = report(["a.parquet", "b.parquet", "c.parquet"])
    want_skipped, got_skipped = Skipped(limit=None), Skipped(limit=None)
    want = [r for b in inventory.iter_inventory_batches(cfg, storage, want_skipped) for r in b.table.to_pylist()]
    assert len(want) > 400 and want_skipped.count > 300
    # pieces of 500 rows: two row groups of 300 a piece (a file in several); of 128: each row group
    # cut in slices of 128 rows (the last slice of a group shorter; a group of 100 whole); of 20:
    # in 8 slices at most (300 rows in slices of 38, 200 of 25; 100 rows in 5 of 20)
    for piece_rows, pieces in ((500, 4 + 2 + 3), (128, 20 + 7 + 15), (20, 56 + 21 + 40)):
        monkeypatch.setattr(inventory, "PIECE_ROWS", piece_rows)
        walk_pool.after_rows, walk_pool.submits = 0, 0
        got_skipped = Skipped(limit=None)
        batches = list(inventory.iter_inventory_batches(cfg, storage, got_skipped, pool=walk_pool))
        assert walk_pool.submits == pieces
        _same_report_units(batches, got_skipped, want, want_skipped)
    for bad in ("bad.parquet", "torn.parquet"):
        cfg = report(["a.parquet", bad])
        _same_error_with_and_without(walk_pool, cfg, storage)


CSV_FIELDS = ["Bucket", "Key", "Size", "ETag", "IsLatest", "IsDeleteMarker", "StorageClass"]


def _csv_report_rows(rng: random.Random, n: int) -> list[list[str]]:
    """``n`` rows of a CSV inventory report (the fields of CSV_FIELDS): keys URL-encoded as S3 writes
    them (a space as +, a + as %2B, a newline as %0A, UTF-8 as %XX), sizes empty or not, ETags
    quoted or not, flags in any case or empty."""
    from urllib.parse import quote_plus

    rows = []
    for j in range(n):
        key = rng.choice(INVENTORY_KEYS + ["a b.jpg", "c+d.png", "e%f.jpg", "sp ace/x y.jpeg"]) + str(j) * rng.randint(0, 1)
        coded = quote_plus(key, safe=rng.choice(["/", ""])) if rng.random() < 0.7 else key.replace("\n", "%0A")
        rows.append([rng.choice(["bk", "b2"]), coded, rng.choice(["", "0", "5", "123456789012"]),
                     rng.choice(["", "abc", '"abc"', '""q""']), rng.choice(["", "true", "false", "TRUE", "True"]),
                     rng.choice(["", "false", "false", "true", "FALSE"]), rng.choice(["STANDARD", "GLACIER"])])
    return rows


def _csv_text(rows: list[list[str]], end: str = "\n") -> str:
    import csv
    import io

    text = io.StringIO()
    csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator=end).writerows(rows)
    return text.getvalue()


def _gzip_csv(rows: list[list[str]], end: str = "\n", head: str = "") -> bytes:
    import gzip

    return gzip.compress((head + _csv_text(rows, end)).encode())


def _row_reader_units(data: bytes, fields: list[str], skip_non_images: bool, skipped: Skipped) -> list[dict]:
    """The row-at-a-time reading of a CSV report (the reader before the column-wise one, written
    out here as the reference): each line a dict of the fields, its key URL-decoded, through
    inventory._units; two rules added since, which the old reader broke on: a UTF-8 byte order
    mark at the start left out, blank lines left out (it failed on them, KeyError 'Bucket')."""
    import csv
    import gzip
    import io
    from urllib.parse import unquote_plus

    from fastsam_batch.inputs.inventory import _units

    def rows():
        for values in csv.reader(io.StringIO(gzip.decompress(data).decode().removeprefix("\ufeff"), newline="")):
            if not values:
                continue
            row = dict(zip(fields, values))
            row["Key"] = unquote_plus(row.get("Key", ""))
            yield row

    return list(_units(rows(), skip_non_images, skipped))


@pytest.mark.parametrize("fields", [CSV_FIELDS, ["Bucket", "Key"], ["Key", "Bucket", "ETag", "IsLatest"]])
@pytest.mark.parametrize("skip_non_images", [True, False])
def test_a_csv_inventory_read_column_wise_gives_the_units_of_the_row_reader(tmp_path, fields, skip_non_images):
    """A CSV inventory report's data file read by Arrow's CSV reader into the Parquet report's
    columns (csv_piece, one slice), against the row-at-a-time reader on the same file: URL-encoded
    keys decoded (+, %2B, %0A, UTF-8), delete markers and older versions left out, folder markers
    and non-images skipped in order, sizes and quoted ETags as a unit has them; the same with
    \r\n line ends, a byte order mark, blank lines, a quoted field broken over lines (one slice);
    Arrow's reader takes these (no fallback); a file with a row of another length goes row by row
    with the row reader's result; a size that is not a number fails as the row reader fails."""
    from fastsam_batch.inputs.inventory import csv_piece, csv_report_batches

    rng = random.Random(len(fields) * 2 + skip_non_images)
    full = _csv_report_rows(rng, 3000)
    rows = [[r[CSV_FIELDS.index(f)] for f in fields] for r in full]
    storage = Storage({})
    short = [list(r) for r in rows]
    short[1234] = short[1234][:-1]  # a row of another length: Arrow refuses it, the row reader reads it
    broken = [list(r) for r in rows]
    broken[77][fields.index("Key")] = "a\nb.jpg"  # a quoted field broken over lines (not as S3 writes them)
    blank = _csv_text(rows[:1500]) + "\n\n" + _csv_text(rows[1500:])
    files = {"plain": (_gzip_csv(rows), True), "crlf": (_gzip_csv(rows, "\r\n"), True),
             "bom": (_gzip_csv(rows, head="\ufeff"), True),
             "blank": (__import__("gzip").compress(blank.encode()), True),
             "short": (_gzip_csv(short), False), "broken": (_gzip_csv(broken), True)}
    for name, (data, arrow) in files.items():
        (tmp_path / name).write_bytes(data)
        want_skipped = Skipped(limit=None)
        want = _row_reader_units(data, fields, skip_non_images, want_skipped)
        text = __import__("gzip").decompress(data).removeprefix(b"\xef\xbb\xbf")
        if arrow:  # read by Arrow, not by the fallback
            assert sum(b.num_rows for b in csv_report_batches(text, fields, 500)) == 3000
        else:
            with pytest.raises(Exception):
                csv_report_batches(text, fields, 500)
        batches, got_skipped = csv_piece(str(tmp_path / name), 0, [], storage, fields, skip_non_images, None, 500,
                                         in_process=False)
        assert [r for b in batches for r in b.table.to_pylist()] == want and len(want) > 300, name
        assert max(len(b) for b in batches) <= 500
        assert (got_skipped.count, got_skipped.examples) == (want_skipped.count, want_skipped.examples)
        assert got_skipped.count > 50 or not skip_non_images
        assert any("%" in r[fields.index("Key")] for r in rows) and any(" " in u["image_id"] for u in want)
    if "Size" in fields:
        plain = {"Bucket": "bk", "Key": "z.jpg", "Size": "12x", "ETag": "e", "IsLatest": "true", "IsDeleteMarker": "false",
                 "StorageClass": "STANDARD"}
        bad = [list(r) for r in rows[:100]] + [[plain[f] for f in fields]] + [list(r) for r in rows[100:]]
        (tmp_path / "bad.csv.gz").write_bytes(_gzip_csv(bad))
        with pytest.raises(ValueError) as want_error:
            _row_reader_units(_gzip_csv(bad), fields, skip_non_images, Skipped())
        with pytest.raises(ValueError) as got_error:
            csv_piece(str(tmp_path / "bad.csv.gz"), 0, [], storage, fields, skip_non_images, None, 500, in_process=False)
        assert str(got_error.value) == str(want_error.value)


def test_report_keys_are_url_decoded_column_wise_as_unquote_plus_decodes_them():
    """inventory._unquoted_plus (+ and %2F column-wise, the rest of the keys with a % one by one)
    against urllib's unquote_plus on 100,000 keys of an alphabet made to break it: escapes whole,
    cut, lowercase, of a % (%25), next to each other and to +, non-ASCII text."""
    from urllib.parse import unquote_plus

    from fastsam_batch.inputs.inventory import _unquoted_plus

    rng = random.Random(23)
    alphabet = ["a", "b", "+", "%", "2", "F", "f", "5", "/", "é", " ", "%2F", "%25", "%2f", "%C3%A9", "%0A"]
    keys = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(100_000)]
    assert _unquoted_plus(pa.array(keys)).to_pylist() == [unquote_plus(k) for k in keys]
    plain = pa.array(["a/b.jpg", "c.png"])
    assert _unquoted_plus(plain).to_pylist() == ["a/b.jpg", "c.png"]

def test_a_csv_report_s_lines_are_read_in_slices_that_cover_it_once(tmp_path):
    """_line_slices (the lines of a gzip'd file in slices cut at uncompressed offsets, read in blocks
    of any size) against the file's lines in Python: slice k is the lines that start from cut k - 1
    up to cut k, so the slices together are the file once (a byte order mark left out), each a run
    of whole lines; one slice asked alone (keep) is that slice of the whole pass; cuts at line
    starts, inside lines, at block edges, past the end; the last line with or without its newline;
    quoted fields holding line breaks never cut; _text_bytes reads the uncompressed size from the
    trailer, and _cuts covers the file."""
    import gzip

    from fastsam_batch.inputs.inventory import _cuts, _line_slices, _text_bytes

    rng = random.Random(5)
    lines = [("x" * rng.randint(0, 30) + f",{j}\n").encode() for j in range(400)]
    storage = Storage({})
    for last_newline, bom in ((True, False), (False, False), (True, True)):
        data = b"".join(lines) if last_newline else b"".join(lines)[:-1]
        path = tmp_path / f"f{last_newline}{bom}.gz"
        path.write_bytes(gzip.compress((b"\xef\xbb\xbf" if bom else b"") + data))
        assert _text_bytes(str(path), storage) == len(data) + 3 * bom
        starts = [0] + [i + 1 for i in range(len(data)) if data[i:i + 1] == b"\n" and i + 1 < len(data)]
        for chunk in (1, 7, 64, 1 << 20):
            for cuts in ([], [1], [len(data) // 2], [5, 6, 7, 300, 301], [len(data) - 1], [len(data) + 50],
                         sorted(rng.sample(range(1, len(data) + 100), 9)), _cuts(len(data))):
                got = list(_line_slices(str(path), storage, cuts, None, chunk))
                assert len(got) == len(cuts) + 1 and b"".join(got) == data, (chunk, cuts)
                shift = 3 if bom else 0  # offsets count the mark
                for k, part in enumerate(got):
                    lo, hi = ([0] + cuts)[k] - shift, ([*cuts, None])[k]
                    owned = [s for s in starts if s >= lo and (hi is None or s < hi - shift)]
                    end = data.find(b"\n", owned[-1]) + 1 if owned else 0
                    assert part == (data[owned[0]:end or len(data)] if owned else b""), (chunk, cuts, k)
                    assert next(_line_slices(str(path), storage, cuts, k, chunk)) == part
                assert next(_line_slices(str(path), storage, cuts, len(cuts) + 3, chunk)) == b""
            # endless cuts (the one pass without a pool): the same slices, none past the file's end
            for step in (1, 50, 333, 1 << 22):
                endless = list(_line_slices(str(path), storage, itertools.count(step, step), None, chunk))
                listed = list(range(step, len(data) + 3 * bom, step))
                assert b"".join(endless) == data and len(endless) <= len(listed) + 3
                whole = list(_line_slices(str(path), storage, listed, None, chunk))
                ends = [max([0] + [i + 1 for i, part in enumerate(x) if part]) for x in (endless, whole)]
                assert endless[:ends[0]] == whole[:ends[1]]  # (the empty slices after the last line aside)
    # quoted fields holding line breaks (and quotes, doubled): a slice never ends inside one, so the
    # slices' rows, each read apart, are the file's rows
    import csv
    import io

    rows = [[f"r{j}", "a\nb" * rng.randint(0, 2) + '"q"' * rng.randint(0, 1), str(j)] for j in range(300)]
    data = _csv_text(rows).encode()
    path = tmp_path / "quoted.gz"
    path.write_bytes(gzip.compress(data))
    for chunk in (5, 64, 1 << 20):
        for cuts in ([], sorted(rng.sample(range(1, len(data)), 12)), list(range(37, len(data), 37))):
            got = list(_line_slices(str(path), storage, cuts, None, chunk))
            assert b"".join(got) == data
            assert [r for part in got for r in csv.reader(io.StringIO(part.decode(), newline=""))] == rows, (chunk, cuts)
            for k in rng.sample(range(len(got)), min(len(got), 8)):
                assert next(_line_slices(str(path), storage, cuts, k, chunk)) == got[k]
    assert _cuts(100) == [] and len(_cuts(10**12)) == 7
    # a header naming the file (gzip's own tool, Python's gzip.open): the trailer's size as it is
    for body in (b"", b"a,b\n", b"x" * 70_000):
        named = tmp_path / "named.gz"
        with open(named, "wb") as raw, gzip.GzipFile(filename="n" * 300 + ".csv", mode="wb", fileobj=raw) as g:
            g.write(body)
        assert _text_bytes(str(named), storage) == len(body)


def test_a_csv_inventory_read_by_the_pool_gives_the_units_of_the_row_reader(s3_env, s3fs_client, walk_pool,
                                                                           monkeypatch):
    """A CSV inventory report on S3 (the moto server) of four data files (one of two gzip members,
    whose trailer tells only the last's size; one with line breaks in quoted keys at its cuts),
    read by planning's pool in slices cut at offsets of their uncompressed size (one a file;
    several; at most MOST_SLICES), and on the driver without a pool (each file in one pass, a few
    KB or MB at a time), against the row-at-a-time reader of the same files: the same units in
    order, the same keys skipped, the ids' keys those of the ids; each slice read in the pool that
    slice; a file that is not gzip, and one with a size that is not a number (the row reader's
    error), the same error with and without the pool."""
    import gzip

    from conftest import FAKE_KEY, FAKE_SECRET, make_bucket
    from fastsam_batch.inputs import inventory

    make_bucket(s3_env, "inv-csv")
    rng = random.Random(12)
    monkeypatch.setattr(inventory, "PIECE_BYTES", 2000)
    data = {"a.csv.gz": _gzip_csv(_csv_report_rows(rng, 2000)), "b.csv.gz": _gzip_csv(_csv_report_rows(rng, 300)),
            "c.csv.gz": _gzip_csv(_csv_report_rows(rng, 1500)),
            "d.csv.gz": _gzip_csv(_csv_report_rows(rng, 900)) + _gzip_csv(_csv_report_rows(rng, 50)),
            "bad.csv.gz": b"not gzip at all"}
    sized = _csv_report_rows(rng, 200)
    sized.insert(150, ["bk", "nine.jpg", "nine", "e", "true", "false", "STANDARD"])  # an image whose size is no number
    data["size.csv.gz"] = _gzip_csv(sized)
    # line breaks inside quoted keys (not as S3 writes them, but CSV), one at each cut of slices of
    # 2,000 bytes (made at the cut in place of a key's character: the file's size, so its cuts, kept)
    text = _csv_text([["bk", f"{j:05d}" + "k" * (150 + j % 97) + ".jpg", "5", "e", "true", "false", "STANDARD"]
                      for j in range(400)])
    cuts = [c for c in inventory._cuts(len(text)) if text[c - 1] == "k"]  # (2,000-byte slices: set above)
    assert len(cuts) >= 4
    for c in cuts:
        text = text[:c - 1] + "\n" + text[c:]
    data["broken.csv.gz"] = gzip.compress(text.encode())
    # a quote inside an unquoted field (which CSV readers take as a character) throws the count of
    # quotes off: the slices then end at the quoted line breaks after it, inside their fields
    lines = text.split("\n", 11)
    lines[10] = 'bk,ab"c.jpg,5,e,true,false,STANDARD'
    data["stray.csv.gz"] = gzip.compress("\n".join(lines).encode())
    for name, body in data.items():
        s3fs_client.pipe_file(f"inv-csv/data/{name}", body)
    storage = Storage({"endpoint_url": s3_env["AWS_ENDPOINT_URL"], "key": FAKE_KEY, "secret": FAKE_SECRET})

    def report(files: list[str]):
        s3fs_client.pipe_file("inv-csv/r/manifest.json", json.dumps({
            "destinationBucket": "arn:aws:s3:::inv-csv", "fileFormat": "CSV", "fileSchema": ", ".join(CSV_FIELDS),
            "files": [{"key": f"data/{f}", "size": len(data[f])} for f in files]}).encode())
        return InputConfig(uri="s3://inv-csv/r/manifest.json", format="s3_inventory")

    good = ["a.csv.gz", "b.csv.gz", "c.csv.gz", "d.csv.gz", "broken.csv.gz"]
    want_skipped = Skipped(limit=None)
    want = [u for f in good for u in _row_reader_units(data[f], CSV_FIELDS, True, want_skipped)]
    assert len(want) > 400 and want_skipped.count > 300
    sizes = {f: len(gzip.decompress(data[f])) for f in good}
    cfg = report(good)
    # slices of 10**9 bytes: a file each; of 20,000: 8 + 2 + 7 + (the last member's 20 KB or so: 1-2) + 5;
    # of 2,000: 8 each (the broken keys' file at its cuts); without a pool in one pass, 4 MiB of text
    # at a time or 5,000 bytes (a break in a quoted key at some of those cuts too)
    for piece_bytes, stream_bytes in ((10**9, 1 << 22), (20_000, 5000), (2000, 1 << 22)):
        monkeypatch.setattr(inventory, "PIECE_BYTES", piece_bytes)
        monkeypatch.setattr(inventory, "STREAM_BYTES", stream_bytes)
        for pool in (walk_pool, None):
            walk_pool.after_rows, walk_pool.submits = 0, 0
            got_skipped = Skipped(limit=None)
            batches = list(inventory.iter_inventory_batches(cfg, storage, got_skipped, pool=pool))
            if pool:
                slices = [len(inventory._cuts(inventory._text_bytes(f"s3://inv-csv/data/{f}", storage))) + 1 for f in good]
                assert walk_pool.submits == sum(slices)
                assert slices[:3] == [min(8, -(-sizes[f] // piece_bytes)) for f in good[:3]], (slices, sizes)
            _same_report_units(batches, got_skipped, want, want_skipped)
    # each slice read in the pool's processes is that slice (cut where the driver cut it), not the file,
    # and comes back (none failed there and was read again on the driver)
    pieces = list(inventory._csv_pieces([f"s3://inv-csv/data/{f}" for f in good], storage))
    walk_pool.after_rows = 0
    done = list(walk_pool.ordered(pieces, lambda p: (inventory.csv_piece, (*p[:3], storage, CSV_FIELDS, True, None, 500)),
                                  size=lambda p: p[3]))
    assert len(done) == len(pieces) > 30 and all(r is not None for _, r in done)
    assert all(sum(len(b) for b in r[0]) > 10 for p, r in done if p[0].endswith("a.csv.gz"))
    for piece, (batches, _) in done:
        alone = inventory.csv_piece(*piece[:3], storage, CSV_FIELDS, True, None, 500, in_process=False)[0]
        assert [b.table.to_pylist() for b in batches] == [b.table.to_pylist() for b in alone]
    monkeypatch.setattr(inventory, "PIECE_BYTES", 2000)
    # the quote inside an unquoted field: read whole without a pool (4 MiB at a time: one slice), as the
    # row reader reads it; in slices of 2,000 bytes an error naming the file, never rows of halves
    cfg = report(["a.csv.gz", "stray.csv.gz"])
    want_skipped = Skipped(limit=None)
    want = [u for f in ("a.csv.gz", "stray.csv.gz") for u in _row_reader_units(data[f], CSV_FIELDS, True, want_skipped)]
    got_skipped = Skipped(limit=None)
    _same_report_units(list(inventory.iter_inventory_batches(cfg, storage, got_skipped)), got_skipped, want,
                       want_skipped)
    with pytest.raises(InputError, match="stray.csv.gz: not CSV as an S3 Inventory report is written"):
        list(inventory.iter_inventory_batches(cfg, storage, Skipped(), pool=walk_pool))
    for bad in ("bad.csv.gz", "size.csv.gz"):
        errors = _same_error_with_and_without(walk_pool, report(["a.csv.gz", bad]), storage)
        if bad == "size.csv.gz":
            with pytest.raises(ValueError) as want_error:
                _row_reader_units(data[bad], CSV_FIELDS, True, Skipped())
            assert errors[0] == (ValueError, str(want_error.value))


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc/<pid>/stat's ppid field)."""
    out: set[int] = set()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.split("/")[2]))
    return out


def _all_gone(pids: list[int], timeout: float = 60.0) -> bool:
    """Whether every process has ended, waiting for it (bounded): close(abort=True) returns once each
    process's end of its sentinel pipe is closed, which the kernel does as the process exits, a moment
    before it is a zombie (seen once on a busy machine)."""
    import time

    deadline = time.monotonic() + timeout
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return all(_gone(p) for p in pids)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie: ended
    except OSError:
        return True


def test_ctrl_c_while_the_pool_starts_gives_one_line_and_leaves_no_process(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) to `fastsam-batch plan` once
    the pool's processes exist (past the driver's first 262,144 rows of a 600,000-row list), given
    while the plan is frozen so that it cannot end first: one line, exit 130, no traceback (the
    processes start with SIGINT held off, then ignore it), and none of them left."""
    import signal
    import time

    from conftest import CHECKPOINT

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env[parallel.PROCESSES_ENV] = "2"
    exe = os.path.join(os.path.dirname(sys.executable), "fastsam-batch")
    # The plan is frozen (SIGSTOP to its group) as soon as its pool's processes are seen, and the
    # Ctrl-C given while it is frozen (taken when it goes on): a plan that ended before the freeze
    # (this process starved of a core meanwhile) is started again with a list four times longer.
    for n in (600_000, 2_400_000, 9_600_000):
        ids = pa.array([f"img/{j}.jpg" for j in range(n)])
        pq.write_table(pa.table({"uri": pc.binary_join_element_wise("s3://b/", ids, ""), "image_id": ids}),
                       tmp_path / "list.parquet")
        del ids
        job = tmp_path / "job.json"
        job.write_text(json.dumps({"name": "t", "input": {"uri": str(tmp_path / "list.parquet"), "format": "list"},
                                   "output": {"uri": str(tmp_path / f"out-{n}")},
                                   "model": {"checkpoint": str(CHECKPOINT), "device": "cpu"}}))
        # SIGINT caught here while the plan starts, so that it starts with Python's Ctrl-C handler: a
        # test run started in the background by a shell ignores SIGINT, and the plan would inherit
        # that (exec keeps an ignored signal ignored; Python then installs no handler, as for `nohup`)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            p = subprocess.Popen([exe, "plan", str(job)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        seen: set[int] = set()
        try:
            deadline = time.monotonic() + 300
            while len(seen) < 2 and p.poll() is None and time.monotonic() < deadline:  # the resource tracker and a process
                seen |= _children(p.pid)
                time.sleep(0.02)
            if p.poll() is None and len(seen) >= 2:
                os.killpg(p.pid, signal.SIGSTOP)
                frozen = p.poll() is None
                seen |= _children(p.pid)
                os.killpg(p.pid, signal.SIGINT)
                os.killpg(p.pid, signal.SIGCONT)
            else:
                frozen = False
            out, err = p.communicate(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        if frozen:
            break
        assert p.returncode == 0 and time.monotonic() < deadline, (p.returncode, err)  # ended before its pool was seen
    assert frozen, "every plan ended before its pool was seen"
    assert p.returncode == 130, (out, err)
    assert "Traceback" not in out + err and err.strip() == "fastsam-batch: plan: interrupted", err
    deadline = time.monotonic() + 30
    while not all(_gone(c) for c in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(c) for c in seen), [c for c in seen if not _gone(c)]


def _tree(root, odd_name: bool = False) -> None:
    """Folders at several depths, names that sort by code point (capitals, digits, dots, non-ASCII),
    files beside folders, empty folders, non-images (skipped), a link to a file (listed) and a link
    to a folder (not walked), files of one modification time and of none (mtime 0)."""
    rng = random.Random(5)
    names = ["a.jpg", "B.png", "c.JPEG", "d.txt", "e", "f.jpg.txt", ".png", "g.\u212Apg", "é.jpg", "10.jpg", "9.jpg",
             "h.webp", "i.GIF", "j.jpe\n"]
    folders = ["", "x", "x/y", "x/y/z", "X", "x.y", "x/a", "0", "é", "deep/1/2/3/4", "empty", "empty/too"]
    for f in folders:
        (root / f).mkdir(parents=True, exist_ok=True)
        for n in rng.sample(names, rng.randint(0, len(names))):
            (root / f / n).write_bytes(b"x" * rng.randint(0, 50))
    for j in range(300):  # a folder larger than a batch slice is not needed; many files in one is
        (root / "many" / f"{j % 7}").mkdir(parents=True, exist_ok=True)
        (root / "many" / f"{j % 7}" / f"{j:05d}.jpg").write_bytes(b"")
    os.utime(root / "many" / "0" / "00000.jpg", (0, 0))  # mtime 0: no version
    os.symlink(root / "x" / "y", root / "link-to-folder")
    (root / "x" / "real.jpg").write_bytes(b"yy")
    os.symlink(root / "x" / "real.jpg", root / "link.jpg")
    os.symlink(root / "gone.jpg", root / "broken-link.jpg")
    if odd_name:  # a name not UTF-8: skipped as a non-image (kept, it cannot be an id in either walk)
        with open(os.path.join(os.fsencode(root / "x"), b"not-utf8-\xff.txt"), "wb"):
            pass


class _CountingPool(parallel.PlanPool):
    submits = 0

    def submit(self, fn, *args):
        self.submits += 1
        return super().submit(fn, *args)


@pytest.fixture(scope="module")
def walk_pool():
    pool = _CountingPool(2)
    yield pool
    pool.close()


@pytest.mark.parametrize("uri, skip_non_images", [
    *((u, True) for u in ["{root}", "{root}/", "{root}/x/**/*.jpg", "{root}/*/*", "{root}/./x/../x", "{root}/nothing-here",
                          "{root}/empty", "{root}/*.none", "{root}/x/a.jpg"]),
    ("{root}", False), ("{root}/*/*", False)])
def test_a_folder_walked_by_the_pool_gives_the_units_of_the_walk_on_the_driver(tmp_path, walk_pool, uri,
                                                                             skip_non_images, monkeypatch):
    """A local folder (or glob) walked by planning's pool (the whole walk in one task; a folder a
    task, after_rows 0: every task, the first one too; after_rows 40: the first ones here; tasks
    of 7 files and 3 folders, the units given in batches of 5), against iter_files on the driver (a file at a time,
    as before): the same units in the same order (ids, uris, sizes, versions), the same keys
    skipped (a name that is not UTF-8 among them), the ids' keys those of the ids, batches of
    the size asked, and the same error for nothing there."""
    from fastsam_batch.index import id_keys
    from fastsam_batch.inputs import files

    root = tmp_path / "tree"
    _tree(root, odd_name=skip_non_images)
    u = uri.format(root=root)
    form = open_input(InputConfig(uri=u, skip_non_images=skip_non_images), Storage())
    want_skipped = Skipped(limit=None)
    try:
        want = _serial(u, skip_non_images, want_skipped)
    except FileNotFoundError as e:
        want = e
    for after_rows, folder_files, task_folders, unit_batch in ((0, 16384, 1024, 4096), (40, 16384, 1, 4096),
                                                               (0, 16384, 1, 4096), (0, 7, 3, 5)):
        # the whole walk in one task; a folder a task (the first ones here, or all in the pool);
        # tasks of 7 files and 3 folders at most (a folder of more files listed in one task, made in
        # several), the units given in batches of 5 (small folders' units merged, large ones' sliced)
        monkeypatch.setattr(files, "FOLDER_FILES", folder_files)
        monkeypatch.setattr(files, "TASK_FOLDERS", task_folders)
        monkeypatch.setattr(files, "UNIT_BATCH", unit_batch)
        walk_pool.after_rows, walk_pool.submits = after_rows, 0
        got_skipped = Skipped(limit=None)
        try:
            batches = list(form.batches(got_skipped, walk_pool))
        except FileNotFoundError as e:
            assert isinstance(want, FileNotFoundError) and str(e) == str(want)
            continue
        assert not isinstance(want, FileNotFoundError), want
        got = [r for b in batches for r in b.table.to_pylist()]
        assert got == want and (got_skipped.count, got_skipped.examples) == (want_skipped.count, want_skipped.examples)
        for b in batches:
            hi, lo = id_keys(b.table.column("image_id").to_pylist())
            assert b.hi.tolist() == hi.tolist() and b.lo.tolist() == lo.tolist()
        if not u.endswith("a.jpg"):  # one file is not walked
            assert all(len(b) == unit_batch for b in batches[:-1]) and 0 < len(batches[-1]) <= unit_batch
        if after_rows == 0:  # every folder scanned by the pool
            assert (walk_pool.submits > 0) is not u.endswith("a.jpg")
    assert isinstance(want, FileNotFoundError) or len(want) > (300 if u.endswith(("tree", "tree/")) else 0)


def _serial(uri: str, skip_non_images: bool, skipped: Skipped) -> list[dict]:
    from fastsam_batch.decode import looks_like_image
    from fastsam_batch.inputs.files import iter_files as iter_inputs

    return list(iter_inputs(uri, Storage(), skipped, looks_like_image if skip_non_images else None))
