"""``fastsam-batch export-webdataset OUTPUT --out DIR [--shard-size N]``: the images and their masks
as WebDataset shards (img2dataset's layout), for training loaders that stream tar files.

Each ok image is one sample of two consecutive members: ``{key}.jpg`` or ``{key}.png`` (a JPEG or
PNG as it is, byte for byte; other formats decoded, oriented as displayed, saved as PNG), read from
its row's ``uri``, and ``{key}.json``::

    {"key": ..., "image_id": ..., "uri": ..., "width": W, "height": H,
     "masks": [{"segmentation": {"size": [H, W], "counts": "..."}, "bbox": [...], "area": A,
                "score": S, ...every other masks[] field of the output...}, ...],
     "prompts": [...]}

Shards: when the input was tar shards, one output shard per input shard, under the input shard's
key (``train/s0.tar.gz`` -> ``DIR/train/s0.tar``), its samples in the input's member order and
keyed by the input's own keys (the member name without its extension), so the masks join the
input's other files (captions, ``.cls``) by key; otherwise ``DIR/000000.tar``, ... of
``--shard-size`` images each, keyed by exports.sample_name. Error rows and images that cannot be
read now are left out and counted.
"""

from __future__ import annotations

import json
import posixpath
import re

from ..storage import Storage
from . import Destination, ExportProgress, OutputRows, Plan, TarShard, groups, rle, sample_name

_KEY = re.compile(r"^[^.]+$")  # WebDataset splits a member's name at the first dot of its base name


def sample_json(row: dict, key: str) -> dict:
    masks = [{"segmentation": rle(row, m), **{k: v for k, v in m.items() if k != "counts"}} for m in row["masks"]]
    return {"key": key, "image_id": row["image_id"], "uri": row["uri"], "width": row["width"],
            "height": row["height"], "masks": masks, "prompts": row.get("prompts") or []}


def shard_name(index: int, input_shard: str | None) -> str:
    if input_shard is None:
        return f"{index:06d}.tar"
    for ext in (".tar.gz", ".tgz", ".tar"):
        if input_shard.lower().endswith(ext):
            return input_shard[: -len(ext)] + ".tar"
    return input_shard + ".tar"


def export_webdataset(output_uri: str, storage: Storage, out: str, shard_size: int = 1000,
                      image_storage: Storage | None = None, progress: bool = True) -> dict:
    """Writes the shards (see the module's text) under ``out``; returns the counts.
    ``image_storage``: how the images' URIs are read (the job's storage options)."""
    rows = OutputRows(output_uri, storage)
    dest = Destination(out, storage, output_uri)
    dest.check()
    plan = Plan(rows)
    shown = ExportProgress("export-webdataset", plan.ok) if progress else None
    counts = {"images": 0, "masks": 0, "files": 0, "error_rows": plan.errors, "unavailable": 0, "examples": [],
              "aligned": plan.aligned}
    for group in groups(rows, plan, image_storage or storage, shard_size, with_images=True):
        keys: set[str] = set()
        with TarShard(dest, shard_name(group.index, group.shard)) as shard:
            for s in group.samples:
                if s.missing is not None:
                    counts["unavailable"] += 1
                    if len(counts["examples"]) < 3:
                        counts["examples"].append(f"{s.row['image_id']}: {s.missing}")
                    if shown:
                        shown.step()
                    continue
                key = posixpath.splitext(s.member)[0] if s.member else ""
                if not _KEY.match(posixpath.basename(key) or ".") or key in keys:
                    key = sample_name(s.row["image_id"])
                keys.add(key)
                ext, data = s.image
                shard.add(f"{key}.{ext}", data)
                shard.add(f"{key}.json", json.dumps(sample_json(s.row, key), separators=(",", ":")).encode())
                counts["images"] += 1
                counts["masks"] += len(s.row["masks"])
                if shown:
                    shown.step()
        counts["files"] += 1
        if shown:
            shown.step(0, files=1)
    if shown:
        shown.close()
    return counts
