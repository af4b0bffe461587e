"""The committed index saved under the output (saved_index.py): read at a start in place of the
files it covers, with exactly the rows a read of every committed file gives; files changed, gone or
new since the save read (or dropped) as they are now; a save that cannot be used ignored with a
warning; written only while the run holds the lease. On a local folder and on S3 (the moto
server), in memory and past the memory bound (records on the scratch disk)."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pytest

from fastsam_batch import saved_index
from fastsam_batch.index import Committed
from fastsam_batch.lease import Lease, LeaseLost
from fastsam_batch.resume import list_parts_stamped, read_committed
from fastsam_batch.saved_index import INDEX_DIR, load_index, save_index
from fastsam_batch.storage import Storage, join_uri, strip_protocol
from fastsam_batch.write import part_name
from test_repair import _local_output, index_rows, output, plain_read, put  # noqa: F401 - output: a fixture


def summary_of(c: Committed) -> tuple:
    return (index_rows(c), [p.rsplit("/", 1)[-1] for p in c.parts], c.fingerprints, c.errors_by_reason(), c.images,
            {p.rsplit("/", 1)[-1]: s for p, s in c.stamps.items()})


# version_key of "", "e1/10", "mtime:1796163999.75/1234", "0123456789abcdef0" under KEY_FORMAT's hash
VERSION_KEYS = [0, 16908901361356465601, 4957383476332258431, 545846390567186269]


def write_parts(uri: str, storage: Storage, images: range, per_file: int, version: str = "v/1") -> list[str]:
    paths = []
    for a in range(images.start, images.stop, per_file):
        ids = [f"img{i:05d}.jpg" for i in range(a, min(a + per_file, images.stop))]
        rows = [(i, version, "ok" if n % 3 else "error", f"{i}#0") for n, i in enumerate(ids)]
        paths.append(join_uri(uri, part_name(ids)))
        put(storage, paths[-1], rows)
    return paths


def saves(uri: str, storage: Storage) -> list[str]:
    fs = storage.fs(uri)
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.find(join_uri(uri, INDEX_DIR)))


@pytest.mark.parametrize("memory_rows", [None, 4], ids=["in-memory", "on-disk"])
def test_a_start_reads_the_save_and_only_what_changed_since(output, memory_rows, monkeypatch, caplog):
    uri, storage, fence = output
    if memory_rows:  # the records past the bound: a file on the scratch disk, saved and loaded as one
        monkeypatch.setattr("fastsam_batch.index.MEMORY_ROWS", memory_rows)
    paths = write_parts(uri, storage, range(0, 40), 7)
    first = read_committed(uri, storage)
    assert first.on_disk == bool(memory_rows)
    assert summary_of(first) == summary_of(plain_read(uri, storage))
    save_index(uri, storage, first, fence=fence)
    names = saves(uri, storage)
    assert len(names) == 2 and {n.rsplit(".", 1)[1] for n in names} == {"json", "rows"}

    # unchanged: the save stands for every file, none read (and see the test below)
    base, drop, read, _ = load_index(uri, storage, list_parts_stamped(uri, storage))
    assert (drop, read, base.rows, base.on_disk) == ([], [], 40, bool(memory_rows))
    base.close()
    again = read_committed(uri, storage)
    assert summary_of(again) == summary_of(first)

    assert not [r for r in caplog.records if r.name == "fastsam_batch.saved_index"]

    # changed since: one file rewritten (other rows), one deleted, one new; the rest from the save
    fs = storage.fs(uri)
    put(storage, paths[0], [(f"img{i:05d}.jpg", "v/2", "ok", "x") for i in range(0, 7)])
    fs.rm(paths[1])
    write_parts(uri, storage, range(100, 103), 7)
    fs.invalidate_cache()
    listed = list_parts_stamped(uri, storage)
    base, drop, read, _ = load_index(uri, storage, listed)
    new = [p for p in listed if p.rsplit("/", 1)[-1] == part_name([f"img{i:05d}.jpg" for i in range(100, 103)])]
    name = {p: p.rsplit("/", 1)[-1] for p in [*drop, *read]}
    assert sorted(name[p] for p in drop) == sorted(p.rsplit("/", 1)[-1] for p in paths[:2])
    assert sorted(read) == sorted([new[0], next(p for p in listed if name.get(p) == paths[0].rsplit("/", 1)[-1])])
    base.close()
    now = read_committed(uri, storage)
    assert summary_of(now) == summary_of(plain_read(uri, storage))
    assert len(index_rows(now)) == 40 - 7 + 3


def test_the_files_the_save_covers_are_not_read_again_and_one_changed_in_place_is(tmp_path, monkeypatch):
    """The files a start reads, counted: none where the save covers them all, one where another is
    new. Then a covered file garbled in place with its size, modification time and inode kept: its
    ctime tells it changed, so the start reads it (and fails on it), where a save trusted it before."""
    from fastsam_batch import resume

    uri, storage, lease = _local_output(tmp_path)
    fence = lease.fence()
    paths = write_parts(uri, storage, range(0, 20), 5)
    first = read_committed(uri, storage)
    save_index(uri, storage, first, fence=fence)
    reads = []
    real = resume.read_file_rows
    monkeypatch.setattr(resume, "read_file_rows", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    assert summary_of(read_committed(uri, storage)) == summary_of(first) and reads == []
    added = write_parts(uri, storage, range(50, 53), 5)
    now = read_committed(uri, storage)
    assert reads == added
    assert summary_of(now) == summary_of(plain_read(uri, storage))
    st = os.stat(paths[2])
    with open(paths[2], "r+b") as f:
        f.write(b"\0" * st.st_size)
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(paths[2])
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert after.st_ctime_ns != st.st_ctime_ns  # (what tells the change: the file was written after it was made)
    with pytest.raises(OSError, match="could not be read"):
        read_committed(uri, storage)


@pytest.mark.parametrize("spoil", ["checksum", "key format", "rows cut short", "header unreadable", "no rows file",
                                   "rows out of order", "a file not in the header", "header without parts"])
def test_a_save_that_cannot_be_used_is_a_warning_and_every_file_is_read(output, spoil, caplog):
    uri, storage, fence = output
    write_parts(uri, storage, range(0, 30), 6)
    first = read_committed(uri, storage)
    head = save_index(uri, storage, first, fence=fence)
    fs = storage.fs(uri)
    rows = head[:-len(".json")] + ".rows"
    header = json.loads(fs.cat_file(head))
    data = bytearray(fs.cat_file(rows))
    if spoil == "checksum":
        data[17] ^= 0x40
        fs.pipe_file(rows, bytes(data))
    elif spoil == "key format":
        fs.pipe_file(head, json.dumps({**header, "key_format": "another"}).encode())
    elif spoil == "rows cut short":
        fs.pipe_file(rows, bytes(data[:-40]))
    elif spoil == "header unreadable":
        fs.pipe_file(head, b"{not json")
    elif spoil in ("rows out of order", "a file not in the header"):  # the checksum made to match
        rec = np.frombuffer(bytes(data), saved_index.ROW).copy()
        if spoil == "rows out of order":
            rec[[0, 1]] = rec[[1, 0]]
        else:
            rec["part_of"][3] = len(header["parts"])
        fs.pipe_file(rows, rec.tobytes())
        fs.pipe_file(head, json.dumps({**header, "checksum": saved_index._verified(rec)}).encode())
    elif spoil == "header without parts":
        fs.pipe_file(head, json.dumps({k: v for k, v in header.items() if k != "parts"}).encode())
    else:
        fs.rm(rows)
    # a file changed since, too: the rows must be those of the files, not of the spoilt save
    write_parts(uri, storage, range(0, 6), 6, version="v/9")
    fs.invalidate_cache()
    with caplog.at_level(logging.WARNING, logger="fastsam_batch.saved_index"):
        got = read_committed(uri, storage)
    assert summary_of(got) == summary_of(plain_read(uri, storage))
    assert any("is not used" in r.getMessage() and "the committed files it covers are read" in r.getMessage()
               for r in caplog.records)


def test_a_newer_save_replaces_the_older_and_its_leftovers(output):
    uri, storage, fence = output
    write_parts(uri, storage, range(0, 10), 5)
    c = read_committed(uri, storage)
    save_index(uri, storage, c, fence=fence)
    fs = storage.fs(uri)
    fs.pipe_file(join_uri(uri, INDEX_DIR, "00000000000000000001-0123456789ab.rows"), b"left by a killed save")
    write_parts(uri, storage, range(10, 15), 5)
    fs.invalidate_cache()
    c2 = read_committed(uri, storage)
    head = save_index(uri, storage, c2, fence=fence)
    token = head.rsplit("/", 1)[-1][:-len(".json")]
    assert saves(uri, storage) == [f"{token}.json", f"{token}.rows"]
    assert summary_of(read_committed(uri, storage)) == summary_of(plain_read(uri, storage))


def test_a_run_that_lost_its_lease_saves_nothing(output):
    uri, storage, fence = output
    write_parts(uri, storage, range(0, 10), 5)
    c = read_committed(uri, storage)
    save_index(uri, storage, c, fence=fence)
    before = saves(uri, storage)
    Lease(storage, uri, "run-other").acquire(break_lease=True)
    with pytest.raises(LeaseLost):
        save_index(uri, storage, c, fence=fence)
    assert saves(uri, storage) == before


def test_the_checksum_is_of_every_byte(tmp_path):
    """A pure check of the checksum: one bit anywhere (in a block past the first too) changes it."""
    rec = np.zeros(3 * 7, saved_index.ROW)
    rec["hi"] = np.arange(len(rec), dtype=np.uint64) * 0x9E3779B97F4A7C15
    monkey_block = saved_index._BLOCK
    try:
        saved_index._BLOCK = 7
        base = saved_index._verified(rec)
        raw = rec.view(np.uint8)
        for at in (0, 38, 40 * 7 + 3, raw.size - 2):  # (byte 39 of a record is padding, not a field)
            flipped = rec.copy()
            flipped.view(np.uint8)[at] ^= 1
            assert saved_index._verified(flipped) != base
    finally:
        saved_index._BLOCK = monkey_block


def test_a_local_save_is_where_the_output_is(tmp_path):
    uri, storage, lease = _local_output(tmp_path)
    fence = lease.fence()
    write_parts(uri, storage, range(0, 4), 2)
    head = save_index(uri, storage, read_committed(uri, storage), fence=fence)
    assert os.path.dirname(strip_protocol(head)) == os.path.join(uri, INDEX_DIR)
    listed = list_parts_stamped(uri, storage)
    base, drop, read, _ = load_index(uri, storage, listed)
    assert (drop, read, sorted(base.parts)) == ([], [], sorted(listed))


def test_files_whose_entry_does_not_tell_content_are_read_again(tmp_path):
    """An object store's entry without an ETag (size and a time of a second's resolution) is not
    trusted across runs: the save's rows of such a file are dropped and the file read."""
    from fastsam_batch.resume import stamp_tells_content

    assert stamp_tells_content("1234/9b2cf535f27731c974343645a3985328")
    assert stamp_tells_content("1234/1796163999.75/5308449/1796163999.75")
    assert not stamp_tells_content("1234/2026-12-01 10:00:00+00:00//")  # S3-compatible, no ETag
    assert not stamp_tells_content("1234/1796163999.75/5308449/")  # no ctime
    assert not stamp_tells_content("")
    uri, storage, lease = _local_output(tmp_path)
    fence = lease.fence()
    write_parts(uri, storage, range(0, 9), 3)
    c = read_committed(uri, storage)
    weak = {p: f"{i}/2026-12-01 10:00:00+00:00//" for i, p in enumerate(c.parts)}
    c.stamps = dict(weak)
    save_index(uri, storage, c, fence=fence)
    assert load_index(uri, storage, weak) is None  # covers none: its records not even read
    listed = {**weak, c.parts[0]: list_parts_stamped(uri, storage)[c.parts[0]]}
    assert load_index(uri, storage, listed) is None


def test_other_files_in_the_index_folder_are_left_alone(output):
    """Only a save's own names (a 20-digit time, 12 hex digits, .json / .rows) are read or deleted."""
    uri, storage, fence = output
    write_parts(uri, storage, range(0, 6), 3)
    fs = storage.fs(uri)
    stray = join_uri(uri, INDEX_DIR, "zz-notes.json")
    fs.makedirs(join_uri(uri, INDEX_DIR), exist_ok=True)
    fs.pipe_file(stray, b"not a save")
    head = save_index(uri, storage, read_committed(uri, storage), fence=fence)
    fs.invalidate_cache()
    assert fs.exists(stray) and fs.exists(head)
    base, drop, read, _ = load_index(uri, storage, list_parts_stamped(uri, storage))
    assert (drop, read, base.rows) == ([], [], 6)
    base.close()


def test_the_keys_a_save_holds_are_those_of_its_format():
    """Keys persist in a save: these values are the key format's (saved_index.KEY_FORMAT). A change
    of the id key or of the version/container hash must change KEY_FORMAT, and these values with it."""
    import hashlib

    from fastsam_batch.index import id_key, version_key

    assert saved_index.KEY_FORMAT.startswith("saved-index-1;ids:blake2b-128;versions,containers:hash_texts-64-v1;")
    for text in ("img00001.jpg", "s3://bucket/a/b.png", "é/ü.jpg"):
        assert id_key(text) == hashlib.blake2b(text.encode(), digest_size=16).digest()
    assert [version_key(v) for v in ("", "e1/10", "mtime:1796163999.75/1234", "0123456789abcdef0")] == VERSION_KEYS


def test_a_local_save_deleted_while_a_start_reads_it_is_a_warning_and_the_files_are_read(tmp_path, monkeypatch,
                                                                                         caplog):
    """A local save past the memory bound is read in place; a run's end may delete it meanwhile
    (under a `plan` or an export, which hold no lease): that start reads every committed file."""
    monkeypatch.setattr("fastsam_batch.index.MEMORY_ROWS", 4)
    uri, storage, lease = _local_output(tmp_path)
    write_parts(uri, storage, range(0, 30), 4)
    head = save_index(uri, storage, read_committed(uri, storage), fence=lease.fence())
    real = saved_index.load_index

    def load_then_lose(*a, **k):
        got = real(*a, **k)
        assert got is not None and got[0].on_disk
        os.remove(strip_protocol(head)[:-len(".json")] + ".rows")  # what a run's end does to an older save
        return got

    monkeypatch.setattr(saved_index, "load_index", load_then_lose)
    with caplog.at_level(logging.WARNING, logger="fastsam_batch.resume"):
        got = read_committed(uri, storage)
    assert summary_of(got) == summary_of(plain_read(uri, storage))
    assert any("could not be read to its end" in r.getMessage() for r in caplog.records)


def test_a_save_covers_an_index_of_just_its_files(output):
    uri, storage, fence = output
    from fastsam_batch.saved_index import saved_covers

    assert saved_covers(uri, storage, Committed())  # nothing committed, nothing saved: none needed
    write_parts(uri, storage, range(0, 8), 4)
    c = read_committed(uri, storage)
    assert not saved_covers(uri, storage, c)
    save_index(uri, storage, c, fence=fence)
    assert saved_covers(uri, storage, read_committed(uri, storage))
    write_parts(uri, storage, range(8, 10), 4)
    storage.fs(uri).invalidate_cache()
    assert not saved_covers(uri, storage, read_committed(uri, storage))


# ---------------------------------------------------------------------------------------------
# Deltas: the files a run publishes, read back and saved during the run (checkpoints.py)


def _published(uri: str, storage: Storage, checkpoints, images: range, per_file: int) -> list[str]:
    """Files written as a run publishes them, each told to ``checkpoints`` (name, rows)."""
    paths = write_parts(uri, storage, images, per_file)
    for p in paths:
        checkpoints.published(p.rsplit("/", 1)[-1], min(per_file, images.stop - images.start))
    storage.fs(uri).invalidate_cache()
    return paths


def _counting_reads(monkeypatch) -> list[str]:
    from fastsam_batch import resume

    reads: list[str] = []
    real = resume.read_file_rows
    monkeypatch.setattr(resume, "read_file_rows", lambda path, *a, **k: reads.append(path.rsplit("/", 1)[-1])
                        or real(path, *a, **k))
    return reads


def _names(paths) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in paths)


@pytest.mark.parametrize("memory_rows", [None, 4], ids=["in-memory", "on-disk"])
def test_deltas_saved_during_a_run_stand_for_their_files_at_the_next_start(output, memory_rows, monkeypatch, caplog):
    """A full save, then a run that publishes files and saves two deltas before it is killed (one
    more file published after the last): the next start reads only that file; its rows and every
    other are exactly those of a read of every file. A file rewritten or deleted after its delta
    is read (or dropped) as it is now."""
    from fastsam_batch.checkpoints import IndexCheckpoints

    uri, storage, fence = output
    if memory_rows:
        monkeypatch.setattr("fastsam_batch.index.MEMORY_ROWS", memory_rows)
    write_parts(uri, storage, range(0, 20), 5)
    save_index(uri, storage, read_committed(uri, storage), fence=fence)
    cp = IndexCheckpoints(uri, storage, fence, interval_s=3600, max_rows=1000)  # (a delta a save_pending)
    first = _published(uri, storage, cp, range(20, 35), 5)
    head1 = cp.save_pending()
    assert head1 is not None and head1.endswith(".delta.json") and cp.save_pending() is None  # nothing pending
    second = _published(uri, storage, cp, range(35, 45), 5)
    head2 = cp.save_pending()
    assert cp.heads == [head1, head2]
    last = _published(uri, storage, cp, range(45, 50), 5)  # in no delta (the run killed before the next)
    with caplog.at_level(logging.WARNING):
        reads = _counting_reads(monkeypatch)
        now = read_committed(uri, storage)
    assert reads == _names(last)
    assert summary_of(now) == summary_of(plain_read(uri, storage))
    assert not [r for r in caplog.records if r.name.startswith("fastsam_batch")]

    # after the deltas: a file of the first rewritten (other rows), one of the second deleted
    put(storage, first[1], [(f"img{i:05d}.jpg", "v/2", "ok", "x") for i in range(25, 30)])
    storage.fs(uri).rm(second[0])
    storage.fs(uri).invalidate_cache()
    reads.clear()
    now = read_committed(uri, storage)
    assert sorted(reads) == sorted(_names(last) + _names(first[1:2]))
    assert summary_of(now) == summary_of(plain_read(uri, storage))
    assert len(index_rows(now)) == 50 - 5

    # a newer delta of a file has its rows (the older delta's are not taken, also where the file is
    # unchanged, as first[2] here: its rows are not doubled); the file left pending goes into it too
    cp.published(first[1].rsplit("/", 1)[-1], 5)
    cp.published(first[2].rsplit("/", 1)[-1], 5)
    assert cp.save_pending() is not None
    reads.clear()
    now = read_committed(uri, storage)
    assert reads == []
    assert len(index_rows(now)) == 50 - 5
    assert summary_of(now) == summary_of(plain_read(uri, storage))


def test_a_runs_end_takes_its_deltas_in_place_of_reading_back_what_it_wrote(output, monkeypatch):
    """refresh_committed (the end of a run) with the run's deltas: the files they hold as listed now
    are not read; one published after the last delta is. Then the run's full save replaces the
    deltas, and a start with it reads nothing."""
    from fastsam_batch.checkpoints import IndexCheckpoints
    from fastsam_batch.resume import refresh_committed

    uri, storage, fence = output
    write_parts(uri, storage, range(0, 10), 5)
    start = read_committed(uri, storage)
    cp = IndexCheckpoints(uri, storage, fence, interval_s=3600)
    written = _published(uri, storage, cp, range(10, 30), 5)
    cp.save_pending()
    late = _published(uri, storage, cp, range(30, 33), 5)
    deltas = cp.close()
    assert len(deltas) == 1 and saved_index.saved_covers(uri, storage, start) is False
    reads = _counting_reads(monkeypatch)
    final = refresh_committed(start, uri, storage, reread=_names(written + late), deltas=deltas)
    assert reads == _names(late)
    assert summary_of(final) == summary_of(plain_read(uri, storage))
    head = save_index(uri, storage, final, fence=fence)
    token = head.rsplit("/", 1)[-1][:-len(".json")]
    assert saves(uri, storage) == [f"{token}.json", f"{token}.rows"]  # the deltas deleted with the older saves
    assert saved_index.saved_covers(uri, storage, final)
    reads.clear()
    assert summary_of(read_committed(uri, storage)) == summary_of(final) and reads == []


@pytest.mark.parametrize("spoil", ["records", "header", "counts"])
def test_a_delta_that_cannot_be_used_is_a_warning_and_its_files_are_read(tmp_path, spoil, monkeypatch, caplog):
    from fastsam_batch.checkpoints import IndexCheckpoints

    uri, storage, lease = _local_output(tmp_path)
    cp = IndexCheckpoints(uri, storage, lease.fence(), interval_s=3600)
    spoilt = _published(uri, storage, cp, range(0, 10), 5)
    head = cp.save_pending()
    kept = _published(uri, storage, cp, range(10, 20), 5)
    cp.save_pending()
    if spoil == "records":  # one bit of a record: its checksum
        path = head[:-len(".json")] + ".rows"
        raw = bytearray(open(path, "rb").read())
        raw[3] ^= 1
        open(path, "wb").write(bytes(raw))
    elif spoil == "header":
        open(head, "w").write("{not json")
    else:  # the header counts a file's rows one fewer than the records hold (checksums agree)
        header = json.loads(open(head).read())
        fps = header["parts"][0][2]
        fps[next(iter(fps))] -= 1
        open(head, "w").write(json.dumps(header))
    reads = _counting_reads(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fastsam_batch.saved_index"):
        now = read_committed(uri, storage)
    assert sorted(reads) == _names(spoilt)  # the other delta's files not read
    assert summary_of(now) == summary_of(plain_read(uri, storage))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert head in said and ("is not used" if spoil == "header" else "could not be read") in said
    assert len(kept) == 2  # (read from their delta: not among the reads above)


def test_a_delta_is_written_only_while_the_run_holds_its_lease(output):
    from fastsam_batch.checkpoints import IndexCheckpoints

    uri, storage, fence = output
    cp = IndexCheckpoints(uri, storage, fence, interval_s=3600)
    _published(uri, storage, cp, range(0, 10), 5)
    Lease(storage, uri, "run-other").acquire(break_lease=True)
    assert cp.save_pending() is None
    assert saves(uri, storage) == []
    assert cp.close(flush=True) == []


def test_the_checkpoint_thread_saves_by_time_by_rows_and_on_a_flush(tmp_path):
    """By time: a short interval saves what was published (waited for, as a condition). By rows: a
    long interval and the rows past ``max_rows`` wake it. A flush at close saves what is left. A
    file published again (rewritten) before its delta is read once, as it is then."""
    from fastsam_batch.checkpoints import IndexCheckpoints

    def wait_for(cond) -> None:
        deadline = time.monotonic() + 120
        while not cond():
            assert time.monotonic() < deadline, "no delta within 2 minutes"
            time.sleep(0.05)

    uri, storage, lease = _local_output(tmp_path)
    timed = IndexCheckpoints(uri, storage, lease.fence(), interval_s=0.05).start()
    _published(uri, storage, timed, range(0, 10), 5)
    wait_for(lambda: timed.heads)
    assert timed.close() == timed.heads and len(timed.heads) >= 1

    by_rows = IndexCheckpoints(uri, storage, lease.fence(), interval_s=3600, max_rows=12).start()
    _published(uri, storage, by_rows, range(100, 110), 5)
    assert by_rows.heads == []  # (10 rows: under the bound, and the interval an hour)
    again = _published(uri, storage, by_rows, range(100, 105), 5)  # the first file published again
    assert by_rows.heads == []
    _published(uri, storage, by_rows, range(110, 115), 5)  # 15 rows pending: past 12
    wait_for(lambda: by_rows.heads)  # a delta of at most 12 rows (10); the other 5 wait
    _published(uri, storage, by_rows, range(200, 203), 5)  # 8 rows pending: under 12
    heads = by_rows.close(flush=True)  # the flush saves them
    headers = [json.loads(open(h).read()) for h in heads]
    assert [h["rows"] for h in headers] == [10, 8]
    assert [name for h in headers for name, _, _ in h["parts"]].count(again[0].rsplit("/", 1)[-1]) == 1
    assert summary_of(read_committed(uri, storage)) == summary_of(plain_read(uri, storage))


def test_a_published_file_gone_before_its_delta_is_left_out_and_the_rest_saved(output):
    from fastsam_batch.checkpoints import IndexCheckpoints

    uri, storage, fence = output
    cp = IndexCheckpoints(uri, storage, fence, interval_s=3600)
    paths = _published(uri, storage, cp, range(0, 15), 5)
    storage.fs(uri).rm(paths[1])  # (a repair emptied it, say)
    storage.fs(uri).invalidate_cache()
    head = cp.save_pending()
    assert head is not None and cp.save_pending() is None  # nothing left pending
    header = json.loads(storage.fs(uri).cat_file(head))
    assert sorted(name for name, _, _ in header["parts"]) == _names([paths[0], paths[2]])
    assert summary_of(read_committed(uri, storage)) == summary_of(plain_read(uri, storage))


def test_a_delta_named_before_the_full_save_is_taken_too(output, monkeypatch):
    """A delta whose name sorts before the newest full save (its writer's clock behind the full
    save's, or a delete that failed) is used all the same: its rows are trusted file by file."""
    from fastsam_batch.checkpoints import IndexCheckpoints

    uri, storage, fence = output
    write_parts(uri, storage, range(0, 10), 5)
    full = save_index(uri, storage, read_committed(uri, storage), fence=fence)
    cp = IndexCheckpoints(uri, storage, fence, interval_s=3600)
    later = _published(uri, storage, cp, range(10, 20), 5)
    head = cp.save_pending()
    fs = storage.fs(uri)
    early = "00000000000000000001-0123456789ab"
    for ext in (".delta.rows", ".delta.json"):
        fs.mv(head[:-len(".delta.json")] + ext, join_uri(uri, INDEX_DIR, early + ext))
    fs.invalidate_cache()
    assert saves(uri, storage)[0].startswith(early) and full.rsplit("/", 1)[-1] in saves(uri, storage)
    reads = _counting_reads(monkeypatch)
    now = read_committed(uri, storage)
    assert reads == [] and len(later) == 2
    assert summary_of(now) == summary_of(plain_read(uri, storage))


def test_a_file_rewritten_while_it_is_read_back_is_left_out_of_the_delta(tmp_path, monkeypatch):
    """The file's entry after its read is not the one before it: its rows are not saved (they
    might be of either content); the next start reads it."""
    from fastsam_batch import resume
    from fastsam_batch.checkpoints import IndexCheckpoints

    uri, storage, lease = _local_output(tmp_path)
    cp = IndexCheckpoints(uri, storage, lease.fence(), interval_s=3600)
    paths = _published(uri, storage, cp, range(0, 15), 5)
    real = resume.read_file_rows

    def read_then_rewrite(path, *a, **k):
        f = real(path, *a, **k)
        if path == paths[1]:
            put(storage, paths[1], [(f"img{i:05d}.jpg", "v/3", "ok", "y") for i in range(5, 10)])
        return f

    monkeypatch.setattr(resume, "read_file_rows", read_then_rewrite)
    head = cp.save_pending()
    monkeypatch.setattr(resume, "read_file_rows", real)
    header = json.loads(open(head).read())
    assert sorted(name for name, _, _ in header["parts"]) == _names([paths[0], paths[2]])
    reads = _counting_reads(monkeypatch)
    now = read_committed(uri, storage)
    assert reads == _names(paths[1:2])
    assert summary_of(now) == summary_of(plain_read(uri, storage))


def test_a_save_takes_the_files_published_before_it_began_and_stops_when_asked(tmp_path, monkeypatch):
    """Files published while a save reads (the run goes on publishing) wait for the next save: a
    save ends however fast files come. A save stoppable by stop() ends between deltas."""
    from fastsam_batch import resume
    from fastsam_batch.checkpoints import IndexCheckpoints

    uri, storage, lease = _local_output(tmp_path)
    cp = IndexCheckpoints(uri, storage, lease.fence(), interval_s=3600, max_rows=5)  # a delta a file
    _published(uri, storage, cp, range(0, 15), 5)
    real = resume.read_file_rows
    made = iter(range(100, 10_000, 5))

    def read_while_publishing(path, *a, **k):
        n = next(made)
        _published(uri, storage, cp, range(n, n + 5), 5)  # one more file each time one is read
        return real(path, *a, **k)

    monkeypatch.setattr(resume, "read_file_rows", read_while_publishing)
    cp.save_pending()
    assert len(cp.heads) == 3 and len(cp._pending) == 3  # (three published meanwhile: the next save's)
    cp._stop.set()
    cp.save_pending(stoppable=True)
    assert len(cp.heads) == 3
    monkeypatch.setattr(resume, "read_file_rows", real)
    cp.save_pending()  # (not stoppable: a flush at the end)
    assert len(cp.heads) == 6 and not cp._pending
    assert summary_of(read_committed(uri, storage)) == summary_of(plain_read(uri, storage))


def test_no_delta_where_the_storage_entries_do_not_tell_content(tmp_path, monkeypatch, caplog):
    """An object store without ETags: no start could trust a delta, so none is made (said once),
    and no file is read back again in the run."""
    from fastsam_batch import resume
    from fastsam_batch.checkpoints import IndexCheckpoints

    monkeypatch.setattr(resume, "stamp_tells_content", lambda stamp: False)
    uri, storage, lease = _local_output(tmp_path)
    cp = IndexCheckpoints(uri, storage, lease.fence(), interval_s=3600)
    _published(uri, storage, cp, range(0, 10), 5)
    with caplog.at_level(logging.INFO, logger="fastsam_batch.checkpoints"):
        assert cp.save_pending() is None
    assert saves(uri, storage) == [] and "do not tell a file's content apart" in caplog.text
    _published(uri, storage, cp, range(10, 15), 5)
    reads = _counting_reads(monkeypatch)
    assert cp.close(flush=True) == [] and reads == []
