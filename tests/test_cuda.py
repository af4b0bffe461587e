"""The GPU path on a GPU: skipped without CUDA (none is lent to most sessions); run by
``benchmarks/gpu.sh`` on the first device. The steps that must not synchronise the host with the
device run under ``torch.cuda.set_sync_debug_mode("error")`` (any synchronisation raises): the real
``segment_on_device``, its few allowed waits relaxed and counted; the mask intervals are compared
with the CPU path's exactly; the device decode with Pillow's."""

from __future__ import annotations

import collections
import contextlib
import io

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

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
        launched = launch_box_masks(on_cuda, 1 << 20, stability=True)  # many chunks (stability counts included)
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


class AllowedWaits(TorchFunctionMode):
    """Inside :func:`no_sync`: the host waits a batch is allowed (the candidates' ``nonzero``,
    torchvision's NMS, the counts' ``tolist``, the copies back by ``.cpu()``), each run with the sync
    debug mode relaxed and counted by kind; anything else that synchronises still raises."""

    WAITS = {torch.Tensor.cpu: "cpu", torch.Tensor.tolist: "tolist", torch.Tensor.nonzero: "nonzero",
             torch.nonzero: "nonzero"}

    def __init__(self):
        super().__init__()
        self.where = collections.Counter()

    def _relaxed(self, kind, fn, *args, **kwargs):
        self.where[kind] += 1
        torch.cuda.set_sync_debug_mode("default")
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = self.WAITS.get(func)
        if kind is None:
            return func(*args, **(kwargs or {}))
        return self._relaxed(kind, func, *args, **(kwargs or {}))

    def __enter__(self):
        import torchvision

        self._nms = torchvision.ops.nms
        torchvision.ops.nms = lambda *a, **k: self._relaxed("torchvision.ops.nms", self._nms, *a, **k)
        return super().__enter__()

    def __exit__(self, *exc):
        import torchvision

        torchvision.ops.nms = self._nms
        return super().__exit__(*exc)


def quantized_head(model, nc: int):
    """The model with its mask coefficients and prototypes rounded to small integers (on the device):
    every mask product is then exact in float32 on both devices, so the masks of the CUDA path and the
    CPU path must be the same pixels (the boxes and scores are the model's own)."""

    def run(x):
        y = model(x)
        y = y[0] if isinstance(y[0], tuple) else y
        pred, protos = y[0], y[1]
        mi = 4 + nc
        pred = torch.cat([pred[:, :mi], pred[:, mi:].mul(2).round_().clamp_(-2, 2)], 1)
        return pred, protos.mul(2).round_().clamp_(-4, 4)

    return run


def test_segment_on_device_waits_only_where_it_must_and_its_masks_equal_the_cpu_path(checkpoint):
    """The real ``segment_on_device`` on CUDA (the fixture model, two letterboxed shapes, pinned
    uploads) under ``torch.cuda.set_sync_debug_mode("error")``: the forward pass, box scaling, the
    full-image rule and the mask launch never wait for the device; the waits are exactly those
    tests/test_syncs.py counts on CPU tensors (NMS 3, the boxes 1, the mask boundaries 1). Its mask
    intervals, scores and adjusted boxes equal the CPU path's (``candidates`` of a CPU segmenter, mask
    by mask with BLAS) on the same detections, exactly (the head quantized: exact products)."""
    from fastsam_batch.decode import decode_image
    from fastsam_batch.segment import FastSAMSegmenter, SegmentSettings
    from fastsam_batch.storage import Storage
    from shapes import make_image

    torch.backends.cuda.matmul.allow_tf32 = False
    settings = SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cuda")
    seg = FastSAMSegmenter(settings, Storage())
    assert seg.batched_masks
    seg.model = quantized_head(seg.model, seg.nc)
    images = []
    for i, size in enumerate([(320, 256)] * 6 + [(256, 320)] * 3):  # image = 4 x prototypes: dyadic resize weights
        b = io.BytesIO()
        make_image(7300 + i, size=size)[0].save(b, format="PNG")
        images.append(decode_image(b.getvalue()))
    sizes = [a.shape[:2] for a in images]
    prepared = seg.prepare(images, sizes)
    assert len(prepared.stacks) == 2 and all(x.is_pinned() for _, _, x in prepared.stacks)
    forwards = []
    real_forward = seg.forward
    seg.forward = lambda p: forwards.append(real_forward(p)) or forwards[-1]
    seg.segment_on_device(prepared, sizes=sizes)  # warm-up: cuDNN's choices, the resize operators' cache
    forwards.clear()
    torch.cuda.synchronize()
    with no_sync(), AllowedWaits() as allowed:
        got_sizes, gpu, _ = seg.segment_on_device(prepared, sizes=sizes)
    assert dict(allowed.where) == {"nonzero": 1, "torchvision.ops.nms": 1, "tolist": 1, "cpu": 2}, allowed.where
    assert sum(allowed.where.values()) == 5  # tests/test_syncs.py's SYNCS_PER_BATCH, counted on CPU tensors
    cpu_seg = FastSAMSegmenter(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9,
                                               device="cpu", mask_path="per_mask"), Storage())
    on_cpu = [(shape, det.cpu(), proto.cpu()) for shape, det, proto in forwards[0]]
    with torch.inference_mode():
        cpu = cpu_seg.candidates([tuple(hw) for hw in sizes], on_cpu)
    assert sum(len(m) for m in gpu) >= 9
    for g, c in zip(gpu, cpu):
        assert len(g) == len(c)
        for a, b in zip(g, c):
            assert np.array_equal(a.starts, b.starts) and np.array_equal(a.ends, b.ends)
            assert a.score == b.score and a.box == b.box


def test_masks_on_cuda_agree_with_the_cpu_model(checkpoint):
    """End to end (the model itself on each device): the masks agree (IoU >= 0.99 for 99% of them:
    the convolutions differ in rounding between devices; the mask step itself is exact, tests above)."""
    from pycocotools import mask as mask_utils

    from fastsam_batch.decode import decode_image
    from fastsam_batch.segment import FastSAMSegmenter, SegmentSettings
    from fastsam_batch.storage import Storage
    from shapes import make_image

    buf = []
    for i in range(8):
        b = io.BytesIO()
        make_image(7300 + i, size=(320, 256))[0].save(b, format="PNG")
        buf.append(decode_image(b.getvalue()))
    sizes = [a.shape[:2] for a in buf]
    gpu = FastSAMSegmenter(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cuda"),
                           Storage()).segment(buf)
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
