"""Metrics through Ray's metrics system (``ray.util.metrics``), scraped by a cluster's Prometheus
with Ray's own (Ray prefixes each name with ``ray_``). Tag ``job``: the manifest's name.

  fastsam_batch_images_total{status, reason}  images committed, by status (ok / error) and error reason
  fastsam_batch_masks_total                   masks committed
  fastsam_batch_prompts_total                 prompts committed
  fastsam_batch_files_total                   Parquet files committed
  fastsam_batch_bytes_read_total              bytes read from storage (read/decode workers)
  fastsam_batch_stage_ms{stage}               per-image milliseconds of read, decode, model, masks,
                                              select, encode (histogram)

Committed counts are recorded by the driver as each file is published, from the file's stats row,
so they agree with the output; the stage times by the writer actors as they stage each file
(:class:`StageMetrics`: a file staged and never published, by a writer killed before its answer,
counts there too); bytes read by the workers that read them. ``cluster/grafana-dashboard.json``
charts them.
"""

from __future__ import annotations

import json

import pyarrow as pa

from .schema import STAGE_COLUMNS as STAGES, error_reason

MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]


class CommitMetrics:
    """The committed counts and stage times; created where Ray is initialised (the driver)."""

    def __init__(self, job: str):
        from ray.util.metrics import Counter, Histogram

        self.tags = {"job": job}
        self.images = Counter("fastsam_batch_images_total", description="images committed, by status and error reason",
                              tag_keys=("job", "status", "reason"))
        self.masks = Counter("fastsam_batch_masks_total", description="masks committed", tag_keys=("job",))
        self.prompts = Counter("fastsam_batch_prompts_total", description="prompts committed", tag_keys=("job",))
        self.files = Counter("fastsam_batch_files_total", description="Parquet files committed", tag_keys=("job",))
        self.stage_ms = Histogram("fastsam_batch_stage_ms", description="milliseconds per image, by stage",
                                  boundaries=MS_BOUNDARIES, tag_keys=("job", "stage"))

    def committed(self, table: pa.Table) -> None:
        counts: dict[tuple[str, str], int] = {}
        for status, error in zip(table.column("status").to_pylist(), table.column("error").to_pylist()):
            key = (status, (error_reason(error) or "error") if status != "ok" else "")
            counts[key] = counts.get(key, 0) + 1
        for (status, reason), n in counts.items():
            self.images.inc(n, tags={**self.tags, "status": status, "reason": reason})
        masks = sum(table.column("num_masks").to_pylist())
        if masks:
            self.masks.inc(masks, tags=self.tags)
        prompts = sum(len(p) for p in table.column("prompts").to_pylist())
        if prompts:
            self.prompts.inc(prompts, tags=self.tags)
        self.files.inc(1, tags=self.tags)
        observe_stages(self.stage_ms, self.tags, table)


    def committed_stats(self, stats: dict) -> None:
        """A published file's counts, from its stats row (write.file_stats)."""
        errors = json.loads(stats["errors"])
        for status, reason, n in [("ok", "", int(stats["ok"]))] + [
                ("error", reason if reason not in (None, "null") else "error", int(k)) for reason, k in errors.items()]:
            if n:
                self.images.inc(n, tags={**self.tags, "status": status, "reason": reason})
        if stats["masks"]:
            self.masks.inc(int(stats["masks"]), tags=self.tags)
        if stats["prompts"]:
            self.prompts.inc(int(stats["prompts"]), tags=self.tags)
        self.files.inc(1, tags=self.tags)


class StageMetrics:
    """The per-image stage times, observed by a writer actor as it stages a file."""

    def __init__(self, job: str):
        from ray.util.metrics import Histogram

        self.tags = {"job": job}
        self.stage_ms = Histogram("fastsam_batch_stage_ms", description="milliseconds per image, by stage",
                                  boundaries=MS_BOUNDARIES, tag_keys=("job", "stage"))

    def staged(self, table: pa.Table) -> None:
        observe_stages(self.stage_ms, self.tags, table)


def observe_stages(histogram, tags: dict, table: pa.Table) -> None:
    """Each row's milliseconds per stage (the table's ``*_ms`` columns of STAGES; negative or null:
    not measured) into ``histogram``, tagged by stage."""
    for stage in STAGES:
        if stage in table.column_names:
            by_stage = {**tags, "stage": stage[:-3]}
            for v in table.column(stage).to_pylist():
                if v is not None and v >= 0:
                    histogram.observe(v, tags=by_stage)


class ReadMetrics:
    """Bytes read, counted in the read/decode workers."""

    def __init__(self, job: str):
        from ray.util.metrics import Counter

        self.tags = {"job": job}
        self.bytes = Counter("fastsam_batch_bytes_read_total", description="bytes read from storage", tag_keys=("job",))

    def read(self, n: int) -> None:
        if n:
            self.bytes.inc(n, tags=self.tags)
