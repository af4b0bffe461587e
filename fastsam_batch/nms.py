"""Non-maximum suppression of a whole batch in one torchvision call, on the model's device.

ultralytics' ``non_max_suppression`` loops over the images of a batch, and calls torchvision's
NMS only when ``torchvision`` happens to be imported already; otherwise it runs its own
pure-torch loop (``TorchNMS.nms``), about 30x slower on a CPU. :func:`batched_nms` keeps
ultralytics' rules for a class-agnostic FastSAM model (candidates above ``conf``, xywh -> xyxy,
best class, at most ``max_nms`` candidates per image by score, greedy NMS at ``iou``, at most
``max_det`` kept per image, best score first) and runs the greedy NMS of every image of the batch
in one ``torchvision.ops.nms`` call: each image's boxes are moved to their own region of the
plane, so boxes of different images never overlap. The moved boxes are held in float64, in which
the move is exact, so the IoUs are those of each image's own boxes (to float rounding); the keeps
equal per-image NMS (tests). The host waits for the device three times per batch, whatever its
images: for the candidates above ``conf`` (``nonzero``), in torchvision's NMS (its CUDA kernel
copies its overlap mask to the host) and for the counts kept per image; no boolean indexing, and
the counts by ``index_add_`` into known bins, not ``torch.bincount`` (two more waits on CUDA)
(tests/test_syncs.py).
"""

from __future__ import annotations

import torch
import torchvision  # imported with the model: NMS always runs on torchvision's kernels
from ultralytics.utils.ops import xywh2xyxy  # the reference's own box conversion

MAX_NMS = 30_000  # ultralytics' cap on candidates per image entering NMS


def batched_nms(prediction: torch.Tensor, conf: float, iou: float, max_det: int, nc: int,
                max_nms: int = MAX_NMS) -> list[torch.Tensor]:
    """Per image, ``(n, 6 + extra)`` rows ``x1, y1, x2, y2, score, class, mask coefficients...``,
    best score first, as ``ultralytics.utils.nms.non_max_suppression(prediction, conf, iou,
    agnostic=True, max_det=max_det, nc=nc)`` gives them. ``prediction``: ``(batch, 4 + nc + extra,
    anchors)``, the model's raw output."""
    bs = prediction.shape[0]
    mi = 4 + nc
    p = prediction.transpose(1, 2)  # (batch, anchors, channels)
    b, a = (p[..., 4:mi].amax(-1) > conf).nonzero(as_tuple=True)  # image-major, anchor order
    x = p[b, a]
    score, cls = x[:, 4:mi].max(1, keepdim=True)
    x = torch.cat((xywh2xyxy(x[:, :4]), score, cls.to(x.dtype), x[:, mi:]), 1)
    if x.shape[0] > max_nms:  # some image may have more candidates than NMS takes: its best max_nms
        by_score = x[:, 4].argsort(descending=True, stable=True)
        by_image = by_score[b[by_score].argsort(stable=True)]
        x, b = x[by_image], b[by_image]
        # The others go to a group of their own past the last image (their own region of the plane,
        # so they suppress nothing), dropped after NMS: no boolean indexing, which would wait for
        # the device.
        b = torch.where(_rank_within(b, bs) < max_nms, b, bs)
    if x.shape[0] == 0:
        return [x.new_zeros((0, x.shape[1])) for _ in range(bs)]
    boxes = x[:, :4].double()
    span = (boxes.max() - boxes.min() + 1).clamp(min=1)
    moved = boxes + (b.double() * span)[:, None]
    keep = torchvision.ops.nms(moved, x[:, 4].double(), iou)  # best score first, all images
    keep = keep[b[keep].argsort(stable=True)]  # image by image, each best score first
    counts = _count_groups(b[keep], bs + 1).tolist()  # the host's one look at the result
    return [kept[:max_det] for kept in torch.split(x[keep], counts)[:bs]]


def _rank_within(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Position of each element within its group, for ``groups`` sorted (0..n-1)."""
    counts = _count_groups(groups, n)
    first = torch.cumsum(counts, 0) - counts
    return torch.arange(groups.numel(), device=groups.device) - first[groups]


def _count_groups(groups: torch.Tensor, n: int) -> torch.Tensor:
    """``torch.bincount(groups, minlength=n)`` for ``groups`` in 0..n-1, without waiting for the
    device: CUDA's bincount reads its input's min and max on the host (two waits); an ``index_add_``
    into ``n`` known bins does not."""
    return torch.zeros(n, dtype=torch.int64, device=groups.device).index_add_(
        0, groups, torch.ones_like(groups, dtype=torch.int64))
