"""Writers beside the workers: output files encoded and staged by K writer actors, published by the driver.

The work is split in two so that the bytes never cross to the driver and only the driver makes a
file visible (so the lease fence, a kill and Ctrl-C keep the guarantees of one writer on the driver):

- :class:`BlockWriter` (one per writer actor; Ray-free, so it is tested without Ray): takes output
  blocks (their rows, fetched from Ray's object store where the writer runs), cuts them into files
  exactly as the driver's one writer did (write.Committer: about ``output.target_file_mb``, never
  above it; ``commit_interval_s``; ``rows_per_file``), encodes each as Parquet and *stages* it
  without making it visible: on S3 a multipart upload to the file's final key, its parts uploaded
  and the upload left open (an object that does not exist until it is completed); locally a
  ``_tmp-<run id>-<uuid>`` file beside it, fsync'd. Each answer carries small records (:class:`Staged`):
  the file's name, its upload id and part ETags (or its temporary path), its stats row, the blocks
  its rows came from, and the container members it holds.
- :class:`Ledger` (the driver): which block (an ObjectRef the driver keeps) went to which writer,
  and how many of its rows are published. It publishes each staged file, in the order its writer
  staged them: the fence checked (lease.LeaseFence), then CompleteMultipartUpload (no bytes move;
  atomic) or ``os.replace``. A block's reference is dropped once every row of it is in a published
  file. A writer that dies: the blocks it held not wholly published go to another writer, without
  the rows already published (a block's rows are cut into files in order, and its writer's files
  are published in order, so what is published of a block is always its first rows). Containers:
  a block's end-of-unit rows are counted once (by block number), and a unit is complete once each
  of its distinct members is in a published file (as write.Committer did).

Files staged and never published (a killed driver; a writer killed between staging and its answer;
a run whose lease was taken over) are invisible and are removed by the next run's start
(repair.remove_stale_temporaries: local ``_tmp-*`` files; on S3 the output prefix's open multipart
uploads of part files); a bucket lifecycle rule for incomplete multipart uploads (README) cleans
them up when no run comes after.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from .retry import with_retries
from .storage import Storage, join_uri, protocol_of, strip_protocol
from .saved_index import INDEX_DIR
from .write import (PART_PREFIX, Committer, Encoder, UnitCompletion, file_stats, parquet_file_bytes, part_name,
                    split_unit_ends, write_synced)

TMP_PREFIX = "_tmp-"
# S3 parts: at least 5 MiB each but the last (S3's rule); a 128 MiB file is 4 parts, uploaded one
# after another by its writer (the writers upload in parallel with each other).
PART_BYTES = 32 << 20


@dataclass
class Staged:
    """A file staged by a writer, not yet visible: what the driver needs to publish it."""

    name: str  # part-<hash>.parquet
    uri: str  # where it becomes visible
    stats: dict  # its stats row (write.STATS_SCHEMA)
    covers: list[tuple[int, int]]  # (block number, rows of that block in this file), in order
    members: list[tuple[str, str]]  # (shard, image id) of its rows from containers
    tmp: str | None = None  # local: the temporary file beside it
    upload_id: str | None = None  # S3: the open multipart upload
    etags: list[str] = field(default_factory=list)  # S3: its parts' ETags, in order
    writer: int = -1  # the writer that staged it


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = strip_protocol(uri).partition("/")
    return bucket, key


def stage_bytes(storage: Storage, uri: str, data: bytes, run_id: str = "") -> dict:
    """``data`` staged for ``uri`` without making it visible: locally a fsync'd ``_tmp-<run id>-``
    file in the same folder (the run's own, so that a run stopping on an error removes its own and no
    other's: :func:`remove_own_temporaries`); on S3 a multipart upload to ``uri``'s key with every part uploaded, left open.
    Returns the fields of :class:`Staged` that say where it is (tmp / upload_id and etags)."""
    if protocol_of(uri) == "file":
        return {"tmp": write_synced(strip_protocol(uri), data, f"{TMP_PREFIX}{run_id}-{uuid.uuid4().hex}")}
    fs = storage.fs(uri)
    bucket, key = _bucket_key(uri)
    upload = with_retries(lambda: fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key))[0]["UploadId"]
    view = memoryview(data)
    etags = []
    for number, start in enumerate(range(0, max(len(data), 1), PART_BYTES), 1):
        body = bytes(view[start:start + PART_BYTES])
        # A part put again (a retry) under its number replaces itself: idempotent.
        r = with_retries(lambda: fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload,
                                            PartNumber=number, Body=body))[0]
        etags.append(r["ETag"])
    return {"upload_id": upload, "etags": etags}


def multipart_etag(etags: list[str]) -> str:
    """The ETag S3 gives the object a multipart upload of these parts completes to, where it follows
    the long-standing convention (the MD5 of the parts' ETags as returned, binary, then ``-<parts>``):
    AWS for plaintext and SSE-S3 objects, MinIO and Ceph unencrypted, moto. Not documented by AWS,
    which calls a multipart object's ETag opaque ("not an MD5 digest, regardless of the method of
    encryption"); under SSE-KMS and SSE-C it does not hold (MinIO's notes on S3 ETags: an encrypted
    multipart object's ETag is not the MD5 of its part checksums, only its ``-<parts>`` suffix
    stays). :func:`publish` uses it only where it holds."""
    digest = hashlib.md5(b"".join(bytes.fromhex(e.strip('"')) for e in etags)).hexdigest()  # noqa: S324 - S3's own
    return f'"{digest}-{len(etags)}"'


def publish(storage: Storage, staged: Staged) -> None:
    """Makes a staged file visible, atomically, moving no bytes: ``os.replace`` of its temporary
    file, or CompleteMultipartUpload. A completion whose answer was lost and that was retried finds
    the upload gone (NoSuchUpload; so does an upload aborted meanwhile): the object there must then
    be this upload's, else an OSError (the run stops; the next run resumes):

    - plaintext / SSE-S3 (the object's HEAD names no KMS): its ETag is exactly
      :func:`multipart_etag` of the staged parts' ETags;
    - SSE-KMS (``aws:kms``, ``aws:kms:dsse``: e.g. a bucket's default encryption), whose multipart
      ETag is opaque: its shape instead, from a HEAD of part 1 (``PartsCount``, which S3 returns
      for a part number's HEAD of a multipart object) and of the object: as many parts as staged,
      part 1 of PART_BYTES when there are more, a size that so many parts make. That tells this
      upload's object from none, from a file of that name of another shape or from a plain PUT;
      not from another upload of the same shape (the same name holds the same image ids: this
      run's rows of them sent again, or a run that took the lease over). SSE-C is not used here."""
    if staged.tmp is not None:
        os.replace(staged.tmp, strip_protocol(staged.uri))
        return
    fs = storage.fs(staged.uri)
    bucket, key = _bucket_key(staged.uri)
    parts = {"Parts": [{"PartNumber": i, "ETag": e} for i, e in enumerate(staged.etags, 1)]}
    try:
        with_retries(lambda: fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key,
                                        UploadId=staged.upload_id, MultipartUpload=parts))
    except FileNotFoundError:  # NoSuchUpload: completed by an earlier try whose answer was lost, or aborted
        gone = f"{staged.uri}: its multipart upload is gone (NoSuchUpload) and"
        try:
            head = with_retries(lambda: fs.call_s3("head_object", Bucket=bucket, Key=key))[0]
        except FileNotFoundError:
            raise OSError(f"{gone} no object is there (the upload was aborted, not completed)") from None
        expected = multipart_etag(staged.etags)
        if head.get("ETag") != expected:
            if not str(head.get("ServerSideEncryption", "")).startswith("aws:kms"):
                raise OSError(f"{gone} the object there is another (ETag {head.get('ETag')}, not {expected})") from None
            part = with_retries(lambda: fs.call_s3("head_object", Bucket=bucket, Key=key, PartNumber=1))[0]
            n, size = len(staged.etags), head.get("ContentLength")
            count, first = part.get("PartsCount"), part.get("ContentLength")
            if n == 1:
                shaped = count == 1 and size is not None and first == size <= PART_BYTES
            else:
                shaped = count == n and first == PART_BYTES and size is not None and \
                    (n - 1) * PART_BYTES < size <= n * PART_BYTES
            if not shaped:
                raise OSError(f"{gone} the object there (SSE-KMS: its ETag is opaque) is not of its shape ({count} "
                              f"parts, {size} bytes; staged: {n} parts of at most {PART_BYTES} bytes)") from None
    fs.invalidate_cache(strip_protocol(staged.uri))


def abort(storage: Storage, staged: Staged) -> None:
    """A staged file dropped (best effort: what is left is removed by the next run's start)."""
    try:
        if staged.tmp is not None:
            os.unlink(staged.tmp)
        elif staged.upload_id is not None:
            bucket, key = _bucket_key(staged.uri)
            storage.fs(staged.uri).call_s3("abort_multipart_upload", Bucket=bucket, Key=key,
                                           UploadId=staged.upload_id)
    except Exception:  # noqa: BLE001 - left for the next run's clean-up
        pass


def remove_own_temporaries(output_uri: str, run_id: str) -> int:
    """A local output's temporary files staged by this run's writers (once they are gone): a run
    that stops on an error (its lease taken over, a failed put) leaves none behind."""
    if protocol_of(output_uri) != "file" or not run_id:
        return 0
    folder = strip_protocol(output_uri)
    n = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(f"{TMP_PREFIX}{run_id}-"):
            try:
                os.unlink(os.path.join(folder, name))
                n += 1
            except FileNotFoundError:
                pass
    return n


def open_uploads(output_uri: str, storage: Storage, since: float | None = None,
                 index: bool = False) -> list[tuple[str, str]]:
    """(key, upload id) of the open multipart uploads of part files directly under an S3 output
    (staged by writers and never published: a killed run's); ``since`` (a time.time()): only those
    begun since then, by the store's clock; ``index``: those of saved indexes (``_index/``) too."""
    fs = storage.fs(output_uri)
    bucket, prefix = _bucket_key(output_uri.rstrip("/") + "/")
    found, marker = [], {}
    while True:
        r = with_retries(lambda: fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker))[0]
        for u in r.get("Uploads", []):
            rest = u["Key"][len(prefix):]
            begun = u.get("Initiated")
            if since is not None and begun is not None and begun.timestamp() < since:
                continue
            if ("/" not in rest and rest.startswith(PART_PREFIX)) or (index and rest.startswith(f"{INDEX_DIR}/")):
                found.append((u["Key"], u["UploadId"]))
        if not r.get("IsTruncated"):
            return found
        marker = {"KeyMarker": r["NextKeyMarker"], "UploadIdMarker": r["NextUploadIdMarker"]}


def abort_uploads(output_uri: str, storage: Storage, uploads: list[tuple[str, str]]) -> None:
    fs = storage.fs(output_uri)
    bucket, _ = _bucket_key(output_uri)
    for key, upload in uploads:
        try:
            with_retries(lambda: fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload))
        except FileNotFoundError:
            pass  # gone meanwhile (completed or aborted by its run)


class _Staging(Committer):
    """write.Committer's cutting, each file staged (not committed): handed to ``sink`` with the
    blocks its rows came from."""

    def __init__(self, sink: Callable[[pa.Table, bytes | None, list], None], encoder, rows_per_file, interval_s,
                 target_file_bytes):
        super().__init__(encoder, rows_per_file, interval_s, on_commit=lambda row: None,
                         target_file_bytes=target_file_bytes)
        self.sink = sink

    def _commit(self, table: pa.Table, data: bytes | None = None) -> None:
        self.sink(table, data, self.head_tags(table.num_rows))


class BlockWriter:
    """One writer (the body of a writer actor): blocks in (numbered by the driver), files staged out.
    Every call answers with what it staged since the last answer (see :meth:`_answer`)."""

    def __init__(self, index: int, output_uri: str, storage: Storage, compression: str = "zstd",
                 rows_per_file: int | None = None, interval_s: float = 10.0, target_file_bytes: int | None = None,
                 job: str | None = None, run_id: str = ""):
        self.index, self.output_uri, self.storage, self.run_id = index, output_uri, storage, run_id
        self.encoder = Encoder(compression)
        self.metrics = None  # metrics.StageMetrics (in a writer actor, ``job`` given): the stage times staged
        if job is not None:
            from .metrics import StageMetrics

            self.metrics = StageMetrics(job)
        self.cutter = _Staging(self._stage, self.encoder, rows_per_file, interval_s, target_file_bytes)
        self.staged: list[Staged] = []
        self.rows: dict[int, int] = {}
        self.unit_ends: list[tuple[int, list]] = []

    def pid(self) -> int:
        return os.getpid()

    def add_block(self, seq: int, block, start: int | None, end: int | None, skip: int = 0) -> dict:
        """:meth:`add` of a Ray Data block (an Arrow table; a pandas one converted) as the driver sends
        it: fetched from the object store where this writer runs, sliced as its bundle says."""
        table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
        if start is not None:
            table = table.slice(start, end - start)
        return self.add(seq, table, skip)

    def add(self, seq: int, table: pa.Table, skip: int = 0) -> dict:
        """Block ``seq``'s rows, but the first ``skip`` (already published from a writer that died)."""
        data, ends = split_unit_ends(table)
        self.rows[seq] = data.num_rows
        if ends:
            self.unit_ends.append((seq, ends))
        if skip:
            data = data.slice(min(skip, data.num_rows))
        if data.num_rows:
            self.cutter.add(data, tag=seq)
        return self.poll()

    def poll(self) -> dict:
        """Stages the waiting rows if the oldest has waited ``commit_interval_s``."""
        if self.cutter.pending_rows and self.cutter.seconds_to_due() <= 0:
            self.cutter.flush()
        return self._answer()

    def flush(self) -> dict:
        """Stages every waiting row (the end of the run, Ctrl-C)."""
        self.cutter.flush()
        return self._answer()

    def _answer(self) -> dict:
        out = {"writer": self.index, "staged": self.staged, "rows": self.rows, "unit_ends": self.unit_ends,
               "pending_rows": self.cutter.pending_rows,
               "due_in": self.cutter.seconds_to_due() if self.cutter.pending_rows else None}
        self.staged, self.rows, self.unit_ends = [], {}, []
        return out

    def _stage(self, table: pa.Table, data: bytes | None, covers: list) -> None:
        t0 = time.perf_counter()
        name = part_name(table.column("image_id").to_pylist())
        if data is None:  # (timed here, not in encode_s: that is the encodes before this file's)
            data = parquet_file_bytes(table, self.encoder.compression)
        uri = join_uri(self.output_uri, name)
        where = stage_bytes(self.storage, uri, data, self.run_id)
        write_s = time.perf_counter() - t0 + self.encoder.encode_s
        self.encoder.encode_s = 0.0
        members = []
        if "shard" in table.column_names:
            members = [(s, i) for s, i in zip(table.column("shard").to_pylist(), table.column("image_id").to_pylist())
                       if s]
        if self.metrics is not None:
            self.metrics.staged(table)
        self.staged.append(Staged(name, uri, file_stats(table, name, write_s), list(covers), members,
                                  writer=self.index, **where))


BLOCK_DEATHS = 3  # writers that may die (or hang) holding one block before the run stops: a block that
# kills its writer is not sent round the writers for the rest of the run (a writer's death otherwise
# stops the run only after pipeline.WRITER_DEATHS in a row with no file published)


class BlockDeaths(RuntimeError):
    """One output block was with a writer each time one died, BLOCK_DEATHS times: the run stops."""


@dataclass
class _Block:
    ref: Any  # the block (an ObjectRef on Ray), kept until its rows are all published
    start: int | None  # the slice of the block that is this run's rows (None: all of it)
    end: int | None
    writer: int  # the writer it was sent to (last)
    size: int  # rows by the block's metadata (end-of-unit rows included), for progress
    rows: int | None = None  # its rows to write, known once its writer has answered
    published: int = 0  # of those, in published files (always its first rows)
    deaths: int = 0  # writers that died (or hung) holding it


class Ledger:
    """The driver's account of the blocks sent to writers (see the module's docstring). Ray-free:
    ``publish`` makes a staged file visible (the fence checked first), ``on_commit`` gets each
    published file's stats row."""

    def __init__(self, publish: Callable[[Staged], None], on_commit: Callable[[dict], None],
                 on_unit_end: Callable[[int, int], None] | None = None,
                 on_units_complete: Callable[[list[tuple[str, str, int]]], None] | None = None):
        self.publish, self.on_commit = publish, on_commit
        self.on_unit_end = on_unit_end or (lambda rows, skipped: None)
        self.units = UnitCompletion(on_units_complete)  # containers complete once their rows are published
        self.blocks: dict[int, _Block] = {}
        self.next_seq = 0
        self.noted: set[int] = set()  # blocks whose end-of-unit rows were counted
        self.files = 0

    def add(self, ref: Any, writer: int, start: int | None = None, end: int | None = None, size: int = 0) -> int:
        """A block sent to ``writer``: its number."""
        seq = self.next_seq
        self.next_seq += 1
        self.blocks[seq] = _Block(ref, start, end, writer, size)
        return seq

    def waiting_rows(self) -> int:
        """Rows sent to writers and not yet in a published file (progress: segmented, not committed)."""
        return sum((b.rows if b.rows is not None else b.size) - b.published for b in self.blocks.values())

    def held_by(self, writer: int) -> list[int]:
        return [seq for seq, b in self.blocks.items() if b.writer == writer]

    def answered(self, answer: dict) -> None:
        """A writer's answer, in the order that writer answered: end-of-unit rows counted once per
        block, rows per block noted, every file staged published in order, blocks wholly published
        let go, units completed."""
        for seq, ends in answer["unit_ends"]:
            if seq in self.noted:
                continue  # a block sent again after its first writer died
            self.noted.add(seq)
            for shard, version, rows, skipped in ends:
                self.units.ended(shard, version, rows)
                self.on_unit_end(rows, skipped)
        for seq, rows in answer["rows"].items():
            if seq in self.blocks:
                self.blocks[seq].rows = rows
        for staged in answer["staged"]:
            self.publish(staged)
            self.files += 1
            self.on_commit(staged.stats)
            for seq, n in staged.covers:
                self.blocks[seq].published += n
            for shard, image_id in staged.members:
                self.units.committed(shard, image_id)
        for seq in [s for s, b in self.blocks.items() if b.rows is not None and b.published >= b.rows]:
            del self.blocks[seq]  # every row of it is in a published file: its reference goes
        self.units.check()

    def resend(self, dead: int, to: Callable[[int], int]) -> list[tuple[int, Any, int | None, int | None, int]]:
        """The blocks writer ``dead`` held, not wholly published: (block number, ref, start, end, rows
        to skip) each, now held by ``to(block number)``."""
        out = []
        for seq in self.held_by(dead):
            b = self.blocks[seq]
            b.deaths += 1
            if b.deaths > BLOCK_DEATHS:
                raise BlockDeaths(f"output block {seq} was with a writer each of the {b.deaths} times one died or "
                                  "hung holding it (a block that kills or stalls its writer, e.g. out of memory): the "
                                  "run stops; the files published are kept, and running the same command again "
                                  "resumes")
            b.writer = to(seq)
            out.append((seq, b.ref, b.start, b.end, b.published))
        return out
