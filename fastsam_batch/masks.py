"""Mask geometry: FastSAM's retina masks computed inside each box only, plus box helpers.

ultralytics' ``process_mask_native`` upsamples every prototype-resolution mask to the full
image (bilinear, after cropping the letterbox padding) and then zeroes it outside its box.
Bilinear resizing is separable, so the whole chain is ``R_y @ M @ R_x^T`` with one row operator
``R_y`` (H x mh) and one column operator ``R_x`` (W x mw) per image. Taking only the rows and
columns of ``R_y``/``R_x`` inside a box gives that box's crop exactly, at a cost proportional
to the box, never materialising a full-resolution mask. The operators are built by running the
very same ``torch.nn.functional.interpolate`` calls ultralytics runs, on identity matrices.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .quality import stability_counts, stability_counts_host, stability_score
from .rle import crop_intervals


def _axis_operator(m: int, f: int, top: int, bottom: int, out: int, device, dtype) -> torch.Tensor:
    """(out x m) matrix: upsample by ``f``, keep [top, bottom), resize to ``out`` (bilinear, like ultralytics)."""
    eye = torch.eye(m, device=device, dtype=dtype).view(1, m, m, 1)  # m channels, each a unit column
    x = F.interpolate(eye, scale_factor=f, mode="bilinear") if f > 1 else eye
    x = x[:, :, top:bottom, :1]
    x = F.interpolate(x, size=(out, 1), mode="bilinear")
    return x[0, :, :, 0].T.contiguous()


def native_mask_operators(mh: int, mw: int, h: int, w: int, device=None, dtype=torch.float32):
    """Row and column operators reproducing ``ultralytics.utils.ops.process_mask_native`` upsampling.

    ``mh, mw``: prototype size (the letterboxed input / 4); ``h, w``: the original image size.
    """
    gain = min(4 * mh / h, 4 * mw / w)
    pad = (4 * mh - max(round(h * gain), 1)) | (4 * mw - max(round(w * gain), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    ih, iw = f * mh, f * mw  # scale_masks' input size
    g = min(ih / h, iw / w)
    pad_w, pad_h = (iw - max(round(w * g), 1)) / 2, (ih - max(round(h * g), 1)) / 2
    top, left = round(pad_h - 0.1), round(pad_w - 0.1)
    bottom, right = top + max(round(h * g), 1), left + max(round(w * g), 1)
    ry = _axis_operator(mh, f, top, bottom, h, device, dtype)
    rx = _axis_operator(mw, f, left, right, w, device, dtype)
    return ry, rx


def box_pixel_span(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Integer pixel range [a, b) of pixels p with lo <= p < hi (ultralytics' ``crop_mask`` rule)."""
    a = min(max(math.ceil(lo), 0), size)
    b = min(max(math.ceil(hi), 0), size)
    return a, max(a, b)


def iter_box_mask_intervals(
    coeffs: torch.Tensor, protos: torch.Tensor, boxes: torch.Tensor, h: int, w: int, chunk_pixels: int = 1 << 21,
    masks_at_once: int = 1024, stability: bool = False,
) -> Iterator[tuple]:
    """For each mask, ``(index, starts, ends)``: its pixels as column-major [start, end) intervals;
    with ``stability``, ``(index, starts, ends, stability score)`` (:mod:`.quality`: on the logits
    of the box crop).

    The masks are ultralytics' retina masks (``process_mask_native``: prototype logits resized to
    the original image, cropped to the box, > 0) for ``coeffs`` (n x c) over ``protos``
    (c x mh x mw) and xyxy ``boxes`` in original-image pixels. Each mask is computed inside its
    box only, in chunks of columns of at most ``chunk_pixels`` pixels, and turned into intervals
    at once, so memory stays bounded whatever the image size and the number of masks (prototype
    logits are made ``masks_at_once`` masks at a time). Only the
    band of prototype rows and columns the box's operator rows touch enters the two matrix
    products, which BLAS runs far faster than per-pixel gathers.
    """
    c, mh, mw = protos.shape
    ry, rx = native_mask_operators(mh, mw, h, w, device=protos.device)
    # Each operator row is non-zero on a narrow band of prototype rows/columns: [lo, hi).
    nz_y, nz_x = ry != 0, rx != 0
    y_lo, y_hi = nz_y.float().argmax(1), mh - nz_y.flip(1).float().argmax(1)
    x_lo, x_hi = nz_x.float().argmax(1), mw - nz_x.flip(1).float().argmax(1)
    flat = protos.float().view(c, -1)
    logits = None
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        if i % masks_at_once == 0:
            logits = (coeffs[i:i + masks_at_once].float() @ flat).view(-1, mh, mw)
        m = logits[i % masks_at_once]
        c0, c1 = box_pixel_span(x1, x2, w)
        r0, r1 = box_pixel_span(y1, y2, h)
        if r1 <= r0 or c1 <= c0:
            yield (i, np.empty(0, np.int64), np.empty(0, np.int64)) + ((np.float32(0),) if stability else ())
            continue
        k0, k1 = int(y_lo[r0:r1].min()), int(y_hi[r0:r1].max())
        j0, j1 = int(x_lo[c0:c1].min()), int(x_hi[c0:c1].max())
        rows = ry[r0:r1, k0:k1] @ m[k0:k1, j0:j1]  # box rows at prototype column resolution
        step = max(1, chunk_pixels // (r1 - r0))
        starts, ends = [], []
        inter = union = 0
        for a in range(c0, c1, step):
            b = min(a + step, c1)
            crop = rows @ rx[a:b, j0:j1].T  # BLAS: dense over the band, cheap per pixel
            if stability:
                hi, lo = stability_counts_host(crop.numpy()) if crop.device.type == "cpu" else map(int, stability_counts(crop))
                inter, union = inter + hi, union + lo
            s, e = crop_intervals(crop > 0, a, r0, h)
            starts.append(s)
            ends.append(e)
        if stability:
            yield i, np.concatenate(starts), np.concatenate(ends), stability_score(inter, union)[()]
        else:
            yield i, np.concatenate(starts), np.concatenate(ends)


def adjust_full_image_boxes(boxes: torch.Tensor, h: int, w: int, threshold: int = 20, iou_thresh: float = 0.9) -> torch.Tensor:
    """FastSAM's rule: a box that, snapped to the border within ``threshold`` px, covers the image
    with IoU > 0.9 becomes exactly the full-image box. Returns a new tensor of ``boxes``' dtype.
    Element-wise selects only (no boolean-mask assignment, which would synchronise an accelerator
    with the host).

    As ``FastSAMPredictor.postprocess`` does it in any dtype (fp16 under ``model.half()``): the
    snapping in the boxes' own dtype (``adjust_bboxes_to_image_border`` assigns in place, so the
    border values are ``w`` and ``h`` rounded to it), the IoU in float32 (``box_iou`` calls
    ``.float()``: in fp16 a box's area overflows past 65504, about 256 x 256 pixels), the full-image
    box written back in the boxes' dtype."""
    if boxes.numel() == 0:
        return boxes.clone()
    zero = boxes.new_zeros(())
    bw, bh = boxes.new_full((), w), boxes.new_full((), h)  # w, h rounded to the boxes' dtype, as assigned
    x1 = torch.where(boxes[:, 0] < threshold, zero, boxes[:, 0]).float()
    y1 = torch.where(boxes[:, 1] < threshold, zero, boxes[:, 1]).float()
    x2 = torch.where(boxes[:, 2] > w - threshold, bw, boxes[:, 2]).float()
    y2 = torch.where(boxes[:, 3] > h - threshold, bh, boxes[:, 3]).float()
    zf = x1.new_zeros(())
    # box_iou(full[None], adjusted): full = [0, 0, w, h] in float32
    inter = (torch.minimum(x2, zf + w) - torch.maximum(x1, zf)).clamp(min=0) * \
        (torch.minimum(y2, zf + h) - torch.maximum(y1, zf)).clamp(min=0)
    area = (x2 - x1) * (y2 - y1)
    iou = inter / ((zf + w) * (zf + h) + area - inter + 1e-7)
    full = torch.stack([zero, zero, bw, bh])  # made on the device: no copy from the host
    return torch.where((iou > iou_thresh)[:, None], full, boxes)


def box_pixel_spans(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """:func:`box_pixel_span` of every xyxy box at once: ``(n, 4)`` int64 ``r0, r1, c0, c1``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    c0 = np.clip(np.ceil(b[:, 0]), 0, w)
    c1 = np.maximum(c0, np.clip(np.ceil(b[:, 2]), 0, w))
    r0 = np.clip(np.ceil(b[:, 1]), 0, h)
    r1 = np.maximum(r0, np.clip(np.ceil(b[:, 3]), 0, h))
    return np.stack([r0, r1, c0, c1], 1).astype(np.int64)


# ``budget_pixels`` of the batched path, in device bytes: a chunk's intermediates (all of them, see
# _chunk_bytes) stay within budget_pixels * BYTES_PER_CROP_PIXEL bytes (tests/test_masks.py measures).
BYTES_PER_CROP_PIXEL = 16
# Device bytes per crop pixel (a float32 crop, three bool masks and the int8 columns at once; later
# the int8 transitions and their int32 running count) and per transition slot (its int64 position,
# mask, column, row and key, with the temporaries that compute them, and the (2, slot) result).
_PIXEL_BYTES, _SLOT_BYTES = 8, 96
# First guess of a chunk's transitions per mask column (two per run: blob-shaped masks have one or
# two runs a column); a chunk with more is computed again with its exact count (see below).
GUESS_PER_COLUMN = 8


def to_device(a: np.ndarray, device) -> torch.Tensor:
    """A host array on ``device`` without synchronising: on CUDA copied from pinned memory,
    asynchronously (a copy from pageable memory, or a blocking one, waits for the stream)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


_OPERATORS: dict = {}
_OPERATORS_KEPT = 16


def cached_mask_operators(mh: int, mw: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`native_mask_operators`, kept for the last few (prototype size, image size, device):
    photos of a collection share a few sizes, so a batch rarely rebuilds them."""
    key = (mh, mw, h, w, str(device))
    ops = _OPERATORS.pop(key, None)
    if ops is None:
        ops = native_mask_operators(mh, mw, h, w, device=device)
    _OPERATORS[key] = ops  # most recently used last
    while len(_OPERATORS) > _OPERATORS_KEPT:
        _OPERATORS.pop(next(iter(_OPERATORS)))
    return ops


def batched_box_mask_intervals(
    jobs: list[tuple[torch.Tensor, torch.Tensor, np.ndarray, int, int]], budget_pixels: int = 1 << 26,
) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """The accelerator form of :func:`iter_box_mask_intervals`, for a whole batch: per image, per
    mask, ``(starts, ends)``, the same intervals.

    ``jobs``: per image ``(coeffs (n x c), protos (c x mh x mw), boxes (n x 4, xyxy, on the host),
    h, w)``, tensors on the device. Masks are computed in chunks of similar box sizes, each chunk
    in a few large operations: its prototype logits (one matrix product), the rows and columns of
    the retina operators inside each box (gathers, every crop padded to the chunk's largest), two
    batched matrix products, the threshold with the box's own extent, and the column-major
    transitions of every crop. A chunk's intermediates (crops, operator rows, prototype logits,
    transition slots) stay within ``budget_pixels * BYTES_PER_CROP_PIXEL`` bytes of device memory,
    whatever the number and size of the masks: a box too large for the budget is cut into column
    ranges (a mask's intervals are column by column, so its pieces' intervals follow each other). The
    batch's results come on top: 16 bytes per guessed transition (about 8 per mask column).

    Host synchronisations: one per batch, two when a chunk has more transitions than guessed. The
    chunk plan (from the boxes, already on the host) goes to the device in one asynchronous copy;
    each chunk's transitions are gathered into a slot of a guessed size without asking the device
    how many there are (a running count and ``searchsorted``: no ``nonzero``); the counts and
    positions of the whole batch come to the host in one copy. A chunk whose count exceeded its
    slot is computed again with a slot of its exact count, and those come back in one more copy (computed in ranges of transitions within the budget).
    """
    return collect_box_masks(launch_box_masks(jobs, budget_pixels))


@dataclass
class LaunchedMasks:
    """The device work of :func:`batched_box_mask_intervals`, queued and not waited for."""

    jobs: list
    offsets: list  # per image: (first key, masks)
    keys: int
    plan: torch.Tensor | None = None
    plans: list = field(default_factory=list)
    slots: list = field(default_factory=list)
    budget: int = 0  # device bytes per chunk
    flats: list = field(default_factory=list)  # per job, its prototypes in float32 (a view when they are)
    found: torch.Tensor | None = None  # counts of every chunk, [stability counts,] then each chunk's (2, slot) keys and positions
    stability: bool = False  # stability counts made on the device and copied back with the transitions
    chunk_keys: np.ndarray | None = None  # the batch key of each row of the plan (chunk by chunk), on the host
    scores: list = field(default_factory=list)  # after collect: per image, each mask's stability score (float32)
    host: np.ndarray | None = None  # after fetch_box_masks: ``found`` copied to the host (``found`` let go)


def launch_box_masks(jobs: list, budget_pixels: int = 1 << 26, stability: bool = False) -> LaunchedMasks:
    """Everything of :func:`batched_box_mask_intervals` up to the copy back to the host: the plan
    from the host's boxes, its asynchronous copy to the device, every chunk's operations. Never
    waits for the device (tests/test_cuda.py runs it under ``torch.cuda.set_sync_debug_mode("error")``).
    ``stability`` (off by default, as in :func:`iter_box_mask_intervals`): each mask's stability
    counts (:mod:`.quality`) are made too, and travel in the same copy back (no wait more);
    :func:`collect_box_masks` leaves the scores in ``scores`` (NaN without ``stability``)."""
    offsets = []
    plans = []  # per chunk: (job index, first row of the plan table, count, crop height, crop width)
    table = []  # per mask (or column range of one) of a chunk: r0, r1, c0, c1, index in its image, key in the batch
    key0 = rows = 0
    device = None
    budget = max(1, budget_pixels) * BYTES_PER_CROP_PIXEL
    for j, (coeffs, protos, boxes, h, w) in enumerate(jobs):
        n = coeffs.shape[0]
        offsets.append((key0, n))
        if n:
            device = protos.device
            c, mh, mw = protos.shape
            spans = _pieces(box_pixel_spans(boxes, h, w), budget, c, mh, mw)  # r0, r1, c0, c1, mask
            hc, wc = spans[:, 1] - spans[:, 0], spans[:, 3] - spans[:, 2]
            for idx in _chunks_by_size(hc, wc, budget, c, mh, mw):
                idx = np.asarray(idx, np.int64)
                table.append(np.concatenate([spans[idx], (spans[idx, 4] + key0)[:, None]], 1))
                plans.append((j, rows, len(idx), int(hc[idx].max()), int(wc[idx].max())))
                rows += len(idx)
        key0 += n
    out = LaunchedMasks(jobs, offsets, key0, budget=budget, stability=stability,
                        flats=[p.float().view(p.shape[0], -1) if c.shape[0] else None for c, p, *_ in jobs])
    if plans:
        host_plan = np.concatenate(table)
        out.plan = to_device(host_plan, device)  # the one copy of the plan to the device
        out.chunk_keys = host_plan[:, 5]
        out.plans = plans
        out.slots = [_guessed_slot(k, hc, wc) for _, _, k, hc, wc in plans]
        found = [_chunk_transitions(jobs, out.plan, p, s, flats=out.flats, stability=stability)
                 for p, s in zip(plans, out.slots)]
        counts = [torch.stack([c for c, _, _ in found])]
        stab = [torch.cat([st.flatten() for _, _, st in found])] if stability else []
        out.found = torch.cat(counts + stab + [torch.cat([kp.flatten() for _, kp, _ in found])])
    return out


def fetch_box_masks(launched: LaunchedMasks) -> LaunchedMasks:
    """The end of the device's part of :func:`launch_box_masks`' work: its results copied to the host
    in one copy (the one wait for the device), the device's copy let go. An actor runs this under its
    device lock and :func:`collect_box_masks` (host work: sorting and splitting) outside it."""
    if launched.plans and launched.host is None:
        launched.host = launched.found.cpu().numpy()  # the one copy back
        launched.found = None
    return launched


def collect_box_masks(launched: LaunchedMasks, lock=None) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """The intervals of :func:`launch_box_masks`' work: one copy to the host (:func:`fetch_box_masks`,
    done here unless done already; two when a chunk had more transitions than its slot, computed again
    with its exact count). The rest is host work (numpy). ``lock``: held (a context manager) around
    the device work this does (the copy back when not fetched yet, and the rare second pass), not
    around the host work, so that a device lock is free while the host sorts."""
    hold = lock if lock is not None else contextlib.nullcontext()
    jobs, plans, slots = launched.jobs, launched.plans, launched.slots
    key_pos = np.empty((2, 0), np.int64)
    inter = np.zeros(launched.keys, np.int64)
    union = np.zeros(launched.keys, np.int64)
    if plans:
        if launched.host is None:
            with hold:
                fetch_box_masks(launched)
        both = launched.host
        counts, rest = both[:len(plans)], both[len(plans):]
        if launched.stability:  # per chunk: its k intersections, then its k unions
            rows = len(launched.chunk_keys)
            stab, rest = rest[:2 * rows], rest[2 * rows:]
            at = 0
            for _, first, k, _, _ in plans:
                keys = launched.chunk_keys[first:first + k]
                np.add.at(inter, keys, stab[at:at + k])  # a mask cut into column ranges: its pieces summed
                np.add.at(union, keys, stab[at + k:at + 2 * k])
                at += 2 * k
        bounds = np.concatenate([[0], np.cumsum(2 * np.asarray(slots))])
        parts = [rest[bounds[i]:bounds[i + 1]].reshape(2, -1)[:, :counts[i]] for i in range(len(plans))]
        over = [i for i in range(len(plans)) if counts[i] > slots[i]]
        if over:  # a second pass, only for chunks with more transitions than guessed: exact slots
            with hold:  # device work again: under the lock
                again = []
                for i in over:  # in ranges of transitions whose slots keep the chunk within the budget
                    j, _, k, hc, wc = plans[i]
                    c, mh, mw = jobs[j][1].shape
                    step = max(1, (launched.budget - _chunk_bytes(k, hc, wc, c, mh, mw, 0)) // _SLOT_BYTES)
                    again.append(torch.cat([_chunk_transitions(jobs, launched.plan, plans[i], min(step, int(counts[i]) - a),
                                                               a, launched.flats)[1]
                                            for a in range(0, int(counts[i]), step)], 1))
                back = torch.cat([kp.flatten() for kp in again]).cpu().numpy()
                del again
            at = 0
            for i in over:
                parts[i] = back[at:at + 2 * counts[i]].reshape(2, -1)
                at += 2 * counts[i]
        key_pos = np.concatenate(parts, 1)
    key, pos = key_pos[0], key_pos[1]
    order = np.argsort(key, kind="stable")  # within a mask, positions stay in column-major order
    key, pos = key[order], pos[order]
    bounds = np.searchsorted(key, np.arange(launched.keys + 1))
    out = []
    scores = stability_score(inter, union) if launched.stability else np.full(launched.keys, np.nan, np.float32)
    launched.scores = [scores[first:first + n] for first, n in launched.offsets]
    for first, n in launched.offsets:
        masks = []
        for i in range(first, first + n):
            p = pos[bounds[i]:bounds[i + 1]]
            masks.append((p[0::2], p[1::2]))
        out.append(masks)
    return out


def _chunk_transitions(jobs, plan: torch.Tensor, chunk: tuple, slot: int, skip: int = 0,
                       flats: list | None = None,
                       stability: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk of :func:`batched_box_mask_intervals`, all on the device: (how many transitions it
    has, a 0-d tensor; ``(2, slot)``: the batch key and pixel position of its first ``slot``
    transitions after the first ``skip``, mask by mask, column by column, row by row; with
    ``stability``, ``(2, k)``: each row's stability intersection and union counts inside its crop
    (a mask cut into column ranges has a row per range: the caller sums them), else None).
    ``flats``: each job's prototypes in float32, (c, mh * mw). Its memory is :func:`_chunk_bytes` at
    most: each intermediate is let go once used."""
    j, first, k, Hc, Wc = chunk
    coeffs, protos, _, h, w = jobs[j]
    flat = protos.view(protos.shape[0], -1) if flats is None else flats[j]
    device = protos.device
    c, mh, mw = protos.shape
    ry, rx = cached_mask_operators(mh, mw, h, w, device)
    sp = plan[first:first + k]
    r0, c0 = sp[:, 0], sp[:, 2]
    ar_h, ar_w = torch.arange(Hc, device=device), torch.arange(Wc, device=device)
    ry_sel = ry[(r0[:, None] + ar_h).clamp_(max=h - 1)]  # (k, Hc, mh)
    rx_sel = rx[(c0[:, None] + ar_w).clamp_(max=w - 1)]  # (k, Wc, mw)
    logits = (coeffs[sp[:, 4]].float() @ flat).view(k, mh, mw)
    crop = torch.bmm(torch.bmm(ry_sel, logits), rx_sel.transpose(1, 2))  # (k, Hc, Wc)
    del ry_sel, rx_sel, logits
    inside = (ar_h[None, :] < (sp[:, 1] - r0)[:, None])[:, :, None] & \
             (ar_w[None, :] < (sp[:, 3] - c0)[:, None])[:, None, :]
    stab = torch.stack(stability_counts(crop, inside)) if stability else None  # (2, k), on the device
    on = ((crop > 0) & inside).transpose(1, 2).to(torch.int8)  # (k, Wc, Hc): column-major
    del crop, inside
    on = torch.nn.functional.pad(on, (1, 1))
    d = on.diff(dim=2).ne_(0).flatten()  # where a run starts or ends
    del on
    seen = d.cumsum(0, dtype=torch.int32)  # transitions up to each element
    count = seen[-1].to(torch.int64)
    # The i-th transition is the first element whose running count reaches i + 1 (past the end: none).
    f = torch.searchsorted(seen, torch.arange(skip + 1, skip + slot + 1, device=device, dtype=torch.int32))
    f.clamp_(max=d.numel() - 1)
    del seen, d
    per_mask, per_col = Wc * (Hc + 1), Hc + 1
    m = f // per_mask
    f -= m * per_mask
    col = f // per_col
    f -= col * per_col  # the row
    pos = c0[m].add_(col).mul_(h).add_(r0[m]).add_(f)
    del col, f
    return count, torch.stack([sp[:, 5][m], pos]), stab


def _guessed_slot(k: int, hc: int, wc: int) -> int:
    """A chunk's first guess of its transitions (at most one per element of its padded columns)."""
    return min(k * wc * (hc + 1), k * wc * GUESS_PER_COLUMN + 64)


def _chunk_bytes(k: int, hc: int, wc: int, c: int, mh: int, mw: int, slot: int | None = None) -> int:
    """Device bytes a chunk of ``k`` crops of ``hc`` x ``wc`` (padded) needs at most in
    :func:`_chunk_transitions`: the prototype logits, operator rows and first product (with the
    coefficients and the gather indices), then the crop pixels, then the
    transition slots (``slot``; its first guess when None). A bound, measured in tests/test_masks.py."""
    slot = _guessed_slot(k, hc, wc) if slot is None else slot
    rows = 4 * k * (mh * mw + hc * mh + wc * mw + hc * mw) + 8 * k * (hc + wc + c)
    return rows + _PIXEL_BYTES * k * wc * (hc + 2) + 4 * k * hc * wc + _SLOT_BYTES * slot


def _pieces(spans: np.ndarray, budget: int, c: int, mh: int, mw: int) -> np.ndarray:
    """``spans`` (r0, r1, c0, c1 per mask) with the mask's index appended, a box too large for the
    budget on its own cut into column ranges that fit (at least a column each), in column order."""
    idx = np.arange(len(spans))
    hc, wc = spans[:, 1] - spans[:, 0], spans[:, 3] - spans[:, 2]
    big = [i for i in range(len(spans)) if hc[i] > 0 and wc[i] > 0 and _chunk_bytes(1, hc[i], wc[i], c, mh, mw) > budget]
    if not big:
        return np.concatenate([spans, idx[:, None]], 1)
    rows = []
    for i in range(len(spans)):
        r0, r1, c0, c1 = spans[i].tolist()
        if i not in big:
            rows.append([r0, r1, c0, c1, i])
            continue
        lo, hi = 1, c1 - c0  # the widest range that fits: bisection on the width
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if _chunk_bytes(1, r1 - r0, mid, c, mh, mw) <= budget else (lo, mid - 1)
        rows += [[r0, r1, a, min(a + lo, c1), i] for a in range(c0, c1, lo)]
    return np.asarray(rows, np.int64)


def _chunks_by_size(hc: np.ndarray, wc: np.ndarray, budget: int, c: int, mh: int, mw: int) -> list[list[int]]:
    """Indices of the non-empty boxes (or pieces) in chunks of similar crop sizes, each chunk's
    :func:`_chunk_bytes` (padded to its largest height and width) within ``budget`` bytes (a piece
    that alone is over it, only when a single column is, is a chunk of its own). Pieces of one mask
    are of one size but the last, so they keep their column order."""
    nonempty = np.flatnonzero((hc > 0) & (wc > 0))
    order = nonempty[np.argsort(-(hc[nonempty] * wc[nonempty]), kind="stable")]
    chunks, cur, ch, cw = [], [], 0, 0
    for i in order.tolist():
        nh, nw = max(ch, int(hc[i])), max(cw, int(wc[i]))
        if cur and _chunk_bytes(len(cur) + 1, nh, nw, c, mh, mw) > budget:
            chunks.append(cur)
            cur, nh, nw = [], int(hc[i]), int(wc[i])
        cur.append(i)
        ch, cw = nh, nw
    if cur:
        chunks.append(cur)
    return chunks
