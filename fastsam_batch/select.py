"""Prompt rules: which of an image's masks each prompt selects. Pure functions, no Ray.

They reproduce ultralytics' ``FastSAMPredictor.prompt`` on the same masks:

* box: the box is cast to int32 (truncation, as ``torch.as_tensor(..., dtype=int32)`` does) and
  clipped to the image; each mask's IoU with the box region is (mask pixels inside the box) /
  (box area + mask area - mask pixels inside the box), in float32; the first mask with the
  largest IoU is selected;
* points: cast to int64 (truncation); the masks that contain a positive point (all masks when
  every point is negative) and contain no negative point;
* text: the mask whose masked crop best matches the text under CLIP, among the masks with more
  than ``text_min_area`` pixels (see :mod:`.clip_text`).

Where the reference would return something arbitrary, a prompt gets an error instead (kept in the
output row, see the README): a box with no area inside the image (``empty_box``), a point outside
the image (``point_outside_image``; the reference clips it to the border), a prompt that selects
no mask (``no_mask_selected``; for a box, IoU 0 with every mask, where the reference picks the
first mask), an image with no masks (``no_mask``), a text with no mask large enough to score
(``no_scorable_mask``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .intervals import IntervalMask, box_intervals, contains_points, covered_before, union


class PromptError(ValueError):
    """Why one prompt produced no mask; the message starts with a short reason."""


@dataclass
class Selection:
    """One output mask of a prompt: the selected masks (merged when more than one), its score."""

    masks: list[int]
    score: float  # detection score (the largest, when merged)
    prompt_score: float | None  # box IoU or text similarity; None for points


def truncate_box(box: list[float], h: int, w: int) -> tuple[int, int, int, int]:
    """The reference's box: int32 truncation toward zero, then clipped to the image."""
    x1, y1, x2, y2 = (int(v) for v in box)  # int() truncates toward zero, as a cast to int32 does
    x1, x2 = min(max(x1, 0), w), min(max(x2, 0), w)
    y1, y2 = min(max(y1, 0), h), min(max(y2, 0), h)
    return x1, y1, x2, y2


def box_ious(masks: list[IntervalMask], box: tuple[int, int, int, int], h: int) -> np.ndarray:
    """float32 IoU of each mask with the integer box region, as the reference computes it."""
    x1, y1, x2, y2 = box
    bs, be = box_intervals(x1, y1, x2, y2, h)
    inside = np.zeros(len(masks), np.int64)
    for i, m in enumerate(masks):
        mx1, my1, mx2, my2 = m.box
        if m.starts.size and bs.size and mx1 <= x2 and mx2 >= x1 and my1 <= y2 and my2 >= y1:
            inside[i] = int((covered_before(m.starts, m.ends, be) - covered_before(m.starts, m.ends, bs)).sum())
    areas = np.array([m.area for m in masks], np.int64)
    union_ = (x2 - x1) * (y2 - y1) + areas - inside
    return inside.astype(np.float32) / union_.astype(np.float32)


def select_box(masks: list[IntervalMask], box: list[float], h: int, w: int) -> Selection:
    if not masks:
        raise PromptError("no_mask: the image has no masks to select from")
    b = truncate_box(box, h, w)
    if b[2] <= b[0] or b[3] <= b[1]:
        raise PromptError(f"empty_box: box {box} has no area inside the {w}x{h} image")
    ious = box_ious(masks, b, h)
    best = int(np.argmax(ious))  # the first of equal maxima, like torch.argmax
    if ious[best] <= 0:
        raise PromptError(f"no_mask_selected: no mask overlaps box {box}")
    return Selection([best], masks[best].score, float(ious[best]))


def point_hits(masks: list[IntervalMask], points: list[list[float]], h: int, w: int) -> np.ndarray:
    """(masks x points) bool: whether each mask contains each point (after the int cast)."""
    for x, y in points:
        if not (0 <= x < w and 0 <= y < h):
            raise PromptError(f"point_outside_image: point [{x:g}, {y:g}] is outside the {w}x{h} image")
    xs = np.array([int(x) for x, _ in points], np.int64)
    ys = np.array([int(y) for _, y in points], np.int64)
    return np.array([contains_points(m.starts, m.ends, xs, ys, h) for m in masks], bool).reshape(len(masks), len(points))


def select_points(masks: list[IntervalMask], points: list[list[float]], labels: list[int], h: int, w: int, merge: bool) -> list[Selection]:
    if not masks:
        raise PromptError("no_mask: the image has no masks to select from")
    hits = point_hits(masks, points, h, w)
    lab = np.asarray(labels, np.int64)
    chosen = np.ones(len(masks), bool) if lab.sum() == 0 else hits[:, lab == 1].any(1)
    chosen &= ~hits[:, lab == 0].any(1)
    idx = [int(i) for i in np.flatnonzero(chosen)]
    if not idx:
        raise PromptError(f"no_mask_selected: no mask contains the positive points without a negative one ({len(points)} points)")
    if merge:
        return [Selection(idx, max(masks[i].score for i in idx), None)]
    return [Selection([i], masks[i].score, None) for i in idx]


def select_text(masks: list[IntervalMask], text: str, similarity: Callable[[str], np.ndarray | None]) -> Selection:
    """``similarity(text)``: the text's similarity with each mask (NaN where not scorable), or None."""
    if not masks:
        raise PromptError("no_mask: the image has no masks to select from")
    sims = similarity(text)
    if sims is None or np.isnan(sims).all():
        raise PromptError(f"no_scorable_mask: no mask is large enough to score text {text!r}")
    best = int(np.nanargmax(sims))
    return Selection([best], masks[best].score, float(sims[best]))


def merged_intervals(masks: list[IntervalMask], sel: Selection) -> tuple[np.ndarray, np.ndarray]:
    if len(sel.masks) == 1:
        m = masks[sel.masks[0]]
        return m.starts, m.ends
    return union([(masks[i].starts, masks[i].ends) for i in sel.masks])


def apply_prompts(
    masks: list[IntervalMask],
    prompts: list[dict],
    h: int,
    w: int,
    *,
    merge_points: bool = False,
    similarity: Callable[[str], np.ndarray | None] | None = None,
) -> tuple[list[tuple[int, Selection]], list[str | None], list[int]]:
    """Run every prompt. Returns (the (prompt index, selection) pairs in prompt order, each prompt's
    error or None, each prompt's number of output masks)."""
    out: list[tuple[int, Selection]] = []
    errors: list[str | None] = []
    counts: list[int] = []
    for k, p in enumerate(prompts):
        if p.get("error"):
            errors.append(p["error"])
            counts.append(0)
            continue
        try:
            if p["kind"] == "box":
                sels = [select_box(masks, p["box"], h, w)]
            elif p["kind"] == "points":
                sels = select_points(masks, p["points"], p["labels"], h, w, merge_points)
            else:
                if similarity is None:
                    raise PromptError("no_clip: text prompts need prompts.clip")
                sels = [select_text(masks, p["text"], similarity)]
        except PromptError as e:
            errors.append(str(e))
            counts.append(0)
            continue
        out += [(k, s) for s in sels]
        errors.append(None)
        counts.append(len(sels))
    return out, errors, counts
