"""Mask rules: which of an image's masks to keep, and an opt-in clean-up. Pure functions, no Ray.

Applied to every image's masks after segmentation and before prompts select among them and
before encoding, in this order (each rule sees what the previous ones left):

1. ``min_score``: drop masks whose detection score is below it; ``min_stability``: drop masks whose
   stability score (SAM's, see :mod:`.quality`) is below it (SAM's generator uses 0.95), compared in
   float32 as SAM does (a score of 190 / 200 passes 0.95); a mask without a score (NaN) raises.
2. ``min_area`` / ``max_area`` (pixels) and ``min_area_fraction`` / ``max_area_fraction`` (of the
   image's pixels): drop masks with area < min or > max; bounds are inclusive.
3. ``drop_full_image``: drop the masks whose box FastSAM itself treats as the whole image (its box,
   snapped to the border within 20 px, has IoU > 0.9 with the image: the background mask).
4. ``max_overlap``: duplicate masks: in score order (highest first; ties: the earlier), drop each
   mask whose IoU with a mask kept before it is above max_overlap (NMS on the masks' pixels,
   computed on intervals: :func:`.quality.duplicate_masks`). The count dropped is recorded per
   image (``num_duplicates``).
5. ``containment``: FastSAM's overlap filter (``filter_masks`` in the original repository): masks
   sorted by area, largest first (stable); for each mask A, every later, strictly smaller mask B not
   yet dropped is dropped when |A and B| / |B| > containment (FastSAM uses 0.8).
6. ``top_k`` by ``top_k_by`` (``score`` or ``area``): keep the k largest, ties broken by the
   original order.

Kept masks stay in their original (score) order. ``clean_up`` (a morphological opening then
closing with an elliptic kernel of ``clean_up_kernel`` pixels) applies to each output mask after
selection; the ``area`` and ``bbox`` in the output are those of the cleaned mask, while the
rules above see the masks as the model made them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .intervals import IntervalMask, intersection_area, intervals_bbox, to_crop
from .quality import duplicate_masks


@dataclass(frozen=True)
class MaskRules:
    min_score: float | None = None
    min_stability: float | None = None
    min_area: int | None = None
    max_area: int | None = None
    min_area_fraction: float | None = None
    max_area_fraction: float | None = None
    drop_full_image: bool = False
    max_overlap: float | None = None
    containment: float | None = None
    top_k: int | None = None
    top_k_by: str = "score"
    clean_up_kernel: int | None = None

    @property
    def filters(self) -> bool:
        return any(v is not None for v in (self.min_score, self.min_stability, self.min_area, self.max_area,
                                            self.min_area_fraction, self.max_area_fraction, self.max_overlap,
                                            self.containment, self.top_k)) or self.drop_full_image


def full_image_boxes(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """Which boxes FastSAM treats as the whole image: those its border rule
    (:func:`.masks.adjust_full_image_boxes`) turns into exactly the full-image box."""
    import torch

    from .masks import adjust_full_image_boxes

    if len(boxes) == 0:
        return np.zeros(0, bool)
    adjusted = adjust_full_image_boxes(torch.as_tensor(np.asarray(boxes, np.float32)), h, w).numpy()
    return np.all(adjusted == np.array([0, 0, w, h], np.float32), axis=1)


def contained_masks(masks: list[IntervalMask], threshold: float) -> set[int]:
    """Indices dropped by FastSAM's containment filter (see the module doc)."""
    order = sorted(range(len(masks)), key=lambda i: -masks[i].area)
    drop: set[int] = set()
    for a_pos, i in enumerate(order):
        a = masks[i]
        for j in order[a_pos + 1:]:
            b = masks[j]
            if j in drop or b.area >= a.area or b.area == 0:
                continue
            if not _boxes_touch(a, b):
                continue
            if intersection_area(a, b) / b.area > threshold:
                drop.add(j)
    return drop


def _boxes_touch(a: IntervalMask, b: IntervalMask) -> bool:
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    return ax1 <= bx2 and bx1 <= ax2 and ay1 <= by2 and by1 <= ay2


def _stable_enough(stability, threshold: float) -> bool:
    """``stability >= threshold`` compared in float32, as SAM (torch) compares its float32 scores and
    as :mod:`.stats` counts them: float32(190 / 200) = 0.94999999 is *at* a threshold of 0.95 (both
    round to the same float32), not below it. A mask without a score (NaN) is an error, never
    dropped silently."""
    q = np.float32(stability)
    if np.isnan(q):
        raise ValueError("min_stability: a mask has no stability score (NaN): stability scores were not computed")
    return bool(q >= np.float32(threshold))


def apply_mask_rules(masks: list[IntervalMask], h: int, w: int, rules: MaskRules, dropped: dict | None = None) -> list[int]:
    """Indices of the masks the rules keep, in their original order. ``dropped``: when given, gets
    ``duplicates``, how many ``max_overlap`` dropped (None when the rule is off)."""
    keep = list(range(len(masks)))
    if dropped is not None:
        dropped["duplicates"] = None
    if not rules.filters:
        return keep
    total = h * w
    if rules.min_score is not None:
        keep = [i for i in keep if masks[i].score >= rules.min_score]
    if rules.min_stability is not None:
        keep = [i for i in keep if _stable_enough(masks[i].stability, rules.min_stability)]
    lo = max(rules.min_area or 0, (rules.min_area_fraction or 0.0) * total)
    hi = min(rules.max_area if rules.max_area is not None else total,
             (rules.max_area_fraction if rules.max_area_fraction is not None else 1.0) * total)
    keep = [i for i in keep if lo <= masks[i].area <= hi]
    if rules.drop_full_image and keep:
        full = full_image_boxes(np.array([masks[i].box for i in keep], np.float32), h, w)
        keep = [i for i, f in zip(keep, full) if not f]
    if rules.max_overlap is not None:
        dup = duplicate_masks([(masks[i].starts, masks[i].ends) for i in keep], [masks[i].score for i in keep],
                              rules.max_overlap, height=h)
        keep = [i for k, i in enumerate(keep) if k not in dup]
        if dropped is not None:
            dropped["duplicates"] = len(dup)
    if rules.containment is not None and keep:
        sub = [masks[i] for i in keep]
        contained = contained_masks(sub, rules.containment)
        keep = [i for k, i in enumerate(keep) if k not in contained]
    if rules.top_k is not None and len(keep) > rules.top_k:
        key = (lambda i: masks[i].score) if rules.top_k_by == "score" else (lambda i: masks[i].area)
        best = sorted(keep, key=lambda i: (-key(i), i))[: rules.top_k]
        keep = sorted(best)
    return keep


def clean_up(starts: np.ndarray, ends: np.ndarray, h: int, w: int, kernel: int) -> tuple[np.ndarray, np.ndarray]:
    """Morphological opening then closing (elliptic ``kernel`` x ``kernel``) of one mask, computed on
    its box grown by the kernel only; returns the new intervals."""
    import cv2
    import torch

    from .rle import crop_intervals

    if starts.size == 0:
        return starts, ends
    x1, y1, x2, y2 = intervals_bbox(starts, ends, h)
    pad = kernel
    x1, y1, x2, y2 = max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, w), min(y2 + pad, h)
    crop = to_crop(starts, ends, x1, y1, x2, y2, h).astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))
    crop = cv2.morphologyEx(crop, cv2.MORPH_OPEN, k)
    crop = cv2.morphologyEx(crop, cv2.MORPH_CLOSE, k)
    return crop_intervals(torch.from_numpy(crop.astype(bool)), x1, y1, h)
