"""Issue 23: writers beside the workers (writers.py): K writers stage files, the driver publishes.

Pure (no Ray): the writers' logic (writers.BlockWriter) and the driver's (writers.Ledger) with the
run's real Parquet encoding into a temporary folder, and S3 staging and publishing against the moto
server (tests/conftest.py), through the fault proxy where an answer is lost. The Ray side (writer
actors, a writer killed, a lease taken over, Ctrl-C, 4 writers against 1) is in the end-to-end
tests that already run the pipeline: test_e2e.py (4 writers against 1), test_reliability.py (chaos:
4 writers on S3, a writer and segmentation actors killed, the driver killed, resumed),
test_lease.py (a takeover with 4 writers), test_failing_well.py (Ctrl-C with 4 writers).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_bucket
from fastsam_batch import writers as W
from fastsam_batch.lease import Lease, LeaseLost
from fastsam_batch.manifest import ManifestError, parse_manifest
from fastsam_batch.repair import remove_stale_temporaries
from fastsam_batch.schema import UNIT_END, UNIT_SKIPPED
from fastsam_batch.sizing import plan_writers
from fastsam_batch.storage import Storage
from test_file_size import REALISTIC, photos

MIB = 1 << 20


def published_ids(folder, names: list[str]) -> list[str]:
    return [i for n in names for i in pq.read_table(os.path.join(folder, n), columns=["image_id"])
            .column("image_id").to_pylist()]


class Run:
    """K in-process writers and a ledger on a local folder, the driver's loop played by hand: a
    writer's answer can be handled, or lost (the writer dies with it)."""

    def __init__(self, folder, k: int, target=MIB, rows_per_file=None, run_id="run-a"):
        self.folder, self.storage, self.run_id = str(folder), Storage(), run_id
        self.names: list[str] = []
        self.units: list[tuple[str, str, int]] = []
        self.unit_rows: list[int] = []
        self.ledger = W.Ledger(lambda s: W.publish(self.storage, s), lambda row: self.names.append(row["file"]),
                               on_unit_end=lambda rows, skipped: self.unit_rows.append(rows),
                               on_units_complete=self.units.extend)
        self.args = (target, rows_per_file)
        self.writers = [self._writer(i) for i in range(k)]

    def _writer(self, i):
        return W.BlockWriter(i, self.folder, self.storage, "zstd", self.args[1], 3600, self.args[0], run_id=self.run_id)

    def send(self, block: pa.Table, i: int, answer: bool = True) -> dict:
        seq = self.ledger.add(block, i, size=block.num_rows)
        got = self.writers[i].add(seq, block)
        if answer:
            self.ledger.answered(got)
        return got

    def die(self, i: int, to) -> None:
        """Writer ``i`` dies (what it holds and any answer not handled are lost); its blocks go to ``to``."""
        self.writers[i] = self._writer(i)
        for seq, block, _, _, skip in self.ledger.resend(i, lambda seq: to):
            self.ledger.answered(self.writers[to].add(seq, block, skip))

    def flush(self) -> None:
        for w in self.writers:
            self.ledger.answered(w.flush())


def test_four_writers_publish_every_row_exactly_once_in_order_also_when_one_dies(tmp_path):
    """Blocks of ~100-mask photo rows spread over 4 writers (1 MiB files): every row in exactly one
    published file, each file at most the target, the rows of a block in order; writer 2 dies with
    an answer lost (the files it staged of the rows it held, never reported): its blocks are sent to
    writer 0 without the rows already published, so still every row once, nothing repeated. The
    lost answer's file stays a temporary file (invisible to readers: pyarrow, polars and DuckDB read
    part-*.parquet), removed as the run's own, or by the next run's start; every block let go."""
    rng = np.random.default_rng(32)
    run = Run(tmp_path / "out", 4)
    blocks, first = [], 0
    for k, size in enumerate([8, 3, 16, 5] * 10):
        blocks.append(photos(first, size, rng, alphabet=REALISTIC))
        first += size
    for k, b in enumerate(blocks):
        run.send(b, k % 4)
    lost = run.writers[2].flush()  # writer 2 stages what it holds, and dies before its answer is handled
    assert lost["staged"], "the lost answer should hold a staged file"
    staged_and_lost = [s.tmp for s in lost["staged"]]
    assert all(os.path.exists(p) for p in staged_and_lost)
    run.die(2, to=0)
    run.flush()
    fed = [i for b in blocks for i in b.column("image_id").to_pylist()]
    got = published_ids(run.folder, run.names)
    assert sorted(got) == sorted(fed) and len(got) == len(set(got))  # exactly once
    assert not run.ledger.blocks  # every block's reference let go
    assert all(os.path.getsize(os.path.join(run.folder, n)) <= MIB for n in run.names)
    in_files = published_ids(run.folder, run.names)  # the rows of each block: in order, file after file
    for block in blocks:
        mine = set(block.column("image_id").to_pylist())
        assert [i for i in in_files if i in mine] == block.column("image_id").to_pylist()
    left = [n for n in os.listdir(run.folder) if not n.startswith("part-")]
    assert left and all(n.startswith(f"_tmp-{run.run_id}-") for n in left)
    assert sorted(left) == sorted(os.path.basename(p) for p in staged_and_lost)
    assert W.remove_own_temporaries(run.folder, "another-run") == 0
    assert W.remove_own_temporaries(run.folder, run.run_id) == len(left)
    assert sorted(os.listdir(run.folder)) == sorted(run.names)


def test_a_block_partly_published_when_its_writer_dies_is_sent_again_without_those_rows(tmp_path):
    """One block of 12 rows, files of 5 rows: writer 0 publishes two files (10 rows) and dies with 2
    waiting; writer 1 gets the block again and skips the 10 published rows."""
    rng = np.random.default_rng(4)
    run = Run(tmp_path / "out", 2, target=None, rows_per_file=5)
    block = photos(0, 12, rng)
    run.send(block, 0)
    assert len(run.names) == 2 and run.ledger.blocks[0].published == 10
    run.die(0, to=1)
    run.flush()
    got = published_ids(run.folder, run.names)
    assert got == block.column("image_id").to_pylist()  # once each, in order
    assert not run.ledger.blocks


def test_a_repeated_row_is_removed_by_the_duplicate_repair(tmp_path):
    """Where a row is published twice anyway (a block sent again while its first file's publish was
    in flight and then landed: not a path the ledger takes, but the output's invariant must not
    depend on it), the duplicate repair at a run's end keeps one row per image."""
    from fastsam_batch.index import duplicate_rows
    from fastsam_batch.repair import remove_duplicates
    from fastsam_batch.resume import read_committed

    rng = np.random.default_rng(5)
    run = Run(tmp_path / "out", 2, target=None, rows_per_file=4)
    block, other = photos(0, 6, rng), photos(100, 2, rng)
    run.send(block, 0)
    run.send(other, 1)  # waiting in writer 1: the block's rows are cut differently there
    published = run.ledger.blocks[0].published
    assert published == 4
    run.ledger.blocks[0].published = 0  # as if the first file's publish had not been counted
    run.die(0, to=1)
    run.flush()
    ids = published_ids(run.folder, run.names)
    assert len(ids) == 8 + published and len(set(ids)) == 8
    storage = Storage()
    lease = Lease(storage, run.folder, "run-repair")
    lease.acquire()
    committed = read_committed(run.folder, storage)
    twice = duplicate_rows(committed)
    assert remove_duplicates(run.folder, storage, twice, fence=lease.fence()) == published
    lease.release()
    ids = pq.read_table(run.folder, columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == sorted(block.column("image_id").to_pylist() + other.column("image_id").to_pylist())


def test_containers_complete_once_across_writers_and_a_block_sent_again(tmp_path):
    """Two tar shards whose rows go to different writers; each shard's end-of-unit row counted once
    (also when its block is sent again after its writer died), each shard complete once, only after
    the file holding its last member is published."""
    rng = np.random.default_rng(6)
    run = Run(tmp_path / "out", 3, target=None, rows_per_file=4)

    def unit_rows(t: pa.Table, unit: str, end: int) -> pa.Table:
        n = t.num_rows
        t = t.set_column(t.schema.get_field_index("shard"), "shard", pa.array([unit] * n, pa.string()))
        t = t.set_column(t.schema.get_field_index("source_version"), "source_version", pa.array(["v1"] * n))
        return t.append_column(UNIT_END, pa.array([end] * n, pa.int64())).append_column(
            UNIT_SKIPPED, pa.array([0] * n, pa.int64()))

    a1, a2 = unit_rows(photos(0, 3, rng), "a.tar", -1), unit_rows(photos(3, 3, rng), "a.tar", -1)
    a_end = unit_rows(photos(10**6, 1, rng), "a.tar", 6)
    b1 = unit_rows(photos(6, 2, rng), "b.tar", -1)
    b_end = unit_rows(photos(10**6 + 1, 1, rng), "b.tar", 2)
    run.send(a1, 0)
    run.send(pa.concat_tables([a2, a_end]), 1)  # a's end rides with its last rows, on another writer
    run.send(pa.concat_tables([b1, b_end]), 2)  # b's end counted; its 2 rows wait in writer 2
    assert run.unit_rows == [6, 2] and run.units == []  # rows wait in the writers (files of 4)
    run.die(2, to=0)  # writer 2 dies: b's block, end row included, sent again: its end not counted again
    assert run.unit_rows == [6, 2]
    run.flush()
    assert sorted(u for u, _, _ in run.units) == ["a.tar", "b.tar"]  # each once
    assert sorted(run.unit_rows) == [2, 6]
    got = published_ids(run.folder, run.names)
    assert sorted(got) == sorted(i for t in (a1, a2, b1) for i in t.column("image_id").to_pylist())


def test_a_publish_refused_by_the_fence_makes_nothing_visible(tmp_path):
    """The driver publishes behind the lease fence: once another run holds the lease, a staged file
    is refused (LeaseLost) and never becomes a part file; the staged temporary is the run's own."""
    storage = Storage()
    out = tmp_path / "out"
    lease = Lease(storage, str(out), "run-old")
    lease.acquire()
    fence = lease.fence()
    names: list[str] = []

    def publish(s):
        fence.check(storage)
        W.publish(storage, s)

    ledger = W.Ledger(publish, lambda row: names.append(row["file"]))
    w = W.BlockWriter(0, str(out), storage, "zstd", 2, 3600, None, run_id="run-old")
    rng = np.random.default_rng(7)
    ledger.answered(w.add(ledger.add(None, 0), photos(0, 2, rng)))
    assert len(names) == 1
    Lease(storage, str(out), "run-new").acquire(break_lease=True)
    answer = w.add(ledger.add(None, 0), photos(2, 2, rng))
    with pytest.raises(LeaseLost):
        ledger.answered(answer)
    assert len(names) == 1 and sorted(p.name for p in out.glob("part-*")) == names
    assert len(list(out.glob("_tmp-run-old-*"))) == 1


def test_s3_a_staged_file_is_invisible_until_published_and_a_lost_completion_is_recognised(
        s3fs_client, s3_env, monkeypatch):
    """On S3 a staged file is an open multipart upload (parts of PART_BYTES, the last smaller): no
    object until the driver completes it. A completion that landed but whose answer was lost
    (retried, NoSuchUpload) is recognised by the object's ETag; an upload never completed (a killed
    run's) is aborted by the next run's start, behind the fence."""
    from s3_fault_proxy import FaultProxy

    monkeypatch.setattr(W, "PART_BYTES", 5 * MIB)
    make_bucket(s3_env, "staging")
    opts = {"key": s3_env["AWS_ACCESS_KEY_ID"], "secret": s3_env["AWS_SECRET_ACCESS_KEY"]}
    out = "s3://staging/masks"
    data = os.urandom(11 * MIB)

    lost = []

    def completion(method, path, headers):  # the first CompleteMultipartUpload: applied, its answer lost
        if method == "POST" and "uploadId=" in path and not lost:
            lost.append(path)
            return "applied-500"
        return None

    with FaultProxy(s3_env["AWS_ENDPOINT_URL"], [None], rule=completion) as proxy:
        storage = Storage({**opts, "endpoint_url": proxy.url})
        where = W.stage_bytes(storage, f"{out}/part-a.parquet", data)
        assert len(where["etags"]) == 3
        s3fs_client.invalidate_cache()
        assert not s3fs_client.exists("staging/masks/part-a.parquet")
        assert [k for k, _ in W.open_uploads(out, storage)] == ["masks/part-a.parquet"]
        W.publish(storage, W.Staged("part-a.parquet", f"{out}/part-a.parquet", {}, [], [], **where))
        assert proxy.injected["applied-500"] == 1
    s3fs_client.invalidate_cache()
    assert s3fs_client.cat_file("staging/masks/part-a.parquet") == data
    storage = Storage({**opts, "endpoint_url": s3_env["AWS_ENDPOINT_URL"]})
    assert W.open_uploads(out, storage) == []
    W.stage_bytes(storage, f"{out}/part-b.parquet", b"never published")  # a killed run's
    lease = Lease(storage, out, "run-next")
    lease.acquire()
    other = Lease(storage, out, "run-other")
    other.acquire(break_lease=True)
    with pytest.raises(LeaseLost):  # only the lease holder aborts
        remove_stale_temporaries(out, storage, fence=lease.fence())
    assert len(W.open_uploads(out, storage)) == 1
    assert remove_stale_temporaries(out, storage, fence=other.fence()) == 1
    assert W.open_uploads(out, storage) == [] and not s3fs_client.exists("staging/masks/part-b.parquet")
    other.release()


def test_writers_setting_is_validated_and_auto_follows_the_cluster():
    base = {"name": "w", "input": {"uri": "/tmp/in"}, "model": {"checkpoint": "/tmp/c.pt"}}
    for bad in (0, 257, "four", 1.5, True):
        with pytest.raises(ManifestError, match="output.writers"):
            parse_manifest({**base, "output": {"uri": "/tmp/out", "writers": bad}})
    assert parse_manifest({**base, "output": {"uri": "/tmp/out"}}).output.writers == "auto"
    assert parse_manifest({**base, "output": {"uri": "/tmp/out", "writers": 4}}).output.writers == 4
    assert plan_writers(4, 0, True, 2) == (4, "output.writers")  # a number is taken as given
    assert plan_writers("auto", 0, False, 2)[0] == 1
    assert plan_writers("auto", 8, False, 2)[0] == 3
    assert plan_writers("auto", 1000, False, 64)[0] == 16
    k, why = plan_writers("auto", 32, True, 8)
    assert k == 4 and "half the driver node's 8 cores" in why
