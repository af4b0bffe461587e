"""``fastsam-batch stats OUTPUT``: what an output holds, read from its Parquet files (local or S3).

Rows by status, errors by reason, masks per image (mean and percentiles), per-stage milliseconds
(percentiles), the run fingerprints present. Only the few columns needed are read, a file at a
time, so a million-image output is summarised in little memory (a number per image and stage).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from .resume import list_parts, local_paths
from .schema import STAGE_COLUMNS as STAGES, error_reason
from .storage import Storage

PERCENTILES = (50, 90, 99)


class OutputError(RuntimeError):
    """The output cannot be read (no Parquet files there, unreadable files)."""


def output_dataset(output_uri: str, storage: Storage):
    """The output's part files as one pyarrow dataset (metadata files and folders left out)."""
    import pyarrow.dataset as pads

    try:
        parts = list_parts(output_uri, storage)
    except Exception as e:  # noqa: BLE001 - said in words by the caller's one line
        from .storage import storage_error_cause

        raise OutputError(f"{output_uri!r}: cannot list it: {storage_error_cause(e)}") from None
    if not parts:
        from .preflight import PreflightError, check_listable

        try:  # a missing bucket or folder said as such, as a run says it
            check_listable("output", output_uri, storage.for_checks())
        except PreflightError as e:
            raise OutputError(str(e)) from None
        raise OutputError(f"{output_uri!r}: no Parquet files (part-*.parquet) there")
    return pads.dataset(local_paths(output_uri, parts), format="parquet", filesystem=storage.fs(output_uri))


def _summary(values: np.ndarray) -> dict:
    if not len(values):
        return {"count": 0}
    return {"count": int(len(values)), "mean": round(float(values.mean()), 3),
            **{f"p{q}": round(float(np.percentile(values, q)), 3) for q in PERCENTILES},
            "max": round(float(values.max()), 3)}


def output_stats(output_uri: str, storage: Storage) -> dict:
    ds = output_dataset(output_uri, storage)
    statuses: Counter = Counter()
    reasons: Counter = Counter()
    fingerprints: Counter = Counter()
    masks: list[np.ndarray] = []
    stages: dict[str, list[np.ndarray]] = {s: [] for s in STAGES}
    columns = ["status", "error", "num_masks", "run_fingerprint", *[s for s in STAGES if s in ds.schema.names]]
    for batch in ds.to_batches(columns=columns):
        status = batch.column("status").to_numpy(zero_copy_only=False)
        statuses.update(status.tolist())
        reasons.update(error_reason(e) for e in batch.column("error").to_pylist() if e)
        fingerprints.update(batch.column("run_fingerprint").to_pylist())
        ok = status == "ok"
        masks.append(batch.column("num_masks").to_numpy(zero_copy_only=False)[ok])
        for s in STAGES:
            if s in batch.schema.names:
                v = batch.column(s).to_numpy(zero_copy_only=False).astype(np.float64)
                stages[s].append(v[np.isfinite(v) & (v >= 0)])
    per_image = np.concatenate(masks) if masks else np.empty(0)
    return {
        "output_uri": output_uri,
        "files": len(ds.files),
        "rows": sum(statuses.values()),
        "rows_by_status": dict(sorted(statuses.items())),
        "errors_by_reason": dict(sorted(reasons.items())),
        "masks": int(per_image.sum()),
        "masks_per_ok_image": _summary(per_image),
        "stage_ms": {s: _summary(np.concatenate(v) if v else np.empty(0)) for s, v in stages.items()},
        "run_fingerprints": dict(sorted(fingerprints.items())),
    }


def render_stats(st: dict) -> str:
    lines = [f"{st['output_uri']}: {st['rows']:,} rows in {st['files']} files",
             "  by status: " + ", ".join(f"{k} {v:,}" for k, v in st["rows_by_status"].items())]
    for reason, n in st["errors_by_reason"].items():
        lines.append(f"    error {reason}: {n:,}")
    m = st["masks_per_ok_image"]
    if m["count"]:
        lines.append(f"  masks: {st['masks']:,}; per ok image mean {m['mean']:.1f}, p50 {m['p50']:g}, p90 {m['p90']:g}, "
                     f"p99 {m['p99']:g}, max {m['max']:g}")
    lines.append("  stage ms        p50       p90       p99")
    for s, v in st["stage_ms"].items():
        if v["count"]:
            lines.append(f"    {s[:-3]:<10}{v['p50']:>9.1f} {v['p90']:>9.1f} {v['p99']:>9.1f}")
    lines.append("  run fingerprints: " + ", ".join(f"{k} ({v:,} rows)" for k, v in st["run_fingerprints"].items()))
    return "\n".join(lines)


def stats_json(st: dict) -> str:
    return json.dumps(st, indent=2, sort_keys=True)
