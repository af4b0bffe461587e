"""Box-cropped retina masks against ultralytics' own post-processing, on random inputs."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from ultralytics.models.fastsam.utils import adjust_bboxes_to_image_border
from ultralytics.utils.metrics import box_iou
from ultralytics.utils.ops import process_mask_native

from fastsam_batch import masks as masks_module
from fastsam_batch.masks import (adjust_full_image_boxes, batched_box_mask_intervals, box_pixel_span, box_pixel_spans,
                                 iter_box_mask_intervals)


def random_boxes(n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.rand(n, 4, generator=gen) * torch.tensor([w, h, w, h])
    return torch.stack(
        [torch.minimum(a[:, 0], a[:, 2]), torch.minimum(a[:, 1], a[:, 3]),
         torch.maximum(a[:, 0], a[:, 2]), torch.maximum(a[:, 1], a[:, 3])], 1)


@pytest.mark.parametrize(
    "mh,mw,h,w",
    [(80, 80, 300, 400), (256, 256, 1500, 2250), (80, 80, 333, 251), (64, 80, 100, 1000), (80, 80, 17, 5), (80, 80, 320, 320)],
)
def test_box_crops_equal_process_mask_native(mh, mw, h, w):
    gen = torch.Generator().manual_seed(mh * 7 + h)
    protos = torch.randn(32, mh, mw, generator=gen)
    coeffs = torch.randn(25, 32, generator=gen) * 0.3
    boxes = random_boxes(25, h, w, gen)
    ref = process_mask_native(protos, coeffs, boxes.clone(), (h, w))
    # A small chunk forces several column chunks per box, and runs split across chunks.
    found = list(iter_box_mask_intervals(coeffs, protos, boxes, h, w, chunk_pixels=997))
    assert [i for i, _, _ in found] == list(range(len(boxes)))
    ours = dense([(starts, ends) for _, starts, ends in found], h, w)
    assert ref.sum() > 0
    assert torch.equal(ours, ref)


def dense(masks: list, h: int, w: int) -> torch.Tensor:
    out = torch.zeros(len(masks), h, w, dtype=torch.uint8)
    for i, (starts, ends) in enumerate(masks):
        flat = torch.zeros(h * w, dtype=torch.uint8)
        for s, e in zip(starts.tolist(), ends.tolist()):
            flat[s:e] = 1
        out[i] = flat.view(w, h).T
    return out


@pytest.mark.parametrize("budget", [1 << 26, 1 << 20])
def test_batched_device_masks_equal_process_mask_native(budget):
    """The accelerator path (a whole batch in a few large operations), run on CPU tensors: the same
    masks as ultralytics' process_mask_native, image by image, whatever the chunk budget (1 << 20, the one after running
    out of memory: many chunks, the largest boxes of the 1500 x 2250 image cut into column ranges)."""
    gen = torch.Generator().manual_seed(11)
    jobs, refs = [], []
    for (mh, mw, h, w), n in zip([(80, 80, 300, 400), (256, 256, 1500, 2250), (80, 80, 333, 251), (64, 80, 100, 1000),
                                  (80, 80, 17, 5)], [25, 40, 0, 25, 9]):
        protos = torch.randn(32, mh, mw, generator=gen)
        coeffs = torch.randn(n, 32, generator=gen) * 0.3
        boxes = random_boxes(n, h, w, gen)
        if n:
            boxes[0] = torch.tensor([3.2, 2.5, 3.9, 7.0])  # no whole pixel inside: an empty mask
        jobs.append((coeffs, protos, boxes.numpy(), h, w))
        refs.append(process_mask_native(protos, coeffs, boxes.clone(), (h, w)) if n else torch.zeros(0, h, w, dtype=torch.uint8))
    results = batched_box_mask_intervals(jobs, budget)
    assert len(results) == len(jobs)
    for (coeffs, _, _, h, w), ref, masks in zip(jobs, refs, results):
        assert len(masks) == coeffs.shape[0]
        assert torch.equal(dense(masks, h, w), ref)
    assert sum(r.sum() for r in refs) > 0 and results[0][0][0].size == 0


def test_box_pixel_spans_equal_box_pixel_span():
    gen = torch.Generator().manual_seed(5)
    boxes = torch.cat([random_boxes(50, 90, 70, gen) * 1.2 - 5, torch.tensor([[2.0, 2.1, 5.0, 5.01], [4.2, 0, 4.5, 3]])])
    spans = box_pixel_spans(boxes.numpy(), 90, 70)
    for (x1, y1, x2, y2), (r0, r1, c0, c1) in zip(boxes.tolist(), spans.tolist()):
        assert (r0, r1) == box_pixel_span(y1, y2, 90) and (c0, c1) == box_pixel_span(x1, x2, 70)


def test_box_pixel_span_follows_crop_mask_rule():
    # crop_mask keeps pixel p when lo <= p < hi
    assert box_pixel_span(2.0, 5.0, 10) == (2, 5)
    assert box_pixel_span(2.1, 5.0, 10) == (3, 5)
    assert box_pixel_span(2.0, 5.01, 10) == (2, 6)
    assert box_pixel_span(-3.0, 50.0, 10) == (0, 10)
    assert box_pixel_span(4.2, 4.5, 10) == (5, 5)  # no pixel inside


def test_full_image_box_adjustment_matches_fastsam_predictor():
    gen = torch.Generator().manual_seed(3)
    h, w = 480, 640
    boxes = torch.cat([random_boxes(40, h, w, gen),
                       torch.tensor([[5.0, 8.0, 630.0, 470.0], [15.0, 0.0, 640.0, 400.0], [0.0, 0.0, 620.0, 479.0]])])
    # The reference, as FastSAMPredictor.postprocess does it.
    ref = boxes.clone()
    full = torch.tensor([0, 0, w, h], dtype=torch.float32)
    idx = torch.nonzero(box_iou(full[None], adjust_bboxes_to_image_border(boxes.clone(), (h, w)))[0] > 0.9).flatten()
    ref[idx] = full
    ours = adjust_full_image_boxes(boxes, h, w)
    assert idx.numel() >= 2
    assert torch.equal(ours, ref)


def fastsam_reference_adjustment(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """FastSAMPredictor.postprocess's full-image rule on ``boxes`` in their own dtype (fp16 under
    model.half()): the border snapping in place in that dtype, box_iou in float32, the full-image box
    written back in that dtype (the other boxes as given: segment.py carries the adjusted box only).
    ultralytics writes its float32 ``full_box`` into fp16 boxes, which torch refuses (the test below
    shows it); here it is cast to the boxes' dtype first, as an assignment of a scalar would be."""
    ref = boxes.clone()
    full = torch.tensor([0, 0, w, h], dtype=torch.float32)
    idx = torch.nonzero(box_iou(full[None], adjust_bboxes_to_image_border(boxes.clone(), (h, w)))[0] > 0.9).flatten()
    ref[idx] = full.to(ref.dtype)
    return ref


@pytest.mark.parametrize("h, w", [(480, 640), (3001, 4001), (2049, 6007)])
def test_full_image_box_adjustment_in_fp16_matches_fastsam_predictor_without_overflow(h, w):
    """In fp16 (model.half()): a box's area is past fp16's 65504 from about 256 x 256 pixels, so an IoU
    in fp16 is inf / inf; ultralytics' box_iou works in float32, and so do we. Sizes past 2048 are not
    exact in fp16 (4001 is 4000 there): the border values are rounded as ultralytics' assignment
    rounds them. Runs on CPU tensors (torch's CPU kernels take fp16 for every step here)."""
    gen = torch.Generator().manual_seed(5)
    boxes = torch.cat([random_boxes(60, h, w, gen),
                       torch.tensor([[5.0, 8.0, w - 10.0, h - 10.0], [15.0, 0.0, w, h * 0.85], [0.0, 0.0, w - 20.0, h - 1.0],
                                     [w * 0.2, h * 0.2, w * 0.8, h * 0.8], [1.0, 2.0, w - 3.0, h * 0.95]])]).half()
    ref = fastsam_reference_adjustment(boxes, h, w)
    ours = adjust_full_image_boxes(boxes, h, w)
    assert ours.dtype == torch.float16
    with pytest.raises(RuntimeError, match="dtypes match"):  # ultralytics' own line, in fp16
        boxes.clone()[torch.tensor([0])] = torch.tensor([0, 0, w, h], dtype=torch.float32)
    full = (ref == torch.tensor([0, 0, w, h], dtype=torch.float32).half()).all(1)
    assert full.sum() >= 3 and not full[-2]  # the rule fired, and not for the box in the middle
    assert torch.equal(ours, ref)
    if h * w > 65504:  # computed in fp16, these boxes' areas overflow: the rule would find nothing
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert not torch.isfinite(area[-5:-2]).any()


def test_full_image_box_adjustment_picks_the_same_boxes_in_fp16_and_float32_at_sizes_exact_in_fp16():
    gen = torch.Generator().manual_seed(6)
    h, w = 1536, 2048
    boxes = torch.cat([random_boxes(50, h, w, gen), torch.tensor([[4.0, 4.0, 2040.0, 1530.0]])]).half()
    full = torch.tensor([0, 0, w, h], dtype=torch.float16)
    a = (adjust_full_image_boxes(boxes, h, w) == full).all(1)
    b = (adjust_full_image_boxes(boxes.float(), h, w) == full.float()).all(1)
    assert a[-1] and torch.equal(a, b)


class LiveBytes(TorchFunctionMode):
    """Bytes of the tensors made inside (by storage: views and in-place results count once), live
    now and at most: the peak of what a call allocates, seen on CPU tensors. Storages that existed
    before (``known``) are not counted."""

    def __init__(self, known=()):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.live: dict[int, list] = {}
        self.now = self.peak = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t):
        key = t.untyped_storage().data_ptr()
        if key == 0 or key in self.known:
            return
        if key not in self.live:
            self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.now += self.live[key][0]
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key):
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]


def test_batched_masks_keep_each_chunk_within_the_memory_budget():
    """The device memory of every chunk (prototype logits, operator rows, crops, transition slots:
    everything it allocates, measured at its peak) stays within budget_pixels * BYTES_PER_CROP_PIXEL,
    with many small masks (where the logits, not the crops, are most of it) and boxes each larger
    than the budget alone (cut into column ranges); the masks are the per-mask path's."""
    gen = torch.Generator().manual_seed(21)
    h, w, budget_pixels = 600, 800, 1 << 18
    protos = torch.randn(32, 80, 80, generator=gen)
    coeffs = torch.randn(203, 32, generator=gen) * 0.3
    boxes = torch.cat([random_boxes(200, 60, 60, gen) + torch.rand(200, 1, generator=gen) * 500,
                       torch.tensor([[0.0, 0.0, 800.0, 600.0], [10.5, 3.2, 790.0, 580.0], [100.0, 0.0, 700.0, 600.0]])])
    jobs = [(coeffs, protos, boxes.numpy(), h, w), (coeffs[:50], protos * 0.5, boxes[:50].numpy(), h, w)]
    masks_module.cached_mask_operators(80, 80, h, w, protos.device)  # built before: not a chunk's memory
    ops = masks_module.cached_mask_operators(80, 80, h, w, protos.device)
    budget = budget_pixels * masks_module.BYTES_PER_CROP_PIXEL
    assert masks_module._chunk_bytes(1, h, w, 32, 80, 80) > budget  # the full-image box alone is over it
    peaks = []
    real = masks_module._chunk_transitions

    def measured(jobs_, plan, chunk, slot, skip=0, flats=None, stability=False):
        with LiveBytes([plan, *ops, *(t for j in jobs_ for t in j[:2])]) as live:
            out = real(jobs_, plan, chunk, slot, skip, flats, stability)
        j, _, k, hc, wc = chunk
        peaks.append((live.peak, masks_module._chunk_bytes(k, hc, wc, 32, 80, 80, slot), chunk))
        return out

    masks_module._chunk_transitions = measured
    try:
        got = batched_box_mask_intervals(jobs, budget_pixels)
    finally:
        masks_module._chunk_transitions = real
    assert len(peaks) > 10
    assert max(p for p, _, _ in peaks) > budget // 4  # the budget is used, not dodged
    for peak, bound, chunk in peaks:
        assert peak <= bound <= budget, (peak, bound, budget, chunk)
    for (c, p, b, hh, ww), masks in zip(jobs, got):
        ref = [(s, e) for _, s, e in iter_box_mask_intervals(c, p, torch.from_numpy(b), hh, ww)]
        assert len(ref) == len(masks)
        assert all(np.array_equal(s1, s2) and np.array_equal(e1, e2) for (s1, e1), (s2, e2) in zip(ref, masks))
    assert sum(s.size for s, _ in got[0][200:]) > 3 * 300  # the large masks came back whole
