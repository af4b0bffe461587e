"""The job's lifecycle: checks before any work, the plan (streaming listing, prompts, resume),
the segmentation (:mod:`.pipeline`, the Ray part), then the end-of-run checks and summary."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

from . import __version__
from .manifest import Manifest
from .metrics import CommitMetrics
from .console import silence_ray
from .model import check_checkpoint, fetch_checkpoint
from .preflight import (PreflightError, check_device, check_listable, check_locations, check_ray_address,
                        check_writable)
from .sizing import local_machine, plan_actors, plan_writers, usable_cpus
from .offline import configure_ultralytics
from .progress import Progress
from .preflight import check_output_placement, check_uploads
from .inputs import CONTAINERS, InputError, Skipped, open_input
from .plan import PlanCount, PlanParts, PlanWave, StreamedPlan, chunked
from .mask_rules import MaskRules
from .prompts import PromptSourceError, global_prompts, load_coco, load_prompt_table
from .segment import SegmentSettings
from .lease import Lease, LeaseHeld, LeaseLost, new_run_id
from .repair import drop_left_over_rows, remove_files, repair_at_end, repair_at_start
from .index import CHANGED, FRESH, Committed, stale_unit_rows, version_keys_arrow
from .parallel import PlanPool, look_up, plan_processes, source_versions
from .resume import (read_committed, read_units_records, run_fingerprint, source_version,
                     write_units_record)
from .saved_index import INDEX_DIR, save_index, saved_covers
from .checkpoints import IndexCheckpoints
from .storage import Storage, join_uri, protocol_of, redact
from .summary import RunSummary
from .write import Interrupted, put_atomic
from .writers import Ledger, Staged, abort_uploads, open_uploads, publish as publish_staged
from .pipeline import WriterPool, embedded_ray_line, ray_address, run_segmentation, start_ray

STREAM_AFTER_FILES = 16  # plan files on file (with planning still going) before the run starts on them
LIST_CHUNK = 1000  # listed containers handled at a time on the driver; the plan's parts: per this many listed
_log = logging.getLogger(__name__)
RUNS_DIR = "_runs"  # each run's summary, kept: _runs/<run id>.json (the run id starts with its start time)
ALL_ERRORS = "all"  # --retry-errors with no reasons: every error row


class JobError(RuntimeError):
    """A problem with the job as a whole (not one image): reported and the run stops."""


class PromptAttacher:
    """Reads the prompt sources (before any work), then gives each planned item its prompts as a
    JSON string, a chunk at a time. ``sources`` identifies the sources for the run fingerprint.
    Counts in the summary the images without prompts and the table's keys that match no input image."""

    def __init__(self, m: Manifest, storage: Storage):
        p = self.p = m.prompts
        self.sources: dict = {}
        self.index = None
        self.common: list[dict] = []
        self.seen: set[str] = set()
        if not p.prompted:
            return
        try:
            if p.table:
                self.index = load_prompt_table(p.table, storage, p.key, p.table_format)
            elif p.coco:
                self.index = load_coco(p.coco, storage, p.coco_include_crowd)
        except PromptSourceError as e:
            raise JobError(str(e)) from None
        self.common = global_prompts(p.boxes, p.points, p.point_labels, p.texts)
        if bool(p.texts) or bool(self.index and self.index.has_texts):
            if not p.clip:
                raise JobError(f"prompts.clip is required: the prompt table {p.table!r} has text prompts")
            from .clip_text import ClipError, clip_sha256

            try:
                self.sources["clip_sha256"] = clip_sha256(p.clip, storage)
            except ClipError as e:
                raise JobError(str(e)) from None
        self.key = "uri" if (p.table and p.key == "uri") else "image_id"
        if self.index is not None:
            self.sources["source_sha256"] = self.index.sha256

    def attach(self, items: list[dict], summary: RunSummary) -> None:
        if not self.p.prompted:
            return
        for it, text in zip(items, self.texts([it[self.key] for it in items], summary)):
            it["prompts"] = text

    def texts(self, keys: list[str], summary: RunSummary) -> list[str]:
        """The prompts of the images of these keys (``image_id``, or ``uri`` where the table is
        keyed by URI), as JSON strings ("" none); only when prompted."""
        by_key = self.index.by_key if self.index else {}
        out = []
        for key in keys:
            own = by_key.get(key, [])
            if own:
                self.seen.add(key)
            prompts = self.common + own
            out.append(json.dumps(prompts, separators=(",", ":")) if prompts else "")
            summary.images_without_prompts += not prompts
            summary.prompts_planned += len(prompts)
        return out

    def finish(self, summary: RunSummary) -> None:
        if self.index is None:
            return
        missing = sorted(k for k in self.index.by_key if k not in self.seen)
        summary.prompt_source_rows = self.index.rows
        summary.prompt_rows_without_image = self.index.rows_without_key
        summary.prompt_bad_rows = sum(self.index.bad_rows.values())
        summary.prompt_images_not_in_input = len(missing)
        summary.prompt_images_not_in_input_examples = missing[:5]


def attach_prompts(m: Manifest, storage: Storage, items: list[dict], summary: RunSummary) -> dict:
    """:class:`PromptAttacher` on one list of items; returns the sources for the fingerprint."""
    attacher = PromptAttacher(m, storage)
    attacher.attach(items, summary)
    attacher.finish(summary)
    return attacher.sources


@dataclass
class Planned:
    """What planning found: the plan parts, and what the end of the run must tidy."""

    plan: PlanParts | PlanCount
    superseded: dict[str, dict[str, str]]  # part -> {image id: version now}: older rows to drop now (a run cut short)
    changed: dict[str, str]  # image id -> version now: old rows dropped once the new one is committed
    retried: set[str]  # images whose error rows are processed again
    carried: list[str] = field(default_factory=list)  # input columns carried into the output
    units: dict[str, str] = field(default_factory=dict)  # container URI -> version, planned (to read)
    stale_units: dict[str, set[bytes]] = field(default_factory=dict)  # part -> rows of old container versions
    retried_rows: dict[str, set[bytes]] = field(default_factory=dict)  # container URI -> error rows read again


def plan_job(m: Manifest, storage: Storage, summary: RunSummary, committed: Committed,
             prompts: PromptAttacher, retry: frozenset[str] | None = None, plan: PlanParts | PlanCount | None = None,
             complete_units: dict[str, dict[tuple[str, str], int]] | None = None, stop=None,
             on_open=None) -> Planned:
    """Lists the input (streaming), gives items their prompts and source versions, and keeps those
    without a current committed row, in plan parts. Returns the parts, the rows of older object
    versions to drop now (left by a run cut short), the changed images (id -> version now), whose
    old rows are dropped once the new ones are committed, and the images whose error rows are
    processed again (``retry``: the error reasons to retry, ``ALL_ERRORS`` for every one).
    ``plan``: where the items go (default: plan parts under the output; PlanCount: counted only).
    ``stop`` (a threading.Event; plan.StreamedPlan's): once set, planning ends at its next batch and
    returns what it planned so far. ``on_open``: called with the input form once it is open."""
    plan = plan if plan is not None else PlanParts(m.output.uri, storage, m.runtime.plan_part_rows)
    skipped = Skipped()
    superseded: dict[str, dict[str, str]] = {}
    changed: dict[str, str] = {}
    retried: set[str] = set()
    units: dict[str, str] = {}
    complete_now: dict[str, str] = {}
    retried_rows: dict[str, set[bytes]] = {}
    form = open_input(m.input, storage)
    if on_open is not None:
        on_open(form)
    stopped = False
    try:
        if form.batches is not None:  # object units as columns (lists, inventories, files)
            stopped = _plan_batches(form, skipped, plan, committed, summary, prompts, retry, superseded, changed,
                                    retried, stop)
        else:  # containers (and any form without batches): a unit at a time
            for chunk in chunked(form.units(skipped), LIST_CHUNK):
                if stop is not None and stop.is_set():
                    stopped = True
                    break
                prompts.attach(chunk, summary)
                for it in chunk:
                    it["source_version"] = source_version(it)
                todo = [it for it in chunk if it["kind"] in CONTAINERS
                        and _plan_container(it, committed, complete_units or {}, summary, units, complete_now, retry,
                                            retried_rows)]
                chunk = [it for it in chunk if it["kind"] not in CONTAINERS]
                summary.images_planned += len(chunk)
                for it, found in zip(chunk, committed.lookup([it["image_id"] for it in chunk],
                                                             [it["source_version"] for it in chunk])):
                    if found.state == "fresh" and not found.ok and retry is not None \
                            and (ALL_ERRORS in retry or found.reason in retry):
                        retried.add(it["image_id"])  # its old rows go once the new one is committed
                        todo.append(it)
                        continue
                    if found.state == "fresh":  # a row of the object as it is now
                        summary.images_skipped_done += 1
                        summary.images_ok += found.ok
                        summary.images_error += not found.ok
                        for part in found.superseded:
                            superseded.setdefault(part, {})[it["image_id"]] = it["source_version"]
                        continue
                    if found.state == "changed":
                        changed[it["image_id"]] = it["source_version"]
                    todo.append(it)
                plan.add(todo)
    except (FileNotFoundError, InputError) as e:
        raise JobError(str(e)) from None
    prompts.finish(summary)
    summary.input_format = form.name
    summary.images_changed = len(changed)
    summary.images_retried_errors = len(retried)
    summary.skipped_not_images = skipped.count
    summary.skipped_examples = skipped.examples
    summary.duplicates_in_input = form.duplicates
    summary.duplicate_examples = form.duplicate_examples
    if not summary.images_planned and not summary.units_planned and skipped.count and not stopped:
        raise JobError(_nothing_to_read(m, form.name, skipped))
    stale = stale_unit_rows(committed, complete_now) if complete_now else {}
    summary.images_retried_errors += sum(len(k) for k in retried_rows.values())
    return Planned(plan, superseded, changed, retried, form.carried, units, stale, retried_rows)


def _plan_batches(form, skipped: Skipped, plan, committed: Committed, summary: RunSummary, prompts: PromptAttacher,
                  retry: frozenset[str] | None, superseded: dict[str, dict[str, str]], changed: dict[str, str],
                  retried: set[str], stop=None) -> bool:
    """The form's batches planned in order; the ids hashed, and looked up in an index on disk, by a
    :class:`.parallel.PlanPool` of processes (the first batches, and a small plan, on the driver).
    Returns True if ``stop`` ended it before the form's end (what was planned is in the plan)."""
    import pyarrow as pa

    pool = PlanPool(plan_processes())
    index = (committed.records.filename, committed.rows) if committed.rows and committed.on_disk else None

    def task(batch):
        if not committed.rows:
            return None  # a fresh output: nothing to look up, its keys not needed (nor hashed)
        if batch.hi is not None and index is None:
            return None  # hashed by the form; an index in memory is looked up here
        t = batch.table
        return look_up, (t.column("image_id") if batch.hi is None else None, batch.hi, batch.lo, t.column("etag"),
                         t.column("size"), index)

    listed = 0  # units before this batch
    held: list = []  # the items to do of the chunk of LIST_CHUNK listed units not yet complete
    held_chunk = -1

    def flush() -> None:
        if held:
            plan.add_table(pa.concat_tables(held) if len(held) > 1 else held[0])
            held.clear()

    finished = stopped = False
    try:
        with contextlib.closing(form.batches(skipped, pool)) as batches, \
                contextlib.closing(pool.ordered(batches, task, size=len)) as planned:
            for batch, done in planned:
                if stop is not None and stop.is_set():
                    stopped = True
                    break
                found = None
                if done is not None:
                    batch.hi, batch.lo, found = done
                todo, at = _plan_objects(batch, committed, summary, prompts, retry, superseded, changed, retried, found)
                # given to the plan as the per-item loop gave them, the items to do of each LIST_CHUNK
                # listed units together: the same plan parts (files) as before
                chunk = (listed + at) // LIST_CHUNK
                cuts = [0, *(np.flatnonzero(np.diff(chunk)) + 1).tolist(), len(at)]
                for a, b in zip(cuts[:-1], cuts[1:]):
                    if b > a:
                        if int(chunk[a]) != held_chunk:
                            flush()
                            held_chunk = int(chunk[a])
                        held.append(todo.slice(a, b - a))
                listed += len(batch)
        flush()
        finished = not stopped
    finally:
        pool.close(abort=not finished)  # an error, Ctrl-C or a stop: its processes terminated at once
    return stopped


def _plan_objects(batch, committed: Committed, summary: RunSummary, prompts: PromptAttacher,
                  retry: frozenset[str] | None, superseded: dict[str, dict[str, str]], changed: dict[str, str],
                  retried: set[str], found=None):
    """:func:`plan_job`'s loop over object units, on a :class:`.inputs.UnitBatch`: the same
    decisions, as arrays (one range search in the committed index for the batch; Python only per
    image that is changed, retried, or has rows of older versions to drop). Returns the units to do,
    in order, as a table of the plan's fields, and their positions in the batch."""
    import pyarrow as pa

    t = batch.table
    n = t.num_rows
    summary.images_planned += n
    versions = source_versions(t.column("etag"), t.column("size"))
    t = t.append_column("source_version", versions)
    if prompts.p.prompted:
        t = t.append_column("prompts", pa.array(prompts.texts(t.column(prompts.key).to_pylist(), summary),
                                                pa.string()))
    if not committed.rows or not n:
        return t, np.arange(n)
    if found is None:
        hi, lo = batch.keys()
        found = committed.lookup_keys(hi, lo, version_keys_arrow(versions))
    fresh = found.state == FRESH
    redo = np.zeros(n, bool)
    if retry is not None:
        again = np.array([ALL_ERRORS in retry or r in retry for r in committed.reasons] + [False], bool)
        redo = fresh & ~found.ok & again[found.code]  # code -1 (ok): the last entry, False
    done = fresh & ~redo
    summary.images_skipped_done += int(np.count_nonzero(done))
    ok = int(np.count_nonzero(done & found.ok))
    summary.images_ok += ok
    summary.images_error += int(np.count_nonzero(done)) - ok
    ids = t.column("image_id")
    if found.superseded:
        for j, parts in found.superseded.items():
            if done[j]:
                for part in parts:
                    superseded.setdefault(committed.parts[part], {})[ids[j].as_py()] = versions[j].as_py()
    for j in np.flatnonzero(redo).tolist():
        retried.add(ids[j].as_py())  # its old rows go once the new one is committed
    moved = np.flatnonzero(found.state == CHANGED)
    if len(moved):
        idx = pa.array(moved)
        changed.update(zip(ids.take(idx).to_pylist(), versions.take(idx).to_pylist()))
    return (t, np.arange(n)) if not done.any() else (t.filter(pa.array(~done)), np.flatnonzero(~done))


def _plan_container(it: dict, committed: Committed, complete: dict[str, dict[tuple[str, str], int]], summary: RunSummary,
                    units: dict[str, str], complete_now: dict[str, str], retry: frozenset[str] | None = None,
                    retried_rows: dict[str, set[bytes]] | None = None) -> bool:
    """Whether a container (tar shard, Parquet file) is read this run. One whose version now is
    recorded complete under this run's fingerprint is skipped (its rows counted as done); one
    with rows of this version committed (a run cut short inside it) is read again without those
    images (``it["done"]``: their id keys); a changed one is read whole, its old rows dropped
    once the new ones are all committed. With ``retry``, a complete one holding error rows of those
    reasons is read again without its other members (the old error rows go once it completes)."""
    summary.units_planned += 1
    uri, version = it["uri"], it["source_version"]
    fresh, old = committed.unit_rows(uri, version)
    summary.images_planned += len(fresh)
    summary.images_skipped_done += len(fresh)
    summary.images_ok += int(committed.ok[fresh].sum()) if len(fresh) else 0
    summary.images_error += len(fresh) - (int(committed.ok[fresh].sum()) if len(fresh) else 0)
    if (version, summary.run_fingerprint) in complete.get(uri, ()):
        redo = fresh[~committed.ok[fresh]] if retry is not None and len(fresh) else fresh[:0]
        if len(redo) and ALL_ERRORS not in retry:
            redo = redo[[committed.reasons[c] in retry for c in committed.reason_of[redo].tolist()]]
        if not len(redo):
            summary.units_skipped_done += 1
            if len(old):
                complete_now[uri] = version
            return False
        # The error rows go back to the plan: counted again as the shard gives them.
        summary.images_planned -= len(redo)
        summary.images_skipped_done -= len(redo)
        summary.images_error -= len(redo)
        fresh = np.setdiff1d(fresh, redo)
        retried_rows[uri] = set(committed.key_list(redo))
    elif len(old) and not len(fresh):
        summary.units_changed += 1
    if len(fresh):
        it["done"] = ",".join(k.hex() for k in committed.key_list(fresh))
    units[uri] = version
    return True


def check_plan_processes() -> None:
    """``$FASTSAM_BATCH_PLAN_PROCESSES`` and ``$FASTSAM_BATCH_READ_THREADS`` checked before any
    work (one line, not after the lease)."""
    from .parallel import processes_asked
    from .resume import read_threads_asked

    try:
        processes_asked()
        read_threads_asked()
    except ValueError as e:
        raise PreflightError(str(e)) from None


def check_input_form(m: Manifest, storage: Storage) -> None:
    """The input read as its format says, as far as its first unit (a list's columns, an
    inventory's manifest and data files, the first Parquet file's schema), before Ray starts; the
    rest is checked as the plan streams, still before any image is read."""
    skipped = Skipped()
    form = open_input(m.input, storage)
    try:
        first = next(iter(form.units(skipped)), None)
    except (FileNotFoundError, InputError) as e:
        raise JobError(str(e)) from None
    if first is None and skipped.count:
        raise JobError(_nothing_to_read(m, form.name, skipped))


def _nothing_to_read(m: Manifest, form: str, skipped: Skipped) -> str:
    what = {"tar": "tar shards (.tar, .tar.gz, .tgz)", "parquet_images": "Parquet files (.parquet)",
            "list": "list files (.parquet, .csv, .jsonl)"}.get(form)
    return (f"input.uri {m.input.uri!r}: no {what or 'images'} there: {skipped.count} files, none "
            + (f"of them {what}" if what else "with an image extension")
            + f" (e.g. {', '.join(skipped.examples[:3])})"
            + ("" if what else "; set input.skip_non_images: false to try every file"))


def _identify(m: Manifest, storage: Storage, summary: RunSummary) -> tuple[PromptAttacher, str | None]:
    """What a run is, checked before any work: the checkpoint (read once, loaded on this CPU to
    know it is a segmentation model), the prompt sources, the run fingerprint (into ``summary``),
    and the Ray address it would join (probed; None: an embedded Ray)."""
    path, summary.checkpoint_sha256 = fetch_checkpoint(m.model.checkpoint, storage)
    check_checkpoint(path, m.model.checkpoint)
    summary.model = m.model.checkpoint.rstrip("/").rsplit("/", 1)[-1]
    prompts = PromptAttacher(m, storage)
    summary.run_fingerprint, summary.fingerprint_material = run_fingerprint(m, summary.checkpoint_sha256,
                                                                            prompts.sources)
    address = ray_address(m)
    check_ray_address(address)
    return prompts, address


def run_job(m: Manifest, overwrite: bool = False, log=print, break_lease: bool = False,
            retry_errors: frozenset[str] | None = None, debug: bool = False) -> RunSummary:
    """Runs a job: preflight (before Ray and before anything is written), the lease, Ray, the plan,
    the segmentation, the end-of-run checks and the records (``_run.json``, ``_runs/``).
    ``retry_errors``: error reasons whose rows are processed again (``ALL_ERRORS``: every one).
    Raises JobError / PreflightError / CheckpointError before any work. After a Ctrl-C the summary
    returned has ``interrupted`` set (what had reached the writer is committed and recorded)."""
    t_start = time.perf_counter()
    env = configure_ultralytics()
    storage = Storage(m.storage_options)
    summary = RunSummary(name=m.name, output_uri=m.output.uri, tool_version=__version__)
    summary.run_id = new_run_id()
    summary.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    # Preflight: every location, the checkpoint, the cluster address and the device, before Ray
    # starts and before anything is deleted. The quick checks first, in the order a user would fix
    # them, and the input's first image before the output is written to: nothing to read, nothing made.
    check_output_placement(ray_address(m), m.output.uri)  # a local output through ray://: on the address's form
    check_plan_processes()
    check_locations(m, storage, probe_output=False)
    check_input_form(m, storage)
    quick = storage.for_checks()
    check_writable("output.uri", m.output.uri, quick)
    check_uploads("output.uri", m.output.uri, quick)  # S3: the multipart uploads a run lists and aborts

    # One writer per output (see lease.py): an output another run holds is refused at once, by
    # reading its lease, before the checkpoint loads; the lease is taken only once every check has
    # passed, so a run that fails one has written nothing to the output.
    lease = Lease(storage, m.output.uri, summary.run_id, m.runtime.lease_stale_s, m.runtime.lease_heartbeat_s,
                  __version__)
    try:
        lease.check_free(break_lease)
        prompts, address = _identify(m, storage, summary)
        if not address:  # an embedded Ray: this machine's GPUs
            check_device(m.model.device, local_machine(m.model.device).gpus, embedded=True)
        lease.acquire(break_lease)  # held from here to the end
    except LeaseHeld as e:
        raise JobError(str(e)) from None
    if lease.taken_over is not None:
        why = lease.stale_reason(lease.taken_over) or "--break-lease"
        summary.lease_taken_over = f"{lease.taken_over.describe()} ({why})"
        log(f"took over the lease on {m.output.uri} from {summary.lease_taken_over}")
    lease.start_heartbeat()
    try:
        return _run_holding_lease(m, overwrite, retry_errors, log, t_start, env, storage, summary, prompts, lease,
                                  debug)
    except LeaseLost:  # a repair or record refused by the fence: the lease was taken over
        raise JobError(_lease_lost(m, lease)) from None
    finally:
        lease.release()


def _run_holding_lease(m: Manifest, overwrite: bool, retry: frozenset[str] | None, log, t_start: float, env: dict,
                       storage: Storage, summary: RunSummary, prompts: PromptAttacher, lease: Lease,
                       debug: bool) -> RunSummary:
    compression = None if m.output.compression == "none" else m.output.compression
    sizing, ray_line = start_ray(m, env, debug)
    cpu_note = check_device(m.model.device, sizing.cluster_gpus, sizing.embedded)  # a joined cluster's GPUs
    committed = read_committed(m.output.uri, storage)
    if not overwrite:
        _check_same_configuration(m, committed, summary.run_fingerprint)
    old_parts = committed.parts if overwrite else []
    if overwrite:
        committed.close()  # not used again (old_parts is its list of names, kept as it is)
        committed = Committed()  # every image is planned; the old files go just before the new ones are written
    fence = lease.fence()  # checked before every write and delete of the run (see repair.py)
    # the index read at the start is handed over: each one replaced is closed (its scratch files removed)
    committed, twice = repair_at_start(m.output.uri, storage, committed, compression, fence=fence, log=log,
                                       owned=True)
    summary.rows_deduplicated += twice
    complete_units = {} if overwrite else read_units_records(m.output.uri, storage)[0]
    # Planning runs in a thread of its own (plan.StreamedPlan): a plan that ends before
    # STREAM_AFTER_FILES plan files are on file is planned whole first, as before; a longer one is
    # segmented while it is planned (_segment_waves), and what needs the whole plan comes after.
    plan = PlanParts(m.output.uri, storage, m.runtime.plan_part_rows)
    forms: list = []
    stream = StreamedPlan(plan, summary, lambda own, stop, index=committed: plan_job(
        m, storage, own, index, prompts, retry, plan=plan, complete_units=complete_units, stop=stop,
        on_open=forms.append)).start()
    try:
        # the first STREAM_AFTER_FILES plan files, or planning's end (a plan of fewer files is always
        # planned whole: small jobs take one path whatever the timing)
        stream.wait(STREAM_AFTER_FILES - 1)
        streaming = not stream.done.is_set()
        planned = None if streaming else stream.finish()
        plan_error: Exception | None = None
        if planned is not None:
            committed = _drop_left_over(m, storage, committed, planned, compression, fence)
            if not plan.count and not old_parts and not twice and not planned.superseded and not planned.stale_units:
                summary.noop = True
                log(f"nothing to do: all {summary.images_planned} images already have rows under run fingerprint "
                    f"{summary.run_fingerprint} (the run is complete; --retry-errors processes error rows again)"
                    if not retry else f"nothing to do: no error rows to retry among the {summary.images_planned} images")
                plan.remove()
                if not saved_covers(m.output.uri, storage, committed):  # (an output of an earlier version's runs)
                    _save_index(m, storage, committed, fence)
                committed.close()
                return summary
            _log_planned(m, summary, plan, log)
        else:
            log(f"planning {m.input.uri}: its first {len(plan.files)} plan files written, segmentation starts while the "
                f"rest is planned (plan under {plan.folder})")
        if ray_line:
            log(ray_line)
        if cpu_note:
            log(cpu_note)
        if overwrite:  # preflight passed and Ray is up: only now is the old output removed
            _remove_old_output(m, storage, old_parts, fence, log)
        checkpoints = IndexCheckpoints(m.output.uri, storage, fence, m.runtime.index_save_interval_s)
        commits = _Commits(m, storage, summary, fence, checkpoints)
        ledger = Ledger(commits.publish, commits.on_commit, commits.on_unit_end, commits.on_units_complete)
        local = protocol_of(m.output.uri) == "file"
        count, why = plan_writers(m.output.writers, sizing.cluster_gpus, local, usable_cpus())
        started = time.time() - 300  # a store's clock a few minutes behind: still this run's uploads

        def clean_s3() -> None:  # uploads staged since this run began (a dead writer's), while the lease is ours
            uploads = open_uploads(m.output.uri, storage, since=started)
            if uploads:
                fence.check(storage)
                abort_uploads(m.output.uri, storage, uploads)

        def tick() -> None:
            if streaming:
                progress.skipped(stream.sync())  # the planner's counts so far, into the run's summary
            progress.tick()

        def watch() -> None:
            lease.check_held()
            if not writers.interrupted():  # after a Ctrl-C what reached the driver is published first
                stream.check()  # planning failed: the run stops (what it committed is kept)

        writers = WriterPool(m, storage, count, ledger, watch=watch, tick=tick, local_output=local,
                             run_id=summary.run_id, clean_s3=clean_s3 if protocol_of(m.output.uri) in ("s3", "s3a") else None)
        # Segmented images are counted as their rows reach a writer; committed ones as files are published.
        if streaming:
            stream.sync()  # what planning counted so far: the images found done are done at the start
        progress = Progress(summary, m.runtime.progress_interval_s, log=log, waiting=ledger.waiting_rows)
        checkpoints.start()
        try:
            if plan.count or streaming:
                log(f"writers: {count} ({why}), each staging its files for the driver to publish")
                settings = replace(settings_for(m, summary, prompts.sources), carried=tuple(forms[0].carried))
                if streaming:
                    planned = _segment_waves(m, storage, settings, summary, stream, sizing, writers, progress, tick,
                                             watch, log)
                    committed = _drop_left_over(m, storage, committed, planned, compression, fence)
                    _log_planned(m, summary, plan, log)
                else:
                    run_segmentation(m, storage, settings, summary, plan, sizing, writers, log)
        except LeaseLost:
            raise JobError(_lease_lost(m, lease)) from None
        except Interrupted:
            summary.interrupted = True
            silence_ray(debug)
        finally:
            checkpoints.stop()  # (first: whatever fails below, no delta is written after this)
            if streaming and planned is None:  # stopped (Ctrl-C, an error): planning ended, what it planned kept
                if not stream.done.is_set():
                    log("stopping: planning ends at its next batch of the listing (what it planned is kept)")
                stream.close()
                try:
                    planned = stream.finish()
                except Exception as e:  # noqa: BLE001 - planning's own error: said below if nothing else is
                    plan_error = e
            summary.writers, summary.writers_restarted = (count, writers.died) if plan.count else (0, 0)
            progress.close()
            plan.remove()
            # a Ctrl-C: what was published and is in no delta yet is saved, for the next start (read
            # back now, not at the end below: the end takes it from there)
            deltas = checkpoints.close(flush=summary.interrupted and lease.lost is None)
        if lease.lost is not None:
            raise JobError(_lease_lost(m, lease))
        if planned is None:  # interrupted, and planning had failed: its partial result is lost
            raise JobError(f"planning failed ({plan_error}); the files published are kept, and running the same command "
                           "again resumes")
        return _finish(m, storage, summary, compression, t_start, commits.written, planned.changed, planned.retried,
                       fence, commits.completed, planned.retried_rows, committed, deltas)
    finally:  # planning never left running (a Ctrl-C or an error anywhere): its thread and processes ended
        stream.close()
        plan.remove()


def _check_same_configuration(m: Manifest, committed: Committed, fingerprint: str) -> None:
    """Refuses an output holding rows of another run fingerprint (without --overwrite)."""
    others = {fp: n for fp, n in committed.fingerprints.items() if fp != fingerprint}
    if others:
        raise JobError(
            f"output.uri {m.output.uri!r} holds {sum(others.values())} rows written by another configuration "
            f"(run fingerprint {', '.join(sorted(others))}; this run's is {fingerprint}: checkpoint, "
            "model settings, prompt rules, mask rules, decode limits or tool version differ). Pass --overwrite to replace them, "
            "or choose a new output.uri"
        )


def _remove_old_output(m: Manifest, storage: Storage, old_parts: list[str], fence, log) -> None:
    """--overwrite: the output's old files, once preflight passed and Ray is up. The containers'
    completion records go first: a kill before the parts are gone leaves old rows (found and replaced
    by the next run), never a record of a container without its rows."""
    remove_files(storage, read_units_records(m.output.uri, storage)[1], fence=fence)
    if old_parts:
        remove_files(storage, old_parts, fence=fence)
        log(f"--overwrite: removed {len(old_parts)} Parquet files from {m.output.uri}")


class _Commits:
    """The driver's side of what the writers stage (writers.Ledger's callbacks): each file published
    only while this run holds the lease, the run's counts, the files it wrote and the containers it
    completed (for the end of the run)."""

    def __init__(self, m: Manifest, storage: Storage, summary: RunSummary, fence, checkpoints: IndexCheckpoints):
        self.m, self.storage, self.summary, self.fence, self.checkpoints = m, storage, summary, fence, checkpoints
        self.metrics = CommitMetrics(m.name)
        self.written: set[str] = set()
        self.completed: dict[str, str] = {}

    def publish(self, staged: Staged) -> None:
        self.fence.check(self.storage)
        publish_staged(self.storage, staged)
        self.metrics.committed_stats(staged.stats)

    def on_commit(self, stats: dict) -> None:
        self.summary.add_file_stats([stats])
        self.written.add(stats["file"])
        self.checkpoints.published(stats["file"], stats["rows"])

    def on_unit_end(self, rows: int, skipped: int) -> None:
        self.summary.images_planned += rows
        self.summary.members_skipped += skipped

    def on_units_complete(self, units: list[tuple[str, str, int]]) -> None:
        write_units_record(self.m.output.uri, self.storage, self.summary.run_fingerprint, units, self.fence)
        self.summary.units_done += len(units)
        self.completed.update((uri, version) for uri, version, _ in units)


def _drop_left_over(m: Manifest, storage: Storage, committed: Committed, planned: Planned, compression, fence):
    """Rows of replaced objects and of changed containers, left by a run cut short after the new ones
    committed (the index read at the start is kept current, never read whole again)."""
    return drop_left_over_rows(m.output.uri, storage, committed, planned.superseded, planned.stale_units, compression,
                               fence=fence, owned=True)


def _log_planned(m: Manifest, summary: RunSummary, plan: PlanParts, log) -> None:
    containers = {"tar": "tar shards", "parquet_images": "Parquet files"}.get(summary.input_format)
    if summary.images_skipped_done:
        log(f"resuming: {summary.images_skipped_done} images already have rows; {plan.count} to do "
            f"({summary.images_changed} of them changed since their row was written)" if not containers else
            f"resuming: {summary.images_skipped_done} images already have rows; {plan.count} {containers} to do "
            f"({summary.units_changed} of them changed since their rows were written)")
    log(f"planned {plan.count} {containers or 'images'} from {m.input.uri} ({summary.skipped_not_images} "
        f"{'other' if containers else 'non-image'} keys skipped"
        + (f"; {summary.duplicates_in_input} repeated image ids skipped" if summary.duplicates_in_input else "")
        + (f"; plan in {len(plan.files)} files under {plan.folder}" if plan.files else "") + ")")


def _segment_waves(m: Manifest, storage: Storage, settings: SegmentSettings, summary: RunSummary,
                   stream: StreamedPlan, sizing, writers: WriterPool, progress: Progress, tick, watch, log) -> Planned:
    """The plan segmented as it is planned, in waves: each wave one Ray Data run over the plan files
    written since the last (the writers, their ledger and the lease kept across waves); the next wave
    waits for at least twice as many new files as the last had, or for planning's end, so a plan of
    P files is at most about log2(P) + 1 waves (each a pipeline's start and drain) whichever of
    planning and segmentation is faster. Returns planning's result once it has ended and every wave
    is published; raises Interrupted after a Ctrl-C between waves (nothing is in flight then: each
    wave ends with every file published), as a wave does after the first Ctrl-C during it (a second
    one stops at once: KeyboardInterrupt)."""
    done, wave = 0, 0
    try:
        while True:
            want = max(1, 2 * wave)  # twice the files of the last wave
            if done and len(stream.parts.files) - done < want and not stream.done.is_set():
                log(f"plan: every plan file so far segmented ({done} files); waiting for planning (the next "
                    f"pass starts at {done + want} files, or when planning ends)")
            try:
                while len(stream.parts.files) - done < want and not stream.done.is_set():
                    stream.wait(done + want - 1, watch=lambda: (watch(), tick()))
            except KeyboardInterrupt:
                raise Interrupted() from None
            stream.check()
            files = stream.parts.files[done:]
            if not files:
                break
            if done:
                log(f"plan: {len(files)} more plan files ({len(files) * m.runtime.plan_part_rows:,} images at most); "
                    f"segmenting them{' (planning goes on)' if not stream.done.is_set() else ''}")
            run_segmentation(m, storage, settings, summary, PlanWave(files), sizing, writers,
                             log if not done else (lambda line: None), keep_writers=True)
            done += len(files)
            wave = len(files)
    finally:
        writers.stop(clean=writers.died > 0)
    progress.skipped(stream.sync())
    return stream.finish()

def _lease_lost(m: Manifest, lease: Lease) -> str:
    """The one line a run whose lease was taken over ends with (the new holder read back)."""
    if lease.lost is None:
        try:
            lease.renew()  # finds and records who holds it now
        except Exception:  # noqa: BLE001 - the storage unreachable: the message names no holder
            pass
    holder = lease.lost.describe() if lease.lost is not None else "another run"
    return (f"this run's lease on {m.output.uri} was taken over by {holder}: this run stopped committing; "
            "the rows it committed before are kept, and that run finishes the output")


def _finish(m: Manifest, storage: Storage, summary: RunSummary, compression: str | None, t_start: float,
            written: set[str], changed: dict[str, str], retried: set[str], fence,
            completed: dict[str, str] | None = None, retried_rows: dict[str, set[bytes]] | None = None,
            committed: Committed | None = None, deltas: list[str] | None = None) -> RunSummary:
    """End of a run (finished or interrupted): old rows of changed objects and retried images
    replaced, duplicates repaired, the checks, and the records. ``committed``: the index the start
    read (kept current there): brought up to date from what this run wrote, not read again
    (``deltas``: what the run saved of it during the run, taken from there)."""
    summary.wall_s = time.perf_counter() - t_start
    done = summary.images_ok + summary.images_error
    summary.images_per_s = (summary.run_ok + summary.run_error) / summary.wall_s if summary.wall_s > 0 else 0.0
    final, superseded, twice = repair_at_end(m.output.uri, storage, compression, fence=fence, written=written,
                                             changed=changed, retried=retried, completed=completed,
                                             retried_rows=retried_rows, committed=committed, owned=True,
                                             deltas=deltas or ())
    summary.rows_superseded += superseded
    summary.rows_deduplicated += twice
    if summary.interrupted:
        pass
    elif final.rows != final.images:
        summary.failed = f"{final.rows - final.images} duplicate rows in {m.output.uri}"
    elif done != summary.images_planned:
        summary.failed = f"{summary.images_planned - done} planned images have no output row"
    frac = m.runtime.max_error_fraction
    if not summary.interrupted and frac is not None and done and summary.images_error / done > frac:
        summary.failed = (
            f"error budget exceeded: {summary.images_error}/{done} images failed "
            f"({summary.images_error / done:.1%} > runtime.max_error_fraction {frac:.1%})"
        )
    fence.check(storage)  # the records too are written only while this run holds the lease
    put_atomic(storage, join_uri(m.output.uri, RUNS_DIR, f"{summary.run_id}.json"), summary.to_json().encode())
    put_atomic(storage, join_uri(m.output.uri, "_run.json"), summary.output_record(
        final.images, final.rows, final.ok_rows, final.errors_by_reason(), len(final.parts),
        final.fingerprints).encode())
    put_atomic(storage, join_uri(m.output.uri, "_manifest.json"),
               json.dumps({**m.model_dump(), "storage_options": redact(m.storage_options)}, indent=2).encode())
    if not summary.interrupted:  # (Ctrl-C: the run ends now; the next start reads what this run committed)
        _save_index(m, storage, final, fence)
    final.close()  # its scratch files removed now (the counts above were its last use)
    return summary


def _save_index(m: Manifest, storage: Storage, final: Committed, fence) -> None:
    """The index as the run ends saved for the next start (:mod:`.saved_index`); a save that fails
    (its storage, or the lease taken over since the run's records: the fence refuses it) only costs
    the next start time (it reads the files): a warning, not a failed run."""
    try:
        save_index(m.output.uri, storage, final, fence=fence)
    except Exception as e:  # noqa: BLE001 - see above (a lease taken over since the records: not saved either)
        _log.warning("the committed index was not saved under %s (%s: %s): the next run reads the committed "
                     "files", join_uri(m.output.uri, INDEX_DIR), type(e).__name__, e)


def dry_run(m: Manifest, retry_errors: frozenset[str] | None = None, overwrite: bool = False) -> dict:
    """What ``run`` would do, without doing it: the checks that write nothing, the listing, prompts
    and resume resolved, the actors it would start. Nothing is written (no lease, no plan files, no
    probe object), and no Ray is started for an embedded run (a cluster is joined to read its size)."""
    env = configure_ultralytics()
    storage = Storage(m.storage_options)
    summary = RunSummary(name=m.name, output_uri=m.output.uri, tool_version=__version__)
    check_plan_processes()
    quick = storage.for_checks()
    check_output_placement(ray_address(m), m.output.uri)
    check_listable("input.uri", m.input.uri, quick)
    check_input_form(m, storage)
    if protocol_of(m.output.uri) != "file":  # a local output may not exist yet
        check_listable("output.uri", m.output.uri, quick)
        check_uploads("output.uri", m.output.uri, quick)  # a listing and an abort of no upload: nothing written
    prompts, address = _identify(m, storage, summary)
    if address:
        sizing, _ = start_ray(m, env)
    else:
        sizing = plan_actors(m.runtime, m.model.device, local_machine(m.model.device))
    device_note = check_device(m.model.device, sizing.cluster_gpus, sizing.embedded)
    committed = read_committed(m.output.uri, storage)
    others = {fp: n for fp, n in committed.fingerprints.items() if fp != summary.run_fingerprint}
    complete_units = {} if overwrite else read_units_records(m.output.uri, storage)[0]
    planned = plan_job(m, storage, summary, Committed() if overwrite else committed, prompts, retry_errors,
                       PlanCount(), complete_units)
    plan, retried = planned.plan, planned.retried
    return {
        "name": m.name, "input_uri": m.input.uri, "output_uri": m.output.uri,
        "run_fingerprint": summary.run_fingerprint,
        "input_format": summary.input_format,
        "images_listed": summary.images_planned,
        "images_to_do": plan.count if not summary.units_planned else None,
        "containers_listed": summary.units_planned, "containers_to_do": plan.count if summary.units_planned else 0,
        "containers_done": summary.units_skipped_done, "duplicates_in_input": summary.duplicates_in_input,
        "images_done": summary.images_skipped_done,
        "images_changed": summary.images_changed,
        "images_retried_errors": len(retried),
        "skipped_not_images": summary.skipped_not_images, "skipped_examples": summary.skipped_examples,
        "prompts_planned": summary.prompts_planned, "images_without_prompts": summary.images_without_prompts,
        "prompt_images_not_in_input": summary.prompt_images_not_in_input,
        "rows_of_other_fingerprints": sum(others.values()),
        "refused": (f"output.uri holds {sum(others.values())} rows of another configuration: run would be refused "
                    "without --overwrite") if others and not overwrite else None,
        "actors": sizing.actors, "actors_why": sizing.why, "gpus_per_actor": sizing.gpus_per_actor,
        "decode_workers": sizing.decode_workers, "device": device_note or m.model.device,
        "cluster": address or embedded_ray_line(),
    }


def render_dry_run(d: dict) -> str:
    lines = [f"plan for '{d['name']}' (run fingerprint {d['run_fingerprint']}); nothing was written",
             (f"  input: {d['input_uri']}: {d['images_listed']:,} images listed, {d['skipped_not_images']:,} non-image keys "
              "skipped" if not d["containers_listed"] else
              f"  input: {d['input_uri']}: {d['containers_listed']:,} {d['input_format']} containers listed "
              f"({d['images_done']:,} images in them already done; the rest are counted as they are read), "
              f"{d['skipped_not_images']:,} other keys skipped")
             + (f" (e.g. {', '.join(d['skipped_examples'][:3])})" if d["skipped_not_images"] else ""),
             f"  output: {d['output_uri']}: {d['images_done']:,} already done under this fingerprint, "
             f"{d['images_changed']:,} changed since, {d['images_retried_errors']:,} error rows to retry",
             f"  to do: {d['images_to_do']:,} images" if d["images_to_do"] is not None else
             f"  to do: {d['containers_to_do']:,} of {d['containers_listed']:,} {d['input_format']} containers "
             f"({d['containers_done']:,} complete; their images are counted as they are read)"]
    if d["duplicates_in_input"]:
        lines.append(f"  repeated image ids in the input (skipped): {d['duplicates_in_input']:,}")
    if d["prompts_planned"] or d["images_without_prompts"]:
        lines.append(f"  prompts: {d['prompts_planned']:,} for the listed images; {d['images_without_prompts']:,} images "
                     f"without any; {d['prompt_images_not_in_input']:,} prompted images not in the input")
    lines.append(f"  cluster: {d['cluster']}; {d['actors']} segmentation actor{'s' if d['actors'] != 1 else ''} "
                 f"({d['actors_why']})" + (f", {d['gpus_per_actor']:g} GPU each" if d["gpus_per_actor"] else "")
                 + f"; up to {d['decode_workers']} read/decode workers; device: {d['device']}")
    if d["refused"]:
        lines.append(f"  REFUSED: {d['refused']}")
    return "\n".join(lines)


def settings_for(m: Manifest, summary: RunSummary, prompt_sources: dict) -> SegmentSettings:
    return SegmentSettings(
        checkpoint_uri=m.model.checkpoint,
        checkpoint_sha256=summary.checkpoint_sha256,
        imgsz=m.model.imgsz,
        conf=m.model.conf,
        iou=m.model.iou,
        max_det=m.model.max_det,
        device=m.model.device,
        half=m.model.half,
        rules=MaskRules(**m.mask_rules.model_dump()),
        prompted=m.prompts.prompted,
        keep_everything=m.prompts.keep_everything,
        merge_points=m.prompts.merge_points,
        clip_uri=m.prompts.clip if prompt_sources.get("clip_sha256") else None,
        clip_sha256=prompt_sources.get("clip_sha256"),
        text_min_area=m.prompts.text_min_area,
        torch_threads=m.runtime.torch_threads or 0,
        actors=m.runtime.num_actors or 1,  # the run's count is set once Ray is up (sizing.py)
        cpus_per_actor=m.runtime.cpus_per_actor,
    )


