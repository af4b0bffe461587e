"""Segment stage: decoded images -> FastSAM everything-mode masks -> COCO RLE, in one place.

:class:`FastSAMSegmenter` holds the model (loaded once) and turns a batch of RGB images into,
for each image, a list of mask records (counts, bbox, area, score). It reproduces ultralytics'
``FastSAMPredictor`` everything mode with ``retina_masks=True``: the same letterbox, the same
fused model, class-agnostic NMS, scale_boxes, masks at the original resolution cropped to
their boxes, and empty masks dropped. FastSAM's full-image box adjustment changes only the
detection boxes, which the output does not carry; the prompt and mask rules use them. Masks are
computed only inside their boxes (see :mod:`.masks`) and held as pixel intervals (see
:mod:`.intervals`) while the mask rules (:mod:`.mask_rules`) and prompts (:mod:`.select`) choose
among them, then encoded to RLE (see :mod:`.rle`); dense masks never leave this object.

:class:`SegmentActor` is the Ray Data callable around it: a batch dict in, a pyarrow table of
output rows out.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from .intervals import IntervalMask
from .mask_rules import MaskRules, apply_mask_rules, clean_up
from .masks import (adjust_full_image_boxes, collect_box_masks, fetch_box_masks, iter_box_mask_intervals,
                    launch_box_masks)
from .rle import rle_fields, runs_from_intervals, runs_to_rle
from .select import apply_prompts, merged_intervals

# (mask pixels per chunk and masks per prototype product on the CPU, crop pixels per chunk on an
# accelerator): as usual, and after running out of memory.
NORMAL_CHUNKS = (1 << 21, 1024, 1 << 26)
SMALL_CHUNKS = (1 << 16, 16, 1 << 20)
NO_PROMPT = {"prompt_index": None, "prompt_kind": None, "prompt_id": None, "category_id": None, "prompt_score": None}


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
    rules: MaskRules = MaskRules()
    prompted: bool = False  # masks come from prompts (else every mask, everything mode)
    carried: tuple[str, ...] = ()  # input columns carried into the output (lists, Parquet of images)
    keep_everything: bool = False  # with prompts: also every mask, after the prompted ones
    merge_points: bool = False
    clip_uri: str | None = None
    clip_sha256: str | None = None
    text_min_area: int = 100
    torch_threads: int = 0  # intra-op threads of torch in the actor; 0: see resolve_threads
    actors: int = 1  # segmentation actors in the run (for the default thread count)
    cpus_per_actor: float = 1.0
    mask_path: str = "auto"  # "per_mask" (CPU's fastest), "batched" (accelerators'), or "auto": by device
    batch_size: int = 0  # most images per forward pass in an actor call (grouped by letterboxed shape); 0: all


def resolve_threads(s: SegmentSettings, device_type: str) -> int:
    """torch threads for one actor: ``torch_threads`` when set; on the CPU, the node's cores shared
    among the actors (the model is the heavy part; read, decode and write are light next to it,
    and ultralytics' own default of cores - 1 leaves one core of two idle); on a GPU, the actor's
    reserved CPUs."""
    import math

    from .sizing import usable_cpus

    if s.torch_threads:
        return s.torch_threads
    if device_type == "cpu":
        return max(1, usable_cpus() // max(1, s.actors))
    return max(1, math.ceil(s.cpus_per_actor))


@dataclass(frozen=True)
class _Shaped:
    shape: tuple


@dataclass
class Prepared:
    """A batch made ready for the device on the host (see :meth:`FastSAMSegmenter.prepare`):
    ``stacks``: per letterboxed shape, (shape, the images' positions in the batch, uint8 NHWC)."""

    count: int
    stacks: list
    on_device: list = ()  # (position, image already on the device (decoded there), its size as shown)


@dataclass
class _Pending:
    """:meth:`FastSAMSegmenter.candidates_on_device`'s result, on the host: per image its boxes table
    (scaled xyxy, adjusted xyxy, score); then either the batched path's launched and fetched masks, or
    the CPU path's intervals and stability scores."""

    host: list
    launched: object = None
    pixels: list | None = None
    stability: list | None = None


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
        self.threads = resolve_threads(settings, self.device.type)
        torch.set_num_threads(self.threads)  # after ultralytics' import, which sets its own
        self.fp16 = settings.half and self.device.type == "cuda"
        # The one place the mask path is chosen: mask by mask with BLAS on the box band is fastest on
        # a CPU; on an accelerator, a few large operations per batch (see candidates()).
        self.batched_masks = settings.mask_path == "batched" or (settings.mask_path == "auto" and self.device.type != "cpu")
        self.stability = True  # each mask's stability score (quality.py); off only to measure its cost (benchmarks)
        self.stride = max(int(self.model.stride.max()), 32)
        self.nc = len(self.model.names)
        self.imgsz = check_imgsz(settings.imgsz, stride=self.stride, min_dim=2)
        self.letterbox = LetterBox(self.imgsz, auto=True, stride=self.stride)
        self.clip = None
        if settings.clip_uri:
            from .clip_text import ClipScorer, local_clip_dir

            clip_dir = local_clip_dir(settings.clip_uri, storage, settings.clip_sha256 or "")
            self.clip = ClipScorer(clip_dir, self.device, min_area=settings.text_min_area)

    def letterbox_params(self, size: tuple[int, int]) -> dict:
        """ultralytics' ``LetterBox.get_params`` for an image shown at ``size`` (it reads only the shape)."""
        return self.letterbox.get_params({"img": _Shaped((*size, 3))})

    def letterbox_shape(self, size: tuple[int, int]) -> tuple[int, int]:
        """The letterboxed (height, width) of an image shown at ``size``, without its pixels."""
        p = self.letterbox_params(size)
        return p["new_unpad"][1] + p["top"] + p["bottom"], p["new_unpad"][0] + p["left"] + p["right"]

    def letterboxed(self, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """ultralytics' letterbox of an image shown at ``size`` (height, width): its geometry is
        that of the full image, and the pixels are resized from ``image``, which may be a reduced
        decode of it (see decode.decode_for_model); for a full-size image exactly ``LetterBox``."""
        if tuple(image.shape[:2]) == tuple(size):
            return self.letterbox(image=image)
        return self.letterbox.apply_image({"img": image}, self.letterbox_params(size))["img"]

    def prepare(self, images: list[np.ndarray], sizes: list[tuple[int, int]] | None = None) -> "Prepared":
        """The host's part of the forward pass, which needs no device (so an actor runs it outside
        its device lock, while the device works on another batch): each image letterboxed like
        ultralytics' predictor (``rect=True``: the smallest stride-aligned rectangle that holds it at
        ``imgsz``), images of equal letterboxed shapes stacked into one array (equal shapes share a
        forward pass; others get their own, so batching never changes a result), in pinned memory on
        CUDA so that the copy to the device is asynchronous."""
        torch = self.torch
        sizes = sizes or [im.shape[:2] for im in images]
        groups: dict[tuple, list[int]] = {}
        boxed, on_device = {}, []
        for i, (im, hw) in enumerate(zip(images, sizes)):
            if isinstance(im, torch.Tensor):  # decoded on the device: letterboxed there (forward)
                on_device.append((i, im, tuple(hw)))
                continue
            boxed[i] = self.letterboxed(im, hw)
            groups.setdefault(boxed[i].shape, []).append(i)
        stacks = []
        for shape, idx in groups.items():
            x = torch.from_numpy(np.stack([boxed[i] for i in idx]))
            stacks.append((shape[:2], idx, x.pin_memory() if self.device.type == "cuda" else x))
        return Prepared(len(images), stacks, on_device)

    def letterboxed_on_device(self, image, size: tuple[int, int]):
        """:meth:`letterboxed` of an (height, width, 3) uint8 tensor, on its device: the same geometry;
        pixels resampled by torch's bilinear interpolation (OpenCV's INTER_LINEAR sampling, in floats
        rather than OpenCV's fixed point: a grey level apart at most, tests/test_device_decode.py)."""
        torch = self.torch
        p = self.letterbox_params(size)
        w, h = p["new_unpad"]
        x = image.permute(2, 0, 1)[None]
        if (h, w) != tuple(image.shape[:2]):
            x = torch.nn.functional.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)
            x = x.round_().clamp_(0, 255).to(torch.uint8)
        x = torch.nn.functional.pad(x, (p["left"], p["right"], p["top"], p["bottom"]),
                                    value=getattr(self.letterbox, "padding_value", 114))
        return x[0].permute(1, 2, 0)

    def forward(self, images, sizes: list[tuple[int, int]] | None = None):
        """Letterbox + model + NMS for a batch of RGB images (or a :class:`Prepared` batch).
        Returns, per image, (input shape, detections after NMS, mask prototypes). One forward pass
        per letterboxed shape, then one NMS for the whole batch (:mod:`.nms`)."""
        torch = self.torch
        from .nms import batched_nms

        prepared = images if isinstance(images, Prepared) else self.prepare(images, sizes)
        out: list = [None] * prepared.count
        preds, order = [], []
        with torch.inference_mode():
            groups: dict[tuple, tuple[list, list]] = {}
            for shape, idx, x in prepared.stacks:
                x = x.to(self.device, non_blocking=True)  # from pinned memory on CUDA: asynchronous
                groups.setdefault(tuple(shape), ([], []))[0].extend(idx)
                groups[tuple(shape)][1].append(x)
            for i, image, size in prepared.on_device:
                x = self.letterboxed_on_device(image, size)
                groups.setdefault(tuple(x.shape[:2]), ([], []))[0].append(i)
                groups[tuple(x.shape[:2])][1].append(x[None])
            for shape, (idx, xs) in groups.items():
                x = torch.cat(xs) if len(xs) > 1 else xs[0]
                x = x.permute(0, 3, 1, 2).contiguous()
                x = (x.half() if self.fp16 else x.float()).div_(255)
                y = self.model(x)
                y = y[0] if isinstance(y[0], tuple) else y
                preds.append(y[0])
                for j, i in enumerate(idx):
                    out[i] = (shape, None, y[1][j])
                    order.append(i)
            if not preds:
                return out
            # Groups have different anchor counts: padded with anchors of score 0, which never pass
            # conf, so one NMS serves the batch (its host synchronisations once per batch).
            anchors = max(p.shape[2] for p in preds)
            joined = torch.cat([torch.nn.functional.pad(p, (0, anchors - p.shape[2])) for p in preds])
            kept = batched_nms(joined, self.settings.conf, self.settings.iou, self.settings.max_det, self.nc)
        for i, det in zip(order, kept):
            out[i] = (out[i][0], det, out[i][2])
        return out

    def candidates(self, sizes: list[tuple[int, int]], forwards, small: bool = False) -> list[list[IntervalMask]]:
        """Every non-empty everything-mode mask of each image, as intervals, best score first, each
        with FastSAM's adjusted box (a box covering the image snaps to the full-image box).
        ``sizes``: each image's (height, width); ``small``: in much smaller pieces (after running out
        of memory); the masks are the same. The boxes and scores of the whole batch come to the host
        in one copy. Mask pixels: on the CPU mask by mask inside its box (:func:`iter_box_mask_intervals`,
        BLAS on the box band: fastest there); on an accelerator in a few large operations for the
        whole batch (:func:`batched_box_mask_intervals`): the same intervals (tests). Each mask carries its
        stability score (:mod:`.quality`), made with its pixels on either path.
        :meth:`candidates_on_device` then :meth:`candidates_on_host`."""
        return self.candidates_on_host(self.candidates_on_device(sizes, forwards, small))

    def candidates_on_device(self, sizes: list[tuple[int, int]], forwards, small: bool = False) -> "_Pending":
        """The device's part of :meth:`candidates` (an actor holds its device lock for it): box
        scaling, the full-image rule, the boxes' copy to the host, the mask launches and the copy of
        their results to the host (:func:`fetch_box_masks`); on the CPU path every mask's intervals."""
        torch = self.torch
        from ultralytics.utils import ops

        chunk_pixels, masks_at_once, device_pixels = SMALL_CHUNKS if small else NORMAL_CHUNKS
        boxes = [ops.scale_boxes(in_shape, pred[:, :4].clone(), hw) for hw, (in_shape, pred, _) in zip(sizes, forwards)]
        host = [torch.cat([b, adjust_full_image_boxes(b, *hw), pred[:, 4:5]], 1).float()
                for b, hw, (_, pred, _) in zip(boxes, sizes, forwards)]
        host = torch.cat(host).cpu().numpy() if host else np.empty((0, 9), np.float32)  # one copy for the batch
        host = np.split(host, np.cumsum([len(b) for b in boxes])[:-1])
        if not self.batched_masks:
            found = [list(iter_box_mask_intervals(pred[:, 6:], proto, b, h, w, chunk_pixels, masks_at_once,
                                                  stability=self.stability))
                     for b, (h, w), (_, pred, proto) in zip(boxes, sizes, forwards)]
            pixels = [[(x[1], x[2]) for x in f] for f in found]
            stability = [[x[3] if self.stability else np.float32(np.nan) for x in f] for f in found]
            return _Pending(host, pixels=pixels, stability=stability)
        launched = launch_box_masks([(pred[:, 6:], proto, hb[:, :4], h, w)
                                     for hb, (h, w), (_, pred, proto) in zip(host, sizes, forwards)],
                                    device_pixels, stability=self.stability)
        return _Pending(host, launched=fetch_box_masks(launched))

    def candidates_on_host(self, pending: "_Pending", lock=None) -> list[list[IntervalMask]]:
        """The host's part of :meth:`candidates` (outside an actor's device lock): the mask transitions
        sorted and split into intervals (:func:`collect_box_masks`; ``lock`` is taken again only for
        its rare second pass on the device), then each image's :class:`IntervalMask` list."""
        pixels, stability = pending.pixels, pending.stability
        if pending.launched is not None:
            pixels = collect_box_masks(pending.launched, lock)
            stability = pending.launched.scores
        out = []
        for hb, masks, stab in zip(pending.host, pixels, stability):
            adjusted, scores = hb[:, 4:8].tolist(), hb[:, 8].tolist()
            # empty masks are dropped, as ultralytics does
            out.append([IntervalMask(st, en, scores[i], tuple(adjusted[i]), np.float32(stab[i]))
                        for i, (st, en) in enumerate(masks) if st.size])
        return out

    def select(self, image: np.ndarray, masks: list[IntervalMask], prompts: list[dict] | None,
               size: tuple[int, int] | None = None, counts: dict | None = None):
        """Mask rules, then prompts: the output masks as (intervals, record fields), and the prompt
        records. ``size``: the image's (height, width) when ``image`` is a reduced decode (CLIP text
        prompts need the full image, see pipeline). ``counts``: gets what the rules dropped, by kind
        (mask_rules.apply_mask_rules)."""
        s = self.settings
        h, w = size or image.shape[:2]
        keep = apply_mask_rules(masks, h, w, s.rules, counts)
        masks = [masks[i] for i in keep]
        out: list[tuple[tuple[np.ndarray, np.ndarray], dict]] = []
        records: list[dict] = []
        if s.prompted:
            prompts = prompts or []
            similarity = self.clip.similarity_fn(image, masks) if self.clip is not None else None
            selected, errors, per_prompt = apply_prompts(masks, prompts, h, w, merge_points=s.merge_points, similarity=similarity)
            for k, sel in selected:
                p = prompts[k]
                out.append((merged_intervals(masks, sel), {
                    "score": sel.score, "stability_score": float(min(masks[i].stability for i in sel.masks)), "prompt_index": k, "prompt_kind": p["kind"], "prompt_id": p.get("id"),
                    "category_id": p.get("category_id"), "prompt_score": sel.prompt_score}))
            records = [prompt_record(k, p, per_prompt[k], errors[k]) for k, p in enumerate(prompts)]
        if not s.prompted or s.keep_everything:
            out += [((m.starts, m.ends), {"score": m.score, "stability_score": float(m.stability), **NO_PROMPT}) for m in masks]
        if s.rules.clean_up_kernel:
            out = [(clean_up(st, en, h, w, s.rules.clean_up_kernel), f) for (st, en), f in out]
        return out, records

    def segment(self, images: list[np.ndarray], prompts: list[list[dict] | None] | None = None,
                small: bool = False, sizes: list[tuple[int, int]] | None = None) -> list[tuple[list[dict], list[dict], dict]]:
        """The output masks of each image (everything mode: best score first; with prompts: in prompt
        order), its prompt records, and its stage timings in ms: ``model`` (its share of letterbox +
        forward + NMS), ``masks`` (its share of mask pixels and intervals), ``select`` (mask rules,
        prompts, CLIP, clean-up) and ``encode`` (RLE compression, area, bbox), and with them
        ``duplicates`` (masks dropped by ``mask_rules.max_overlap``; None when off). ``sizes``: each
        image's (height, width) as shown, where an image is a reduced decode; else the arrays' own."""
        return self.finish(self.segment_on_device(images, small, sizes), images, prompts)

    def segment_on_device(self, images, small: bool = False,
                          sizes: list[tuple[int, int]] | None = None) -> tuple[list, list, dict]:
        """The model's part of :meth:`segment`: letterbox (unless ``images`` is already a
        :class:`Prepared` batch), forward, NMS and mask intervals of a batch (on the accelerator,
        when there is one). Returns what :meth:`finish` needs, all on the host. On an accelerator
        the host waits for the device a fixed few times per batch, whatever its images and masks
        (tests/test_syncs.py counts them). :meth:`launch_on_device` then :meth:`complete_on_host`."""
        return self.complete_on_host(self.launch_on_device(images, small, sizes))

    def launch_on_device(self, images, small: bool = False, sizes: list[tuple[int, int]] | None = None) -> tuple:
        """What of :meth:`segment_on_device` uses the device (an actor holds its device lock for this
        only): the forward pass, NMS, the boxes and mask launches, and the copies of their results to
        the host. Returns what :meth:`complete_on_host` needs (on the host)."""
        t0 = time.perf_counter()
        if isinstance(images, Prepared):
            prepared = images
            sizes = [tuple(hw) for hw in sizes]
        else:
            sizes = [tuple(hw) for hw in sizes] if sizes else [im.shape[:2] for im in images]
            prepared = self.prepare(images, sizes)
        forwards = self.forward(prepared)
        t1 = time.perf_counter()
        with self.torch.inference_mode():
            pending = self.candidates_on_device(sizes, forwards, small)
        del forwards  # the prototypes and detections on the device: let go before the host's part
        return sizes, pending, prepared.count, t1 - t0, time.perf_counter() - t1

    def complete_on_host(self, launched: tuple, lock=None) -> tuple[list, list, dict]:
        """The host's part of :meth:`segment_on_device` (outside an actor's device lock): the mask
        intervals from the transitions the device found (:meth:`candidates_on_host`; ``lock`` taken
        again only for its rare second pass). Returns what :meth:`finish` needs."""
        sizes, pending, count, model_s, device_masks_s = launched
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            masks = self.candidates_on_host(pending, lock)
        n = max(count, 1)
        masks_s = device_masks_s + time.perf_counter() - t0
        return sizes, masks, {"model": model_s * 1000 / n, "masks": masks_s * 1000 / n}

    def finish(self, done: tuple[list, list, dict], images: list[np.ndarray],
               prompts: list[list[dict] | None] | None = None) -> list[tuple[list[dict], list[dict], dict]]:
        """The host's part of :meth:`segment`: mask rules, prompts and RLE of each image."""
        sizes, candidates, shared = done
        prompts = prompts or [None] * len(images)
        results = []
        with self.torch.inference_mode():
            for im, (h, w), masks, image_prompts in zip(images, sizes, candidates, prompts):
                t2 = time.perf_counter()
                dropped: dict = {}
                selected, prompt_records = self.select(im, masks, image_prompts, (h, w), dropped)
                t3 = time.perf_counter()
                records = []
                for (starts, ends), fields in selected:
                    if starts.size == 0:  # a clean-up can empty a mask
                        continue
                    counts, area, bbox = rle_fields(runs_to_rle(runs_from_intervals(starts, ends, h * w), h, w))
                    records.append({"counts": counts, "bbox": bbox, "area": area, **fields})
                t4 = time.perf_counter()
                # with the timings: the masks dropped as duplicates (mask_rules.max_overlap; None when off)
                timings = {**shared, "select": (t3 - t2) * 1000, "encode": (t4 - t3) * 1000,
                           "duplicates": dropped.get("duplicates")}
                results.append((records, prompt_records, timings))
        return results


class SegmentActor:
    """Ray Data callable: batch of decoded rows -> pyarrow table of output rows."""

    def __init__(self, settings: SegmentSettings, storage, run_fingerprint: str, run_id: str = "",
                 timeout_s: float | None = None):
        import threading

        from .watchdog import Watchdog

        self.watchdog = Watchdog(run_id)
        self.timeout_s = timeout_s
        self.segmenter = FastSAMSegmenter(settings, storage)
        self.device_lock = threading.Lock()  # one batch on the device at a time (see segment_batch)
        if self.segmenter.clip is not None:
            self.segmenter.clip.device_lock = self.device_lock
        self._cpu_segmenter: FastSAMSegmenter | None = None
        self.storage = storage
        self.run_fingerprint = run_fingerprint
        self.settings = settings
        self.model_name = settings.checkpoint_uri.rstrip("/").rsplit("/", 1)[-1]

    def __call__(self, batch: dict) -> "pa.Table":  # noqa: F821
        from .rows import output_table

        n = len(batch["image_id"])
        masks: list[list[dict]] = [[] for _ in range(n)]
        errors = [batch["error"][i] or None for i in range(n)]
        timings: list[dict] = [{} for _ in range(n)]
        given = [json.loads(batch["prompts"][i]) if "prompts" in batch and batch["prompts"][i] else [] for i in range(n)]
        # Until an image is segmented, its prompts record why not (kept when segmenting fails).
        records = [[prompt_record(k, p, 0, p.get("error") or "image_failed: see the row's error") for k, p in enumerate(ps)]
                   for ps in given]
        # The image as shown (an image may be a reduced decode of it; see decode.decode_for_model).
        sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in range(n)]
        s = self.settings
        # With prompts, an image without any gets an ok row with no masks and no model time.
        todo = [i for i in range(n) if errors[i] is None and (not s.prompted or s.keep_everything or given[i])]
        # Time limits (watchdog.py): an image that outlasted its limit alone is an error row; a batch
        # that outlasted its limit is redone one image at a time, each with its own limit.
        ids = [batch["image_id"][i] for i in range(n)]
        # input.decode: device: JPEGs arrive as bytes, decoded on the device part by part (below).
        jpegs = [None] * n
        if "jpeg" in batch:
            from .decode import DeviceJpeg

            batch = {**batch, "width": np.array(batch["width"]), "height": np.array(batch["height"]),
                     "decode_ms": np.array(batch["decode_ms"], dtype=np.float64)}
            jpegs = [DeviceJpeg(bytes(batch["jpeg"][i]), sizes[i], int(batch["orientation"][i]))
                     if errors[i] is None and len(batch["jpeg"][i]) else None for i in range(n)]
        images = {i: batch["image"][i] for i in range(n) if jpegs[i] is None}
        too_slow = self.watchdog.poisoned("segment-alone")
        for i in [i for i in todo if ids[i] in too_slow]:
            errors[i] = f"timeout: segmenting took longer than runtime.image_timeout_s = {self.timeout_s:g} s"
        todo = [i for i in todo if errors[i] is None]
        alone = any(ids[i] in self.watchdog.poisoned("segment-batch") for i in todo)
        if todo and not alone:
            limit = self.timeout_s * len(todo) if self.timeout_s else None
            with self.watchdog.watch("segment-batch", [ids[i] for i in todo], limit):
                try:
                    for part in self.buckets(todo, sizes):
                        part = self.decode_on_device(part, jpegs, images, errors, batch)
                        done = self.segment_batch(self.segmenter, [images[i] for i in part],
                                                  [given[i] for i in part], [sizes[i] for i in part])
                        for i, (recs, prs, t) in zip(part, done):
                            masks[i], records[i], timings[i] = recs, prs, t
                except Exception:  # noqa: BLE001 - isolate the image that fails; the others still get rows
                    self.free_memory()
                    alone = True
        if alone:
            for i in todo:
                if masks[i] or timings[i] or errors[i] is not None:
                    continue
                try:
                    if not self.decode_on_device([i], jpegs, images, errors, batch):
                        continue  # a file neither the device nor Pillow decodes: its error row
                    with self.watchdog.watch("segment-alone", [ids[i]], self.timeout_s):
                        masks[i], records[i], timings[i] = self.segment_one(images[i], given[i], sizes[i])
                except Exception as e:  # noqa: BLE001
                    errors[i] = f"segment_failed: {type(e).__name__}: {e}"
        return output_table(batch, masks, errors, timings, model=self.model_name, sha256=s.checkpoint_sha256,
                            fingerprint=self.run_fingerprint, prompts=records, carried=s.carried)

    def decode_on_device(self, part: list[int], jpegs: list, images: dict, errors: list, batch: dict) -> list[int]:
        """``input.decode: device``: the JPEGs of ``part`` not decoded yet, decoded on the model's device
        in one batch under the device lock (decode.decode_jpegs_on_device; Pillow, outside it, for those it refuses) into
        ``images``; a file neither can decode gets the error row Pillow's decode gives it in every mode
        (no size). Returns the positions of ``part`` that have an image."""
        from .decode import DecodeError, decode_jpegs_on_device, decode_refused_on_host

        todo = [i for i in part if i not in images and jpegs[i] is not None]
        if todo:
            t0 = time.perf_counter()
            with self.device_lock:
                got = decode_jpegs_on_device([jpegs[i] for i in todo], self.segmenter.device)
            got = decode_refused_on_host([jpegs[i] for i in todo], got)  # Pillow's, for those refused: the lock free
            share = (time.perf_counter() - t0) * 1000 / len(todo)
            for i, image in zip(todo, got):
                batch["decode_ms"][i] += share
                if isinstance(image, DecodeError):
                    errors[i] = str(image)
                    batch["width"][i] = batch["height"][i] = -1
                else:
                    images[i] = image
        return [i for i in part if i in images]

    def buckets(self, todo: list[int], sizes: list[tuple[int, int]]) -> list[list[int]]:
        """``todo`` (row positions) grouped by letterboxed shape, each group cut into forward passes of
        at most ``settings.batch_size`` images: a pass has one shape, so it is full whatever the mix
        of aspects in the call (which takes a few batches' worth of rows on GPUs, sizing.py)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i in todo:
            groups.setdefault(self.segmenter.letterbox_shape(sizes[i]), []).append(i)
        n = self.settings.batch_size or len(todo) or 1
        return [g[a:a + n] for g in groups.values() for a in range(0, len(g), n)]

    def segment_batch(self, segmenter: "FastSAMSegmenter", images: list[np.ndarray], prompts: list, sizes: list,
                      small: bool = False):
        """Host work outside the actor's device lock, device work under it: with two calls running
        in the actor (on accelerators), the host work of one batch (letterbox, stacking and pinning
        before; sorting the mask transitions into intervals, mask rules, prompts and RLE after) runs
        while the device works on the other's. CLIP
        (text prompts) takes the same lock for each of its device batches
        (clip_text.ClipScorer.device_lock)."""
        prepared = segmenter.prepare(images, sizes)
        with self.device_lock:  # the launches and the copies back only
            launched = segmenter.launch_on_device(prepared, small, sizes)
        done = segmenter.complete_on_host(launched, self.device_lock)  # host work: the lock is free
        return segmenter.finish(done, images, prompts)

    def segment_one(self, image: np.ndarray, prompts: list[dict], size: tuple[int, int]):
        """One image alone; when it runs out of memory (many masks, a huge image), again with masks
        in much smaller pieces, then on the CPU (when the model runs on an accelerator). Raises
        :class:`OutOfMemory` naming what was tried when every way runs out of memory."""
        ways = [("as usual", lambda: self.segment_batch(self.segmenter, [image], [prompts], [size])),
                ("with smaller mask chunks", lambda: self.segment_batch(self.segmenter, [image], [prompts], [size], True))]
        if self.segmenter.device.type != "cpu":
            host = image.cpu().numpy() if isinstance(image, self.segmenter.torch.Tensor) else image  # decoded on the device
            ways.append(("on the CPU", lambda: self.cpu_segmenter().segment([host], [prompts], True, [size])))
        tried = []
        for way, run in ways:
            try:
                return run()[0]
            except Exception as e:  # noqa: BLE001 - only running out of memory is retried
                if not is_out_of_memory(e):
                    raise
                tried.append(f"{way}: {type(e).__name__}: {str(e)[:200]}")
                self.free_memory()
        raise OutOfMemory("out of memory for this image (" + "; ".join(tried) + ")")

    def cpu_segmenter(self) -> "FastSAMSegmenter":
        if self._cpu_segmenter is None:
            from dataclasses import replace

            self._cpu_segmenter = FastSAMSegmenter(replace(self.settings, device="cpu", half=False), self.storage)
        return self._cpu_segmenter

    def free_memory(self) -> None:
        import gc

        gc.collect()
        if self.segmenter.device.type == "cuda":
            self.segmenter.torch.cuda.empty_cache()


class OutOfMemory(RuntimeError):
    """An image that ran out of memory however it was processed."""


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def prompt_record(index: int, prompt: dict, num_masks: int, error: str | None) -> dict:
    """One entry of a row's ``prompts`` list (see schema.PROMPT_TYPE)."""
    kind = prompt.get("kind")
    return {"index": index, "kind": kind, "id": prompt.get("id"), "category_id": prompt.get("category_id"),
            "text": prompt.get("text") if kind == "text" else None,
            "box": prompt.get("box") if kind == "box" else None,
            "points": prompt.get("points") if kind == "points" else None,
            "labels": prompt.get("labels") if kind == "points" else None,
            "num_masks": num_masks, "error": error}
