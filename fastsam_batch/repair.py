"""The few steps that rewrite or delete committed files under ``output.uri``, each behind the lease fence.

Every function here takes the run's ``fence`` (:class:`.lease.LeaseFence`) and checks it before
each put and each delete, so a run whose lease was taken over changes nothing more (it raises
:class:`.lease.LeaseLost`). Each step is safe to cut short at any point (a killed driver) and to
run again:

- a file is rewritten without some rows by putting the kept rows to a new content-addressed name
  first and deleting the old file after; a kill in between leaves both, i.e. rows of one image in
  two files, which :func:`.resume.duplicate_rows` finds and the next run repairs. A file from which
  nothing is dropped is left alone (never put and then deleted under its own name).
- ``_units/`` records are merged by writing the merged record first and deleting the merged ones
  after; a record is only ever deleted once every unit it names is in a record written before.

What each step decides (which rows, which files) is pure logic in :mod:`.index`; the index read
at the start of the run is kept current through these steps (each reports the files it rewrote,
:func:`.resume.apply_rewrites` reads only those), never read whole again; the table of
every write and delete the job makes, with its fence and crash-safety argument, is in ARCHITECTURE.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from .plan import remove_plan_files
from .index import (Committed, Duplicates, duplicate_rows, id_key, rows_in_other_files, rows_outside,
                    stale_unit_rows, superseded_parts, version_keys)
from .resume import (UNITS_DIR, _names_starting, apply_rewrites, read_committed, read_units_records, refresh_committed,
                     write_units_record)
from .saved_index import INDEX_DIR
from .storage import Storage, join_uri, protocol_of, strip_protocol
from .write import parquet_file_bytes, part_name, put_atomic


def drop_rows(output_uri: str, storage: Storage, rows: dict[str, set], compression: str | None = "zstd", *,
              fence, keep_one: dict[str, set[tuple[bytes, int]]] | None = None,
              keep_version: dict[bytes, str] | None = None, rewrites: dict[str, str | None] | None = None) -> int:
    """Rewrites each named Parquet file without some of its rows. ``rows``: part -> what goes there:
    an id key (every row of the image, except a row of the version ``keep_version`` names for it,
    or of no recorded version) or an (id key, version key) pair (the rows of that image and version);
    ``keep_one``: part -> (id key, version key) pairs of which one row there stays (an ok one, else
    the first). The kept rows go to a new content-addressed file first, then the old file is
    deleted. A file with nothing to drop is not touched. Returns the number of rows dropped;
    ``rewrites`` (when given) gets old file -> the file of its kept rows (None: nothing kept), in
    the form the committed index names files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keep_one = keep_one or {}
    fs = storage.fs(output_uri)
    dropped = 0
    for part in sorted(set(rows) | set(keep_one)):
        with fs.open(part, "rb") as f:
            table = pq.read_table(f)
        keys = [id_key(i) for i in table.column("image_id").to_pylist()]
        versions = (table.column("source_version").to_pylist() if "source_version" in table.column_names
                    else [""] * len(keys))
        pairs = list(zip(keys, version_keys(versions).tolist()))
        gone, once = rows.get(part, set()), keep_one.get(part, set())

        def goes(k: bytes, v: str | None, p: tuple[bytes, int]) -> bool:
            if p in gone:
                return True
            if k not in gone:
                return False
            return keep_version is None or (bool(v) and keep_version.get(k) != v)

        drop = np.array([goes(k, v, p) for k, v, p in zip(keys, versions, pairs)], bool)
        if once:
            ok = [s == "ok" for s in table.column("status").to_pylist()]
            chosen: dict[tuple[bytes, int], int] = {}
            for i, p in enumerate(pairs):
                if p in once and not drop[i] and (p not in chosen or (ok[i] and not ok[chosen[p]])):
                    chosen[p] = i
            for i, p in enumerate(pairs):
                if p in chosen and chosen[p] != i:
                    drop[i] = True
        if not drop.any():
            continue  # nothing of this file goes: it stays as it is
        keep = table.filter(pa.array(~drop))
        dropped += table.num_rows - keep.num_rows
        new = None
        if keep.num_rows:
            new = _free_rewrite_name(output_uri, fs, part, keep.column("image_id").to_pylist())
            data = parquet_file_bytes(keep, compression)
            fence.check(storage)
            put_atomic(storage, new, data)
        fence.check(storage)
        fs.rm(part)
        if rewrites is not None:
            # named as the listing names the file it replaces (same folder)
            rewrites[part] = f"{part.rsplit('/', 1)[0]}/{new.rsplit('/', 1)[-1]}" if new else None
    return dropped


def _free_rewrite_name(output_uri: str, fs, part: str, kept_ids: list[str]) -> str:
    """A name for the rewrite of ``part`` that no file has: never ``part`` itself, nor another
    committed file (one holding exactly the kept ids, or an earlier, cut-short rewrite of ``part``,
    which this repair may be about to drop from or delete: putting over it would lose its rows)."""
    for attempt in range(1000):
        new = join_uri(output_uri, part_name(kept_ids, rewrite_of=part if not attempt else f"{part}#{attempt}"))
        if strip_protocol(new) == strip_protocol(part):
            continue
        fs.invalidate_cache(strip_protocol(new))
        if not fs.exists(new):
            return new
    raise RuntimeError(f"no free name for a rewrite of {part}")


def drop_superseded_rows(output_uri: str, storage: Storage, superseded: dict[str, dict[str, str]],
                         compression: str | None = "zstd", *, fence, rewrites: dict | None = None) -> int:
    """Rows of older versions of objects dropped (``superseded``: part -> {image id: its version now});
    the row of the version now stays, also when it is in the same file."""
    keep = {id_key(i): v for ids in superseded.values() for i, v in ids.items()}
    return drop_rows(output_uri, storage, {part: {id_key(i) for i in ids} for part, ids in superseded.items()},
                     compression, fence=fence, keep_version=keep, rewrites=rewrites)


def _warn(message: str) -> None:
    logging.getLogger(__name__).warning(message)


def with_kept_copies_present(output_uri: str, storage: Storage, duplicates: Duplicates, log=None) -> Duplicates:
    """``duplicates`` without the repairs whose chosen copy is gone although the index still lists
    it (a listing that lags a delete; a paused earlier lease holder's repair): deleting the other
    copies would lose the image. Each file chosen to keep is asked for once; those skipped are
    said in one line (``log``), and the next run repairs them."""
    if not duplicates.kept:
        return duplicates
    fs = storage.fs(output_uri)
    missing = set()
    for part in sorted(duplicates.kept):
        fs.invalidate_cache(part)
        if not fs.exists(part):
            missing.add(part)
    if not missing:
        return duplicates
    skipped = set().union(*(duplicates.kept[p] for p in missing))
    (log or _warn)(f"warning: duplicate rows of {len(skipped)} images left for the next run: the file chosen to "
                   f"keep ({', '.join(sorted(missing)[:3])}{', ...' if len(missing) > 3 else ''}) is listed but gone")
    return Duplicates({p: ks - skipped for p, ks in duplicates.drop.items() if ks - skipped},
                      {p: ks for p, ks in duplicates.keep_one.items() if p not in missing},
                      {p: ks for p, ks in duplicates.kept.items() if p not in missing})


def remove_duplicates(output_uri: str, storage: Storage, duplicates: Duplicates, compression: str | None = "zstd", *,
                      fence, rewrites: dict | None = None, log=None) -> int:
    """The rows :func:`.resume.duplicate_rows` chose, dropped: one row per image and version stays
    (only where the copy chosen to keep still exists: :func:`with_kept_copies_present`)."""
    duplicates = with_kept_copies_present(output_uri, storage, duplicates, log)
    return drop_rows(output_uri, storage, duplicates.drop, compression, fence=fence, keep_one=duplicates.keep_one,
                     rewrites=rewrites)


def rename_parts(rows: dict[str, set], rewrites: dict[str, str | None]) -> dict[str, set]:
    """``rows`` (part -> what to drop there) with the files :func:`drop_rows` rewrote named as they are
    now (``rewrites``: old -> new, None where nothing was kept: nothing left to drop there)."""
    out: dict[str, set] = {}
    for part, what in rows.items():
        now = rewrites.get(part, part)
        if now is not None:
            out.setdefault(now, set()).update(what)
    return out


def _replacing(old: Committed, new: Committed, owned: bool) -> bool:
    """``new`` replaces ``old``: ``old``'s scratch files removed now if it is ``owned`` (made here,
    or handed over by the caller), not when it is garbage collected. Returns whether ``new`` is
    owned (an index made here is; ``old`` itself, returned unchanged, stays as it was)."""
    if new is old:
        return owned
    if owned:
        old.close()
    return True


def drop_left_over_rows(output_uri: str, storage: Storage, committed: Committed,
                        superseded: dict[str, dict[str, str]], stale_units: dict[str, set[bytes]],
                        compression: str | None = "zstd", *, fence, owned: bool = False) -> Committed:
    """Before the segmentation: rows a run cut short left behind dropped: rows of replaced objects
    whose new rows are committed (``superseded``), then rows of old versions of containers whose
    new version is complete (``stale_units``, part -> id keys; where the first drop rewrote a file
    holding both, the keys follow it to its new name). Returns ``committed`` kept current; each
    index replaced here is closed, ``committed`` itself only if ``owned`` (the caller hands it over)."""
    rewrites: dict[str, str | None] = {}
    if superseded:
        drop_superseded_rows(output_uri, storage, superseded, compression, fence=fence, rewrites=rewrites)
        new = apply_rewrites(committed, output_uri, storage, rewrites)
        owned, committed = _replacing(committed, new, owned), new
    if stale_units:
        stale_units = rename_parts(stale_units, rewrites)
        rewrites = {}
        drop_rows(output_uri, storage, stale_units, compression, fence=fence, rewrites=rewrites)
        new = apply_rewrites(committed, output_uri, storage, rewrites)
        owned, committed = _replacing(committed, new, owned), new
    return committed


def remove_files(storage: Storage, paths: list[str], *, fence) -> None:
    """Deletes the given files (``--overwrite``: the old output, once the new run is ready to write)."""
    if paths:
        fence.check(storage)
        storage.fs(paths[0]).rm(paths)


def remove_stale_temporaries(output_uri: str, storage: Storage, *, fence) -> int:
    """Files staged and never published (writers.py: a killed run's writers; a run whose lease was
    taken over), removed at a run's start, before its own writers start (so none of them is this
    run's): locally the temporary files (``_tmp-*``) in the output and its ``_units/``, ``_runs/``
    and ``_index/`` folders; on S3 the open multipart uploads of part files directly under the output
    and of saved indexes (``_index/``)
    (aborted: S3 keeps an open upload's parts, and bills them, until then; S3 puts of the
    driver's records are single PUTs, never partial)."""
    if protocol_of(output_uri) in ("s3", "s3a"):
        from .writers import abort_uploads, open_uploads

        uploads = open_uploads(output_uri, storage, index=True)
        if uploads:
            fence.check(storage)
            abort_uploads(output_uri, storage, uploads)
        return len(uploads)
    if protocol_of(output_uri) != "file":
        return 0
    stale = [p for folder in (output_uri, join_uri(output_uri, UNITS_DIR), join_uri(output_uri, "_runs"),
                              join_uri(output_uri, INDEX_DIR))
             for p in _names_starting(folder, storage, "_tmp-")]
    if stale:
        fence.check(storage)
        storage.fs(output_uri).rm(stale)
    return len(stale)


def compact_units_records(output_uri: str, storage: Storage, *, fence) -> None:
    """The ``_units/`` records merged into one file per fingerprint (fewer reads on the next run):
    every merged record is written before any record is deleted, and only records whose every
    unit is in a merged one are deleted."""
    complete, files = read_units_records(output_uri, storage)
    if len(files) < 2:
        return
    by_fp: dict[str, list[tuple[str, str, int]]] = {}
    for uri, versions in complete.items():
        for (version, fp), rows in versions.items():
            by_fp.setdefault(fp, []).append((uri, version, rows))
    merged = {strip_protocol(write_units_record(output_uri, storage, fp, units, fence)).rsplit("/", 1)[-1]
              for fp, units in by_fp.items()}
    old = [f for f in files if f.rsplit("/", 1)[-1] not in merged]
    if old:
        fence.check(storage)
        storage.fs(output_uri).rm(old)


def repair_at_start(output_uri: str, storage: Storage, committed: Committed, compression: str | None, *,
                    fence, log=None, owned: bool = False) -> tuple[Committed, int]:
    """Before planning: rows of one image written twice (two runs at once, a rewrite cut short, a
    member given twice) reduced to one, temporaries of killed writers and plan files of runs cut
    short removed. Returns the committed rows as they are now (``committed`` updated by the files
    rewritten, not read again; ``owned``: the caller hands ``committed`` over, closed once
    replaced), and the rows dropped."""
    deduplicated = 0
    twice = duplicate_rows(committed)
    if twice:
        rewrites: dict[str, str | None] = {}
        deduplicated = remove_duplicates(output_uri, storage, twice, compression, fence=fence, rewrites=rewrites,
                                         log=log)
        new = apply_rewrites(committed, output_uri, storage, rewrites)
        _replacing(committed, new, owned)
        committed = new
    remove_stale_temporaries(output_uri, storage, fence=fence)
    fence.check(storage)
    remove_plan_files(output_uri, storage)
    return committed, deduplicated


def repair_at_end(output_uri: str, storage: Storage, compression: str | None, *, fence, written: set[str],
                  changed: dict[str, str], retried: set[str], completed: dict[str, str] | None = None,
                  retried_rows: dict[str, set[bytes]] | None = None,
                  committed: Committed | None = None, log=None, owned: bool = False,
                  deltas: Sequence[str] = ()) -> tuple[Committed, int, int]:
    """After the segmentation (finished or interrupted): rows of objects that changed replaced by
    this run's, rows of old container versions and of retried error rows dropped where their new
    rows are committed, ``_units/`` records merged, duplicates reduced to one (this run's row
    kept). ``committed``: the index as the start of the run left it, brought up to date by one
    listing (the files this run wrote, any other run's that landed, and any whose listing entry
    changed, read; nothing else is read again); without it the output is read whole. Listed once
    more before the duplicates are chosen (a file deleted meanwhile must not be the copy kept).
    Each index made here is closed (its scratch files removed) as soon as a newer one replaces it;
    ``committed`` too if ``owned`` (the caller hands it over and does not use it after).
    ``deltas``: the run's index deltas (what it wrote, read back during the run): files they hold
    as listed now are taken from them, not read again (:func:`.resume.refresh_committed`).
    Returns the committed rows as they are now, rows superseded and rows deduplicated."""
    if committed is None:
        final, owned = read_committed(output_uri, storage), True
    else:
        final = refresh_committed(committed, output_uri, storage, reread=written, deltas=deltas)
        owned = _replacing(committed, final, owned)
    superseded = deduplicated = 0

    def replace_final(new: Committed) -> None:
        nonlocal final, owned
        owned, final = _replacing(final, new, owned), new

    def drop(rows: dict, **kw) -> int:
        rewrites: dict[str, str | None] = {}
        n = drop_rows(output_uri, storage, rows, compression, fence=fence, rewrites=rewrites, **kw)
        replace_final(apply_rewrites(final, output_uri, storage, rewrites))
        return n

    if changed:  # rows of objects that changed, replaced by this run's
        found = superseded_parts(final, changed)
        keep = {id_key(i): v for ids in found.values() for i, v in ids.items()}
        superseded = drop({part: {id_key(i) for i in ids} for part, ids in found.items()}, keep_version=keep)
    stale = stale_unit_rows(final, completed) if completed else {}
    if stale:  # containers read again whole (changed): rows of their old versions go
        superseded += drop(stale)
    redone = set().union(*(k for uri, k in (retried_rows or {}).items() if uri in (completed or {})))
    old_errors = rows_in_other_files(final, redone, written) if redone else {}
    if old_errors:  # error rows of containers read again (--retry-errors): their new rows are in
        drop(old_errors)
    if completed:
        compact_units_records(output_uri, storage, fence=fence)
    if retried:  # error rows processed again: the old rows go where a new one is committed
        drop({part: {id_key(i) for i in ids} for part, ids in rows_outside(final, retried, written).items()})
    replace_final(refresh_committed(final, output_uri, storage))  # files gone (or changed) since: not chosen to keep
    twice = duplicate_rows(final, prefer=written)
    if twice:  # another run's commit that landed while this run wrote the same images: this run's rows stay
        twice = with_kept_copies_present(output_uri, storage, twice, log)
        deduplicated = drop(twice.drop, keep_one=twice.keep_one)
    return final, superseded, deduplicated
