"""Box-cropped retina masks against ultralytics' own post-processing, on random inputs."""

from __future__ import annotations

import pytest
import torch
from ultralytics.models.fastsam.utils import adjust_bboxes_to_image_border
from ultralytics.utils.metrics import box_iou
from ultralytics.utils.ops import process_mask_native

from fastsam_batch.masks import adjust_full_image_boxes, box_pixel_span, iter_box_mask_intervals


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
    ours = torch.zeros_like(ref)
    # A small chunk forces several column chunks per box, and runs split across chunks.
    for i, starts, ends in iter_box_mask_intervals(coeffs, protos, boxes, h, w, chunk_pixels=997):
        flat = torch.zeros(h * w, dtype=torch.uint8)
        for s, e in zip(starts.tolist(), ends.tolist()):
            flat[s:e] = 1
        ours[i] = flat.view(w, h).T
    assert ref.sum() > 0
    assert torch.equal(ours, ref)


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
