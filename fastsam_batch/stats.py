"""``fastsam-batch stats OUTPUT``: what an output holds, read from its Parquet files (local or S3).

Rows by status, errors by reason, masks per image (mean and percentiles), per-stage milliseconds
(percentiles), the run fingerprints present, duplicate masks dropped (``mask_rules.max_overlap``),
and histograms of the masks' ``stability_score`` (20 bins of 0.05) and of masks per ok image (at
most 20 bins of equal integer width), as text, and as a PNG with ``--histogram-png``. Only the few
columns needed are read, a file at a time (of ``masks`` only its ``stability_score`` leaf), so a
million-image output is summarised in little memory (a number per image and stage; the stability
histogram is counted on fixed bins as the files pass).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow.compute as pc

from .resume import list_parts, local_paths
from .schema import STAGE_COLUMNS as STAGES, error_reason
from .storage import Storage

PERCENTILES = (50, 90, 99)
STABILITY_EDGES = np.linspace(0.0, 1.0, 21)  # 20 bins of 0.05; the last one holds 1.0
SAM_STABILITY = 0.95  # SAM's stability_score_thresh: the share of masks at or above it is reported
HISTOGRAM_BINS = 20


class OutputError(RuntimeError):
    """The output cannot be read (no Parquet files there, unreadable files)."""


def output_dataset(output_uri: str, storage: Storage, unified: bool = False):
    """The output's part files as one pyarrow dataset (metadata files and folders left out).
    ``unified``: its schema is the union of every file's (each file's footer read), so a column or
    mask field that only some files have (files of an earlier version) is read as null in the others;
    without it pyarrow takes the first file's schema and drops what the others have more."""
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
    ds = pads.dataset(local_paths(output_uri, parts), format="parquet", filesystem=storage.fs(output_uri))
    if unified:
        import pyarrow as pa

        schemas = [f.physical_schema for f in ds.get_fragments()]
        if any(not s.equals(schemas[0]) for s in schemas[1:]):  # fields a file lacks are read as nulls
            schema = pa.unify_schemas(schemas, promote_options="permissive")
            schema = pa.schema([pa.field(f.name, _nullable(f.type), nullable=True, metadata=f.metadata) for f in schema],
                               metadata=schema.metadata)
            ds = pads.dataset(ds.files, format="parquet", filesystem=ds.filesystem, schema=schema)
    return ds


def _nullable(t):
    """``t`` with every nested field nullable (a field some files lack is null in their rows)."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _nullable(f.type), nullable=True, metadata=f.metadata) for f in t])
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        value = pa.field(t.value_field.name, _nullable(t.value_type), nullable=True)
        if pa.types.is_fixed_size_list(t):
            return pa.list_(value, t.list_size)
        return pa.large_list(value) if pa.types.is_large_list(t) else pa.list_(value)
    return t


def _summary(values: np.ndarray) -> dict:
    if not len(values):
        return {"count": 0}
    return {"count": int(len(values)), "mean": round(float(values.mean()), 3),
            **{f"p{q}": round(float(np.percentile(values, q)), 3) for q in PERCENTILES},
            "max": round(float(values.max()), 3)}


def masks_per_image_histogram(per_image: np.ndarray) -> dict:
    """Counts of ok images by masks per image, in at most HISTOGRAM_BINS bins of equal integer width
    ([lo, hi) each, the last holding the largest count)."""
    top = int(per_image.max()) if len(per_image) else 0
    width = max(1, -(-(top + 1) // HISTOGRAM_BINS))
    edges = np.arange(0, top + width + 1, width)
    counts, _ = np.histogram(per_image, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def stability_scores(ds, files=None):
    """Each file's masks' ``stability_score`` (float32 array), reading only that leaf of ``masks``;
    files written before the column existed give none."""
    import pyarrow.parquet as pq

    for path in files if files is not None else ds.files:
        with ds.filesystem.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            masks = pf.schema_arrow.field("masks").type.value_type
            if masks.get_field_index("stability_score") < 0:
                continue
            t = pf.read(columns=["masks.list.element.stability_score"])
            values = t.column("masks").combine_chunks().flatten().field("stability_score")
            yield values.to_numpy(zero_copy_only=False).astype(np.float32)


def output_stats(output_uri: str, storage: Storage) -> dict:
    ds = output_dataset(output_uri, storage, unified=True)  # columns of some files only: null in the others
    statuses: Counter = Counter()
    reasons: Counter = Counter()
    fingerprints: Counter = Counter()
    masks: list[np.ndarray] = []
    stages: dict[str, list[np.ndarray]] = {s: [] for s in STAGES}
    duplicates = duplicate_rows = 0
    has_dups = "num_duplicates" in ds.schema.names
    columns = ["status", "error", "num_masks", "run_fingerprint", *[s for s in STAGES if s in ds.schema.names],
               *(["num_duplicates"] if has_dups else [])]
    for batch in ds.to_batches(columns=columns):
        status = batch.column("status").to_numpy(zero_copy_only=False)
        statuses.update(status.tolist())
        reasons.update(error_reason(e) for e in batch.column("error").to_pylist() if e)
        fingerprints.update(batch.column("run_fingerprint").to_pylist())
        ok = status == "ok"
        masks.append(batch.column("num_masks").to_numpy(zero_copy_only=False)[ok])
        if has_dups:
            d = batch.column("num_duplicates")
            duplicates += int(pc.sum(d).as_py() or 0)
            duplicate_rows += len(d) - d.null_count
        for s in STAGES:
            if s in batch.schema.names:
                v = batch.column(s).to_numpy(zero_copy_only=False).astype(np.float64)
                stages[s].append(v[np.isfinite(v) & (v >= 0)])
    per_image = np.concatenate(masks) if masks else np.empty(0)
    stab_counts = np.zeros(len(STABILITY_EDGES) - 1, np.int64)
    stab_sum, stab_n, stab_sam = 0.0, 0, 0
    for v in stability_scores(ds):
        stab_counts += np.histogram(v, bins=STABILITY_EDGES)[0]
        stab_sum += float(v.astype(np.float64).sum())
        stab_n += len(v)
        stab_sam += int((v >= np.float32(SAM_STABILITY)).sum())
    return {
        "output_uri": output_uri,
        "files": len(ds.files),
        "rows": sum(statuses.values()),
        "rows_by_status": dict(sorted(statuses.items())),
        "errors_by_reason": dict(sorted(reasons.items())),
        "masks": int(per_image.sum()),
        "masks_per_ok_image": _summary(per_image),
        # rows checked for duplicates (mask_rules.max_overlap set) and the masks it dropped in them
        "duplicates": {"rows_checked": duplicate_rows, "masks_dropped": duplicates},
        "stability_score": {"count": stab_n, "mean": round(stab_sum / stab_n, 4) if stab_n else None,
                            f"at_least_{SAM_STABILITY}": stab_sam},
        "histograms": {
            "stability_score": {"edges": [round(float(e), 2) for e in STABILITY_EDGES], "counts": stab_counts.tolist()},
            "masks_per_ok_image": masks_per_image_histogram(per_image),
        },
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
    d = st.get("duplicates") or {}
    if d.get("rows_checked"):
        lines.append(f"  duplicate masks dropped (mask_rules.max_overlap): {d['masks_dropped']:,} "
                     f"in {d['rows_checked']:,} rows checked")
    q = st.get("stability_score") or {}
    hist = st.get("histograms") or {}
    if q.get("count"):
        at = q[f"at_least_{SAM_STABILITY}"]
        lines.append(f"  stability_score: mean {q['mean']:.3f}; >= {SAM_STABILITY} (SAM's threshold): {at:,} of "
                     f"{q['count']:,} masks ({100 * at / q['count']:.1f}%)")
        lines += render_histogram(hist["stability_score"], "{lo:.2f}-{hi:.2f}")
    if m["count"]:
        lines.append("  masks per ok image:")
        lines += render_histogram(hist["masks_per_ok_image"], "{lo:g}-{hi_incl:g}")
    lines.append("  stage ms        p50       p90       p99")
    for s, v in st["stage_ms"].items():
        if v["count"]:
            lines.append(f"    {s[:-3]:<10}{v['p50']:>9.1f} {v['p90']:>9.1f} {v['p99']:>9.1f}")
    lines.append("  run fingerprints: " + ", ".join(f"{k} ({v:,} rows)" for k, v in st["run_fingerprints"].items()))
    return "\n".join(lines)


BAR = 40


def render_histogram(h: dict, label: str) -> list[str]:
    """Text bars, one line a bin, from the first bin with a count to the last."""
    counts, edges = h["counts"], h["edges"]
    full = [i for i, c in enumerate(counts) if c]
    if not full:
        return []
    top = max(counts)
    lines = []
    for i in range(full[0], full[-1] + 1):
        name = label.format(lo=edges[i], hi=edges[i + 1], hi_incl=edges[i + 1] - 1)
        bar = "#" * round(BAR * counts[i] / top)
        lines.append(f"    {name:>11} |{bar:<{BAR}} {counts[i]:,}")
    return lines


def check_writable_file(path: str, option: str) -> None:
    """A local file ``path`` can be written: its folder exists and is writable, and it is no folder."""
    import os

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise OutputError(f"{option} {path!r}: is a folder; give a file name")
    if not os.path.isdir(folder):
        raise OutputError(f"{option} {path!r}: no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{option} {path!r}: cannot write in {folder}")


def write_histogram_png(st: dict, path: str) -> None:
    """The two histograms (stability_score, masks per ok image) side by side, as a PNG at ``path``
    (replaced only once complete)."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = st["histograms"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    try:
        for ax, h, title, xlabel in [
            (a, hist["stability_score"], f"stability_score ({st['stability_score']['count']:,} masks)", "stability score"),
            (b, hist["masks_per_ok_image"], f"masks per ok image ({st['masks_per_ok_image']['count']:,} images)",
             "masks"),
        ]:
            edges = np.asarray(h["edges"], np.float64)
            ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", color="#4477aa", edgecolor="white")
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("count")
        a.axvline(SAM_STABILITY, color="#cc3311", linestyle="--", label=f"SAM's threshold {SAM_STABILITY}")
        a.legend(loc="upper left")
        fig.suptitle(st["output_uri"], fontsize=9)
        fig.tight_layout()
        fd, tmp = tempfile.mkstemp(prefix=".stats-", suffix=".png.tmp", dir=os.path.dirname(os.path.abspath(path)))
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format="png")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    finally:
        plt.close(fig)


def stats_json(st: dict) -> str:
    return json.dumps(st, indent=2, sort_keys=True)
