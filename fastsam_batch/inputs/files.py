"""Files: images as objects under a folder, prefix (recursive), glob or one file; local or S3.

``image_id`` is the object's key relative to the listed folder/prefix (or to the part of a glob
before its first wildcard), so the same input always gets the same id, on any machine.

Listing streams: local folders one directory at a time; S3 prefixes one ``ListObjectsV2`` page
(1,000 keys) at a time, and with ``input.list_workers`` > 1 many pages at once (see
:func:`iter_s3_parallel`): a delimiter listing first (each sub-prefix then listed on its own), and
a prefix of many keys split into key ranges as its pages come back. Other fsspec protocols fall
back to ``fs.find`` (one list in memory). The tar and Parquet-of-images forms list their
container files the same way.
"""

from __future__ import annotations

import itertools
import operator
import os
import posixpath
import queue
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import NamedTuple

from ..decode import looks_like_image
from ..retry import with_retries
from ..storage import Storage, protocol_of, strip_protocol, to_uri
from . import UNIT_BATCH, InputForm, Skipped, UnitBatch, batches_of_units, image_keys, unit, unit_batch

GLOB_CHARS = set("*?[")


def glob_base(path: str) -> str:
    """The folder part of a glob before its first wildcard component (what ids are relative to)."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if GLOB_CHARS & set(part):
            return "/".join(parts[:i])
    return posixpath.dirname(path)


def _objects(page: dict, bucket: str, upto: str | None = None) -> list[tuple[str, dict]]:
    out = []
    for obj in page.get("Contents", ()):
        key = obj["Key"]
        if upto is not None and key > upto:
            break
        if not key.endswith("/"):  # "folder" marker objects
            out.append((f"{bucket}/{key}", {"size": obj.get("Size", 0), "ETag": obj.get("ETag", "")}))
    return out


def iter_s3(fs, prefix: str) -> Iterator[tuple[str, dict]]:
    """(bucket/key, info) for every object under ``bucket/prefix``, one ListObjectsV2 page at a time."""
    bucket, _, key_prefix = prefix.partition("/")
    kwargs = {"Bucket": bucket, "Prefix": key_prefix}
    while True:
        page, _ = with_retries(lambda: fs.call_s3("list_objects_v2", **kwargs))
        yield from _objects(page, bucket)
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def split_points(keys: list[str], prefix: str, last: str, upto: str | None, limit: int = 64) -> list[str]:
    """Keys strictly between ``last`` and ``upto`` (None: the end of ``prefix``) at which to split
    the rest of a listing into ranges. Any points give a correct split (ranges (a, b] cover every
    key once); these aim at where keys vary: at each position from the end of ``prefix`` to the
    first one where this page's keys differ, the characters seen in the page that sort after
    ``last``'s own, of those seen where the page's keys vary (digits for numbered keys)."""
    first = keys[0] if keys else last
    varies = next((i for i, (a, b) in enumerate(zip(first, last)) if a != b), min(len(first), len(last)))
    chars = sorted({k[varies] for k in keys if len(k) > varies} or set("".join(k[len(prefix):] for k in keys)))
    points = set()
    for k in range(len(prefix), min(varies, len(last) - 1) + 1):
        for c in chars:
            if c > last[k]:
                b = last[:k] + c
                if b > last and (upto is None or b < upto):
                    points.add(b)
    points = sorted(points)
    if len(points) > limit:  # spread over the candidates: shallow ones cover much, deep ones little
        points = [points[(i * len(points)) // limit] for i in range(limit)]
    return points


def iter_s3_parallel(fs, prefix: str, workers: int) -> Iterator[tuple[str, dict]]:
    """As :func:`iter_s3` (the same objects; not in key order), with up to ``workers`` LIST
    requests in flight. A delimiter listing of the prefix comes first: each sub-prefix it names is
    listed by a task of its own. A flat prefix (and each sub-prefix) is listed as key ranges: a
    task lists one page of its range (StartAfter = the range's start); when more keys follow, it
    splits the rest of its range at :func:`split_points` among the workers then idle (or, none
    being idle, hands it on whole to one task). Pages go through a queue
    of four, so the pages held are about ``workers + 4`` (about 1 MB each, parsed), however many
    keys there are and however fast the listing runs."""
    bucket, _, key_prefix = prefix.partition("/")
    pages: queue.Queue = queue.Queue(maxsize=4)
    closed = threading.Event()
    lock = threading.Lock()
    pending = [0]
    _DONE = object()

    def put(item) -> None:
        while not closed.is_set():
            try:
                pages.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def submit(fn: Callable, *args) -> None:
        with lock:
            pending[0] += 1
        pool.submit(run, fn, *args)

    def run(fn: Callable, *args) -> None:
        try:
            if not closed.is_set():
                fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)
        finally:
            with lock:
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                put(_DONE)

    def list_page(**kwargs) -> dict:
        return with_retries(lambda: fs.call_s3("list_objects_v2", Bucket=bucket, **kwargs))[0]

    def key_range(sub: str, after: str | None, upto: str | None) -> None:
        # The keys of (after, upto] all start with the two bounds' common prefix: asking for that
        # prefix ends the page where the range can hold no more (S3 has no end key).
        narrow = os.path.commonprefix([after, upto]) if after and upto else sub
        page = list_page(Prefix=max(narrow, sub, key=len), **({"StartAfter": after} if after else {}))
        found = _objects(page, bucket, upto)
        if found:
            put(found)
        keys = [o["Key"] for o in page.get("Contents", ())]
        if not page.get("IsTruncated") or not keys or (upto is not None and keys[-1] >= upto):
            return
        rest(keys, sub, upto)

    def rest(keys: list[str], sub: str, upto: str | None) -> None:
        """The keys after ``keys[-1]`` (up to ``upto``): split among the idle workers, if any,
        else one task that goes on from there (so split ranges never outnumber the workers much)."""
        with lock:
            idle = workers - pending[0]
        points = split_points(keys, sub, keys[-1], upto, limit=idle) if idle > 0 else []
        bounds = [keys[-1], *points, upto]
        for a, b in zip(bounds[:-1], bounds[1:]):
            submit(key_range, sub, a, b)

    def by_delimiter(token: str | None) -> None:
        page = list_page(Prefix=key_prefix, Delimiter="/", **({"ContinuationToken": token} if token else {}))
        subs = [p["Prefix"] for p in page.get("CommonPrefixes", ())]
        if token is None and not subs:  # a flat prefix: this page is the first of its key range
            found = _objects(page, bucket)
            if found:
                put(found)
            keys = [o["Key"] for o in page.get("Contents", ())]
            if page.get("IsTruncated") and keys:
                rest(keys, key_prefix, None)
            return
        found = _objects(page, bucket)
        if found:
            put(found)
        for sub in subs:
            submit(key_range, sub, None, None)
        if page.get("IsTruncated"):
            submit(by_delimiter, page["NextContinuationToken"])

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastsam-batch-list")
    try:
        submit(by_delimiter, None)
        while True:
            item = pages.get()
            if item is _DONE:
                with lock:
                    if pending[0] == 0:
                        break
                continue
            if isinstance(item, BaseException):
                raise item
            yield from item
    finally:
        closed.set()
        pool.shutdown(wait=False, cancel_futures=True)


_NAME = operator.attrgetter("name")


def list_folder(folder: str) -> tuple[list[str], list[str]]:
    """A local folder's files and its subfolders (paths), each in name order (a folder gone or
    unreadable: none). Links to files are files; links to folders are not walked (no cycles)."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=_NAME)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return [], []
    files, subfolders = [], []
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            subfolders.append(e.path)
        elif e.is_file():
            files.append(e.path)
    return files, subfolders


def _iter_local(root: str) -> Iterator[tuple[str, dict]]:
    """(path, info) for every file under ``root``, one folder at a time: a folder's files in name
    order, then its subfolders', each in name order (depth first)."""
    stack = [root]
    while stack:
        files, subfolders = list_folder(stack.pop())
        for path in files:
            st = os.stat(path)
            yield path, {"size": st.st_size, "mtime": st.st_mtime}
        stack.extend(reversed(subfolders))


def _iter_tree(fs, protocol: str, root: str, workers: int = 1) -> Iterator[tuple[str, dict]]:
    if protocol == "file":
        return _iter_local(root)
    if protocol in ("s3", "s3a") and hasattr(fs, "call_s3"):
        prefix = root.rstrip("/") + "/"
        return iter_s3_parallel(fs, prefix, workers) if workers > 1 else iter_s3(fs, prefix)
    return iter(sorted(fs.find(root, detail=True).items()))  # other protocols: one list, as fsspec gives it


def _where(uri: str, storage: Storage) -> tuple[str, object, str, str, str | None]:
    """(protocol, file system, path, base the ids are relative to, the glob's regex or None)."""
    protocol = protocol_of(uri)
    fs = storage.fs(uri)
    path = strip_protocol(uri)
    if protocol == "file":
        path = path if path.startswith("/") else posixpath.abspath(path)
    if GLOB_CHARS & set(path):
        from fsspec.utils import glob_translate

        return protocol, fs, path, glob_base(path), glob_translate(path)
    return protocol, fs, path, path.rstrip("/"), None


def iter_objects(uri: str, storage: Storage, workers: int = 1) -> tuple[str, Iterator[tuple[str, dict]]]:
    """(base the ids are relative to, iterator of (path, info)) for a folder, prefix, glob or file.
    Raises FileNotFoundError, naming the uri, when there is nothing there at all."""
    protocol, fs, path, base, glob = _where(uri, storage)
    if glob is not None:
        pattern = re.compile(glob)
        found = ((p, info) for p, info in _iter_tree(fs, protocol, base, workers) if pattern.match(p))
    elif not path.endswith("/") and fs.isfile(path):
        base = posixpath.dirname(path)
        found = iter([(path, fs.info(path))])
    else:
        if protocol == "file" and not os.path.isdir(base):
            raise FileNotFoundError(f"input.uri {uri!r}: no such file, folder or prefix")
        found = _iter_tree(fs, protocol, base, workers)
        if protocol == "file":
            return base, _nonempty(found, uri, EMPTY_FOLDER)
    return base, _nonempty(found, uri)


EMPTY_FOLDER = "an empty folder (no files in it or its subfolders)"


NOTHING_LISTED = "no such file, folder or prefix (nothing is listed there)"


def _nonempty(found: Iterator, uri: str, empty: str = NOTHING_LISTED) -> Iterator:
    first = next(found, None)
    if first is None:
        raise FileNotFoundError(f"input.uri {uri!r}: {empty}")
    yield first
    yield from found


def mtime_version(mtime: float | None) -> str:
    """A local file's version: its modification time (none for a time of 0 or unknown)."""
    return f"mtime:{mtime}" if mtime else ""


def version_of(info: dict) -> str:
    """What changes when the object does: S3's ETag; for local files the modification time."""
    etag = info.get("ETag") or info.get("etag") or mtime_version(info.get("mtime"))
    return str(etag).strip('"')


def iter_files(uri: str, storage: Storage, skipped: Skipped, keep: Callable[[str], bool] | None = looks_like_image,
               workers: int = 1, kind: str = "object") -> Iterator[dict]:
    """Units for the files under ``uri`` that ``keep`` accepts (by key; None: every file); the
    others go to ``skipped``. The first ``next()`` raises FileNotFoundError when nothing is listed."""
    protocol = protocol_of(uri)
    base, found = iter_objects(uri, storage, workers)
    for p, info in found:
        rel = posixpath.relpath(p, base) if base else p
        if rel.startswith("../") or rel == ".":
            rel = p
        if keep is not None and not keep(rel):
            skipped.add(rel)
            continue
        yield unit(rel, to_uri(protocol, p), info.get("size") or 0, version_of(info), kind)


# ---------------------------------------------------------------------------------------------
# A local folder walked by planning's process pool (issue 23: a billion files)

WALK_AHEAD = 2  # tasks of the walk a process of the pool started ahead of the plan
FOLDER_FILES = 1 << 14  # files a task of the walk stats and makes units of, at most
TASK_FOLDERS = 1 << 10  # folders a task of the walk lists, at most


class _Work:
    """A piece of the walk, in its order: the walk from a folder down (``folder``), or files of a
    large folder (``paths``: those past what its listing's task made)."""

    __slots__ = ("folder", "paths", "future")

    def __init__(self, folder: str | None = None, paths: list[str] | None = None):
        self.folder, self.paths, self.future = folder, paths, None


def file_batches(uri: str, storage: Storage, skipped: Skipped, keep: Callable[[str], bool] | None = looks_like_image,
                 workers: int = 1, pool=None) -> Iterator[UnitBatch]:
    """:func:`iter_files`' units as :class:`.UnitBatch` es, in the same order. A local folder or
    glob is walked by ``pool`` (a :class:`.parallel.PlanPool`, when active). A task walks from a
    folder down in the walk's order (:func:`walk_units`), listing folders and making their files'
    units (stat, ids, versions, image check and keys, as columns) until it has made
    :data:`FOLDER_FILES` or listed :data:`TASK_FOLDERS` folders, and gives back what is left: the
    rest of a large folder's files (tasks of their own, :func:`path_units`) and the folders it did
    not reach. The driver keeps the walk's order (a folder's files, then its subfolders', depth
    first, as :func:`iter_files`), starts the tasks of the first :data:`WALK_AHEAD` x processes
    pieces of it (a piece pushed back out of those by the walk goes back to waiting, if its task
    has not started; one that has keeps its result until its turn), and gives the units in
    batches of ``UNIT_BATCH`` (the last one fewer). The first tasks, up to the pool's
    ``after_rows`` files, run here (a small folder starts no process). Other inputs:
    :func:`iter_files`, batched."""
    protocol, _, path, base, glob = _where(uri, storage)
    if pool is None or not pool.active or protocol != "file" or not base or keep not in (None, looks_like_image) \
            or (glob is None and not os.path.isdir(base)):
        yield from batches_of_units(iter_files(uri, storage, skipped, keep, workers))
        return
    images_only = keep is not None
    order: deque[_Work] = deque([_Work(base)])  # the walk's pieces not yet given, in its order
    ahead = WALK_AHEAD * pool.processes
    here = 0  # files listed or stat-ed by the tasks run here (the driver's share, against after_rows)
    listed = 0  # files the glob matched (all without one): none is nothing there
    held: list[UnitBatch] = []  # units not yet given (fewer than UNIT_BATCH)
    held_rows = 0

    def task(work: _Work):
        if work.paths is None:
            return walk_units, (work.folder, base, glob, images_only, skipped.limit, FOLDER_FILES, TASK_FOLDERS)
        return path_units, (work.paths, base, images_only, skipped.limit)

    def start(work: _Work) -> None:
        fn, args = task(work)
        work.future = pool.submit(fn, *args)

    try:
        while order:
            if here >= pool.after_rows:
                for work in itertools.islice(order, ahead):
                    if work.future is None:
                        start(work)
            work = order.popleft()  # started above (it was first) unless the driver still does its share
            if work.future is None:
                fn, args = task(work)
                scan = fn(*args)
                here += scan.seen
            else:
                scan = work.future.result()
            listed += scan.matched
            skipped.merge(scan.skipped)
            new = [_Work(paths=scan.rest[at:at + FOLDER_FILES]) for at in range(0, len(scan.rest), FOLDER_FILES)]
            new += [_Work(f) for f in scan.then]
            order.extendleft(reversed(new))
            for pushed in itertools.islice(order, ahead, 2 * ahead + len(new)):  # out of the first places now
                if pushed.future is not None and pushed.future.cancel():  # not started: back to waiting
                    pushed.future = None
            if scan.batch is not None:
                held.append(scan.batch)
                held_rows += len(scan.batch)
                if held_rows >= UNIT_BATCH:
                    whole = _joined(held)
                    full = held_rows - held_rows % UNIT_BATCH
                    for at in range(0, full, UNIT_BATCH):
                        yield whole.slice(at, UNIT_BATCH)
                    held = [whole.slice(full, UNIT_BATCH)] if full < held_rows else []
                    held_rows -= full
        if held:
            yield _joined(held)
    finally:
        for work in order:
            if work.future is not None:
                work.future.cancel()
    if not listed:
        raise FileNotFoundError(f"input.uri {uri!r}: {EMPTY_FOLDER if glob is None else NOTHING_LISTED}")


def _joined(batches: list[UnitBatch]) -> UnitBatch:
    import numpy as np
    import pyarrow as pa

    if len(batches) == 1:
        return batches[0]
    return UnitBatch(pa.concat_tables([b.table for b in batches]).combine_chunks(),
                     np.concatenate([b.hi for b in batches]), np.concatenate([b.lo for b in batches]))


class FolderScan(NamedTuple):
    """What a task of the walk gives back (:func:`walk_units`, :func:`path_units`)."""

    batch: UnitBatch | None  # the units made, with their id keys; None: none
    skipped: Skipped  # keys skipped as not images, ``limit`` examples at most
    seen: int  # files listed, or stat-ed (a task of a folder's rest): the work done
    matched: int  # files listed that the glob matched (all without one), skipped or not
    rest: list[str]  # the last folder's files past those made (a large folder's): for tasks of their own
    then: list[str]  # folders of the walk not reached, in the walk's order (after ``rest``)


def walk_units(folder: str, base: str, glob: str | None, images_only: bool, limit: int | None,
               most: int = FOLDER_FILES, folders: int = TASK_FOLDERS) -> FolderScan:
    """The walk from ``folder`` down, in :func:`iter_files`' order (a folder's files, then its
    subfolders', depth first): folders listed, and their files that ``glob`` matches made into
    units (:func:`path_units`), until ``most`` files are taken or ``folders`` listed; the files of
    the last folder not taken and the folders not reached given back, in order."""
    stack = [folder]
    paths: list[str] = []
    rest: list[str] = []
    seen = matched = done = 0
    pattern = _compiled(glob) if glob is not None else None
    while stack and len(paths) < most and done < folders:
        files, subfolders = list_folder(stack.pop())
        done += 1
        seen += len(files)
        if pattern is not None:
            files = [f for f in files if pattern.match(f)]
        matched += len(files)
        stack.extend(reversed(subfolders))
        room = most - len(paths)
        paths.extend(files[:room])
        if len(files) > room:
            rest = files[room:]
            break
    batch, skipped = _units_of(paths, base, images_only, limit)
    return FolderScan(batch, skipped, seen, matched, rest, stack[::-1])


def path_units(paths: list[str], base: str, images_only: bool, limit: int | None) -> FolderScan:
    """A task of a large folder's files (already listed and counted): their units."""
    batch, skipped = _units_of(paths, base, images_only, limit)
    return FolderScan(batch, skipped, len(paths), 0, [], [])


def _units_of(paths: list[str], base: str, images_only: bool, limit: int | None
              ) -> tuple[UnitBatch | None, Skipped]:
    """Units of files of the walk (paths under ``base``), column by column: ids (the paths past
    ``base``, as posixpath.relpath gives them for these), sizes and versions (stat), the image
    check (:func:`.image_keys`; names that are not UTF-8 by :func:`.decode.looks_like_image`, as
    :func:`iter_files` checks them), the ids' keys; and the keys skipped."""
    import numpy as np
    import pyarrow as pa

    from ..index import id_keys

    skipped = Skipped(limit=limit)
    if not paths:
        return None, skipped
    cut = len(base) + 1  # every path walked is base + "/" + ...: its id the rest (posixpath.relpath's)
    rels = [p[cut:] for p in paths]
    if not images_only:
        keep = np.ones(len(rels), bool)
    else:
        try:
            keep = image_keys(pa.array(rels, pa.string()))
        except UnicodeEncodeError:  # a name not UTF-8 (surrogate escapes): each checked in Python
            keep = np.array([looks_like_image(r) for r in rels], bool)
    kept = []
    for j, k in enumerate(keep.tolist()):
        if k:
            kept.append(j)
        else:
            skipped.add(rels[j])
    if not kept:
        return None, skipped
    ids = [rels[j] for j in kept]
    stats = [os.stat(paths[j]) for j in kept]
    hi, lo = id_keys(ids)
    batch = unit_batch(ids, [paths[j] for j in kept], [st.st_size for st in stats],
                       [mtime_version(st.st_mtime) for st in stats], hi=hi, lo=lo)
    return batch, skipped


_compiled = lru_cache(maxsize=None)(re.compile)  # a glob's regex, compiled once a process


def open_form(cfg, storage: Storage) -> InputForm:
    keep = looks_like_image if cfg.skip_non_images else None
    return InputForm("files", lambda skipped: iter_files(cfg.uri, storage, skipped, keep, cfg.list_workers),
                     batches=lambda skipped, pool=None: file_batches(cfg.uri, storage, skipped, keep,
                                                                     cfg.list_workers, pool))
