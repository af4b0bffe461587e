"""The accelerator path waits for the device a fixed few times per batch, whatever its images and
masks: counted on CPU tensors by tests/sync_counter.py (what would synchronise a CUDA stream)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastsam_batch import masks as masks_module
from fastsam_batch.decode import decode_image
from fastsam_batch.masks import batched_box_mask_intervals
from fastsam_batch.segment import FastSAMSegmenter, SegmentSettings
from fastsam_batch.storage import Storage
from shapes import make_image
from sync_counter import SyncCounter

# Per batch: NMS 3 (candidates above conf, torchvision's NMS, the counts kept per image: by
# index_add_, since torch.bincount would add two), the boxes and scores 1, the mask transitions 1
# (2 when a chunk has more than guessed, a case of its own below).
SYNCS_PER_BATCH = 5


def smooth_job(n: int, h: int, w: int, gen: torch.Generator, box: int = 40):
    """A job of ``n`` masks of blob-like prototypes (a few runs a column, like real masks) in boxes of
    at most ``box`` pixels."""
    protos = torch.nn.functional.interpolate(torch.randn(1, 32, 10, 10, generator=gen), size=(80, 80),
                                             mode="bilinear")[0]
    coeffs = torch.randn(n, 32, generator=gen)
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w - box, h - box])
    boxes = torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=gen) * (box - 4)], 1)
    return coeffs, protos, boxes.numpy(), h, w


def counted(fn):
    with SyncCounter() as c:
        out = fn()
    return c, out


def test_batched_masks_sync_once_per_batch_whatever_the_masks_and_images():
    gen = torch.Generator().manual_seed(1)
    one, big, batch = [smooth_job(10, 300, 400, gen)], [smooth_job(3000, 300, 400, gen)], \
        [smooth_job(10, 300, 400, gen) for _ in range(32)]
    few, _ = counted(lambda: batched_box_mask_intervals(one))
    # 3,000 masks in many chunks (a small budget), and 32 images
    many, found = counted(lambda: batched_box_mask_intervals(big, budget_pixels=1 << 16))
    images, _ = counted(lambda: batched_box_mask_intervals(batch))
    assert sum(s.size for s, _ in found[0]) > 3000  # real masks came back
    assert (few.syncs, many.syncs, images.syncs) == (1, 1, 1), (few.where, many.where, images.where)
    assert (few.uploads, many.uploads, images.uploads) == (1, 1, 1)


def test_chunks_with_more_transitions_than_guessed_cost_one_more_sync_and_give_the_same_masks(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    jobs = [smooth_job(200, 300, 400, gen) for _ in range(3)]
    expected = batched_box_mask_intervals(jobs, budget_pixels=1 << 15)
    monkeypatch.setattr(masks_module, "GUESS_PER_COLUMN", 0)  # every chunk's slot too small
    c, again = counted(lambda: batched_box_mask_intervals(jobs, budget_pixels=1 << 15))
    assert c.syncs == 2, c.where
    for a, b in zip(expected, again):
        assert all(np.array_equal(s1, s2) and np.array_equal(e1, e2) for (s1, e1), (s2, e2) in zip(a, b))


@pytest.fixture(scope="module")
def segmenter(checkpoint):
    return FastSAMSegmenter(SegmentSettings(str(checkpoint), "unused", imgsz=224, conf=0.25, iou=0.9, device="cpu",
                                            mask_path="batched"), Storage())


def test_a_batch_through_the_device_path_syncs_a_fixed_number_of_times(segmenter):
    """segment_on_device (letterbox, forward, NMS, boxes, mask intervals) of 1 image, of 32, and of
    images of three letterboxed shapes: the same few synchronisations, and uploads by shape, not by image."""
    same = [np.asarray(make_image(7000 + i, size=(256, 224))[0]) for i in range(32)]
    mixed = [np.asarray(make_image(7100 + i, size=size)[0]) for i, size in enumerate([(256, 224), (200, 360), (320, 256)] * 2)]
    one, (_, m1, _) = counted(lambda: segmenter.segment_on_device(same[:1]))
    many, (_, m32, _) = counted(lambda: segmenter.segment_on_device(same))
    shapes, _ = counted(lambda: segmenter.segment_on_device(mixed))
    assert len(m1[0]) > 0 and sum(len(m) for m in m32) > 32  # masks were found
    assert one.syncs == many.syncs == shapes.syncs == SYNCS_PER_BATCH, (one.where, many.where, shapes.where)
    assert (one.uploads, many.uploads, shapes.uploads) == (2, 2, 4)  # the images (per shape), the mask plan


def test_the_sync_counter_counts_what_would_wait():
    """The harness itself: each kind of host wait counted once, host tensors' reads not."""
    x = torch.arange(6.0)
    with SyncCounter() as c:
        x.sum().item()
        x.tolist()
        bool(x[0] > 1)
        x.nonzero()
        y = x.clone()
        y[y > 2] = 0
        x[x > 1]
        torch.from_numpy(np.zeros(3)).to(DEVICE)  # a blocking upload
        h = x.cpu()
        h.numpy()  # already on the host
        torch.where(x > 1, x, 0)  # no wait
    assert c.syncs == 8 and c.uploads == 1, c.where
    assert decode_image is not None


DEVICE = torch.device("cpu")  # on CPU tensors, the device object stands for the accelerator (sync_counter.py)


@pytest.mark.parametrize("name, op, waits, uploads", [
    ("bincount", lambda x, i: torch.bincount(i, minlength=8), 2, 0),  # CUDA reads min and max on the host
    ("Tensor.bincount", lambda x, i: i.bincount(), 2, 0),
    ("to('cpu')", lambda x, i: x.to("cpu"), 1, 0),
    ("to(device='cpu')", lambda x, i: x.to(device="cpu"), 1, 0),
    ("to('cpu', non_blocking=True)", lambda x, i: x.to("cpu", non_blocking=True), 1, 0),  # read next
    ("to('cpu', torch.float16)", lambda x, i: x.to("cpu", torch.float16), 1, 0),
    ("equal", lambda x, i: torch.equal(x, x + 0), 1, 0),
    ("Tensor.equal", lambda x, i: x.equal(x), 1, 0),
    ("tensor(...).to(device)", lambda x, i: torch.tensor([1.0, 2.0]).to(DEVICE), 1, 1),
    ("zeros(...).to(device, non_blocking)", lambda x, i: torch.zeros(3).to(DEVICE, non_blocking=True), 0, 1),
    ("arange(...).to(device=)", lambda x, i: torch.arange(3).to(device=DEVICE), 1, 1),
    ("as_tensor(list).cuda-like .to(device)", lambda x, i: torch.as_tensor([1, 2]).to(DEVICE), 1, 1),
    ("tensor(..., device=)", lambda x, i: torch.tensor([1.0], device=DEVICE), 1, 1),
])
def test_each_kind_of_host_wait_is_counted(name, op, waits, uploads):
    x, i = torch.arange(6.0), torch.tensor([0, 3, 3, 1])
    with SyncCounter() as c:
        op(x, i)
    assert (c.syncs, c.uploads) == (waits, uploads), (name, c.where)


@pytest.mark.parametrize("name, op", [
    ("a host tensor copied to the host", lambda: torch.from_numpy(np.zeros(3)).to("cpu")),
    ("a host tensor compared on the host", lambda: torch.equal(torch.zeros(2), torch.ones(2))),
    ("bincount of a host tensor", lambda: torch.bincount(torch.tensor([1, 2]))),
    ("a read of what came back", lambda: torch.zeros(2).to("cpu").tolist()),
    ("a device tensor made on the device", lambda: torch.zeros(3, device=DEVICE) + 1),
    ("a count without bincount", lambda: torch.zeros(5, dtype=torch.int64, device=DEVICE).index_add_(
        0, torch.arange(4, device=DEVICE) % 5, torch.ones(4, dtype=torch.int64, device=DEVICE))),
    ("a dtype change", lambda: torch.arange(3, device=DEVICE).to(torch.float32)),
])
def test_what_never_waits_is_not_counted(name, op):
    with SyncCounter() as c:
        op()
    assert (c.syncs, c.uploads) == (0, 0), (name, c.where)


def test_resize_operators_are_built_once_per_size_not_per_image(monkeypatch):
    built = []
    real = masks_module.native_mask_operators
    monkeypatch.setattr(masks_module, "native_mask_operators", lambda *a, **k: built.append(a) or real(*a, **k))
    monkeypatch.setattr(masks_module, "_OPERATORS", {})
    gen = torch.Generator().manual_seed(4)
    batched_box_mask_intervals([smooth_job(5, 300, 400, gen) for _ in range(32)] + [smooth_job(5, 200, 100, gen)])
    batched_box_mask_intervals([smooth_job(5, 300, 400, gen) for _ in range(4)])
    assert built == [(80, 80, 300, 400), (80, 80, 200, 100)]
