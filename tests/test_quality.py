"""Mask quality (quality.py): SAM's stability score against segment_anything's own
``calculate_stability_score`` on the same logits, on both mask paths and through the segmenter;
duplicate masks on intervals against a dense-mask reference (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from segment_anything.utils.amg import calculate_stability_score
from ultralytics.utils.ops import scale_masks

from fastsam_batch.intervals import IntervalMask
from fastsam_batch.mask_rules import MaskRules, apply_mask_rules
from fastsam_batch.masks import adjust_full_image_boxes, box_pixel_span, collect_box_masks, iter_box_mask_intervals, launch_box_masks
from fastsam_batch.quality import duplicate_masks, stability_counts, stability_score
from fastsam_batch.rle import crop_intervals
from sync_counter import SyncCounter
from test_masks import dense, random_boxes


EPS = 1e-5  # logits this close to +-1 may round to either side (separable products vs interpolate)


def reference_scores(coeffs, protos, boxes, h, w) -> tuple[np.ndarray, np.ndarray]:
    """segment_anything's score of each mask, on ultralytics' own retina logits (process_mask_native's
    chain before its threshold and crop, line for line: prototype product, the upsampling by f that
    crops the padding on whole pixels, scale_masks to the image), cropped to the box's pixels
    (crop_mask's rule); NaN for a box without pixels. And per mask the lowest and highest score it
    could have were its logits within EPS of +1 and of -1 rounded the other way (float rounding, not
    the method, can move such a pixel across: separable products against interpolate); NaN when it
    has none."""
    c, mh, mw = protos.shape
    if coeffs.shape[0] == 0:
        return np.empty(0, np.float32), np.empty((0, 2))
    gain = min(4 * mh / h, 4 * mw / w)
    pad = (4 * mh - max(round(h * gain), 1)) | (4 * mw - max(round(w * gain), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    x = (coeffs.float() @ protos.float().view(c, -1)).view(1, -1, mh, mw)
    logits = scale_masks(F.interpolate(x, scale_factor=f, mode="bilinear") if f > 1 else x, (h, w))[0]
    out, near = [], []
    for m, (x1, y1, x2, y2) in zip(logits, boxes.tolist()):
        r0, r1 = box_pixel_span(y1, y2, h)
        c0, c1 = box_pixel_span(x1, x2, w)
        crop = m[r0:r1, c0:c1]
        out.append(float(calculate_stability_score(crop[None], 0.0, 1.0)[0]) if crop.numel() else float("nan"))
        inter, union = int((crop > 1).sum()), int((crop > -1).sum())
        a_hi, a_lo = int(((crop - 1).abs() < EPS).sum()), int(((crop + 1).abs() < EPS).sum())
        near.append(((inter - a_hi) / max(union + a_lo, 1), (inter + a_hi) / max(union - a_lo, 1))
                    if a_hi or a_lo else (np.nan, np.nan))
    return np.array(out, np.float32), np.array(near, np.float64).reshape(-1, 2)


def assert_equal_to_reference(ours: np.ndarray, ref: np.ndarray, near: np.ndarray) -> None:
    """Bit for bit on every mask without a logit within rounding distance of the thresholds; on the
    others, within what rounding those few pixels the other way allows; 0 for a box without pixels."""
    has = ~np.isnan(ref)
    exact = has & np.isnan(near[:, 0])
    assert np.array_equal(ours[exact], ref[exact])
    lo, hi = near[has & ~exact].T
    assert ((ours[has & ~exact] >= lo - 1e-7) & (ours[has & ~exact] <= hi + 1e-7)).all()
    assert (hi - lo < 1e-3).all()  # a handful of pixels in thousands or millions: a tight bound
    assert (ours[~has] == 0).all()  # no pixel in the box: 0 (the mask is empty and dropped)


def test_stability_of_logits_equals_segment_anything():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 37, 53, generator=gen) * 3
    logits[3] = -5  # nothing above -1: SAM says NaN, we say 0 (such a mask is empty, never output)
    inter, union = stability_counts(logits)
    ours = stability_score(inter.numpy(), union.numpy())
    ref = calculate_stability_score(logits, 0.0, 1.0).numpy()
    assert ours.dtype == np.float32
    assert np.isnan(ref[3]) and ours[3] == 0
    keep = np.arange(40) != 3
    assert np.array_equal(ours[keep], ref[keep])  # bit for bit: the same float32 division
    # `inside` (crops padded to a common size): the padding never counts
    inside = torch.zeros(40, 37, 53, dtype=torch.bool)
    inside[:, :20, :31] = True
    pi, pu = stability_counts(torch.where(inside, logits, torch.full_like(logits, 7.0)), inside)
    ref = calculate_stability_score(logits[:, :20, :31], 0.0, 1.0).numpy()
    assert np.array_equal(stability_score(pi.numpy(), pu.numpy())[keep], ref[keep])


CASES = [(80, 80, 300, 400), (256, 256, 1500, 2250), (80, 80, 333, 251), (64, 80, 100, 1000), (80, 80, 17, 5)]


def job(mh, mw, h, w, n, gen):
    protos = torch.randn(32, mh, mw, generator=gen)
    coeffs = torch.randn(n, 32, generator=gen) * 0.3
    return coeffs, protos, random_boxes(n, h, w, gen), h, w


@pytest.mark.parametrize("mh,mw,h,w", CASES)
def test_per_mask_path_stability_equals_segment_anything(mh, mw, h, w):
    gen = torch.Generator().manual_seed(mh + 3 * h)
    coeffs, protos, boxes, h, w = job(mh, mw, h, w, 25, gen)
    found = list(iter_box_mask_intervals(coeffs, protos, boxes, h, w, chunk_pixels=997, stability=True))
    ours = np.array([q for *_, q in found], np.float32)
    ref, near = reference_scores(coeffs, protos, boxes, h, w)
    has = ~np.isnan(ref)
    assert has.sum() >= 15 and ((ref[has] > 0) & (ref[has] < 1)).sum() >= 10  # scores of every kind
    assert_equal_to_reference(ours, ref, near)
    # the same masks as without the score
    plain = list(iter_box_mask_intervals(coeffs, protos, boxes, h, w, chunk_pixels=997))
    assert all(np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2]) for a, b in zip(found, plain))


@pytest.mark.parametrize("budget,cut", [(1 << 26, False), (1 << 18, True)])
def test_batched_path_stability_equals_segment_anything(budget, cut):
    """Whatever the budget: one chunk, many, or (``cut``) masks too large for it alone cut into
    column ranges whose counts are summed per mask."""
    gen = torch.Generator().manual_seed(11)
    jobs = [job(*case, n, gen) for case, n in zip(CASES, [25, 40, 0, 25, 9])]
    launched = launch_box_masks([(c, p, b.numpy(), h, w) for c, p, b, h, w in jobs], budget, stability=True)
    assert len(launched.plans) > 1 or budget == 1 << 26
    keys = launched.chunk_keys
    assert (len(np.unique(keys)) < len(keys)) == cut  # a mask of several pieces, or none
    masks = collect_box_masks(launched)
    assert len(launched.scores) == len(jobs)
    for (coeffs, protos, boxes, h, w), scores, found in zip(jobs, launched.scores, masks):
        assert scores.dtype == np.float32 and len(scores) == coeffs.shape[0] == len(found)
        assert_equal_to_reference(scores, *reference_scores(coeffs, protos, boxes, h, w))


def test_stability_costs_the_batched_path_no_wait_and_no_upload():
    from test_syncs import smooth_job

    gen = torch.Generator().manual_seed(1)
    jobs = [smooth_job(300, 300, 400, gen) for _ in range(4)]
    counted = {}
    for on in (False, True):
        with SyncCounter() as c:
            launched = launch_box_masks(jobs, 1 << 16, stability=on)
            collect_box_masks(launched)
        counted[on] = (c.syncs, c.uploads)
    assert counted[True] == counted[False] == (1, 1)
    assert (launched.scores[0] > 0).any()


@pytest.fixture(scope="module", params=["per_mask", "batched"])
def segmenter(checkpoint, request):
    from fastsam_batch.segment import FastSAMSegmenter, SegmentSettings
    from fastsam_batch.storage import Storage

    return FastSAMSegmenter(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cpu",
                                            mask_path=request.param), Storage())


def test_the_segmenters_masks_carry_segment_anythings_score_of_the_models_logits(segmenter):
    """The real model's masks (both paths): each mask's stability_score is calculate_stability_score of
    ultralytics' retina logits of that detection, in its box; and it reaches the output records."""
    from ultralytics.utils import ops

    from shapes import make_image

    images = [np.asarray(make_image(4100 + i, size=size)[0]) for i, size in enumerate([(256, 224), (200, 360)])]
    sizes = [im.shape[:2] for im in images]
    forwards = segmenter.forward(images)
    with torch.inference_mode():
        candidates = segmenter.candidates(sizes, forwards)
    checked = 0
    for (h, w), (in_shape, pred, proto), masks in zip(sizes, forwards, candidates):
        boxes = ops.scale_boxes(in_shape, pred[:, :4].clone(), (h, w))
        ref, near = reference_scores(pred[:, 6:], proto, boxes, h, w)
        area = dense([(m.starts, m.ends) for m in masks], h, w).sum((1, 2))
        # candidates keep the non-empty masks in detection order: walk both, a detection matching the
        # next mask by its adjusted box and score (NMS leaves no two detections with one box)
        adjusted, scores = adjust_full_image_boxes(boxes, h, w).tolist(), pred[:, 4].tolist()
        index = []
        for i in range(len(scores)):
            if len(index) < len(masks) and (tuple(adjusted[i]), scores[i]) == (masks[len(index)].box, masks[len(index)].score):
                index.append(i)
        assert len(index) == len(masks)
        for i, m, a in zip(index, masks, area.tolist()):
            lo, hi = near[i]
            assert np.float32(m.stability) == ref[i] if np.isnan(lo) else lo - 1e-7 <= m.stability <= hi + 1e-7
            assert a == m.area
            checked += 1
    assert checked >= 5
    results = segmenter.segment(images)
    got = [r["stability_score"] for recs, _, _ in results for r in recs]
    assert got == [m.stability for ms in candidates for m in ms] and all(0 < q <= 1 for q in got)


def test_min_stability_drops_the_unstable():
    cols = np.arange(10, 20, dtype=np.int64) * 40
    masks = [IntervalMask(cols + 5, cols + 15, 0.9, (10, 5, 20, 15), stability=q) for q in (0.99, 0.5, 0.95, 0.949)]
    assert apply_mask_rules(masks, 40, 60, MaskRules(min_stability=0.95)) == [0, 2]


def test_min_stability_keeps_scores_exactly_on_the_threshold():
    """Known answers: 190 of 200 and 19 of 20 pixels stable score float32(0.95) = 0.94999999, which is
    *at* 0.95 in float32 (SAM compares its float32 scores so): kept; 189 / 200 is below: dropped."""
    cols = np.arange(10, 20, dtype=np.int64) * 40
    scores = [stability_score(190, 200)[()], stability_score(19, 20)[()], stability_score(189, 200)[()]]
    assert float(scores[0]) < 0.95  # the trap: as a Python float it is below the threshold
    masks = [IntervalMask(cols + 5, cols + 15, 0.9, (10, 5, 20, 15), stability=q) for q in scores]
    assert apply_mask_rules(masks, 40, 60, MaskRules(min_stability=0.95)) == [0, 1]
    # the score stored as a Python float (as records carry it) is judged the same
    masks = [IntervalMask(cols + 5, cols + 15, 0.9, (10, 5, 20, 15), stability=float(q)) for q in scores]
    assert apply_mask_rules(masks, 40, 60, MaskRules(min_stability=0.95)) == [0, 1]


def test_a_mask_without_a_stability_score_is_never_dropped_silently():
    """IntervalMask's stability defaults to NaN (not computed); min_stability then raises, and the
    other rules do not look at it."""
    cols = np.arange(10, 20, dtype=np.int64) * 40
    masks = [IntervalMask(cols + 5, cols + 15, 0.9, (10, 5, 20, 15))]
    assert math.isnan(masks[0].stability)
    with pytest.raises(ValueError, match="no stability score"):
        apply_mask_rules(masks, 40, 60, MaskRules(min_stability=0.5))
    assert apply_mask_rules(masks, 40, 60, MaskRules(min_score=0.5)) == [0]


def test_both_mask_paths_make_stability_scores_only_when_asked():
    """iter_box_mask_intervals and launch_box_masks agree on the default (off): 3-tuples and NaN scores."""
    gen = torch.Generator().manual_seed(5)
    coeffs, protos, boxes, h, w = job(*CASES[0], 6, gen)
    assert all(len(x) == 3 for x in iter_box_mask_intervals(coeffs, protos, boxes, h, w))
    launched = launch_box_masks([(coeffs, protos, boxes.numpy(), h, w)])
    collect_box_masks(launched)
    assert launched.scores[0].dtype == np.float32 and np.isnan(launched.scores[0]).all()


# Duplicate masks -------------------------------------------------------------------------------

def dense_duplicates(masks: np.ndarray, scores: list[float], t: float) -> set[int]:
    """The reference: greedy mask NMS on dense masks."""
    order = sorted(range(len(masks)), key=lambda i: (-scores[i], i))
    kept, dropped = [], set()
    for i in order:
        dup = False
        for j in kept:
            inter = int((masks[i] & masks[j]).sum())
            union = int(masks[i].sum()) + int(masks[j].sum()) - inter
            if union and inter / union > t:
                dup = True
                break
        (dropped.add(i) if dup else kept.append(i))
    return dropped


@st.composite
def mask_sets(draw):
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    n = draw(st.integers(0, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    base = rng.random((h, w)) < rng.uniform(0.1, 0.9)
    masks = []
    for _ in range(n):  # near-copies of a few shapes (duplicates), blobs and random pixels
        kind = rng.integers(3)
        if kind == 0:
            m = base ^ (rng.random((h, w)) < rng.uniform(0, 0.2))
        elif kind == 1:
            y0, x0 = rng.integers(h), rng.integers(w)
            m = np.zeros((h, w), bool)
            m[y0:y0 + rng.integers(1, h + 1), x0:x0 + rng.integers(1, w + 1)] = True
        else:
            m = rng.random((h, w)) < rng.uniform(0, 1)
        masks.append(m)
    scores = [float(draw(st.sampled_from([0.3, 0.5, 0.5, 0.7, 0.9]))) for _ in range(n)]
    t = draw(st.sampled_from([0.0, 0.25, 0.5, 0.6, 0.8, 0.9, 0.95]))
    return np.array(masks, bool).reshape(n, h, w), scores, t


@settings(max_examples=300, deadline=None)
@given(mask_sets())
def test_duplicates_on_intervals_equal_the_dense_reference(case):
    masks, scores, t = case
    n, h, _ = masks.shape
    intervals = [crop_intervals(torch.from_numpy(m), 0, 0, h) for m in masks]
    want = dense_duplicates(masks, scores, t)
    assert duplicate_masks(intervals, scores, t) == want  # bounds from flat ranges and areas only
    assert duplicate_masks(intervals, scores, t, height=h) == want  # and from the boxes


def test_masks_whose_boxes_do_not_meet_are_never_intersected(monkeypatch):
    """200 equal squares stacked in the same columns: their flat pixel ranges overlap and their areas
    are equal (neither bounds the IoU), but their boxes are apart: with the image's height no pair is
    intersected; and where the boxes do meet (a copy of each) exactly the true duplicates drop."""
    import fastsam_batch.quality as quality

    h, side, gap = 200 * 12, 10, 2
    cols = np.arange(side, dtype=np.int64) * h
    masks = [(cols + k * (side + gap), cols + k * (side + gap) + side) for k in range(200)]
    calls = []
    real = quality.mask_iou
    monkeypatch.setattr(quality, "mask_iou", lambda *a: calls.append(1) or real(*a))
    assert duplicate_masks(masks, [1.0] * 200, 0.5, height=h) == set() and calls == []
    twice = masks + masks  # each square's copy (later, same score) is its duplicate, nothing else
    assert duplicate_masks(twice, [1.0] * 400, 0.5, height=h) == set(range(200, 400))
    assert len(calls) == 200


def test_max_overlap_in_the_rules_counts_what_it_drops():
    h, w = 40, 60
    a = np.zeros((h, w), bool)
    a[5:25, 10:30] = True
    b = a.copy()
    b[24, 10:30] = False  # IoU 0.95 with a
    c = np.zeros((h, w), bool)
    c[5:25, 32:50] = True  # apart
    masks = [IntervalMask(*crop_intervals(torch.from_numpy(m), 0, 0, h), s, (0, 0, w, h)) for m, s in
             [(b, 0.8), (a, 0.9), (c, 0.7)]]
    counts: dict = {}
    assert apply_mask_rules(masks, h, w, MaskRules(max_overlap=0.9), counts) == [1, 2] and counts == {"duplicates": 1}
    assert apply_mask_rules(masks, h, w, MaskRules(max_overlap=0.96), counts) == [0, 1, 2] and counts == {"duplicates": 0}
    assert apply_mask_rules(masks, h, w, MaskRules(), counts) == [0, 1, 2] and counts == {"duplicates": None}
