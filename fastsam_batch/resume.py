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
    # image_id -> [(source version, part path)] for every committed row of the image
    versions: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def fresh(self, image_id: str, version: str) -> bool:
        """Whether the image has a committed row made from this version of its source object."""
        return any(v == version or v == "" for v, _ in self.versions.get(image_id, []))

    def superseded_parts(self, current: dict[str, str]) -> dict[str, set[str]]:
        """part -> image ids whose rows there were made from an older version of the object while a
        row from the current version is committed too (after an incremental run, or a crash in it)."""
        out: dict[str, set[str]] = {}
        for image_id, rows in self.versions.items():
            version = current.get(image_id)
            if version is None or len(rows) < 2 or not self.fresh(image_id, version):
                continue
            for v, part in rows:
                if v not in (version, ""):
                    out.setdefault(part, set()).add(image_id)
        return out


def source_version(item: dict) -> str:
    """What identifies the content of a planned object: its ETag (S3) or modification time (local), and size."""
    return f"{item.get('etag', '')}/{item.get('size', 0)}"


def _names_starting(output_uri: str, storage: Storage, prefix: str) -> list[str]:
    """Paths of the files directly under ``output_uri`` whose names start with ``prefix``."""
    fs = storage.fs(output_uri)
    fs.invalidate_cache(output_uri)  # s3fs caches listings: the writers have added files since
    try:
        names = fs.ls(output_uri, detail=False)
    except FileNotFoundError:
        return []
    return sorted(p for p in names if p.rsplit("/", 1)[-1].startswith(prefix))


def list_parts(output_uri: str, storage: Storage) -> list[str]:
    return _names_starting(output_uri, storage, PART_PREFIX)


def _local(output_uri: str, paths: list[str]) -> list[str]:
    return paths if protocol_of(output_uri) != "file" else [p.split("://", 1)[-1] for p in paths]


def read_committed(output_uri: str, storage: Storage) -> Committed:
    """Image ids, statuses, fingerprints and source versions of the committed rows (a few columns read)."""
    import pyarrow.dataset as pads

    c = Committed(parts=list_parts(output_uri, storage))
    if not c.parts:
        return c
    fs = storage.fs(output_uri)
    for part in _local(output_uri, c.parts):
        t = pads.dataset(part, format="parquet", filesystem=fs)
        cols = ["image_id", "run_fingerprint", "status"] + [x for x in ("source_version",) if x in t.schema.names]
        table = t.to_table(columns=cols)
        ids = table.column("image_id").to_pylist()
        versions = table.column("source_version").to_pylist() if "source_version" in cols else [""] * len(ids)
        c.rows += len(ids)
        c.status.update(zip(ids, table.column("status").to_pylist()))
        for fp in table.column("run_fingerprint").to_pylist():
            c.fingerprints[fp] = c.fingerprints.get(fp, 0) + 1
        for image_id, v in zip(ids, versions):
            c.versions.setdefault(image_id, []).append((v or "", part))
    return c


def drop_superseded_rows(output_uri: str, storage: Storage, committed: Committed, current: dict[str, str],
                         compression: str | None = "zstd") -> int:
    """Rewrites each Parquet file holding superseded rows without them (new content-addressed file
    first, then the old one deleted: a crash in between leaves the old file to be rewritten again,
    to the same name, on the next run). Returns the number of rows dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .write import part_name, put_atomic

    fs = storage.fs(output_uri)
    dropped = 0
    for part, ids in sorted(committed.superseded_parts(current).items()):
        with fs.open(part, "rb") as f:
            table = pq.read_table(f)
        keep = table.filter(pc.invert(pc.is_in(table.column("image_id"), value_set=pa.array(sorted(ids), pa.string()))))
        dropped += table.num_rows - keep.num_rows
        if keep.num_rows:
            import io

            buf = io.BytesIO()
            pq.write_table(keep, buf, compression=compression)
            base = output_uri.rstrip("/")
            put_atomic(storage, f"{base}/{part_name(keep.column('image_id').to_pylist())}", buf.getvalue())
        fs.rm(part)
    return dropped


def remove_stale_temporaries(output_uri: str, storage: Storage) -> int:
    """Local temporary files left by a killed writer (S3 puts are never partial)."""
    if protocol_of(output_uri) != "file":
        return 0
    stale = _names_starting(output_uri, storage, "_tmp-")
    if stale:
        storage.fs(output_uri).rm(stale)
    return len(stale)
