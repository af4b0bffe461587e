"""Prompt selection agrees with ultralytics' ``FastSAMPredictor.prompt`` on the same masks.

Both sides start from the same everything-mode masks (ours are identical to the reference's,
see test_segment.py); then each box and each point prompt must select exactly the masks the
reference selects, on generated images and on the real photographs in ``../shared/real-images``.
Box prompts from the generator's ground-truth boxes must give masks close to the true masks.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import REAL_IMAGES as REAL_PHOTOS
from conftest import shared
from fastsam_batch.decode import decode_image
from fastsam_batch.rle import runs_from_intervals, runs_to_rle
from fastsam_batch.segment import FastSAMSegmenter, SegmentSettings
from fastsam_batch.select import PromptError, Selection, merged_intervals, select_box, select_points
from fastsam_batch.storage import Storage
from shapes import make_image

REAL_IMAGES = ["dogs.jpg", "cat.jpg", "sa_414.jpg"]


def _ref_counts(result) -> list[str]:
    if result.masks is None:
        return []
    return [mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode() for m in result.masks.data.cpu().numpy()]


def _our_counts(masks, sel, h, w) -> str:
    s, e = merged_intervals(masks, sel)
    return runs_to_rle(runs_from_intervals(s, e, h * w), h, w)["counts"].decode()


class Case:
    """One image: our masks and the reference's, which correspond one to one, in the same order
    (identical, but for a rare pixel where float rounding differs: checked below)."""

    def __init__(self, segmenter, ref_model, path: Path, imgsz: int, conf: float):
        self.image = decode_image(path.read_bytes())
        self.masks = segmenter.segment_on_device([self.image])[1][0]  # every mask, as intervals
        self.ref = ref_model.predict(str(path), imgsz=imgsz, conf=conf, iou=0.9, retina_masks=True, device="cpu", verbose=False)[0]
        self.predictor = ref_model.predictor
        self.h, self.w = self.image.shape[:2]
        self.ref_all = _ref_counts(self.ref)
        assert len(self.masks) == len(self.ref_all), "the everything-mode masks must be the reference's to start with"
        ours = [{"size": [self.h, self.w], "counts": _our_counts(self.masks, Selection([i], 0, None), self.h, self.w).encode()}
                for i in range(len(self.masks))]
        refs = [{"size": [self.h, self.w], "counts": c.encode()} for c in self.ref_all]
        ious = [float(mask_utils.iou([a], [b], [0])[0, 0]) for a, b in zip(ours, refs)]
        assert min(ious, default=1.0) >= 0.999, min(ious)
        self.ref_index = {c: i for i, c in enumerate(self.ref_all)}

    def _indices(self, result) -> list[int]:
        return sorted(self.ref_index[c] for c in _ref_counts(result))

    def ref_box(self, box) -> list[int]:
        return self._indices(self.predictor.prompt(self.ref, bboxes=[box])[0])

    def ref_points(self, points, labels) -> list[int]:
        return self._indices(self.predictor.prompt(self.ref, points=points, labels=labels)[0])


def _settings(checkpoint, imgsz, conf):
    return SegmentSettings(str(checkpoint), "unused", imgsz=imgsz, conf=conf, iou=0.9, device="cpu")


@pytest.fixture(scope="module")
def ref_model(checkpoint):
    from ultralytics import FastSAM

    return FastSAM(str(checkpoint))


@pytest.fixture(scope="module")
def generated_cases(checkpoint, ref_model, tmp_path_factory):
    seg = FastSAMSegmenter(_settings(checkpoint, 320, 0.25), Storage())
    d = tmp_path_factory.mktemp("prompt-ref")
    cases = []
    for seed in range(7000, 7008):
        img, shapes = make_image(seed, max_shapes=5)
        p = d / f"{seed}.png"
        img.save(p)
        c = Case(seg, ref_model, p, 320, 0.25)
        c.shapes = shapes
        cases.append(c)
    return cases


@pytest.fixture(scope="module")
def real_cases(checkpoint, ref_model):
    real = shared(REAL_PHOTOS)
    seg = FastSAMSegmenter(_settings(checkpoint, 640, 0.01), Storage())
    return [Case(seg, ref_model, real / name, 640, 0.01) for name in REAL_IMAGES]


def _random_boxes(rng: random.Random, h: int, w: int, n: int) -> list[list[float]]:
    """Boxes of all sizes, with fractional corners, some partly outside the image."""
    out = []
    for _ in range(n):
        x1, y1 = rng.uniform(-0.1 * w, 0.9 * w), rng.uniform(-0.1 * h, 0.9 * h)
        out.append([x1, y1, x1 + rng.uniform(0.05, 0.6) * w, y1 + rng.uniform(0.05, 0.6) * h])
    return out


def _random_point_prompts(rng: random.Random, h: int, w: int, n: int):
    out = []
    for k in range(n):
        m = rng.randint(1, 4)
        pts = [[rng.uniform(0, w - 1e-3), rng.uniform(0, h - 1e-3)] for _ in range(m)]
        labels = [1] * m if k % 3 == 0 else ([0] * m if k % 3 == 1 else [rng.randint(0, 1) for _ in range(m)])
        out.append((pts, labels))
    return out


def _check_boxes(case: Case, boxes) -> tuple[int, int]:
    agreed = skipped = 0
    for box in boxes:
        try:
            sel = select_box(case.masks, box, case.h, case.w)
        except PromptError as e:
            # Only where the reference's answer is arbitrary: no overlap at all, or no box inside.
            assert str(e).startswith(("no_mask_selected", "empty_box", "no_mask")), e
            skipped += 1
            continue
        assert sel.masks == case.ref_box(box), box
        agreed += 1
    return agreed, skipped


def _check_points(case: Case, prompts) -> int:
    agreed = 0
    for pts, labels in prompts:
        try:
            sels = select_points(case.masks, pts, labels, case.h, case.w, merge=False)
            ours = [i for s in sels for i in s.masks]
        except PromptError as e:
            assert str(e).startswith("no_mask_selected"), e
            ours = []
        assert ours == case.ref_points(pts, labels), (pts, labels)
        agreed += 1
    return agreed


def test_box_prompts_select_what_the_reference_selects_on_generated_images(generated_cases):
    rng = random.Random(1)
    agreed = skipped = 0
    for case in generated_cases:
        gt = [list(s.box_xyxy) for s in case.shapes]
        a, s = _check_boxes(case, gt + _random_boxes(rng, case.h, case.w, 12))
        agreed, skipped = agreed + a, skipped + s
    assert agreed >= 60, (agreed, skipped)  # random boxes often miss every shape: those are skipped


def test_point_prompts_select_what_the_reference_selects_on_generated_images(generated_cases):
    rng = random.Random(2)
    total = 0
    for case in generated_cases:
        # A positive point at each shape's centre of mass, plus random sets of points and labels.
        centres = [[float(np.nonzero(s.mask)[1].mean()), float(np.nonzero(s.mask)[0].mean())] for s in case.shapes]
        total += _check_points(case, [([c], [1]) for c in centres] + _random_point_prompts(rng, case.h, case.w, 10))
    assert total >= 80


def test_box_and_point_prompts_agree_with_the_reference_on_real_photographs(real_cases):
    rng = random.Random(3)
    boxes = points = 0
    for case in real_cases:
        assert len(case.masks) >= 5, "too few masks on a photograph to test selection"
        # The reference's prompt() sums over every full-size mask per prompt: fewer on big photos.
        n = 12 if case.h * case.w < 1_000_000 else 3
        # Boxes around reference masks (jittered) and random ones.
        mask_boxes = [[x - rng.uniform(0, 15), y - rng.uniform(0, 15), x + bw + rng.uniform(0, 15), y + bh + rng.uniform(0, 15)]
                      for x, y, bw, bh in (mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
                                           for m in case.ref.masks.data.cpu().numpy()[:n])]
        a, _ = _check_boxes(case, mask_boxes + _random_boxes(rng, case.h, case.w, n))
        boxes += a
        points += _check_points(case, _random_point_prompts(rng, case.h, case.w, n))
    assert boxes >= 25 and points >= 18


def test_ground_truth_box_prompts_give_the_true_masks(generated_cases):
    """Box prompts from the generator's true boxes: IoU of the selected mask with the true mask."""
    ious = []
    for case in generated_cases:
        for s in case.shapes:
            sel = select_box(case.masks, list(s.box_xyxy), case.h, case.w)
            rle = {"size": [case.h, case.w], "counts": _our_counts(case.masks, sel, case.h, case.w).encode()}
            gt = mask_utils.encode(np.asfortranarray(s.mask.astype(np.uint8)))
            ious.append(float(mask_utils.iou([rle], [gt], [0])[0, 0]))
    print(f"ground-truth box prompts: mean mask IoU {np.mean(ious):.3f} over {len(ious)} shapes, min {np.min(ious):.3f}")
    assert len(ious) >= 20
    assert np.mean(ious) > 0.9
