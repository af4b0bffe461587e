"""Run fingerprints and resuming: what is already committed under ``output.uri``.

Every row carries the fingerprint of the run that wrote it: a hash of everything that decides
its masks (checkpoint SHA-256, model settings, prompt rules, decode limits, tool version).
Re-running a job reads only the ``image_id``, ``status`` and ``run_fingerprint`` columns of the
committed Parquet files; images that already have a row are skipped. Rows of another fingerprint mean
another configuration wrote there: that run is refused unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from . import __version__
from .manifest import Manifest
from .storage import Storage, protocol_of
from .write import PART_PREFIX


def run_fingerprint(m: Manifest, checkpoint_sha256: str, prompt_sources: dict | None = None) -> tuple[str, dict]:
    """(fingerprint, the material it hashes). The device is left out on purpose: cpu and cuda
    runs of the same settings may finish each other's work (fp16 is in, as ``model.half``).
    ``prompt_sources``: SHA-256 of the prompt table / COCO file and of the CLIP folder."""
    material = {
        "tool_version": __version__,
        "checkpoint_sha256": checkpoint_sha256,
        "model": m.model.model_dump(include={"imgsz", "conf", "iou", "max_det", "half"}),
        "prompts": m.prompts.model_dump(exclude={"table", "coco", "clip"}),
        "prompt_sources": prompt_sources or {},
        "mask_rules": m.mask_rules.model_dump(),
        "decode": {"max_pixels": m.input.max_pixels},
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]
    return digest, material


@dataclass
class Committed:
    parts: list[str] = field(default_factory=list)
    status: dict[str, str] = field(default_factory=dict)  # image_id -> "ok" | "error"
    rows: int = 0
    fingerprints: dict[str, int] = field(default_factory=dict)  # fingerprint -> rows


def _names_starting(output_uri: str, storage: Storage, prefix: str) -> list[str]:
    """Paths of the files directly under ``output_uri`` whose names start with ``prefix``."""
    try:
        names = storage.fs(output_uri).ls(output_uri, detail=False)
    except FileNotFoundError:
        return []
    return sorted(p for p in names if p.rsplit("/", 1)[-1].startswith(prefix))


def list_parts(output_uri: str, storage: Storage) -> list[str]:
    return _names_starting(output_uri, storage, PART_PREFIX)


def read_committed(output_uri: str, storage: Storage) -> Committed:
    """Image ids, statuses and fingerprints of the rows already committed (three columns read)."""
    import pyarrow.dataset as pads

    c = Committed(parts=list_parts(output_uri, storage))
    if not c.parts:
        return c
    fs = storage.fs(output_uri)
    paths = c.parts if protocol_of(output_uri) != "file" else [p.split("://", 1)[-1] for p in c.parts]
    table = pads.dataset(paths, format="parquet", filesystem=fs).to_table(columns=["image_id", "run_fingerprint", "status"])
    ids = table.column("image_id").to_pylist()
    c.rows = len(ids)
    c.status = dict(zip(ids, table.column("status").to_pylist()))
    for fp in table.column("run_fingerprint").to_pylist():
        c.fingerprints[fp] = c.fingerprints.get(fp, 0) + 1
    return c


def remove_stale_temporaries(output_uri: str, storage: Storage) -> int:
    """Local temporary files left by a killed writer (S3 puts are never partial)."""
    if protocol_of(output_uri) != "file":
        return 0
    stale = _names_starting(output_uri, storage, "_tmp-")
    if stale:
        storage.fs(output_uri).rm(stale)
    return len(stale)
