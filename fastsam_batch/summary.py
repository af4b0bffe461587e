"""Run summary: counts gathered from the writer's per-file stats, printed and saved as ``_run.json``."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class RunSummary:
    name: str
    images_planned: int = 0
    images_ok: int = 0
    images_error: int = 0
    images_skipped_done: int = 0  # already had rows from an earlier run of the same fingerprint
    images_changed: int = 0  # had rows, but the object changed since (ETag/size): processed again
    images_retried_errors: int = 0  # had an error row, processed again (--retry-errors); old row replaced
    rows_superseded: int = 0  # rows of changed objects removed once their new rows were committed
    rows_deduplicated: int = 0  # rows of an image written twice (two runs at once) removed, one kept
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_not_images: int = 0
    input_format: str = "files"  # input.format
    units_planned: int = 0  # containers listed (tar shards, Parquet files of images)
    units_skipped_done: int = 0  # of them complete under this fingerprint already (not read)
    units_changed: int = 0  # of them changed since their rows were written (read again whole)
    units_done: int = 0  # containers whose every row this run committed
    members_skipped: int = 0  # tar members that are not images (side files), counted and skipped
    duplicates_in_input: int = 0  # list rows whose image_id came before (skipped: one row per image_id)
    duplicate_examples: list[str] = field(default_factory=list)
    skipped_examples: list[str] = field(default_factory=list)
    masks_written: int = 0
    # masks dropped by mask_rules.max_overlap in the rows THIS RUN wrote (not the output's whole: rows of
    # earlier runs are not read again at the end); the output's total: `fastsam-batch stats`' duplicates
    masks_dropped_duplicates: int = 0
    images_retried: int = 0  # images whose read was retried after a transient storage error
    read_retries: int = 0  # retries of reads in all
    # Prompts (null/zero in everything mode).
    prompts_planned: int = 0  # prompts given to the images planned (global ones included)
    prompts_run: int = 0  # prompts recorded in the rows written by this run
    prompt_errors_by_reason: dict[str, int] = field(default_factory=dict)
    images_without_prompts: int = 0  # planned images no prompt names (ok rows with no masks)
    prompt_source_rows: int = 0  # rows / annotations read from the prompt table or COCO file
    prompt_rows_without_image: int = 0  # rows whose image key is empty (or a COCO image id not listed)
    prompt_bad_rows: int = 0  # rows kept as prompts with a bad_prompt error
    prompt_images_not_in_input: int = 0  # images named by the prompt source that the input does not hold
    prompt_images_not_in_input_examples: list[str] = field(default_factory=list)
    run_ok: int = 0  # ok rows committed by this run (images_ok also counts the rows of earlier runs)
    run_error: int = 0  # error rows committed by this run
    files_written: int = 0
    writers: int = 0  # writer actors (output.writers) that staged this run's files
    writers_restarted: int = 0  # writer actors that died, hung or lost an answer: each started again, its blocks sent again (but the last, when the run stopped on it)
    write_s: float = 0.0  # time spent building and putting Parquet files, summed over writers
    wall_s: float = 0.0
    images_per_s: float = 0.0  # this run's images (run_ok + run_error) per second of its wall time
    checkpoint_sha256: str = ""
    model: str = ""
    output_uri: str = ""
    tool_version: str = ""
    run_fingerprint: str = ""
    run_id: str = ""  # this run's id, as in its lease on the output
    lease_taken_over: str | None = None  # the stale (or broken) lease this run took over, described
    fingerprint_material: dict = field(default_factory=dict)
    failed: str | None = None  # why the run counts as failed (error budget), else None
    interrupted: bool = False  # stopped by Ctrl-C: what was done is committed, the rest is for the next run
    started: str = ""  # UTC, ISO 8601
    noop: bool = False  # nothing to do: every image had its row (nothing was written)

    def add_file_stats(self, rows: list[dict]) -> None:
        reasons = Counter(self.errors_by_reason)
        preasons = Counter(self.prompt_errors_by_reason)
        for r in rows:
            self.images_ok += int(r["ok"])
            self.images_error += int(r["rows"] - r["ok"])
            self.run_ok += int(r["ok"])
            self.run_error += int(r["rows"] - r["ok"])
            self.masks_written += int(r["masks"])
            self.masks_dropped_duplicates += int(r.get("duplicates") or 0)
            self.files_written += 1
            self.write_s += float(r["write_s"])
            reasons.update(json.loads(r["errors"]))
            self.prompts_run += int(r["prompts"])
            self.images_retried += int(r["retried"])
            self.read_retries += int(r["retries"])
            preasons.update(json.loads(r["prompt_errors"]))
        self.errors_by_reason = dict(sorted(reasons.items()))
        self.prompt_errors_by_reason = dict(sorted(preasons.items()))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @property
    def status(self) -> str:
        return "interrupted" if self.interrupted else "failed" if self.failed else "finished"

    def output_record(self, images: int, rows: int, ok: int, errors_by_reason: dict[str, int], files: int,
                      fingerprints: dict[str, int]) -> str:
        """``_run.json``: the output as a whole (every run's rows), and the last run's summary; each
        run's own summary is kept under ``_runs/``."""
        return json.dumps({
            "output_uri": self.output_uri,
            "images": images,
            "rows": rows,
            "images_ok": ok,
            "images_error": rows - ok,
            "errors_by_reason": errors_by_reason,
            "files": files,
            "run_fingerprints": fingerprints,
            "last_run": {"run_id": self.run_id, "status": self.status, "summary": f"_runs/{self.run_id}.json"},
            "last_run_summary": asdict(self),
        }, indent=2, sort_keys=True)

    def render(self) -> str:
        total = self.images_ok + self.images_error
        lines = [
            f"fastsam-batch run '{self.name}': {self.run_ok + self.run_error} images in {self.wall_s:.1f}s "
            f"({self.images_per_s:.2f} images/s)",
            f"  this run: ok: {self.run_ok}   error: {self.run_error}   masks written: {self.masks_written}"
            f"   files: {self.files_written}",
        ]
        if total != self.run_ok + self.run_error:
            lines.append(f"  the job's images now: {total} of {self.images_planned} have rows (ok {self.images_ok}, "
                         f"error {self.images_error}), {self.images_skipped_done} of them from earlier runs")
        if self.masks_dropped_duplicates:
            lines.append(f"  duplicate masks dropped in this run's rows (mask_rules.max_overlap): "
                         f"{self.masks_dropped_duplicates} (the output's total: fastsam-batch stats)")
        if self.images_retried:
            lines.append(f"  retried after transient storage errors: {self.images_retried} images ({self.read_retries} retries)")
        if self.images_skipped_done:
            lines.append(f"  already done in an earlier run (skipped): {self.images_skipped_done}")
        if self.images_retried_errors:
            lines.append(f"  error rows processed again (--retry-errors, old rows replaced): {self.images_retried_errors}")
        if self.images_changed:
            lines.append(f"  changed since their rows were written (processed again, old rows replaced): {self.images_changed}")
        for reason, n in self.errors_by_reason.items():
            lines.append(f"    error {reason}: {n}")
        if self.rows_deduplicated:
            lines.append(f"  rows of images written twice (by two runs at once) removed: {self.rows_deduplicated}")
        if self.prompts_planned or self.prompt_source_rows:
            lines.append(f"  prompts: {self.prompts_run} run, {sum(self.prompt_errors_by_reason.values())} with an error; "
                         f"images without prompts: {self.images_without_prompts}")
            for reason, n in self.prompt_errors_by_reason.items():
                lines.append(f"    prompt error {reason}: {n}")
            if self.prompt_source_rows:
                lines.append(f"  prompt source: {self.prompt_source_rows} rows, {self.prompt_bad_rows} bad, "
                             f"{self.prompt_rows_without_image} without an image key; "
                             f"{self.prompt_images_not_in_input} images not in the input"
                             + (f" e.g. {', '.join(self.prompt_images_not_in_input_examples)}"
                                if self.prompt_images_not_in_input else ""))
        if self.units_planned:
            lines.append(f"  containers ({self.input_format}): {self.units_planned} listed, {self.units_done} completed "
                         f"this run, {self.units_skipped_done} complete before, {self.units_changed} changed"
                         + (f"; {self.members_skipped} non-image members skipped" if self.members_skipped else ""))
        if self.duplicates_in_input:
            lines.append(f"  repeated image ids in the input (skipped, first kept): {self.duplicates_in_input}  e.g. "
                         + ", ".join(self.duplicate_examples[:3]))
        if self.skipped_not_images:
            ex = ", ".join(self.skipped_examples[:5])
            lines.append(f"  skipped (not an image by extension): {self.skipped_not_images}  e.g. {ex}")
        lines.append(f"  output: {self.output_uri}   run fingerprint: {self.run_fingerprint}   run id: {self.run_id}")
        if self.failed:
            lines.append(f"  FAILED: {self.failed}")
        return "\n".join(lines)
