"""``fastsam-batch export-coco OUTPUT --out FILE.json``: the masks as COCO JSON, streamed.

Results form (default): the list ``COCO.loadRes`` and ``COCOeval`` take, one entry per mask:
``image_id``, ``category_id``, ``segmentation`` (compressed RLE as in the output), ``bbox``,
``score``, and ``file_name`` (the output's image_id); with prompts also ``prompt_id`` (a COCO
annotation id when the prompts came from one) and the mask's category. Annotations form
(``--annotations``): a COCO dataset (``images``, ``annotations``, ``categories``) for labelling tools.

Image ids: with ``--coco GT.json`` those of the images of that file (matched by ``file_name``, as
``prompts.coco`` matches them); otherwise 1, 2, ... in the output's order. Masks are written as
they are read, a file at a time: only the image list is held (annotations form).

Categories: a prompted mask keeps its prompt's ``category_id``. An everything-mode mask has none: it
gets the category "object", id 1, or with ``--coco`` an id that file does not use (one above its
highest), so that it is never labelled as one of the file's categories; ``--category-id N`` gives
such masks category N instead (to evaluate them against a file whose objects are all of one
category, say).

The JSON is written to a temporary file beside ``--out`` and renamed over it only when complete:
a failed export (a missing output, an unreadable ``--coco``) leaves the old file as it was.
"""

from __future__ import annotations

import json
from typing import TextIO

from ..stats import OutputError
from ..storage import Storage
from . import OutputRows

DEFAULT_CATEGORY = {"id": 1, "name": "object"}


def coco_image_ids(coco_uri: str, storage: Storage) -> tuple[dict[str, int], list[dict]]:
    """file_name -> id, and the categories, of a COCO annotations file."""
    try:
        doc = json.loads(storage.read_bytes(coco_uri))
        return {im["file_name"]: int(im["id"]) for im in doc["images"]}, list(doc.get("categories") or [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputError(f"--coco {coco_uri!r}: not a readable COCO annotations file ({type(e).__name__}: {e})") from None


def uncategorised(categories: list[dict]) -> dict:
    """The category of masks without one (everything mode): "object", with an id ``categories`` do not use."""
    used = [int(c["id"]) for c in categories if isinstance(c, dict) and isinstance(c.get("id"), int)]
    return {**DEFAULT_CATEGORY, "id": max(used) + 1} if used else dict(DEFAULT_CATEGORY)


def export_coco_file(output_uri: str, storage: Storage, out_path: str, annotations: bool = False,
                     coco_uri: str | None = None, category_id: int | None = None) -> dict:
    """:func:`export_coco` into the local file ``out_path``, replaced only once the export is complete
    (its folder must exist). Returns the counts."""
    import os
    import tempfile

    target = os.path.realpath(out_path)  # a symlink is written through, as an ordinary open would
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise OutputError(f"--out {out_path!r}: no such folder {os.path.dirname(os.path.abspath(out_path))}")
    fd, tmp = tempfile.mkstemp(prefix=".export-coco-", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            counts = export_coco(output_uri, storage, f, annotations, coco_uri, category_id)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from everyone else
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return counts


def export_coco(output_uri: str, storage: Storage, out: TextIO, annotations: bool = False,
                coco_uri: str | None = None, category_id: int | None = None) -> dict:
    """Writes the COCO JSON to ``out``; returns counts (images, masks, images without a COCO id).
    ``category_id``: the category of masks without one (default: see :func:`uncategorised`)."""
    ids, categories = coco_image_ids(coco_uri, storage) if coco_uri else ({}, [])
    other = uncategorised(categories)
    if category_id is not None:
        other = next((c for c in categories if c.get("id") == category_id), {"id": category_id, "name": "object"})
    rows = OutputRows(output_uri, storage)
    images: list[dict] = []
    counts = {"images": 0, "masks": 0, "error_rows": 0, "not_in_coco": 0, "outside_coco_categories": 0}
    coco_categories = {c.get("id") for c in categories}
    seen_categories: set[int] = set()
    out.write('{"annotations": [\n' if annotations else "[\n")
    first = True
    for row in rows.rows(["image_id", "width", "height", "status", "masks"]):
        if row["status"] != "ok":
            counts["error_rows"] += 1
            continue
        if ids:
            image_id = ids.get(row["image_id"])
            if image_id is None:
                counts["not_in_coco"] += 1
                continue
        else:
            image_id = counts["images"] + 1
        counts["images"] += 1
        images.append({"id": image_id, "file_name": row["image_id"], "width": row["width"], "height": row["height"]})
        for m in row["masks"]:
            category = m["category_id"] if m["category_id"] is not None else other["id"]
            seen_categories.add(category)
            if coco_uri and category not in coco_categories:
                counts["outside_coco_categories"] += 1
            entry = {"image_id": image_id, "category_id": category,
                     "segmentation": {"size": [row["height"], row["width"]], "counts": m["counts"]},
                     "bbox": [round(v, 2) for v in m["bbox"]], "score": round(float(m["score"]), 5)}
            if annotations:
                entry.update(id=counts["masks"] + 1, area=int(m["area"]), iscrowd=0)
            else:
                entry["file_name"] = row["image_id"]
            if m["prompt_id"] is not None:
                entry["prompt_id"] = m["prompt_id"]
            out.write(("" if first else ",\n") + json.dumps(entry, separators=(",", ":")))
            first = False
            counts["masks"] += 1
    if annotations:
        known = {c["id"] for c in categories}
        categories = categories + [other if c == other["id"] else {"id": c, "name": f"category {c}"}
                                   for c in sorted(seen_categories - known)]
        out.write('\n],\n"images": ' + json.dumps(images) + ',\n"categories": ' + json.dumps(categories) + "}\n")
    else:
        out.write("\n]\n")
    return counts
