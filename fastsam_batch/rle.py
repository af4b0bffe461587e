"""COCO run-length encoding of masks, computed from box crops without building full-size masks.

A FastSAM mask is zero outside its box, so only the box crop is ever computed. COCO RLE runs
over the full image in column-major (Fortran) order, alternating zeros and ones and starting
with zeros. These functions turn a crop placed at (x0, y0) in an image of height H and width W
into those run lengths directly, with array operations, and let pycocotools do only the
compression into its string form (``frPyObjects``), which gives the same bytes as
``pycocotools.mask.encode`` of the full mask.
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils


def crop_intervals(crop: torch.Tensor, x0: int, y0: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Half-open [start, end) intervals of ones, as column-major indices into the full image.

    ``crop`` is a 2-D bool (or 0/1) tensor placed at (x0, y0) on any device; the transitions are
    found there and only the interval bounds (a few per column) come back to the host. Intervals
    come out sorted; ones touching across a column boundary are not merged here.
    """
    if crop.numel() == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if crop.device.type != "cpu":
        return _crop_intervals_torch(crop, x0, y0, height)
    # On the CPU, in the crop's own row-major memory (no copy, no transpose): where a pixel
    # differs from the one above it (one pass, then one flat nonzero: far faster than a 2-D
    # nonzero), plus ones on the crop's first and last rows; the few transition positions are
    # then sorted into column-major order.
    a = crop.numpy()
    ch, cw = a.shape
    r, c = np.divmod(np.flatnonzero(a[1:] != a[:-1]), cw)
    top = np.flatnonzero(a[0])  # intervals starting at the crop's top edge
    bottom = np.flatnonzero(a[-1])  # intervals ending at its bottom edge
    rows = np.concatenate((r + 1, np.zeros(top.size, np.int64), np.full(bottom.size, ch, np.int64)))
    cols = np.concatenate((c, top, bottom))
    order = np.lexsort((rows, cols))
    pos = (cols[order] + x0) * height + rows[order] + y0
    return pos[0::2], pos[1::2]  # in each column transitions alternate: start, end, start, ...


def _crop_intervals_torch(crop: torch.Tensor, x0: int, y0: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    # On an accelerator: transitions found there; only their positions come to the host.
    padded = torch.nn.functional.pad(crop.to(torch.int8).T, (1, 1))
    diff = padded[:, 1:] - padded[:, :-1]
    col_s, row_s = torch.nonzero(diff == 1, as_tuple=True)
    col_e, row_e = torch.nonzero(diff == -1, as_tuple=True)
    starts = ((col_s + x0) * height + row_s + y0).cpu().numpy().astype(np.int64)
    ends = ((col_e + x0) * height + row_e + y0).cpu().numpy().astype(np.int64)
    return starts, ends


def crop_run_lengths(crop: torch.Tensor, x0: int, y0: int, height: int, width: int) -> np.ndarray:
    """Uncompressed COCO run lengths of a full HxW mask that is ``crop`` at (x0, y0) and zero elsewhere."""
    return runs_from_intervals(*crop_intervals(crop, x0, y0, height), height * width)


def runs_from_intervals(starts: np.ndarray, ends: np.ndarray, total: int) -> np.ndarray:
    """Alternating zero/one run lengths (COCO order) from sorted half-open intervals of ones."""
    if starts.size == 0:
        return np.array([total], dtype=np.int64)
    # A run that ends at the bottom of one column and one that starts at the top of the next are
    # one run (crops spanning the full height): merge touching intervals.
    touching = starts[1:] == ends[:-1]
    if touching.any():
        starts = starts[np.concatenate(([True], ~touching))]
        ends = ends[np.concatenate((~touching, [True]))]
    bounds = np.empty(starts.size * 2 + 2, dtype=np.int64)
    bounds[0] = 0
    bounds[1:-1:2] = starts
    bounds[2:-1:2] = ends
    bounds[-1] = total
    runs = np.diff(bounds)
    # COCO RLE always starts with a (possibly empty) run of zeros but has no empty run at the end.
    return runs[:-1] if runs[-1] == 0 else runs


def runs_to_rle(runs: np.ndarray, height: int, width: int) -> dict:
    """Compressed COCO RLE (``{"size", "counts"}``, counts as bytes) from run lengths.

    Identical to ``pycocotools.mask.encode`` of the full mask; pycocotools only compresses here.
    """
    return mask_utils.frPyObjects({"size": [height, width], "counts": runs.tolist()}, height, width)


def rle_fields(rle: dict) -> tuple[str, int, list[float]]:
    """The output fields of one mask: counts string, area and [x, y, w, h] box (pycocotools' own)."""
    return rle["counts"].decode("ascii"), int(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]


def encode_mask(mask: np.ndarray) -> dict:
    """Reference path for a full HxW mask: pycocotools on a Fortran-ordered uint8 array."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle
