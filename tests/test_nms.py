"""Batched NMS (one torchvision call per batch) against ultralytics' per-image NMS, on real model
outputs; and the segmenter never on ultralytics' pure-torch NMS fallback."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REAL_IMAGES, shared
from fastsam_batch.decode import decode_image
from fastsam_batch.nms import batched_nms
from fastsam_batch.segment import FastSAMSegmenter, SegmentSettings
from fastsam_batch.storage import Storage
from shapes import make_image



def raw_outputs(seg: FastSAMSegmenter, images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack([seg.letterbox(image=im) for im in images])).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        y = seg.model(x)
    y = y[0] if isinstance(y[0], tuple) else y
    return y[0]


def reference(pred, conf, iou, max_det, max_nms=30000):
    from ultralytics.utils import nms

    assert "torchvision" in sys.modules  # the reference on torchvision's kernel, as ultralytics' predictor runs it
    return nms.non_max_suppression(pred, conf, iou, agnostic=True, max_det=max_det, nc=1, max_nms=max_nms)


@pytest.fixture(scope="module")
def fixture_outputs(checkpoint):
    seg = FastSAMSegmenter(SegmentSettings(str(checkpoint), "unused", imgsz=320, device="cpu"), Storage())
    return raw_outputs(seg, [np.asarray(make_image(5000 + i, size=(256, 224))[0].convert("RGB")) for i in range(6)])


@pytest.fixture(scope="module")
def photo_outputs(tmp_path_factory):
    """A FastSAM-s-architecture model with seeded random weights on four photographs: thousands of
    candidates per image at conf 0.01, as in the benchmark."""
    photos = sorted(shared(REAL_IMAGES).glob("*.jpg"))[:4]  # first: skip before building anything
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench

    ckpt = bench.random_fastsam(tmp_path_factory.mktemp("ck") / "s.pt", "s")
    seg = FastSAMSegmenter(SegmentSettings(str(ckpt), "unused", imgsz=640, device="cpu"), Storage())
    assert len(photos) == 4
    images = [np.asarray(Image.open(p).convert("RGB").resize((640, 480))) for p in photos]  # one letterbox shape
    return raw_outputs(seg, images)


@pytest.mark.parametrize("conf,iou,max_det", [(0.25, 0.9, 300), (0.05, 0.5, 300), (0.01, 0.9, 5)])
def test_batched_nms_keeps_what_per_image_nms_keeps_fixture_model(fixture_outputs, conf, iou, max_det):
    ours, ref = batched_nms(fixture_outputs, conf, iou, max_det, 1), reference(fixture_outputs, conf, iou, max_det)
    assert len(ours) == len(ref) == 6
    assert sum(r.shape[0] for r in ref) > 6
    for o, r in zip(ours, ref):
        assert torch.equal(o, r)


@pytest.mark.parametrize("max_det,max_nms", [(300, 30000), (20, 30000), (300, 500)])
def test_batched_nms_keeps_what_per_image_nms_keeps_photos(photo_outputs, max_det, max_nms):
    ours = batched_nms(photo_outputs, 0.01, 0.9, max_det, 1, max_nms=max_nms)
    ref = reference(photo_outputs, 0.01, 0.9, max_det, max_nms=max_nms)
    for o, r in zip(ours, ref):
        assert r.shape[0] == max_det or max_nms < 30000
        assert torch.equal(o, r)


def test_batched_nms_with_no_candidates(fixture_outputs):
    out = batched_nms(fixture_outputs, 0.999999, 0.9, 300, 1)
    ref = reference(fixture_outputs, 0.999999, 0.9, 300)
    assert [o.shape[0] for o in out] == [r.shape[0] for r in ref] == [0] * 6
    assert all(o.shape[1] == fixture_outputs.shape[1] + 1 for o in out)  # xyxy, score, class, coefficients


def test_segmenter_never_takes_ultralytics_fallback_nms(checkpoint, monkeypatch):
    """ultralytics falls back to its pure-torch loop when torchvision is not imported; the segmenter
    must never get there (nor call ultralytics' per-image NMS at all)."""
    from ultralytics.utils import nms

    def forbidden(*a, **k):
        raise AssertionError("ultralytics' NMS was called")

    monkeypatch.setattr(nms.TorchNMS, "nms", staticmethod(forbidden))
    monkeypatch.setattr(nms, "non_max_suppression", forbidden)
    seg = FastSAMSegmenter(SegmentSettings(str(checkpoint), "unused", imgsz=320, device="cpu"), Storage())
    assert "torchvision" in sys.modules
    image = decode_image(_png(make_image(5100)[0]))
    (records, _, _), = seg.segment([image])
    assert records


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
