"""``fastsam-batch export-webdataset OUTPUT --out DIR [--shard-size N]``: the images and their masks
as WebDataset shards (img2dataset's layout), for training loaders that stream tar files.

Each ok image is one sample of two consecutive members: ``{key}.jpg`` or ``{key}.png`` (in the
orientation of its masks, see exports.image_file), read from its row's ``uri``, and ``{key}.json``
(its ``uri`` without user info or an http(s) query string, exports.public_uri)::

    {"key": ..., "image_id": ..., "uri": ..., "width": W, "height": H,
     "masks": [{"segmentation": {"size": [H, W], "counts": "..."}, "bbox": [...], "area": A,
                "score": S, ...every other masks[] field of the output...}, ...],
     "prompts": [...]}

Shards: when the input was tar shards, one output shard per input shard, under the input shard's
key (``train/s0.tar.gz`` -> ``DIR/train/s0.tar``), its samples in the input's member order and
keyed by the input's own keys (the member name without its extension), so the masks join the
input's other files (captions, ``.cls``) by key (two input shards that would share a name stop
the export first); otherwise ``DIR/000000.tar``, ... of ``--shard-size`` images each, keyed by
exports.sample_name. Error rows and images that cannot be read now (or changed since) are left
out and counted. ``DIR`` must hold no files, or with ``--overwrite`` its ``.tar`` files are removed
first.
"""

from __future__ import annotations

import json
import posixpath
import re

from ..storage import Storage
from ..stats import OutputError
from . import Destination, ExportProgress, OutputRows, Plan, TarShard, groups, left_out, public_uri, rle, sample_name

_KEY = re.compile(r"^[^.]+$")  # WebDataset splits a member's name at the first dot of its base name


def sample_json(row: dict, key: str) -> dict:
    masks = [{"segmentation": rle(row, m), **{k: v for k, v in m.items() if k != "counts"}} for m in row["masks"]]
    return {"key": key, "image_id": row["image_id"], "uri": public_uri(row["uri"]), "width": row["width"],
            "height": row["height"], "masks": masks, "prompts": row.get("prompts") or []}


def shard_name(index: int, input_shard: str | None) -> str:
    if input_shard is None:
        return f"{index:06d}.tar"
    for ext in (".tar.gz", ".tgz", ".tar"):
        if input_shard.lower().endswith(ext):
            return input_shard[: -len(ext)] + ".tar"
    return input_shard + ".tar"


def owns(name: str) -> bool:
    """Whether ``--out``'s file ``name`` is one export-webdataset writes (what --overwrite removes)."""
    return name.endswith(".tar")


def export_webdataset(output_uri: str, storage: Storage, out: str, shard_size: int = 1000,
                      image_storage: Storage | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Writes the shards (see the module's text) under ``out``; returns the counts.
    ``image_storage``: how the images' URIs are read (the job's storage options). ``out`` must
    hold no files, or ``overwrite``: the ``.tar`` files there are removed first."""
    rows = OutputRows(output_uri, storage)
    dest = Destination(out, storage, output_uri)
    dest.prepare("export-webdataset", owns, overwrite)
    shown = ExportProgress("export-webdataset") if progress else None
    plan = Plan(rows, shown)
    if plan.aligned:  # two input shards that would be written under one name (s0.tar and s0.tar.gz)
        names: dict[str, str] = {}
        for key in sorted(plan.keys.values()):
            name = shard_name(0, key)
            if name in names:
                raise OutputError(f"input shards {names[name]!r} and {key!r} would both be written as {name!r} "
                                  "(one output shard per input shard); rename one of them in the input")
            names[name] = key
    if shown:
        shown.start(plan.ok)
    counts = {"images": 0, "masks": 0, "files": 0, "error_rows": plan.errors, "unavailable": 0, "examples": [],
              "aligned": plan.aligned, "duplicates": rows.duplicates}
    for group in groups(rows, plan, image_storage or storage, shard_size, with_images=True):
        keys: set[str] = set()
        with TarShard(dest, shard_name(group.index, group.shard)) as shard:
            for s in group.samples:
                if left_out(counts, s, shown):
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
