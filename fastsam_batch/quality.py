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
pixel intervals (:mod:`.intervals`), never on dense masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .intervals import intersection_area

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


def duplicate_masks(masks: Sequence[tuple[np.ndarray, np.ndarray]], scores: Sequence[float], max_overlap: float) -> set[int]:
    """Indices of the masks dropped as duplicates: masks are taken in score order, highest first
    (ties: the earlier one first), and one is dropped when its IoU with a mask taken before it and
    kept is above ``max_overlap``. ``masks``: each a ``(starts, ends)`` pair of column-major
    intervals (:mod:`.intervals`). Pairs whose flat pixel ranges do not meet, or whose areas alone
    bound the IoU to at most ``max_overlap`` (IoU <= smaller / larger area), are not intersected."""
    areas = [int((e - s).sum()) for s, e in masks]
    spans = [(int(s[0]), int(e[-1])) if s.size else (0, 0) for s, e in masks]
    order = sorted(range(len(masks)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    dropped: set[int] = set()
    for i in order:
        ai = areas[i]
        duplicate = False
        if ai:
            for j in kept:
                aj = areas[j]
                if spans[i][1] <= spans[j][0] or spans[j][1] <= spans[i][0]:
                    continue
                if min(ai, aj) / max(ai, aj) <= max_overlap:  # the IoU of one inside the other
                    continue
                if mask_iou(masks[i], masks[j], ai, aj) > max_overlap:
                    duplicate = True
                    break
        if duplicate:
            dropped.add(i)
        else:
            kept.append(i)
    return dropped
