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
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_not_images: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    masks_written: int = 0
    files_written: int = 0
    write_s: float = 0.0  # time spent building and putting Parquet files, summed over writers
    wall_s: float = 0.0
    images_per_s: float = 0.0
    checkpoint_sha256: str = ""
    model: str = ""
    output_uri: str = ""
    tool_version: str = ""
    run_fingerprint: str = ""
    fingerprint_material: dict = field(default_factory=dict)
    failed: str | None = None  # why the run counts as failed (error budget), else None

    def add_file_stats(self, rows: list[dict]) -> None:
        reasons = Counter(self.errors_by_reason)
        for r in rows:
            self.images_ok += int(r["ok"])
            self.images_error += int(r["rows"] - r["ok"])
            self.masks_written += int(r["masks"])
            self.files_written += 1
            self.write_s += float(r["write_s"])
            reasons.update(json.loads(r["errors"]))
        self.errors_by_reason = dict(sorted(reasons.items()))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def render(self) -> str:
        lines = [
            f"fastsam-batch run '{self.name}': {self.images_ok + self.images_error} images in {self.wall_s:.1f}s "
            f"({self.images_per_s:.2f} images/s)",
            f"  ok: {self.images_ok}   error: {self.images_error}   masks written: {self.masks_written}"
            f"   files: {self.files_written}",
        ]
        if self.images_skipped_done:
            lines.append(f"  already done in an earlier run (skipped): {self.images_skipped_done}")
        for reason, n in self.errors_by_reason.items():
            lines.append(f"    error {reason}: {n}")
        if self.skipped_not_images:
            ex = ", ".join(self.skipped_examples[:5])
            lines.append(f"  skipped (not an image by extension): {self.skipped_not_images}  e.g. {ex}")
        lines.append(f"  output: {self.output_uri}   run fingerprint: {self.run_fingerprint}")
        if self.failed:
            lines.append(f"  FAILED: {self.failed}")
        return "\n".join(lines)
