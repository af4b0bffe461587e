"""Mask rules and interval helpers against hand-made masks with known answers (no Ray, no model)."""

from __future__ import annotations

import numpy as np
import torch

from fastsam_batch.intervals import (
    IntervalMask,
    contains_points,
    intersection_area,
    intervals_bbox,
    to_crop,
    union,
)
from fastsam_batch.mask_rules import MaskRules, apply_mask_rules, clean_up, contained_masks, full_image_boxes
from fastsam_batch.rle import crop_intervals

H, W = 40, 60


def mask_of(dense: np.ndarray, score: float = 0.5, box=None) -> IntervalMask:
    s, e = crop_intervals(torch.from_numpy(dense), 0, 0, dense.shape[0])
    if box is None:
        ys, xs = np.nonzero(dense)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)) if len(xs) else (0, 0, 0, 0)
    return IntervalMask(s, e, score, box)


def rect(x1, y1, x2, y2, h=H, w=W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    return m


def dense(m: IntervalMask, h=H, w=W) -> np.ndarray:
    return to_crop(m.starts, m.ends, 0, 0, w, h, h)


def test_interval_helpers_match_dense_arithmetic():
    rng = np.random.default_rng(0)
    for _ in range(30):
        a = rng.random((H, W)) < 0.3
        b = rng.random((H, W)) < 0.5
        a[:, 10] = True  # full columns: intervals touching across column boundaries
        ma, mb = mask_of(a), mask_of(b)
        assert ma.area == a.sum()
        assert np.array_equal(dense(ma), a)
        assert intersection_area(ma, mb) == (a & b).sum()
        s, e = union([(ma.starts, ma.ends), (mb.starts, mb.ends)])
        assert np.array_equal(to_crop(s, e, 0, 0, W, H, H), a | b)
        assert np.all(s[1:] > e[:-1])  # merged: no two intervals touch or overlap
        xs, ys = rng.integers(0, W, 50), rng.integers(0, H, 50)
        assert np.array_equal(contains_points(ma.starts, ma.ends, xs, ys, H), a[ys, xs])
        assert np.array_equal(to_crop(ma.starts, ma.ends, 7, 3, 31, 29, H), a[3:29, 7:31])
    m = mask_of(rect(5, 7, 20, 12))
    assert intervals_bbox(m.starts, m.ends, H) == (5, 7, 20, 12)


def test_area_and_score_rules_with_inclusive_bounds():
    masks = [mask_of(rect(0, 0, 10, 10), 0.9), mask_of(rect(20, 0, 25, 4), 0.3), mask_of(rect(30, 0, 60, 40), 0.6)]
    areas = [m.area for m in masks]
    assert areas == [100, 20, 1200]
    assert apply_mask_rules(masks, H, W, MaskRules()) == [0, 1, 2]
    assert apply_mask_rules(masks, H, W, MaskRules(min_score=0.6)) == [0, 2]  # inclusive
    assert apply_mask_rules(masks, H, W, MaskRules(min_area=100)) == [0, 2]
    assert apply_mask_rules(masks, H, W, MaskRules(max_area=100)) == [0, 1]
    assert apply_mask_rules(masks, H, W, MaskRules(min_area_fraction=100 / (H * W))) == [0, 2]
    assert apply_mask_rules(masks, H, W, MaskRules(max_area_fraction=0.5)) == [0, 1, 2]  # 1200/2400 = 0.5, inclusive
    assert apply_mask_rules(masks, H, W, MaskRules(max_area_fraction=0.49)) == [0, 1]
    assert apply_mask_rules(masks, H, W, MaskRules(min_area=50, max_area_fraction=0.4)) == [0]


def test_top_k_by_score_or_area_keeps_original_order():
    masks = [mask_of(rect(0, 0, 10, 10), 0.2), mask_of(rect(20, 0, 25, 4), 0.9), mask_of(rect(30, 0, 60, 40), 0.5),
             mask_of(rect(0, 20, 3, 23), 0.9)]
    assert apply_mask_rules(masks, H, W, MaskRules(top_k=2)) == [1, 3]  # the two 0.9s
    assert apply_mask_rules(masks, H, W, MaskRules(top_k=2, top_k_by="area")) == [0, 2]
    assert apply_mask_rules(masks, H, W, MaskRules(top_k=1)) == [1]  # tie: the earlier one
    assert apply_mask_rules(masks, H, W, MaskRules(top_k=10)) == [0, 1, 2, 3]


def test_containment_is_fastsams_filter():
    big = mask_of(rect(0, 0, 30, 30))  # 900
    inside = mask_of(rect(5, 5, 15, 15))  # 100, fully inside big
    mostly = mask_of(rect(25, 0, 34, 10))  # 90, 50 inside big: 0.56
    apart = mask_of(rect(40, 0, 50, 10))  # 100, disjoint
    masks = [inside, big, mostly, apart]
    assert contained_masks(masks, 0.8) == {0}
    assert contained_masks(masks, 0.5) == {0, 2}
    assert apply_mask_rules(masks, H, W, MaskRules(containment=0.8)) == [1, 2, 3]
    # Equal areas never drop each other (FastSAM compares only strictly smaller masks).
    twins = [mask_of(rect(0, 0, 10, 10)), mask_of(rect(0, 0, 10, 10))]
    assert contained_masks(twins, 0.8) == set()
    # A mask dropped by a larger one still drops smaller ones, as in FastSAM's loop.
    chain = [mask_of(rect(0, 0, 20, 20)), mask_of(rect(0, 0, 19, 20)), mask_of(rect(0, 0, 18, 19))]
    assert contained_masks(chain, 0.8) == {1, 2}


def test_drop_full_image_uses_fastsams_border_rule():
    boxes = np.array([[0, 0, W, H], [15, 10, W - 15, H - 10], [19, 19, W - 19, H - 19], [5, 5, 20, 20]], float)
    # Within 20 px of every border, the second snaps to the full box; the third too (19 < 20).
    assert full_image_boxes(boxes, H, W).tolist() == [True, True, True, False]
    masks = [mask_of(rect(0, 0, W, H)), mask_of(rect(5, 5, 20, 20))]
    assert apply_mask_rules(masks, H, W, MaskRules(drop_full_image=True)) == [1]
    big_but_not_full = [mask_of(rect(0, 0, 30, H))]  # covers half the image: its box is no full box
    assert apply_mask_rules(big_but_not_full, H, W, MaskRules(drop_full_image=True)) == [0]


def test_clean_up_removes_specks_and_fills_pinholes():
    def cleaned(m, k=3):
        return to_crop(*clean_up(*crop_intervals(torch.from_numpy(m), 0, 0, H), H, W, k), 0, 0, W, H, H)

    clean = rect(10, 10, 40, 30)
    # A 3x3 elliptic kernel is a cross: opening a rectangle with it cuts exactly its four corner pixels.
    corners = {(10, 10), (10, 39), (29, 10), (29, 39)}
    assert {tuple(p) for p in np.argwhere(cleaned(clean) != clean)} == corners
    noisy = clean.copy()
    noisy[20, 25] = False  # a pinhole
    noisy[2, 2] = True  # a speck far away
    noisy[35, 50:52] = True  # a two-pixel speck
    assert np.array_equal(cleaned(noisy), cleaned(clean))
