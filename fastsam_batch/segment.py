"""Segment stage: decoded images -> FastSAM everything-mode masks -> COCO RLE, in one place.

:class:`FastSAMSegmenter` holds the model (loaded once) and turns a batch of RGB images into,
for each image, a list of mask records (counts, bbox, area, score). It reproduces ultralytics'
``FastSAMPredictor`` everything mode with ``retina_masks=True``: the same letterbox, the same
fused model, class-agnostic NMS, scale_boxes, masks at the original resolution cropped to
their boxes, and empty masks dropped. (FastSAM's full-image box adjustment changes only the
detection boxes, which the output does not carry; the prompt rules use it, see
``masks.adjust_full_image_boxes``.) Masks are computed only inside their boxes (see :mod:`.masks`) and encoded to RLE right where they are made
(see :mod:`.rle`); dense masks never leave this object.

:class:`SegmentActor` is the Ray Data callable around it: a batch dict in, a pyarrow table of
output rows out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .masks import iter_box_mask_intervals
from .rle import rle_fields, runs_from_intervals, runs_to_rle


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

    def segment(self, images: list[np.ndarray]) -> list[tuple[list[dict], dict]]:
        """Everything-mode masks of each image as output records (best score first), with the
        image's stage timings in ms: ``model`` (its share of letterbox + forward + NMS),
        ``masks`` (mask pixels and run lengths) and ``encode`` (RLE compression, area, bbox)."""
        torch = self.torch
        from ultralytics.utils import ops

        t0 = time.perf_counter()
        forwards = self.forward(images)
        model_ms = (time.perf_counter() - t0) * 1000 / max(len(images), 1)
        results = []
        with torch.inference_mode():
            for im, (in_shape, pred, proto) in zip(images, forwards):
                h, w = im.shape[:2]
                t_img = time.perf_counter()
                encode_s = 0.0
                records = []
                if pred.shape[0]:
                    boxes = ops.scale_boxes(in_shape, pred[:, :4].clone(), (h, w))
                    scores = pred[:, 4].float().cpu().numpy()
                    for i, starts, ends in iter_box_mask_intervals(pred[:, 6:], proto, boxes, h, w):
                        if starts.size == 0:
                            continue  # empty masks are dropped, as ultralytics does
                        t_enc = time.perf_counter()
                        counts, area, bbox = rle_fields(runs_to_rle(runs_from_intervals(starts, ends, h * w), h, w))
                        records.append({"counts": counts, "bbox": bbox, "area": area, "score": float(scores[i])})
                        encode_s += time.perf_counter() - t_enc
                total_ms = (time.perf_counter() - t_img) * 1000
                timings = {"model": model_ms, "masks": total_ms - encode_s * 1000, "encode": encode_s * 1000}
                results.append((records, timings))
        return results


class SegmentActor:
    """Ray Data callable: batch of decoded rows -> pyarrow table of output rows."""

    def __init__(self, settings: SegmentSettings, storage, run_fingerprint: str):
        self.segmenter = FastSAMSegmenter(settings, storage)
        self.run_fingerprint = run_fingerprint
        self.settings = settings
        self.model_name = settings.checkpoint_uri.rstrip("/").rsplit("/", 1)[-1]

    def __call__(self, batch: dict) -> "pa.Table":  # noqa: F821
        from .rows import output_table

        n = len(batch["image_id"])
        masks: list[list[dict]] = [[] for _ in range(n)]
        errors = [batch["error"][i] or None for i in range(n)]
        timings: list[dict] = [{} for _ in range(n)]
        todo = [i for i in range(n) if errors[i] is None]
        if todo:
            try:
                for i, (recs, t) in zip(todo, self.segmenter.segment([batch["image"][i] for i in todo])):
                    masks[i], timings[i] = recs, t
            except Exception:  # noqa: BLE001 - isolate the image that fails; the others still get rows
                for i in todo:
                    try:
                        masks[i], timings[i] = self.segmenter.segment([batch["image"][i]])[0]
                    except Exception as e:  # noqa: BLE001
                        errors[i] = f"segment_failed: {type(e).__name__}: {e}"
        return output_table(batch, masks, errors, timings, model=self.model_name, sha256=self.settings.checkpoint_sha256,
                            fingerprint=self.run_fingerprint)
