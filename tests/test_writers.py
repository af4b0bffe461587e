"""Issue 23: writers beside the workers (writers.py): K writers stage files, the driver publishes.

Pure (no Ray): the writers' logic (writers.BlockWriter) and the driver's (writers.Ledger) with the
run's real Parquet encoding into a temporary folder, and S3 staging and publishing against the moto
server (tests/conftest.py), through the fault proxy where an answer is lost. The driver's loop
itself (pipeline.WriterPool) with real writer actors on a local Ray of this module's own, blocks
put in its object store: a writer killed holding rows, a writer hung (an S3 put held by the proxy),
deaths in a row between published files, the first and second Ctrl-C, files cut by rows and by
time. The whole run with writers is in the end-to-end tests: test_e2e.py (4 writers against 1),
test_reliability.py (chaos: 4 writers on S3, a writer and segmentation actors killed, the driver
killed, resumed), test_lease.py (a takeover with 4 writers), test_failing_well.py (Ctrl-C with 4
writers).
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
from s3_fault_proxy import FaultProxy
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


def test_a_block_that_keeps_killing_its_writer_stops_the_run_naming_it(tmp_path):
    """A block whose writer dies each time it holds it (e.g. out of memory on it) is not sent round
    the writers for ever: the BLOCK_DEATHS-th resend goes, the next one stops the run naming the
    block; a block with a writer only once is not counted against it."""
    rng = np.random.default_rng(5)
    run = Run(tmp_path / "out", 2, target=None, rows_per_file=50)
    poison, fine = photos(0, 3, rng), photos(3, 3, rng)
    run.send(poison, 0)
    run.send(fine, 1)
    holder = 0
    for _ in range(W.BLOCK_DEATHS):
        run.die(holder, to=1 - holder)  # the block goes to the other writer, which then dies with it
        holder = 1 - holder
    assert run.ledger.blocks[0].deaths == W.BLOCK_DEATHS and run.ledger.blocks[1].deaths < W.BLOCK_DEATHS
    with pytest.raises(W.BlockDeaths, match=rf"output block 0 was with a writer each of the {W.BLOCK_DEATHS + 1} "
                                            "times one died or hung holding it"):
        run.die(holder, to=1 - holder)


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


def test_s3_a_staged_file_is_invisible_until_published_and_a_lost_completion_answer_is_retried(
        s3fs_client, s3_env, monkeypatch):
    """On S3 a staged file is an open multipart upload (parts of PART_BYTES, the last smaller): no
    object until the driver completes it. A completion that landed but whose answer was lost is
    retried (moto answers the repeat with success; a NoSuchUpload answer: the test after this one);
    an upload never completed (a killed run's) is aborted by the next run's start, behind the fence."""
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


def _completions(answers: list[str]):
    """A proxy rule: the CompleteMultipartUpload requests (POST ...?uploadId=) answered, in turn, with
    ``answers`` (then forwarded as they are)."""
    left = list(answers)

    def rule(method, path, headers):
        if method == "POST" and "uploadId=" in path and left:
            return left.pop(0)
        return None
    return rule


def test_s3_a_completion_answered_no_such_upload_is_published_only_when_the_object_is_this_uploads(
        s3fs_client, s3_env, monkeypatch):
    """What S3 may answer a retried CompleteMultipartUpload whose first try landed: NoSuchUpload.
    publish then reads the object there: this upload's (the ETag S3 gives a multipart object, from
    the staged parts' ETags): published; no object (an upload aborted, never completed): an error
    that says so; another object of that name: an error naming both ETags. Under SSE-KMS (the ETag
    opaque) by the object's shape: parts count and sizes."""
    monkeypatch.setattr(W, "PART_BYTES", 5 * MIB)
    make_bucket(s3_env, "nsu")
    opts = {"key": s3_env["AWS_ACCESS_KEY_ID"], "secret": s3_env["AWS_SECRET_ACCESS_KEY"]}
    out = "s3://nsu/masks"
    data = os.urandom(11 * MIB)

    def publish_with(answers: list[str], name: str, before=None):
        with FaultProxy(s3_env["AWS_ENDPOINT_URL"], [None], rule=_completions(answers)) as proxy:
            storage = Storage({**opts, "endpoint_url": proxy.url})
            where = W.stage_bytes(storage, f"{out}/{name}", data)
            if before is not None:
                before()
            try:
                W.publish(storage, W.Staged(name, f"{out}/{name}", {}, [], [], **where))
            finally:
                s3fs_client.invalidate_cache()
            return proxy.injected

    # the first completion landed, its answer lost; the retry told NoSuchUpload: this upload's object
    injected = publish_with(["applied-500", "nosuchupload"], "part-a.parquet")
    assert injected["applied-500"] == 1 and injected["nosuchupload"] == 1
    assert s3fs_client.cat_file("nsu/masks/part-a.parquet") == data

    # never completed (aborted meanwhile), nothing there
    with pytest.raises(OSError, match=r"part-b.parquet: its multipart upload is gone \(NoSuchUpload\) and no "
                                      r"object is there \(the upload was aborted, not completed\)"):
        publish_with(["nosuchupload"], "part-b.parquet")
    assert not s3fs_client.exists("nsu/masks/part-b.parquet")

    # another object of that name (a plain PUT of other bytes)
    with pytest.raises(OSError, match=r"part-c.parquet: its multipart upload is gone \(NoSuchUpload\) and the "
                                      r"object there is another \(ETag .*, not .*-3.*\)"):
        publish_with(["nosuchupload"], "part-c.parquet",
                     before=lambda: s3fs_client.pipe_file("nsu/masks/part-c.parquet", b"another file"))
    assert s3fs_client.cat_file("nsu/masks/part-c.parquet") == b"another file"  # left as it was

    # SSE-KMS: an object of this upload's shape (3 parts: 5 + 5 + 1 MiB) is taken as this one's
    # (documented: the same name holds the same image ids); one of another shape is refused
    def kms_upload(name: str, sizes: list[int]):
        key = f"masks/{name}"
        c = s3fs_client
        upload = c.call_s3("create_multipart_upload", Bucket="nsu", Key=key, ServerSideEncryption="aws:kms")["UploadId"]
        parts = [{"PartNumber": n, "ETag": c.call_s3("upload_part", Bucket="nsu", Key=key, UploadId=upload,
                                                     PartNumber=n, Body=os.urandom(size))["ETag"]}
                 for n, size in enumerate(sizes, 1)]
        c.call_s3("complete_multipart_upload", Bucket="nsu", Key=key, UploadId=upload,
                  MultipartUpload={"Parts": parts})

    publish_with(["nosuchupload"], "part-d.parquet", before=lambda: kms_upload("part-d.parquet", [5 * MIB, 5 * MIB, MIB]))
    with pytest.raises(OSError, match=r"part-e.parquet: .*\(SSE-KMS: its ETag is opaque\) is not of its shape "
                                      r"\(2 parts, 11534336 bytes; staged: 3 parts"):
        publish_with(["nosuchupload"], "part-e.parquet", before=lambda: kms_upload("part-e.parquet", [5 * MIB, 6 * MIB]))


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


# The real WriterPool (pipeline.py) on a Ray of this module's own -----------------------------------


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of this module's own (address="local": never a cluster `ray start` runs here), in a
    temp folder of its own (short: Ray's socket paths), on the free ports Ray picks; shut down after."""
    import shutil
    import tempfile

    import ray

    temp = tempfile.mkdtemp(prefix="fsb-wp-", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", _temp_dir=temp)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.02)


class Blocks:
    """What WriterPool.run takes from Ray Data (``_execute_to_iterator``: reference bundles), one block
    a bundle, the tables put in the object store. ``before(k)`` runs before the k-th is handed on, in
    the pool's producer thread, while the pool works: where a test waits for a condition and acts."""

    def __init__(self, tables: list, before=None, refs: list | None = None):
        import ray

        self.tables = tables
        self.refs = refs or [ray.put(t) for t in tables]
        self.before = before or (lambda k: None)

    def _execute_to_iterator(self):
        return self._bundles(), None, None

    def _bundles(self):
        from types import SimpleNamespace as NS

        for k, (ref, t) in enumerate(zip(self.refs, self.tables)):
            self.before(k)
            yield NS(blocks=[NS(ref=ref, metadata=NS(num_rows=t.num_rows))], slices=None)


def pool_for(out: str, k: int, storage: Storage | None = None, rows_per_file: int | None = None,
             interval_s: float = 3600, **kw):
    """The run's WriterPool with ``k`` writer actors and a Ledger publishing into ``out``; the names of
    the files published, in order."""
    from fastsam_batch.pipeline import WriterPool

    storage = storage or Storage()
    names: list[str] = []
    ledger = W.Ledger(lambda s: W.publish(storage, s), lambda row: names.append(row["file"]))
    output = {"uri": out, "writers": k, "commit_interval_s": interval_s}
    if rows_per_file:
        output["rows_per_file"] = rows_per_file
    m = parse_manifest({"name": "pool", "input": {"uri": "/nonexistent"}, "model": {"checkpoint": "/nonexistent.pt"},
                        "output": output})
    pool = WriterPool(m, storage, k, ledger, local_output=not out.startswith("s3://"), run_id="pool-run", **kw)
    return pool, names


def ids_of(tables) -> list[str]:
    return [i for t in tables for i in t.column("image_id").to_pylist()]


def kill_writer(pool, i: int) -> int:
    """SIGKILL of writer ``i``'s process (this module's Ray's; asked from the producer thread)."""
    import signal

    import ray

    pid = ray.get(pool.handles[i].pid.remote(), timeout=120)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_pool_a_writer_killed_holding_rows_has_its_blocks_written_by_its_replacement_exactly_once(ray_local,
                                                                                                   tmp_path):
    """2 writers, files only at the end (commit_interval_s 3600): once writer 1 has answered for a
    block whose rows it holds, its process is SIGKILLed mid-stream. The pool finds it dead (its next
    call fails), starts another, sends it the blocks writer 1 held; every row is published exactly
    once, every block let go, no temporary left."""
    rng = np.random.default_rng(81)
    tables = [photos(10 * k, 5, rng) for k in range(8)]
    out = str(tmp_path / "out")
    pool, names = pool_for(out, 2)
    killed = []

    def before(k):
        if k == 4:
            wait_for(lambda: any(b.writer == 1 and b.rows for b in list(pool.ledger.blocks.values())),
                     "writer 1 to hold rows")
            killed.append(kill_writer(pool, 1))

    pool.run(Blocks(tables, before))
    assert len(killed) == 1 and pool.died == 1 and pool.hung == 0
    got = published_ids(out, names)
    assert sorted(got) == sorted(ids_of(tables)) and len(got) == len(set(got))
    assert not pool.ledger.blocks
    assert sorted(os.listdir(out)) == sorted(names)  # only the published files (writer 1 staged none: files at the end)


def test_pool_a_hung_writer_is_killed_replaced_and_what_it_staged_never_published(ray_local, s3_env, s3fs_client,
                                                                                   tmp_path):
    """S3 output through a proxy that holds every part upload unanswered (a put that hangs) until the
    pool has found a writer hung (its oldest call unanswered for hang_s): that writer is killed, a
    new one started, its blocks sent again; then the proxy lets the uploads go. Every row exactly
    once, and the hung writer's upload (open, never completed) aborted as the run ends."""
    import threading

    from s3_fault_proxy import FaultProxy

    make_bucket(s3_env, "hung")
    out = "s3://hung/masks"
    rng = np.random.default_rng(82)
    tables = [photos(10 * k, 4, rng) for k in range(4)]
    opts = {"key": s3_env["AWS_ACCESS_KEY_ID"], "secret": s3_env["AWS_SECRET_ACCESS_KEY"]}

    def holds(method, path, headers):
        return "hold" if method == "PUT" and "partNumber=" in path else None

    with FaultProxy(s3_env["AWS_ENDPOINT_URL"], [None], rule=holds) as proxy:
        storage = Storage({**opts, "endpoint_url": proxy.url})
        pool, names = pool_for(out, 2, storage, rows_per_file=4, hang_s=10,
                               clean_s3=lambda: W.abort_uploads(out, storage, W.open_uploads(out, storage)))

        def releaser():
            wait_for(lambda: pool.hung >= 1, "a writer found hung", timeout=300)
            proxy.release()

        t = threading.Thread(target=releaser, daemon=True)
        t.start()
        try:
            pool.run(Blocks(tables))
        finally:
            proxy.release()  # the test's own failure: nothing left held
        t.join()
        assert proxy.injected["hold"] >= 1
    assert pool.hung >= 1 and pool.died >= pool.hung
    import ray

    assert pool.nodes == [ray.get_runtime_context().get_node_id()]  # a remote output: placed on nodes with CPUs
    direct = Storage({**opts, "endpoint_url": s3_env["AWS_ENDPOINT_URL"]})
    s3fs_client.invalidate_cache()
    got = [i for n in names for i in pq.read_table(f"hung/masks/{n}", filesystem=s3fs_client, columns=["image_id"])
           .column("image_id").to_pylist()]
    assert sorted(got) == sorted(ids_of(tables)) and len(got) == len(set(got))
    assert sorted(p.rsplit("/", 1)[-1] for p in s3fs_client.ls("hung/masks/")) == sorted(set(names))
    assert W.open_uploads(out, direct) == []


def test_pool_deaths_count_in_a_row_between_published_files(ray_local, tmp_path):
    """The bound is on writer deaths in a row with no file published in between (a day-long run on
    spot nodes outlives any number that each let it go on): with max_deaths 2, a writer killed 3 times,
    each time after every block so far was published (files of one row), is replaced each time and
    the run ends with every row once; 3 kills in a row with nothing published (files only at the
    end) stop the run with one line, after its temporaries are removed."""
    from fastsam_batch.pipeline import WritersLost

    rng = np.random.default_rng(83)
    tables = [photos(10 * k, 1, rng) for k in range(8)]
    out = str(tmp_path / "goes-on")
    pool, names = pool_for(out, 1, rows_per_file=1, max_deaths=2)
    killed = []

    def before(k):
        if k in (2, 4, 6):  # every block so far published (so the last death, if any, was noticed)
            wait_for(lambda: len(names) == k, f"{k} files published")
            killed.append(kill_writer(pool, 0))

    pool.run(Blocks(tables, before))
    assert len(killed) == 3 and pool.died == 3 and pool.deaths_in_a_row == 0
    got = published_ids(out, names)
    assert got == ids_of(tables)  # once each, and in order (one writer)

    out = str(tmp_path / "stops")
    tables = [photos(10 * k, 2, rng) for k in range(5)]
    pool, names = pool_for(out, 1, max_deaths=2)
    killed = []

    def before_nothing_published(k):
        if k >= 2:  # the previous death noticed, and the (new) writer holding the rows sent so far
            wait_for(lambda: pool.died == len(killed) and len(held := list(pool.ledger.blocks.values())) == k
                     and all(b.rows for b in held), "the writer to hold every block sent")
            killed.append(kill_writer(pool, 0))

    with pytest.raises(WritersLost) as e:
        pool.run(Blocks(tables, before_nothing_published))
    assert "died 3 times in a row with no file published" in str(e.value) and "\n" not in str(e.value)
    assert pool.died == 3 and names == []
    assert not os.path.exists(out) or os.listdir(out) == []  # nothing published, no file of any kind there


def test_pool_first_ctrl_c_publishes_what_arrived_and_a_second_stops_at_once(ray_local, tmp_path):
    """The first SIGINT: the pool takes no more blocks; what had reached it is published, once, and
    Interrupted raised; SIGINT is then Python's default. A second SIGINT while the pool drains (a
    writer waiting for a block that never comes) stops it at once: KeyboardInterrupt, the writers
    ended, nothing waited for or cleaned up (a staged temporary stays for the next run's start)."""
    import signal
    import threading

    import ray

    from fastsam_batch.write import Interrupted

    rng = np.random.default_rng(84)
    tables = [photos(10 * k, 3, rng) for k in range(4)]
    out = str(tmp_path / "first")
    pool, names = pool_for(out, 2)
    never = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def before(k):
        if k == 2:
            wait_for(lambda: len(pool.ledger.blocks) == 2, "two blocks routed")
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the run is going
        if k == 3:
            never.wait()  # the pipeline gives nothing more

    try:
        with pytest.raises(Interrupted):
            pool.run(Blocks(tables, before))
        got = published_ids(out, names)
        assert sorted(got) in (sorted(ids_of(tables[:2])), sorted(ids_of(tables[:3])))  # what had arrived, once
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
        never.set()

    @ray.remote(num_cpus=0)
    def block_never_made():
        import time

        time.sleep(3600)

    out = str(tmp_path / "second")
    os.makedirs(out)
    planted = os.path.join(out, "_tmp-pool-run-staged")  # as a writer's staged file left by the run
    with open(planted, "wb") as f:
        f.write(b"staged")
    pool, names = pool_for(out, 2)
    stuck = block_never_made.remote()
    tables = tables[:3]
    refs = [ray.put(tables[0]), stuck, ray.put(tables[2])]

    def before_second(k):
        if k == 2:
            wait_for(lambda: len(pool.ledger.blocks) == 2, "two blocks routed")
            os.kill(os.getpid(), signal.SIGINT)
            wait_for(lambda: signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the first Ctrl-C taken")
            os.kill(os.getpid(), signal.SIGINT)  # the second: the drain waits for the stuck block's writer

    try:
        with pytest.raises(KeyboardInterrupt):
            pool.run(Blocks(tables, before_second, refs=refs))
        pids = []
        for r in pool.pid_refs:
            try:
                pids.append(ray.get(r, timeout=60))
            except ray.exceptions.RayActorError:
                pass  # ended before it had started
        wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), "the writers to end")
        assert os.path.exists(planted)  # not cleaned up on the way out: the next run's start removes it
    finally:
        signal.signal(signal.SIGINT, previous)
        ray.cancel(stuck, force=True)
    storage = Storage()
    lease = Lease(storage, out, "run-next")
    lease.acquire()
    assert remove_stale_temporaries(out, storage, fence=lease.fence()) >= 1 and not os.path.exists(planted)
    lease.release()


def test_pool_files_cut_every_n_rows_or_when_rows_have_waited(ray_local, tmp_path):
    """In the writer actors as the run has them: rows_per_file 3 cuts a file every 3 rows, the rest at
    the end; rows that have waited commit_interval_s are staged without waiting for more."""
    rng = np.random.default_rng(85)
    tables = [photos(0, 4, rng), photos(4, 2, rng), photos(6, 1, rng)]
    out = str(tmp_path / "every-3")
    pool, names = pool_for(out, 1, rows_per_file=3)
    pool.run(Blocks(tables))
    ids = ids_of(tables)
    assert [published_ids(out, [n]) for n in names] == [ids[0:3], ids[3:6], ids[6:7]]

    out = str(tmp_path / "waited")
    tables = [photos(10, 1, rng), photos(11, 1, rng)]
    pool, names = pool_for(out, 1, interval_s=1e-6)

    def before(k):
        if k == 1:
            wait_for(lambda: len(names) == 1, "the first row published after its interval")

    pool.run(Blocks(tables, before))
    assert [published_ids(out, [n]) for n in names] == [ids_of(tables[:1]), ids_of(tables[1:])]


def test_remote_output_writers_go_to_nodes_with_cpus_gpu_nodes_first():
    """Placement (pipeline.writer_nodes, on ray.nodes()' records): a head that advertises no CPUs
    (our Kubernetes manifests: num-cpus "0") and dead nodes take no writer; GPU nodes first."""
    from fastsam_batch.pipeline import writer_nodes

    def node(i, alive=True, **resources):
        return {"NodeID": f"n{i}", "Alive": alive, "Resources": resources}

    head = node(0, memory=1e9)  # num-cpus 0: no CPU entry at all
    cpu, gpu, gpu2, dead = node(1, CPU=8.0), node(2, CPU=16.0, GPU=4.0), node(3, CPU=16.0, GPU=8.0), node(4, False, CPU=8.0)
    assert writer_nodes([head, cpu, dead]) == ["n1"]
    assert writer_nodes([head, cpu, gpu, dead, gpu2]) == ["n2", "n3"]
    assert writer_nodes([head, dead]) == []  # then Ray spreads them (pipeline.WriterPool._start)
    assert writer_nodes([node(5, CPU=0.0, GPU=1.0), cpu]) == ["n1"]


def test_a_container_is_complete_once_each_of_its_distinct_images_is_committed():
    """write.UnitCompletion (the Committer's and the Ledger's): a container that gave 3 images is
    complete at the check after the third distinct one is committed, not before; a member committed
    twice (a read task Ray retried) counts once; a container whose end is not yet known is never
    complete, whatever is committed; each complete container is reported once."""
    from fastsam_batch.write import UnitCompletion

    reported = []
    units = UnitCompletion(reported.extend)
    for image in ("a", "b", "b"):
        units.committed("s0", image)
    units.committed("s1", "x")
    units.check()
    assert reported == []  # neither end known yet
    units.ended("s0", "v0", 3)
    units.ended("s1", "v1", 1)
    units.check()
    assert reported == [("s1", "v1", 1)]  # s0: 2 distinct of 3
    units.committed("s0", "a")
    units.check()
    assert reported == [("s1", "v1", 1)]
    units.committed("s0", "c")
    units.check()
    units.check()
    assert reported == [("s1", "v1", 1), ("s0", "v0", 3)]
