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

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

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
    masks_at_once: int = 1024,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """For each mask, ``(index, starts, ends)``: its pixels as column-major [start, end) intervals.

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
            yield i, np.empty(0, np.int64), np.empty(0, np.int64)
            continue
        k0, k1 = int(y_lo[r0:r1].min()), int(y_hi[r0:r1].max())
        j0, j1 = int(x_lo[c0:c1].min()), int(x_hi[c0:c1].max())
        rows = ry[r0:r1, k0:k1] @ m[k0:k1, j0:j1]  # box rows at prototype column resolution
        step = max(1, chunk_pixels // (r1 - r0))
        starts, ends = [], []
        for a in range(c0, c1, step):
            b = min(a + step, c1)
            crop = (rows @ rx[a:b, j0:j1].T) > 0  # BLAS: dense over the band, cheap per pixel
            s, e = crop_intervals(crop, a, r0, h)
            starts.append(s)
            ends.append(e)
        yield i, np.concatenate(starts), np.concatenate(ends)


def adjust_full_image_boxes(boxes: torch.Tensor, h: int, w: int, threshold: int = 20, iou_thresh: float = 0.9) -> torch.Tensor:
    """FastSAM's rule: a box that, snapped to the border within ``threshold`` px, covers the image
    with IoU > 0.9 becomes exactly the full-image box. Returns a new tensor."""
    if boxes.numel() == 0:
        return boxes.clone()
    snapped = boxes.clone()
    snapped[snapped[:, 0] < threshold, 0] = 0
    snapped[snapped[:, 1] < threshold, 1] = 0
    snapped[snapped[:, 2] > w - threshold, 2] = w
    snapped[snapped[:, 3] > h - threshold, 3] = h
    full = torch.tensor([0.0, 0.0, float(w), float(h)], device=boxes.device, dtype=boxes.dtype)
    inter_w = (torch.minimum(snapped[:, 2], full[2]) - torch.maximum(snapped[:, 0], full[0])).clamp(min=0)
    inter_h = (torch.minimum(snapped[:, 3], full[3]) - torch.maximum(snapped[:, 1], full[1])).clamp(min=0)
    inter = inter_w * inter_h
    area = (snapped[:, 2] - snapped[:, 0]) * (snapped[:, 3] - snapped[:, 1])
    iou = inter / (area + w * h - inter + 1e-7)
    out = boxes.clone()
    out[iou > iou_thresh] = full
    return out


def box_pixel_spans(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """:func:`box_pixel_span` of every xyxy box at once: ``(n, 4)`` int64 ``r0, r1, c0, c1``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    c0 = np.clip(np.ceil(b[:, 0]), 0, w)
    c1 = np.maximum(c0, np.clip(np.ceil(b[:, 2]), 0, w))
    r0 = np.clip(np.ceil(b[:, 1]), 0, h)
    r1 = np.maximum(r0, np.clip(np.ceil(b[:, 3]), 0, h))
    return np.stack([r0, r1, c0, c1], 1).astype(np.int64)


# Device memory per crop pixel in a chunk: float32 crop, bool mask and int8 transitions, with room.
BYTES_PER_CROP_PIXEL = 12


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
    transitions of every crop (one ``nonzero``). A chunk holds at most ``budget_pixels`` crop
    pixels, so memory stays bounded whatever the number of masks. The transition positions of the
    whole batch come to the host in one copy; no step synchronises per mask or per image.
    """
    out: list[list[tuple[np.ndarray, np.ndarray]]] = []
    keys, positions = [], []
    offsets = []
    key0 = 0
    for coeffs, protos, boxes, h, w in jobs:
        n = coeffs.shape[0]
        offsets.append((key0, n))
        key0 += n
        if n == 0:
            continue
        device = protos.device
        c, mh, mw = protos.shape
        ry, rx = native_mask_operators(mh, mw, h, w, device=device)
        spans = box_pixel_spans(boxes, h, w)
        hc, wc = spans[:, 1] - spans[:, 0], spans[:, 3] - spans[:, 2]
        flat = protos.float().view(c, -1)
        for idx in _chunks_by_size(hc, wc, budget_pixels):
            k = len(idx)
            Hc, Wc = int(hc[idx].max()), int(wc[idx].max())
            sp = torch.from_numpy(spans[idx]).to(device, non_blocking=True)
            r0, c0 = sp[:, 0], sp[:, 2]
            ar_h, ar_w = torch.arange(Hc, device=device), torch.arange(Wc, device=device)
            ry_sel = ry[(r0[:, None] + ar_h).clamp_(max=h - 1)]  # (k, Hc, mh)
            rx_sel = rx[(c0[:, None] + ar_w).clamp_(max=w - 1)]  # (k, Wc, mw)
            sel = torch.from_numpy(np.asarray(idx)).to(device, non_blocking=True)
            logits = (coeffs[sel].float() @ flat).view(k, mh, mw)
            crop = torch.bmm(torch.bmm(ry_sel, logits), rx_sel.transpose(1, 2))  # (k, Hc, Wc)
            inside = (ar_h[None, :] < (sp[:, 1] - r0)[:, None])[:, :, None] & \
                     (ar_w[None, :] < (sp[:, 3] - c0)[:, None])[:, None, :]
            on = ((crop > 0) & inside).transpose(1, 2).to(torch.int8)  # (k, Wc, Hc): column-major
            d = torch.nn.functional.pad(on, (1, 1)).diff(dim=2)  # +1 where a run starts, -1 past its end
            j, col, row = d.nonzero(as_tuple=True)  # mask by mask, column by column, row by row
            positions.append((c0[j] + col) * h + r0[j] + row)
            keys.append(sel[j] + offsets[-1][0])
    if positions:
        both = torch.stack([torch.cat(keys), torch.cat(positions)]).cpu().numpy()  # the one copy to the host
        key, pos = both[0], both[1]
        order = np.argsort(key, kind="stable")  # within a mask, positions stay in column-major order
        key, pos = key[order], pos[order]
        bounds = np.searchsorted(key, np.arange(key0 + 1))
    else:
        pos, bounds = np.empty(0, np.int64), np.zeros(key0 + 1, np.int64)
    for first, n in offsets:
        masks = []
        for i in range(first, first + n):
            p = pos[bounds[i]:bounds[i + 1]]
            masks.append((p[0::2], p[1::2]))
        out.append(masks)
    return out


def _chunks_by_size(hc: np.ndarray, wc: np.ndarray, budget_pixels: int) -> list[list[int]]:
    """Indices of the non-empty boxes in chunks of similar crop sizes, each chunk's padded crops
    (count x largest height x largest width) within ``budget_pixels`` (a box larger than the budget
    is a chunk of its own)."""
    nonempty = np.flatnonzero((hc > 0) & (wc > 0))
    order = nonempty[np.argsort(-(hc[nonempty] * wc[nonempty]), kind="stable")]
    chunks, cur, mh, mw = [], [], 0, 0
    for i in order.tolist():
        nh, nw = max(mh, int(hc[i])), max(mw, int(wc[i]))
        if cur and (len(cur) + 1) * nh * nw > budget_pixels:
            chunks.append(cur)
            cur, nh, nw = [], int(hc[i]), int(wc[i])
        cur.append(i)
        mh, mw = nh, nw
    if cur:
        chunks.append(cur)
    return chunks
