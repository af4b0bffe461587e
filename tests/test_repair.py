"""The steps that rewrite or delete committed files (repair.py): what each keeps, that each stops at
the lease fence, and the invariant over all of them: whatever point a driver is killed at (SIGKILL at
the k-th storage operation of the repair and compaction steps) and however often, the repairs run
again to completion leave exactly one row per image, and no image ever has fewer rows than it had."""

from __future__ import annotations

import builtins
import os
import random
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_bucket
from fastsam_batch.lease import Lease, LeaseLost
from fastsam_batch.repair import (compact_units_records, drop_left_over_rows, drop_rows, drop_superseded_rows,
                                  remove_duplicates, remove_files, remove_stale_temporaries, repair_at_end,
                                  repair_at_start)
from fastsam_batch.index import Committed
from fastsam_batch.resume import (UNITS_DIR, duplicate_rows, id_key, iter_files, list_parts_stamped, read_committed,
                                  read_units_records, stale_unit_rows, superseded_parts, write_units_record)
from fastsam_batch.saved_index import save_index
from fastsam_batch.storage import Storage, join_uri
from fastsam_batch.write import part_name

FP = "fp-repair-test"


def table(rows: list[tuple]) -> pa.Table:
    """Output rows as the repairs read them: (image_id, source_version, status, payload)."""
    return pa.table({
        "image_id": [r[0] for r in rows], "uri": [r[3] for r in rows], "shard": [None] * len(rows),
        "source_version": [r[1] for r in rows], "status": [r[2] for r in rows],
        "error": [None if r[2] == "ok" else "read_failed: test" for r in rows],
        "run_fingerprint": [FP] * len(rows)})


def put(storage: Storage, uri: str, rows: list[tuple]) -> None:
    import io

    buf = io.BytesIO()
    pq.write_table(table(rows), buf)
    storage.fs(uri).pipe_file(uri, buf.getvalue())


def index_rows(c: Committed) -> list[tuple]:
    """Every row of an index as plain values (its file's name, its reason's text), sorted: two
    indexes of the same rows compare equal whatever their files' order."""
    names = [p.rsplit("/", 1)[-1] for p in c.parts]
    return sorted(zip(c.hi.tolist(), c.lo.tolist(), c.versions.tolist(), c.units.tolist(), c.ok.tolist(),
                      [c.reasons[r] if r >= 0 else None for r in c.reason_of.tolist()],
                      [names[p] for p in c.part_of.tolist()]))


def plain_read(uri: str, storage: Storage, memory_rows: int | None = None) -> Committed:
    """Every committed file read (no saved index used): what a saved index must stand for."""
    listed = list_parts_stamped(uri, storage)
    return Committed.from_files(iter_files(uri, storage, list(listed), stamps=listed), memory_rows)


def read_rows(storage: Storage, output: str) -> list[tuple]:
    fs = storage.fs(output)
    fs.invalidate_cache()
    out = []
    for part in read_committed(output, storage).parts:
        with fs.open(part, "rb") as f:
            t = pq.read_table(f)
        out += list(zip(*(t.column(c).to_pylist() for c in ("image_id", "source_version", "status", "uri"))))
    return sorted(out)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path, s3_env, monkeypatch):
    """An output (a local folder, or a prefix on the moto server), its Storage, and this run's lease."""
    if request.param == "local":
        uri = str(tmp_path / "out")
        os.makedirs(uri)
    else:
        for k, v in s3_env.items():
            monkeypatch.setenv(k, v)
        bucket = f"repair-{tmp_path.name.lower().replace('_', '-')[-30:]}"
        make_bucket(s3_env, bucket)
        uri = f"s3://{bucket}/out"
    storage = Storage()
    lease = Lease(storage, uri, "run-repair")
    lease.acquire()
    yield uri, storage, lease.fence()
    lease.release()


def test_drop_rows_that_drops_nothing_leaves_the_file(output):
    uri, storage, fence = output
    part = join_uri(uri, part_name(["a", "b"]))  # named as the writer names it: by the ids it holds
    put(storage, part, [("a", "v/1", "ok", "a#0"), ("b", "v/1", "ok", "b#0")])
    before = read_rows(storage, uri)
    # Rows of an image the file does not hold: nothing to drop, so the file must stay (it used to be
    # put under its own content-addressed name and then deleted).
    assert drop_rows(uri, storage, {read_committed(uri, storage).parts[0]: {id_key("zzz")}}, fence=fence) == 0
    assert read_rows(storage, uri) == before


def test_two_rows_of_one_image_in_one_file_are_repaired_to_one(output):
    uri, storage, fence = output
    put(storage, join_uri(uri, "part-a.parquet"),
        [("a", "v/1", "error", "a#error"), ("a", "v/1", "ok", "a#ok"), ("b", "v/1", "ok", "b#0")])
    committed = read_committed(uri, storage)
    assert (committed.rows, committed.images) == (3, 2)
    twice = duplicate_rows(committed)
    assert twice and not twice.drop  # nothing in another file: one of the two rows in this file stays
    assert remove_duplicates(uri, storage, twice, fence=fence) == 1
    assert read_rows(storage, uri) == [("a", "v/1", "ok", "a#ok"), ("b", "v/1", "ok", "b#0")]  # the ok row kept
    again = read_committed(uri, storage)
    assert (again.rows, again.images) == (2, 2) and not duplicate_rows(again)  # the next run's check passes


def test_a_rewrite_never_replaces_another_file_holding_exactly_its_kept_ids(output):
    """Files named by their ids as the writer names them: {x}, {x, y} and {y} (two runs' commits of
    the same images). Whatever the names' order, dropping the duplicates of {x, y} must not put its
    kept row onto the file {x} or {y} and then delete that file with the rows it held."""
    uri, storage, fence = output
    for x, y in (("x1", "y1"), ("x2", "y2"), ("x3", "y3"), ("x4", "y4")):  # several name orders
        files = {(x,): [(x, "v", "ok", f"{x}-a")], (x, y): [(x, "v", "ok", f"{x}-b"), (y, "v", "ok", f"{y}-b")],
                 (y,): [(y, "v", "ok", f"{y}-c")]}
        for ids, rows in files.items():
            put(storage, join_uri(uri, part_name(list(ids))), rows)
    repair_at_start(uri, storage, read_committed(uri, storage), None, fence=fence)
    got = [r[0] for r in read_rows(storage, uri)]
    assert sorted(got) == sorted(f"{c}{n}" for c in "xy" for n in range(1, 5))  # one row each, none lost


def test_the_end_of_a_run_reads_again_a_file_rewritten_under_its_own_name(output):
    """Reproduced from review: the start index holds part_name(["slow"]) with an error row; this
    run (--retry-errors) commits exactly that file's ids, ok, under the same name. The counts the
    end of the run gives (for _run.json) are those of a plain read of every row."""
    uri, storage, fence = output
    slow = join_uri(uri, part_name(["slow"]))
    put(storage, slow, [("slow", "v/1", "error", "slow#0")])
    put(storage, join_uri(uri, part_name(["a", "b"])), [("a", "v/1", "ok", "a#0"), ("b", "v/1", "ok", "b#0")])
    start = read_committed(uri, storage)
    put(storage, slow, [("slow", "v/1", "ok", "slow#1")])
    final, _, _ = repair_at_end(uri, storage, None, fence=fence, written=set(), changed={}, retried=set(),
                                committed=start)
    plain = read_rows(storage, uri)  # (image_id, version, status, uri) of every row, read plainly
    errors: dict[str, int] = {}
    for r in plain:
        if r[2] != "ok":
            errors["read_failed"] = errors.get("read_failed", 0) + 1
    assert (final.rows, final.images, int(final.ok.sum()), final.errors_by_reason()) == \
        (len(plain), len({r[0] for r in plain}), sum(r[2] == "ok" for r in plain), errors) == (3, 3, 3, {})


def _local_output(tmp_path):
    uri = str(tmp_path / "out")
    os.makedirs(uri)
    storage = Storage()
    lease = Lease(storage, uri, "run-repair")
    lease.acquire()
    return uri, storage, lease


def test_a_duplicate_is_not_repaired_onto_a_copy_that_is_listed_but_gone(tmp_path, monkeypatch):
    """The copy chosen to keep (the ok row, in A) was deleted, but the listing still shows A (a
    listing that lags a delete; a paused earlier lease holder): deleting the other copy would
    lose the image. The repair is skipped, with a warning, and the image keeps its row."""
    from fastsam_batch import resume

    uri, storage, lease = _local_output(tmp_path)
    a, b = join_uri(uri, "part-a.parquet"), join_uri(uri, "part-b.parquet")
    put(storage, a, [("x", "v/1", "ok", "x#a")])
    put(storage, b, [("x", "v/1", "error", "x#b"), ("y", "v/1", "ok", "y#b")])
    start = read_committed(uri, storage)
    lagging = resume.list_parts_stamped(uri, storage)
    os.remove(a)
    monkeypatch.setattr(resume, "list_parts_stamped", lambda *_: dict(lagging))
    said: list[str] = []
    repair_at_end(uri, storage, None, fence=lease.fence(), written=set(), changed={}, retried=set(),
                  committed=start, log=said.append)
    monkeypatch.undo()
    assert [r[0] for r in read_rows(storage, uri)] == ["x", "y"]  # x kept (its one copy, in B)
    assert len(said) == 1 and "part-a.parquet" in said[0] and "1 images" in said[0]
    lease.release()


def test_the_end_of_a_run_lists_again_before_it_chooses_the_copy_to_keep(tmp_path, monkeypatch):
    """A copy deleted during the end of the run (after the first listing) is not chosen to keep: the
    output is listed again just before the duplicates are chosen."""
    from fastsam_batch import repair

    uri, storage, lease = _local_output(tmp_path)
    a, b = join_uri(uri, "part-a.parquet"), join_uri(uri, "part-b.parquet")
    put(storage, a, [("x", "v/1", "ok", "x#a")])
    put(storage, b, [("x", "v/1", "error", "x#b"), ("y", "v/1", "ok", "y#b")])
    start = read_committed(uri, storage)
    monkeypatch.setattr(repair, "compact_units_records", lambda *_, **__: os.remove(a))  # meanwhile, A goes
    said: list[str] = []
    final, _, twice = repair_at_end(uri, storage, None, fence=lease.fence(), written=set(), changed={},
                                    retried=set(), completed={"s.tar": "v"}, committed=start, log=said.append)
    assert [r[0] for r in read_rows(storage, uri)] == ["x", "y"] and twice == 0 and not said
    assert (final.rows, final.images, final.parts) == (2, 2, [b])
    lease.release()


def test_the_end_of_a_run_closes_each_index_it_replaces(tmp_path, monkeypatch):
    """Past the bound each index is a scratch file: the start index handed over (``owned``) is closed
    once the refresh replaces it, and so is each one a drop replaces; only the final one is left.
    Not handed over, the caller's index is left alone."""
    from fastsam_batch import index

    monkeypatch.setenv(index.SCRATCH_ENV, str(tmp_path / "scratch"))
    monkeypatch.setattr(index, "MEMORY_ROWS", 2)  # every index of more than 2 rows on disk
    uri, storage, lease = _local_output(tmp_path)
    put(storage, join_uri(uri, "part-a.parquet"), [(f"i{k}", "v/1", "ok", f"i{k}#a") for k in range(5)])
    put(storage, join_uri(uri, "part-b.parquet"), [("i0", "v/1", "ok", "i0#b"), ("j", "v/1", "ok", "j#b")])
    for owned in (False, True):
        start = read_committed(uri, storage)
        assert start.on_disk and os.path.isdir(start._scratch.dir)
        put(storage, join_uri(uri, f"part-c{owned}.parquet"), [(f"n{owned}", "v/1", "ok", "n#c")])  # this run's
        final, _, twice = repair_at_end(uri, storage, None, fence=lease.fence(), written=set(), changed={},
                                        retried=set(), committed=start, owned=owned)
        assert final is not start and os.path.isdir(final._scratch.dir)
        assert os.path.isdir(start._scratch.dir) is not owned
        assert (final.rows, final.images) == (final.images, 7 + owned)
        assert twice == (1 if not owned else 0)
        left = sorted(os.listdir(tmp_path / "scratch"))
        assert len(left) == (1 if owned else 2), left  # the final one (and the caller's, not handed over)
        start.close()
        final.close()
    lease.release()


def test_left_over_rows_of_both_kinds_in_one_file_are_dropped(tmp_path):
    """One file holds a superseded row (image a: its object changed, the new row is committed) and a
    row of an old version of a container now complete: the first drop rewrites the file under a new
    name, and the second must drop from that file (it used to open the deleted one and abort the
    run with FileNotFoundError)."""
    uri, storage, lease = _local_output(tmp_path)

    def put_rows(name: str, rows: list[tuple]) -> str:
        """(image_id, source_version, status, shard) rows."""
        import io

        buf = io.BytesIO()
        pq.write_table(pa.table({
            "image_id": [r[0] for r in rows], "shard": [r[3] for r in rows], "uri": [r[0] for r in rows],
            "source_version": [r[1] for r in rows], "status": [r[2] for r in rows],
            "error": pa.array([None] * len(rows), pa.string()), "run_fingerprint": [FP] * len(rows)}), buf)
        path = join_uri(uri, name)
        storage.fs(path).pipe_file(path, buf.getvalue())
        return path

    both = put_rows("part-p.parquet", [("a", "v/1", "ok", None), ("s.tar/m", "old", "ok", "s.tar"),
                                       ("z", "v/1", "ok", None)])
    put_rows("part-q.parquet", [("a", "v/2", "ok", None), ("s.tar/m", "new", "ok", "s.tar")])
    committed = read_committed(uri, storage)
    superseded = superseded_parts(committed, {"a": "v/2"})
    stale = stale_unit_rows(committed, {"s.tar": "new"})
    assert set(superseded) == set(stale) == {both}
    after = drop_left_over_rows(uri, storage, committed, superseded, stale, fence=lease.fence())
    plain = read_rows(storage, uri)
    assert [(r[0], r[1]) for r in plain] == [("a", "v/2"), ("s.tar/m", "new"), ("z", "v/1")]
    again = read_committed(uri, storage)
    assert (after.parts, after.rows, after.images) == (again.parts, again.rows, again.images) == \
        (again.parts, 3, 3)
    lease.release()


def test_a_run_that_lost_its_lease_rewrites_and_deletes_nothing(output):
    uri, storage, fence = output
    put(storage, join_uri(uri, "part-a.parquet"), [("a", "v/1", "ok", "a#0"), ("a", "v/2", "ok", "a#1")])
    put(storage, join_uri(uri, "part-b.parquet"), [("a", "v/2", "ok", "a#2")])
    for units in ([("s1", "v", 1)], [("s2", "v", 2)]):
        write_units_record(uri, storage, FP, units, fence)
    Lease(storage, uri, "run-other").acquire(break_lease=True)  # another run takes the lease over
    fs = storage.fs(uri)
    fs.invalidate_cache()
    listing = sorted(fs.find(uri))
    committed = read_committed(uri, storage)
    with pytest.raises(LeaseLost):
        drop_superseded_rows(uri, storage, superseded_parts(committed, {"a": "v/2"}), fence=fence)
    with pytest.raises(LeaseLost):
        remove_duplicates(uri, storage, duplicate_rows(committed), fence=fence)
    with pytest.raises(LeaseLost):
        compact_units_records(uri, storage, fence=fence)
    with pytest.raises(LeaseLost):
        remove_files(storage, committed.parts, fence=fence)
    with pytest.raises(LeaseLost):
        repair_at_start(uri, storage, committed, "zstd", fence=fence)
    if not uri.startswith("s3://"):
        (Path(uri) / "_tmp-left-by-a-kill").write_bytes(b"")
        with pytest.raises(LeaseLost):
            remove_stale_temporaries(uri, storage, fence=fence)
        (Path(uri) / "_tmp-left-by-a-kill").unlink()
    fs.invalidate_cache()
    assert sorted(fs.find(uri)) == listing


# The invariant under kills ------------------------------------------------------------------------

class _Kill:
    """Counts storage operations (a file opened for writing, each write to it, rename, delete) and
    SIGKILLs this process at the ``at``-th (a write is cut after half its bytes). ``at`` 0: count only."""

    def __init__(self, at: int = 0):
        self.at, self.n = at, 0

    def step(self) -> bool:
        self.n += 1
        return self.n == self.at

    def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class _Writer:
    def __init__(self, f, kill: _Kill):
        self._f, self._kill = f, kill

    def write(self, data):
        if self._kill.step():
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            self._kill.die()
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextmanager
def storage_operations(kill: _Kill):
    """The local filesystem's mutating calls wrapped by ``kill`` (test code only: production is not
    touched). fsspec's LocalFileSystem and write.put_atomic go through these. Only calls from this
    thread and from threads started inside the block count: the patch is process-wide, and a thread
    that was already running (another test's folder removed in the background) must not add
    operations the forked repair never makes."""
    real_open, real = builtins.open, {n: getattr(os, n) for n in ("replace", "rename", "remove", "unlink", "rmdir")}
    real_rmtree = shutil.rmtree
    others = set(threading.enumerate()) - {threading.current_thread()}  # (objects: an id can be reused)

    def counts() -> bool:
        return threading.current_thread() not in others

    def wrapped(fn):
        def call(*a, **k):
            if counts() and kill.step():
                kill.die()
            return fn(*a, **k)
        return call

    def open_(file, mode="r", *a, **k):
        if counts() and any(c in mode for c in "wax+"):
            if kill.step():
                kill.die()
            return _Writer(real_open(file, mode, *a, **k), kill)
        return real_open(file, mode, *a, **k)

    builtins.open = open_
    for n, fn in real.items():
        setattr(os, n, wrapped(fn))
    shutil.rmtree = wrapped(real_rmtree)
    try:
        yield kill
    finally:
        builtins.open = real_open
        for n, fn in real.items():
            setattr(os, n, fn)
        shutil.rmtree = real_rmtree


def repair_everything(out: str, current: dict[str, str]) -> None:
    """The start-of-run and end-of-run repairs a run makes, in its order, and the compaction."""
    storage = Storage()
    fence = _fence(out)
    committed, _ = repair_at_start(out, storage, read_committed(out, storage), "zstd", fence=fence)
    drop_superseded_rows(out, storage, superseded_parts(committed, current), "zstd", fence=fence)
    compact_units_records(out, storage, fence=fence)
    final, _, _ = repair_at_end(out, storage, "zstd", fence=fence, written=set(), changed=current, retried=set())
    save_index(out, storage, final, fence=fence)  # the next start reads it (and a kill may cut it short)


def _fence(out: str):
    return Lease(Storage(), out, "run-invariant").fence()


def killed_repair(out: str, current: dict[str, str], at: int) -> bool:
    """The repairs in a forked child SIGKILLed at its ``at``-th storage operation; True if it was."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            with storage_operations(_Kill(at)):
                repair_everything(out, current)
        except BaseException:  # noqa: BLE001 - reported to the parent by the exit code
            import traceback

            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the repair raised (see stderr)"
    return False


@st.composite
def outputs(draw):
    """An output as runs cut short, two runs at once and changed objects leave it: rows of one image
    in several files or twice in one file, rows of older versions of an object, ``_units/`` records
    of completed containers in several files, a temporary file of a killed writer; and whether an
    index of it was saved (saved_index.py) before the repairs."""
    files = draw(st.integers(1, 4))
    rows: dict[int, list[tuple]] = {}
    current = {}
    for i in range(draw(st.integers(1, 7))):
        image = f"img{i}.png"
        current[image] = draw(st.sampled_from(["e1/10", "e2/20"]))
        versions = [current[image]] if draw(st.integers(0, 4)) else []  # else changed, not yet redone
        versions += ["e0/5"] * draw(st.integers(0 if versions else 1, 1))
        for v in versions:
            for n in range(draw(st.integers(1, 3))):
                ok = draw(st.booleans())
                rows.setdefault(draw(st.integers(0, files - 1)), []).append(
                    (image, v, "ok" if ok else "error", f"{image}@{v}#{n}{'ok' if ok else 'err'}"))
    records = draw(st.lists(st.lists(st.tuples(st.sampled_from(["s1.tar", "s2.tar", "s3.tar"]),
                                               st.sampled_from(["v1", "v2"]), st.integers(1, 3)),
                                     min_size=1, max_size=3), max_size=3))
    kills = draw(st.lists(st.integers(0, 2**32), min_size=1, max_size=2))  # seeds of the kill points
    return rows, current, records, draw(st.booleans()), kills, draw(st.booleans())


def make_output(out: Path, rows: dict[int, list[tuple]], records: list, tmp_file: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    storage = Storage()
    for f, rs in rows.items():  # named as the writer names its files: by the ids they hold
        put(storage, str(out / part_name([r[0] for r in rs])), rs)
    lease_fence = _fence(str(out))
    for units in records:
        write_units_record(str(out), storage, FP, units, lease_fence)
    if tmp_file:
        (out / "_tmp-killed-writer").write_bytes(b"PAR1 half a file")


def units_of(out: str) -> set:
    complete, _ = read_units_records(out, Storage())
    return {(u, v, fp, n) for u, by in complete.items() for (v, fp), n in by.items()}


def test_any_kill_during_the_repairs_then_a_rerun_leaves_exactly_one_row_per_image(tmp_path):
    kill_points = []

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(outputs())
    def check(case):
        rows, current, records, tmp_file, kills, saved = case
        base = Path(os.path.realpath(tmp_path)) / f"case{len(kill_points)}-{os.urandom(4).hex()}"
        out = base / "out"
        lease = Lease(Storage(), str(out), "run-invariant")
        lease.acquire()
        try:
            make_output(out, rows, records, tmp_file)
            images_before = {r[0] for r in read_rows(Storage(), str(out))}
            current_before = {r[0]: r for r in read_rows(Storage(), str(out)) if r[1] == current[r[0]]}
            units_before = units_of(str(out))
            # The operations a whole repair makes, counted on a copy: the kill points are spread over them.
            shutil.copytree(out, base / "count")
            with storage_operations(_Kill()) as counted:
                repair_everything(str(base / "count"), current)
            if saved:  # an index saved before the repairs: each start reads it, then the files it does not cover
                c = read_committed(str(out), Storage())
                save_index(str(out), Storage(), c, fence=_fence(str(out)))
                c.close()
            for seed in kills:
                at = random.Random(seed).randint(1, max(1, counted.n))
                if killed_repair(str(out), current, at):
                    kill_points.append(at)
                now = read_rows(Storage(), str(out))
                # Never fewer: every image that had a row still has one, of the version it had now.
                assert {r[0] for r in now} == images_before
                assert {r[0] for r in now if r[1] == current[r[0]]} == set(current_before)
                assert units_of(str(out)) >= units_before
            repair_everything(str(out), current)  # the next run, not killed
            final = read_rows(Storage(), str(out))
            # the index a start reads (the saved one, and the files it does not cover) is the files' own
            assert index_rows(read_committed(str(out), Storage())) == index_rows(plain_read(str(out), Storage()))
            assert sorted(r[0] for r in final) == sorted(images_before)  # exactly one row per image
            for image_id, _, status, payload in final:
                if image_id in current_before:
                    assert payload.startswith(f"{image_id}@{current[image_id]}#")  # the current version's
                    had_ok = any(r[0] == image_id and r[1] == current[image_id] and r[2] == "ok"
                                 for rs in rows.values() for r in rs)
                    assert status == ("ok" if had_ok else "error")  # an ok row kept where there was one
            assert not duplicate_rows(read_committed(str(out), Storage()))
            assert units_of(str(out)) == units_before
            assert len(read_units_records(str(out), Storage())[1]) <= 1  # one record per fingerprint
            assert not list(out.glob("_tmp-*")) and not list(out.glob(f"{UNITS_DIR}/_tmp-*"))
        finally:
            lease.release()
            shutil.rmtree(base)

    check()
    assert len(kill_points) >= 20, kill_points
    print(f"killed at {len(kill_points)} points (operation numbers): {kill_points}")
