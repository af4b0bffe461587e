"""Building output rows (pyarrow) from a batch and its per-image masks or errors."""

from __future__ import annotations

import json
import time

import pyarrow as pa

from .schema import INTERNAL_COLUMNS, output_schema


def _ms(values) -> list:
    return [float(x) if x is not None and x >= 0 else None for x in values]


def output_table(batch: dict, masks: list[list[dict]], errors: list, timings: list[dict], *, model: str, sha256: str,
                 fingerprint: str, prompts: list[list[dict]] | None = None, carried: tuple[str, ...] = ()) -> pa.Table:
    """The output rows of a batch: the schema's columns, the ``carried`` columns (from each row's
    ``extra``), and the internal end-of-unit columns when the batch has them (the writer drops
    those rows and columns)."""
    n = len(batch["image_id"])
    ok = [e is None for e in errors]
    now = int(time.time() * 1000)
    prompts = prompts or [[] for _ in range(n)]
    cols = {
        "image_id": [str(x) for x in batch["image_id"]],
        "uri": [str(x) for x in batch["uri"]],
        "shard": [str(x) or None for x in batch["shard"]] if "shard" in batch else [None] * n,
        "source_version": [str(x) for x in batch["source_version"]] if "source_version" in batch else [None] * n,
        "width": [int(batch["width"][i]) if batch["width"][i] > 0 else None for i in range(n)],
        "height": [int(batch["height"][i]) if batch["height"][i] > 0 else None for i in range(n)],
        "status": ["ok" if k else "error" for k in ok],
        "error": [None if k else str(e) for k, e in zip(ok, errors)],
        "masks": [m if k else [] for k, m in zip(ok, masks)],
        "num_masks": [len(m) if k else 0 for k, m in zip(ok, masks)],
        "num_duplicates": [t.get("duplicates") if k else None for k, t in zip(ok, timings)],
        "prompts": prompts,
        "num_prompt_errors": [sum(p["error"] is not None for p in ps) for ps in prompts],
        "model": [model] * n,
        "checkpoint_sha256": [sha256] * n,
        "run_fingerprint": [fingerprint] * n,
        "read_retries": [int(x) for x in batch["read_retries"]] if "read_retries" in batch else [0] * n,
        "read_ms": _ms(batch["read_ms"]),
        "decode_ms": _ms(batch["decode_ms"]),
        "model_ms": _ms(t.get("model") for t in timings),
        "masks_ms": _ms(t.get("masks") for t in timings),
        "select_ms": _ms(t.get("select") for t in timings),
        "encode_ms": _ms(t.get("encode") for t in timings),
        "segmented_at": [now] * n,
    }
    schema = output_schema(carried)
    if carried:
        extras = [json.loads(e) if e else {} for e in batch["extra"]] if "extra" in batch else [{}] * n
        for c in carried:
            cols[c] = [e.get(c) for e in extras]
    if INTERNAL_COLUMNS[0] in batch:
        for c in INTERNAL_COLUMNS:
            cols[c] = [int(x) for x in batch[c]]
            schema = schema.append(pa.field(c, pa.int32()))
    return pa.Table.from_pydict(cols, schema=schema)
