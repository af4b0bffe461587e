"""Masks as sorted column-major pixel intervals: the form masks take between segmentation and RLE.

A mask of an H x W image is a pair of int64 arrays ``(starts, ends)``: half-open intervals
[start, end) of pixels that are on, as column-major (COCO, Fortran order) flat indices
``x * H + y``, sorted and non-overlapping (touching is allowed). That is a few numbers per column
of the mask's box, so every mask of an image fits in memory at once at any image size, and the
prompt and mask rules below work on it with array operations, never on full-size masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EMPTY = np.empty(0, np.int64)


@dataclass
class IntervalMask:
    starts: np.ndarray
    ends: np.ndarray
    score: float
    box: tuple[float, float, float, float]  # detection box xyxy (FastSAM's full-image rule applied)
    # SAM's stability score of the model's logits in the box (quality.py), float32; NaN: not computed
    # (min_stability then raises rather than drop the mask)
    stability: float = float("nan")
    area: int = field(init=False)

    def __post_init__(self) -> None:
        self.area = int((self.ends - self.starts).sum())


def covered_before(starts: np.ndarray, ends: np.ndarray, p: np.ndarray) -> np.ndarray:
    """For each flat index in ``p``: how many mask pixels have an index < p."""
    if starts.size == 0:
        return np.zeros(np.shape(p), np.int64)
    lengths = ends - starts
    before = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    i = np.searchsorted(starts, p, side="right") - 1
    ok = i >= 0
    ic = np.where(ok, i, 0)
    return np.where(ok, before[ic] + np.minimum(p - starts[ic], lengths[ic]), 0)


def intersection_area(a: IntervalMask | tuple, b: IntervalMask | tuple) -> int:
    """Pixels on in both masks."""
    sa, ea = (a.starts, a.ends) if isinstance(a, IntervalMask) else a
    sb, eb = (b.starts, b.ends) if isinstance(b, IntervalMask) else b
    if sa.size == 0 or sb.size == 0:
        return 0
    if sa.size < sb.size:  # search the longer list
        sa, ea, sb, eb = sb, eb, sa, ea
    return int((covered_before(sa, ea, eb) - covered_before(sa, ea, sb)).sum())


def box_intervals(x1: int, y1: int, x2: int, y2: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of the integer box [x1, x2) x [y1, y2) as intervals (one per column)."""
    if x2 <= x1 or y2 <= y1:
        return EMPTY, EMPTY
    cols = np.arange(x1, x2, dtype=np.int64) * height
    return cols + y1, cols + y2


def contains_points(starts: np.ndarray, ends: np.ndarray, xs: np.ndarray, ys: np.ndarray, height: int) -> np.ndarray:
    """Whether the mask is on at each integer pixel (x, y)."""
    if starts.size == 0:
        return np.zeros(len(xs), bool)
    p = np.asarray(xs, np.int64) * height + np.asarray(ys, np.int64)
    i = np.searchsorted(starts, p, side="right") - 1
    return (i >= 0) & (p < ends[np.maximum(i, 0)])


def union(masks: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The union of several masks' intervals, sorted and merged."""
    parts = [(s, e) for s, e in masks if s.size]
    if not parts:
        return EMPTY, EMPTY
    s = np.concatenate([p[0] for p in parts])
    e = np.concatenate([p[1] for p in parts])
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    reach = np.maximum.accumulate(e)
    new = np.concatenate(([True], s[1:] > reach[:-1]))  # an interval starts a group past all before it
    group_ends = np.concatenate((reach[np.flatnonzero(new)[1:] - 1], [reach[-1]]))
    return s[new], group_ends


def to_crop(starts: np.ndarray, ends: np.ndarray, x1: int, y1: int, x2: int, y2: int, height: int) -> np.ndarray:
    """Dense bool crop (rows y1:y2, columns x1:x2) of the mask; memory of the crop's columns only."""
    ch, cw = max(y2 - y1, 0), max(x2 - x1, 0)
    if ch == 0 or cw == 0:
        return np.zeros((ch, cw), bool)
    lo, hi = x1 * height, x2 * height  # the crop's columns, full height, as a flat range
    s = np.clip(starts, lo, hi) - lo
    e = np.clip(ends, lo, hi) - lo
    keep = e > s
    edges = np.zeros(hi - lo + 1, np.int32)
    np.add.at(edges, s[keep], 1)
    np.add.at(edges, e[keep], -1)
    cols = np.cumsum(edges[:-1]).astype(bool).reshape(cw, height)
    return np.ascontiguousarray(cols[:, y1:y2].T)


def intervals_bbox(starts: np.ndarray, ends: np.ndarray, height: int) -> tuple[int, int, int, int]:
    """Tight integer box [x1, x2) x [y1, y2) of the mask's pixels (0,0,0,0 when empty)."""
    if starts.size == 0:
        return 0, 0, 0, 0
    last = ends - 1
    x1, x2 = int(starts[0] // height), int(last[-1] // height) + 1
    # An interval may run over column boundaries: then it covers the top and bottom rows.
    spans = (last // height) > (starts // height)
    if spans.any():
        return x1, 0, x2, height
    return x1, int((starts % height).min()), x2, int((last % height).max()) + 1
