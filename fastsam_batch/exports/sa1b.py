"""``fastsam-batch export-sa1b OUTPUT --out DIR [--tar] [--shard-size N] [--with-images]``: the
masks as SA-1B per-image records, the layout of Segment Anything's dataset (and of Datumaro's
``segment_anything`` format, which CVAT uses).

One record per ok image, ``<name>.json``::

    {"image": {"image_id": 1, "file_name": "<name>.jpg", "width": W, "height": H},
     "annotations": [{"id": 1, "segmentation": {"size": [H, W], "counts": "..."}, "bbox": [x, y, w, h],
                      "area": A, "predicted_iou": S, "stability_score": T, "crop_box": [0, 0, W, H],
                      "point_coords": [[x, y], ...]}, ...]}

- ``segmentation``: COCO compressed RLE, as in the output; ``bbox`` (XYWH) and ``area`` as there.
- ``predicted_iou``: the mask's detection ``score`` (FastSAM has no IoU head; SAM's field is its
  predicted mask IoU). Filter on it as on SAM's, knowing it is a confidence, not an IoU estimate.
- ``stability_score``: from ``masks[].stability_score`` when the output has it; absent otherwise
  (Datumaro's importer refuses ``null`` there and reads a missing key as 0.0; SAM's own tools
  never read it back).
- ``crop_box``: the whole image (FastSAM segments the image in one pass, never in crops).
- ``point_coords``: the foreground points (label 1) of the point prompt that selected the mask
  (background points left out); ``[]`` for masks of everything mode, box and text prompts.
- ``image_id`` numbers the images 1, 2, ... and ``id`` the masks 1, 2, ... in the export's order
  (the same for the same output). ``<name>`` is the output's image_id in safe characters plus 8 hex
  digits of its hash (exports.sample_name): unique, and the same in every export.
- ``file_name``: ``<name>.jpg`` for a JPEG, ``<name>.png`` otherwise. With ``--with-images`` the
  image is written under that name beside its record, in the orientation of its masks (see
  exports.image_file: a JPEG or PNG without an EXIF rotation byte for byte, a turned JPEG saved
  again as displayed, quality 95; other formats as PNG), read from its row's ``uri``; without it,
  the name is judged from the image id's extension.

Files: ``DIR/<name>.json`` (+ image), or with ``--tar`` shards ``DIR/sa_000000.tar``, ... of
``--shard-size`` images (one shard per input tar shard when the input was tar shards). Error rows
and images that cannot be read now (or changed since) are left out and counted. ``DIR`` must hold no
files, or with ``--overwrite`` the files this export writes (:func:`owns`) are removed first.
"""

from __future__ import annotations

import json
import posixpath
import re

from ..storage import Storage
from . import Destination, ExportProgress, OutputRows, Plan, TarShard, groups, left_out, rle, sample_name

JPEG_EXTENSIONS = (".jpg", ".jpeg", ".jpe")


def point_coords(row: dict, m: dict) -> list:
    """The foreground points (label 1) of the point prompt that selected the mask: SA-1B's
    ``point_coords`` are the points a mask was sampled from, all foreground; background points
    (label 0) of the prompt are left out."""
    i = m.get("prompt_index")
    if i is None or m.get("prompt_kind") != "points":
        return []
    prompts = row.get("prompts") or []
    p = (prompts[i] if 0 <= i < len(prompts) else None) or {}
    points = p.get("points") or []
    labels = p.get("labels")
    if labels is None or len(labels) != len(points):
        labels = [1] * len(points)  # no labels: all foreground (the prompt tables' default)
    return [[float(x), float(y)] for (x, y), label in zip(points, labels) if label == 1]


def owns(name: str) -> bool:
    """Whether ``--out``'s file ``name`` is one export-sa1b writes (what --overwrite removes)."""
    return "/" not in name and bool(_OWN.match(name))


_OWN = re.compile(r"^(sa_\d{6}\.tar|.+-[0-9a-f]{8}\.(json|jpg|png))$")


def record(row: dict, image_id: int, file_name: str, first_id: int) -> dict:
    """The SA-1B record of one output row; its masks get ids ``first_id``, ``first_id + 1``, ..."""
    w, h = row["width"], row["height"]
    annotations = []
    for k, m in enumerate(row["masks"]):
        ann = {"id": first_id + k, "segmentation": rle(row, m), "bbox": [float(v) for v in m["bbox"]],
               "area": int(m["area"]), "predicted_iou": float(m["score"])}
        if m.get("stability_score") is not None:
            ann["stability_score"] = float(m["stability_score"])
        ann.update(crop_box=[0, 0, w, h], point_coords=point_coords(row, m))
        annotations.append(ann)
    return {"image": {"image_id": image_id, "file_name": file_name, "width": w, "height": h},
            "annotations": annotations}


def export_sa1b(output_uri: str, storage: Storage, out: str, tar: bool = False, shard_size: int = 1000,
                with_images: bool = False, image_storage: Storage | None = None, progress: bool = True,
                overwrite: bool = False) -> dict:
    """Writes the records (see the module's text) under ``out``; returns the counts.
    ``image_storage``: how the images' URIs are read (the job's storage options). ``out`` must
    hold no files, or ``overwrite``: this export kind's files there are removed first."""
    rows = OutputRows(output_uri, storage)
    dest = Destination(out, storage, output_uri)
    dest.prepare("export-sa1b", owns, overwrite)
    shown = ExportProgress("export-sa1b") if progress else None
    plan = Plan(rows, shown)
    if shown:
        shown.start(plan.ok)
    counts = {"images": 0, "masks": 0, "files": 0, "error_rows": plan.errors, "unavailable": 0, "examples": [],
              "duplicates": rows.duplicates}
    for group in groups(rows, plan, image_storage or storage, shard_size, with_images):
        shard = TarShard(dest, f"sa_{group.index:06d}.tar") if tar else None
        with shard or _NoShard():
            for s in group.samples:
                if left_out(counts, s, shown):
                    continue
                name = sample_name(s.row["image_id"])
                ext = s.image[0] if s.image else (
                    "jpg" if posixpath.splitext(s.row["image_id"])[1].lower() in JPEG_EXTENSIONS else "png")
                counts["images"] += 1
                doc = json.dumps(record(s.row, counts["images"], f"{name}.{ext}", counts["masks"] + 1),
                                 separators=(",", ":")).encode()
                counts["masks"] += len(s.row["masks"])
                files = [(f"{name}.json", doc)] + ([(f"{name}.{ext}", s.image[1])] if s.image else [])
                for file_name, data in files:
                    shard.add(file_name, data) if shard else dest.put_bytes(file_name, data)
                counts["files"] += 0 if shard else len(files)
                if shown:
                    shown.step(files=0 if shard else len(files))
        if shard is not None:
            counts["files"] += 1
            if shown:
                shown.step(0, files=1)
    if shown:
        shown.close()
    return counts


class _NoShard:
    def __enter__(self):
        return None

    def __exit__(self, *_):
        return False
