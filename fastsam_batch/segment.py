"""Segment stage: decoded images -> FastSAM everything-mode masks -> COCO RLE, in one place.

:class:`FastSAMSegmenter` holds the model (loaded once) and turns a batch of RGB images into,
for each image, a list of mask records (counts, bbox, area, score). It reproduces ultralytics'
``FastSAMPredictor`` everything mode with ``retina_masks=True``: the same letterbox, the same
fused model, class-agnostic NMS, scale_boxes, masks at the original resolution cropped to
their boxes, empty masks dropped, and FastSAM's full-image box adjustment. Masks are computed
only inside their boxes (see :mod:`.masks`) and encoded to RLE right where they are made
(see :mod:`.rle`); dense masks never leave this object.

:class:`SegmentActor` is the Ray Data callable around it: a batch dict in, a pyarrow table of
output rows out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .masks import adjust_full_image_boxes, box_crops
from .rle import crop_run_lengths, rle_fields, runs_to_rle


@dataclass(frozen=True)
class SegmentSettings:
    checkpoint_uri: str
    checkpoint_sha256: str
    imgsz: int = 1024
    conf: float = 0.4
    iou: float = 0.9
    max_det: int = 300
    device: str = "auto"
    half: bool = False


class FastSAMSegmenter:
    def __init__(self, settings: SegmentSettings, storage):
        import torch

        from .model import load_model, local_checkpoint, resolve_device
        from .offline import configure_ultralytics

        configure_ultralytics()
        from ultralytics.data.augment import LetterBox
        from ultralytics.utils.checks import check_imgsz

        self.torch = torch
        self.settings = settings
        self.device = resolve_device(settings.device)
        path = local_checkpoint(settings.checkpoint_uri, storage, settings.checkpoint_sha256)
        self.model = load_model(path, self.device, half=settings.half)
        self.fp16 = settings.half and self.device.type == "cuda"
        self.stride = max(int(self.model.stride.max()), 32)
        self.nc = len(self.model.names)
        self.imgsz = check_imgsz(settings.imgsz, stride=self.stride, min_dim=2)
        self.letterbox = LetterBox(self.imgsz, auto=True, stride=self.stride)

    def forward(self, images: list[np.ndarray]):
        """Letterbox + model + NMS for a batch of RGB images.

        Like ultralytics' predictor (``rect=True``), each image is letterboxed to the smallest
        stride-aligned rectangle that holds it at ``imgsz``. Images whose letterboxed shapes are
        equal share one forward pass; others get their own, so batching never changes a result.
        Returns, per image, (input shape, detections after NMS, mask prototypes).
        """
        torch = self.torch
        from ultralytics.utils import nms

        boxed = [self.letterbox(image=im) for im in images]
        groups: dict[tuple, list[int]] = {}
        for i, b in enumerate(boxed):
            groups.setdefault(b.shape, []).append(i)
        out: list = [None] * len(images)
        for shape, idx in groups.items():
            x = torch.from_numpy(np.stack([boxed[i] for i in idx])).to(self.device)
            x = x.permute(0, 3, 1, 2).contiguous()
            x = (x.half() if self.fp16 else x.float()).div_(255)
            with torch.inference_mode():
                y = self.model(x)
                y = y[0] if isinstance(y[0], tuple) else y
                preds = nms.non_max_suppression(
                    y[0], self.settings.conf, self.settings.iou, agnostic=True, max_det=self.settings.max_det, nc=self.nc
                )
            for j, i in enumerate(idx):
                out[i] = (shape[:2], preds[j], y[1][j])
        return out

    def segment(self, images: list[np.ndarray]) -> list[list[dict]]:
        """Everything-mode masks of each image as output records, best score first."""
        torch = self.torch
        from ultralytics.utils import ops

        results = []
        with torch.inference_mode():
            for im, (in_shape, pred, proto) in zip(images, self.forward(images)):
                h, w = im.shape[:2]
                if pred.shape[0] == 0:
                    results.append([])
                    continue
                boxes = ops.scale_boxes(in_shape, pred[:, :4].clone(), (h, w))
                crops = box_crops(pred[:, 6:], proto, boxes, h, w)
                keep = [i for i, c in enumerate(crops) if not c.empty]
                boxes = adjust_full_image_boxes(boxes[keep], h, w)
                scores = pred[keep, 4].float().cpu().numpy()
                records = []
                for j, i in enumerate(keep):
                    c = crops[i]
                    runs = crop_run_lengths(c.crop, c.x0, c.y0, h, w)
                    counts, area, bbox = rle_fields(runs_to_rle(runs, h, w))
                    records.append({"counts": counts, "bbox": bbox, "area": area, "score": float(scores[j])})
                del boxes
                results.append(records)
        return results


class SegmentActor:
    """Ray Data callable: batch of decoded rows -> pyarrow table of output rows."""

    def __init__(self, settings: SegmentSettings, storage):
        self.segmenter = FastSAMSegmenter(settings, storage)
        self.settings = settings
        self.model_name = settings.checkpoint_uri.rstrip("/").rsplit("/", 1)[-1]

    def __call__(self, batch: dict) -> "pa.Table":  # noqa: F821
        from .rows import output_table

        n = len(batch["image_id"])
        masks: list[list[dict]] = [[] for _ in range(n)]
        errors = [batch["error"][i] or None for i in range(n)]
        seg_ms = [None] * n
        todo = [i for i in range(n) if errors[i] is None]
        if todo:
            t0 = time.perf_counter()
            try:
                out = self.segmenter.segment([batch["image"][i] for i in todo])
                per = (time.perf_counter() - t0) * 1000 / len(todo)
                for i, recs in zip(todo, out):
                    masks[i], seg_ms[i] = recs, per
            except Exception:  # noqa: BLE001 - isolate the image that fails; the others still get rows
                for i in todo:
                    t1 = time.perf_counter()
                    try:
                        masks[i] = self.segmenter.segment([batch["image"][i]])[0]
                        seg_ms[i] = (time.perf_counter() - t1) * 1000
                    except Exception as e:  # noqa: BLE001
                        errors[i] = f"segment_failed: {type(e).__name__}: {e}"
        return output_table(
            batch, masks, errors, seg_ms, model=self.model_name, sha256=self.settings.checkpoint_sha256
        )
