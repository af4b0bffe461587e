"""Mask quality: SAM's stability score, and duplicate masks. Pure functions, no Ray.

**Stability score** (SAM's ``segment_anything.utils.amg.calculate_stability_score``): the IoU of
the mask's logits thresholded at ``MASK_THRESHOLD + STABILITY_OFFSET`` and at ``MASK_THRESHOLD -
STABILITY_OFFSET`` (0 + 1 and 0 - 1, SAM's defaults), i.e. ``#(logit > 1) / #(logit > -1)``: near 1
when the mask's edge is sharp (a small change of the threshold hardly moves it), low when much of
it sits on a soft slope of logits. SAM thresholds the logits at the resolution its masks are made
(upsampled to the original image); so do we: the logits are FastSAM's retina logits at the
original image's resolution, ``R_y @ M @ R_x^T`` (see :mod:`.masks`), the very values whose sign
makes the mask.

Which pixels count: **the pixels of the mask's box crop**, ``box_pixel_span`` rows x columns (the
pixels ultralytics' ``crop_mask`` keeps), and no others. ``process_mask_native`` (the pinned
ultralytics) thresholds the logits of the whole image at 0 first and then ``crop_mask`` zeroes the
binary mask outside the box: the logits outside the box are real values the model made, and a
score over the whole image would count every pixel there above -1 (and above +1) although the
crop turns them off whatever their value. We leave them out: outside the box the mask is off by
construction (cropping, not the model's logits), so those pixels say nothing about the mask's
stability; the score is SAM's of the logits that decide the mask's pixels.
Inside the box the counts are exactly ``calculate_stability_score`` of the box crop of the
logits (tests/test_quality.py checks both mask paths against it). A mask whose union is empty has
no pixel on (its mask is a subset of the union) and is dropped before it reaches the output; its
score is 0 here, where SAM's would be NaN.

A mask made of several (points prompts with ``merge_points``) gets the lowest score of those it
merges; a cleaned-up mask (``mask_rules.clean_up_kernel``) keeps the score of the mask the model
made, as the mask rules see that mask too.

**Duplicate masks** (``mask_rules.max_overlap``): box NMS leaves masks that cover the same pixels
under boxes that differ. :func:`duplicate_masks` drops, greedily in score order (NMS on masks),
each mask whose IoU with a mask already kept is above the threshold, computed on the masks'
pixel intervals (:mod:`.intervals`), never on dense masks; pairs whose boxes bound the IoU to at
most the threshold are never intersected (a vectorised bound against all kept masks at once).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .intervals import intersection_area, intervals_bbox

MASK_THRESHOLD = 0.0  # a pixel is on when its logit is above this (ultralytics: gt_(0.0))
STABILITY_OFFSET = 1.0  # SAM's stability_score_offset


def stability_counts(logits, inside=None):
    """``(intersection, union)`` pixel counts of :func:`stability_score` for ``logits`` (``(..., H,
    W)`` torch tensor): pixels above ``+offset`` and above ``-offset``, summed over the last two
    dimensions (int64 tensors on the logits' device; never read back here, so the accelerator path
    does not wait for them). ``inside``: a bool tensor broadcastable to ``logits``, the pixels that
    count (the box crop of masks padded to a common crop size); None: all of them."""
    hi = logits > MASK_THRESHOLD + STABILITY_OFFSET
    lo = logits > MASK_THRESHOLD - STABILITY_OFFSET
    if inside is not None:
        hi &= inside
        lo &= inside
    return hi.sum((-2, -1)), lo.sum((-2, -1))


def stability_counts_host(logits: np.ndarray) -> tuple[int, int]:
    """:func:`stability_counts` of one host array of logits, as ints: numpy's ``count_nonzero`` is
    about ten times faster than torch's reductions of a bool tensor on the CPU (the per-mask path)."""
    return (int(np.count_nonzero(logits > MASK_THRESHOLD + STABILITY_OFFSET)),
            int(np.count_nonzero(logits > MASK_THRESHOLD - STABILITY_OFFSET)))


def stability_score(intersection, union) -> np.ndarray:
    """float32 ``intersection / union`` (``calculate_stability_score``'s int32 / int32 division in
    float32), 0 where the union is empty."""
    inter = np.asarray(intersection, np.float32)
    uni = np.asarray(union, np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = inter / uni
    return np.where(uni > 0, out, np.float32(0)).astype(np.float32)


def mask_iou(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], area_a: int, area_b: int) -> float:
    """IoU of two masks given as intervals (0 when both are empty)."""
    inter = intersection_area(a, b)
    union = area_a + area_b - inter
    return inter / union if union else 0.0


def duplicate_masks(masks: Sequence[tuple[np.ndarray, np.ndarray]], scores: Sequence[float], max_overlap: float,
                    height: int | None = None) -> set[int]:
    """Indices of the masks dropped as duplicates: masks are taken in score order, highest first
    (ties: the earlier one first), and one is dropped when its IoU with a mask taken before it and
    kept is above ``max_overlap``. ``masks``: each a ``(starts, ends)`` pair of column-major
    intervals (:mod:`.intervals`); ``height``: the image's, which gives each mask's tight box.

    Each mask is checked against every kept mask at once (numpy): an upper bound of their
    intersection, the least of the two areas, the overlap of their flat pixel ranges and (with
    ``height``) of their boxes, bounds their IoU by ``ub / (a_i + a_j - ub)``; only the kept masks
    whose bound is above ``max_overlap`` are intersected. The bound is the IoU's own expression at a
    larger intersection, so the pruning never changes the result (tests: against dense masks)."""
    n = len(masks)
    areas = np.array([int((e - s).sum()) for s, e in masks], np.int64)
    first = np.array([int(s[0]) if s.size else 0 for s, _ in masks], np.int64)
    last = np.array([int(e[-1]) if s.size else 0 for s, e in masks], np.int64)
    boxes = (np.array([intervals_bbox(s, e, height) for s, e in masks], np.int64).reshape(n, 4)
             if height is not None else None)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    kept = np.empty(n, np.int64)
    k = 0
    dropped: set[int] = set()
    for i in order:
        ai = int(areas[i])
        duplicate = False
        if ai and k:
            js = kept[:k]
            ub = np.minimum(np.minimum(last[js], last[i]) - np.maximum(first[js], first[i]), np.minimum(areas[js], ai))
            if boxes is not None:
                bj, bi = boxes[js], boxes[i]
                bw = np.minimum(bj[:, 2], bi[2]) - np.maximum(bj[:, 0], bi[0])
                bh = np.minimum(bj[:, 3], bi[3]) - np.maximum(bj[:, 1], bi[1])
                ub = np.minimum(ub, np.clip(bw, 0, None) * np.clip(bh, 0, None))
            ub = np.clip(ub, 0, None)
            cand = js[ub / (ai + areas[js] - ub) > max_overlap]  # the denominator >= a_i > 0
            for j in cand.tolist():
                if mask_iou(masks[i], masks[j], ai, int(areas[j])) > max_overlap:
                    duplicate = True
                    break
        if duplicate:
            dropped.add(i)
        else:
            kept[k] = i
            k += 1
    return dropped
