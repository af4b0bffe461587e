"""``fastsam-batch overlay OUTPUT --sample N --out DIR``: pictures to check masks by eye.

For a sample of images (the same sample for the same seed): the image with each mask tinted in a
colour of its own (half opacity) and outlined, box prompts drawn as white rectangles and point
prompts as crosses (green foreground, red background), as ``DIR/<image id>.png``; and a contact
sheet of the sample, ``DIR/contact-sheet.png``. Pixels outside every mask and prompt mark are the
image's own. ``--color-by stability`` or ``score`` colours each mask by its ``stability_score`` or
detection ``score`` instead, on a red (0) - yellow (0.5) - green (1) scale (:func:`value_colour`),
to see at a glance which masks a quality threshold would drop; a mask without the value (a file
written before the column existed, next to newer ones) is grey. With a value scale the contact
sheet gets a legend: the scale as a bar, marked 0, 0.5 and 1.
"""

from __future__ import annotations

import colorsys
import random
import re
from pathlib import Path

import numpy as np

from .inputs import read_image_at
from .decode import DecodeError, decode_for_model
from .stats import OutputError, output_dataset
from .storage import Storage

ALPHA = 0.5
THUMB = 256


def mask_colour(k: int) -> np.ndarray:
    """Distinct colours: hues a golden angle apart, saturated and bright."""
    r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.85, 0.95)
    return np.array([r, g, b]) * 255


COLOR_BY = {"mask": None, "stability": "stability_score", "score": "score"}  # --color-by: the mask field


NO_VALUE = np.array([128.0, 128.0, 128.0])  # --color-by: a mask without the value (a file of an older version)


def value_colour(v: float) -> np.ndarray:
    """A value in [0, 1] as a colour: hue from red (0) through yellow (0.5) to green (1)."""
    r, g, b = colorsys.hsv_to_rgb(min(max(float(v), 0.0), 1.0) / 3, 0.85, 0.95)
    return np.array([r, g, b]) * 255


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def draw(image: np.ndarray, row: dict, color_by: str = "mask") -> np.ndarray:
    """The picture of one output row over its RGB image; ``color_by``: a colour per mask, or by its
    stability or detection score (see the module doc)."""
    from pycocotools import mask as mask_utils

    h, w = image.shape[:2]
    out = image.astype(np.float64)
    edges = []
    for k, m in enumerate(row["masks"]):
        binary = mask_utils.decode({"size": [h, w], "counts": m["counts"].encode()}).astype(bool)
        field = COLOR_BY[color_by]
        value = None if field is None else m.get(field)
        colour = mask_colour(k) if field is None else NO_VALUE if value is None else value_colour(value)
        out[binary] = out[binary] * (1 - ALPHA) + colour * ALPHA
        edges.append((outline(binary), colour))
    for edge, colour in edges:
        out[edge] = colour
    out = out.round().clip(0, 255).astype(np.uint8)
    for p in row.get("prompts") or []:
        if p.get("box"):
            x1, y1, x2, y2 = (int(round(v)) for v in p["box"])
            x1, x2 = max(0, min(x1, w - 1)), max(0, min(x2, w - 1))
            y1, y2 = max(0, min(y1, h - 1)), max(0, min(y2, h - 1))
            out[y1, x1:x2 + 1] = out[y2, x1:x2 + 1] = 255
            out[y1:y2 + 1, x1] = out[y1:y2 + 1, x2] = 255
        for (x, y), label in zip(p.get("points") or [], p.get("labels") or []):
            colour = (0, 255, 0) if label else (255, 0, 0)
            x, y = int(round(x)), int(round(y))
            out[max(0, y - 4):y + 5, min(max(x, 0), w - 1)] = colour
            out[min(max(y, 0), h - 1), max(0, x - 4):x + 5] = colour
    return out


LEGEND_H = 40  # the contact sheet's legend strip (--color-by stability / score)
LEGEND_BAR = (8, 8, 209, 20)  # the gradient bar: x1, y1, x2, y2; x1 is 0, x1 + 100 is 0.5, x2 - 1 is 1


def draw_legend(sheet, top: int, field: str) -> None:
    """The value scale under the contact sheet: a bar from 0 (left, red) through 0.5 (yellow) to 1
    (right, green), marked 0 / 0.5 / 1, and the field's name."""
    from PIL import Image, ImageDraw

    x1, y1, x2, y2 = LEGEND_BAR
    bar = np.array([value_colour(i / (x2 - x1 - 1)) for i in range(x2 - x1)]).round().astype(np.uint8)
    sheet.paste(Image.fromarray(np.repeat(bar[None], y2 - y1, 0)), (x1, top + y1))
    pen = ImageDraw.Draw(sheet)
    for v in (0.0, 0.5, 1.0):
        x = x1 + round(v * (x2 - x1 - 1))
        pen.line([(x, top + y2), (x, top + y2 + 3)], fill=(255, 255, 255))
        pen.text((max(x - 6, 0), top + y2 + 4), f"{v:g}", fill=(255, 255, 255))
    pen.text((x2 + 10, top + y1), f"{field} (grey: none)", fill=(255, 255, 255))


def safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._") or "image"


def sample_rows(output_uri: str, storage: Storage, n: int, seed: int = 0, color_by: str = "mask") -> list[dict]:
    """``n`` ok rows chosen at random (``seed``), in image id order."""
    import pyarrow.compute as pc

    ds = output_dataset(output_uri, storage, unified=True)  # a mask field of some files only: null in the others
    field = COLOR_BY[color_by]
    if field is not None and ds.schema.field("masks").type.value_type.get_field_index(field) < 0:
        raise OutputError(f"--color-by {color_by}: {output_uri!r} has no {field} in its masks "
                          "(written by an older version; run it again with --overwrite to get the column)")
    ids = sorted(ds.to_table(columns=["image_id"], filter=pc.field("status") == "ok").column("image_id").to_pylist())
    if not ids:
        raise OutputError(f"{output_uri!r}: no ok rows to draw")
    chosen = sorted(random.Random(seed).sample(ids, min(n, len(ids))))
    table = ds.to_table(columns=["image_id", "uri", "width", "height", "masks", "prompts"],
                        filter=pc.field("image_id").isin(chosen))
    return sorted(table.to_pylist(), key=lambda r: r["image_id"])


def write_overlays(output_uri: str, storage: Storage, n: int, out_dir: str, seed: int = 0,
                   color_by: str = "mask") -> list[Path]:
    """Draws the sample into ``out_dir``; returns the pictures written (the contact sheet last)."""
    from PIL import Image

    if n < 1:
        raise OutputError(f"--sample {n}: give how many images to draw (1 or more)")
    rows = sample_rows(output_uri, storage, n, seed, color_by)  # the output read before anything is written
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written, thumbs = [], []
    for row in rows:
        try:
            image, _ = decode_for_model(read_image_at(row["uri"], storage), max_pixels=1 << 40)
        except (OSError, ValueError, DecodeError) as e:
            raise OutputError(f"{row['uri']!r}: cannot read the image to draw on ({e})") from None
        if image.shape[:2] != (row["height"], row["width"]):
            raise OutputError(f"{row['uri']!r}: the image is {image.shape[1]}x{image.shape[0]} now, its row says "
                              f"{row['width']}x{row['height']} (changed since it was segmented?)")
        picture = Image.fromarray(draw(image, row, color_by))
        path = folder / f"{safe_name(row['image_id'])}.png"
        picture.save(path)
        written.append(path)
        thumb = picture.copy()
        thumb.thumbnail((THUMB, THUMB))
        thumbs.append(thumb)
    cols = min(len(thumbs), 6)
    rows = -(-len(thumbs) // cols)
    legend = COLOR_BY[color_by] is not None
    sheet = Image.new("RGB", (cols * THUMB, rows * THUMB + (LEGEND_H if legend else 0)), (32, 32, 32))
    for i, t in enumerate(thumbs):
        sheet.paste(t, ((i % cols) * THUMB + (THUMB - t.width) // 2, (i // cols) * THUMB + (THUMB - t.height) // 2))
    if legend:
        draw_legend(sheet, rows * THUMB, COLOR_BY[color_by])
    sheet_path = folder / "contact-sheet.png"
    sheet.save(sheet_path)
    written.append(sheet_path)
    return written
