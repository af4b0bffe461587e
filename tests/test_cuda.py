"""The GPU path on a GPU: skipped without CUDA (none is lent to most sessions); run by
``benchmarks/gpu.sh`` on the first device. The steps that must not synchronise the host with the
device run under ``torch.cuda.set_sync_debug_mode("error")`` (any synchronisation raises); the mask
intervals are compared with the CPU path's exactly; the device decode with Pillow's."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch.cuda.is_available() is False); run by "
                                       "benchmarks/gpu.sh on a GPU machine")

CUDA = torch.device("cuda")


@contextlib.contextmanager
def no_sync():
    """Any host synchronisation with the device inside raises (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def exact_job(n: int, mh: int, mw: int, scale: int, gen: torch.Generator, dtype=torch.float32):
    """Prototypes and coefficients of small integers, an image ``scale`` times the prototypes (a power
    of two: the resize operators' weights are dyadic): every product and sum is exact in float32, so
    the device's and the CPU's masks must be the same pixels."""
    protos = torch.randint(-4, 5, (32, mh, mw), generator=gen).to(dtype)
    coeffs = torch.randint(-2, 3, (n, 32), generator=gen).to(dtype)
    h, w = mh * scale, mw * scale
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
    boxes = torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.5, h * 0.5])], 1)
    return coeffs, protos, boxes.numpy(), h, w


def test_batched_masks_on_cuda_equal_the_cpu_path_and_launch_without_syncing():
    from fastsam_batch.masks import (batched_box_mask_intervals, collect_box_masks, iter_box_mask_intervals,
                                     launch_box_masks)

    gen = torch.Generator().manual_seed(3)
    jobs = [exact_job(n, 64, 80, 4, gen) for n in (40, 0, 300, 7)]
    cpu = batched_box_mask_intervals(jobs)
    on_cuda = [(c.to(CUDA), p.to(CUDA), b, h, w) for c, p, b, h, w in jobs]
    torch.cuda.synchronize()
    with no_sync():
        launched = launch_box_masks(on_cuda, 1 << 20)  # many chunks (stability counts included)
    gpu = collect_box_masks(launched)
    assert sum(len(m) for m in gpu) == 347
    for a, b, q, (c, p, bx, h, w) in zip(cpu, gpu, launched.scores, jobs):
        per_mask = list(iter_box_mask_intervals(c, p, torch.from_numpy(bx), h, w, stability=True))
        for (s1, e1), (s2, e2), (_, s3, e3, _) in zip(a, b, per_mask):
            assert np.array_equal(s1, s2) and np.array_equal(e1, e2)
            assert np.array_equal(s1, s3) and np.array_equal(e1, e3)
        # exact arithmetic: the device's stability scores are the CPU's, bit for bit
        assert np.array_equal(q, np.array([x[3] for x in per_mask], np.float32).reshape(-1))
    assert sum(s.size for m in gpu for s, _ in m) > 0


def test_the_device_part_of_a_batch_syncs_only_where_it_must(checkpoint):
    """The fixture model on CUDA: the upload from pinned memory, the forward pass, box scaling and the
    full-image rule, and the mask launch never wait for the device; NMS and the two copies back are
    the batch's few waits. The masks agree with the CPU path's (IoU >= 0.99 for 99% of them: the
    convolutions differ in rounding between devices; the mask step itself is exact, test above)."""
    from pycocotools import mask as mask_utils
    from ultralytics.utils import ops

    from fastsam_batch.decode import decode_image
    from fastsam_batch.masks import adjust_full_image_boxes, collect_box_masks, launch_box_masks
    from fastsam_batch.nms import batched_nms
    from fastsam_batch.segment import FastSAMSegmenter, SegmentSettings
    from fastsam_batch.storage import Storage
    from shapes import make_image

    settings = SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cuda")
    seg = FastSAMSegmenter(settings, Storage())
    buf = []
    for i in range(8):
        b = io.BytesIO()
        make_image(7300 + i, size=(320, 256))[0].save(b, format="PNG")
        buf.append(decode_image(b.getvalue()))
    sizes = [a.shape[:2] for a in buf]
    prepared = seg.prepare(buf, sizes)
    (shape, idx, x), = prepared.stacks
    assert x.is_pinned()
    with torch.inference_mode():
        with no_sync():
            xd = x.to(CUDA, non_blocking=True).permute(0, 3, 1, 2).contiguous().float().div_(255)
            y = seg.model(xd)
            y = y[0] if isinstance(y[0], tuple) else y
        preds = batched_nms(y[0], settings.conf, settings.iou, settings.max_det, seg.nc)  # NMS: its waits
        with no_sync():
            boxes = [ops.scale_boxes(shape, p[:, :4].clone(), hw) for p, hw in zip(preds, sizes)]
            adjusted = [adjust_full_image_boxes(b, *hw) for b, hw in zip(boxes, sizes)]
        host = [b.cpu().numpy() for b in boxes]
        assert len(adjusted) == len(boxes)
        with no_sync():
            launched = launch_box_masks([(p[:, 6:], y[1][j], hb, h, w)
                                         for j, (p, hb, (h, w)) in enumerate(zip(preds, host, sizes))])
        collect_box_masks(launched)
    gpu = seg.segment(buf)
    cpu = FastSAMSegmenter(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cpu",
                                           mask_path="batched"), Storage()).segment(buf)
    matched = total = 0
    for (g, _, _), (c, _, _), (h, w) in zip(gpu, cpu, sizes):
        refs = [{"size": [h, w], "counts": r["counts"].encode()} for r in c]
        ours = [{"size": [h, w], "counts": r["counts"].encode()} for r in g]
        total += len(refs)
        if refs and ours:
            matched += int((mask_utils.iou(refs, ours, [0] * len(ours)).max(1) >= 0.99).sum())
    assert total >= 8 and matched >= 0.99 * total, (matched, total)


def test_device_decode_on_cuda_is_close_to_pillow():
    """nvJPEG against Pillow (libjpeg-turbo): the same size and orientation; pixels within the
    tolerance stated here (mean under 1.5 grey levels, under 1% of values more than 8 apart)."""
    from PIL import Image

    from fastsam_batch.decode import decode_image, decode_on_device, probe_for_device
    from shapes import make_image
    from test_decode import big_jpeg

    files = [big_jpeg(640, 480, orientation=o) for o in (None, 3, 6, 8)]
    b = io.BytesIO()
    make_image(4100, size=(1400, 1100))[0].save(b, format="JPEG", quality=95)
    files.append(b.getvalue())
    b = io.BytesIO()
    Image.fromarray(np.full((40, 60), 100, np.uint8)).save(b, format="JPEG")
    files.append(b.getvalue())
    got = decode_on_device([probe_for_device(d) for d in files], CUDA)
    for g, d in zip(got, files):
        assert isinstance(g, torch.Tensor) and g.device.type == "cuda"
        ref = decode_image(d)
        g = g.cpu().numpy()
        assert g.shape == ref.shape
        diff = np.abs(g.astype(int) - ref.astype(int))
        assert diff.mean() < 1.5 and (diff > 8).mean() < 0.01, (diff.mean(), diff.max())
