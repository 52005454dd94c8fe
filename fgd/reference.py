"""Plain-PyTorch float64 versions of every fgd op: the truth the kernels are tested against.

They are written for clarity, not speed: imitation_mask materialises the [B, A, G] IoU tensor that
the kernels avoid. Each returns float64 (or bool) whatever the input dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _extent(lo: Tensor, hi: Tensor, offset: float) -> Tensor:
    # An inverted interval has length 0 whatever the offset (see csrc/box.h).
    return torch.where(hi >= lo, hi - lo + offset, torch.zeros_like(lo))


def _overlap(lo: Tensor, hi: Tensor, offset: float) -> Tensor:
    # max(0, hi - lo + offset): adding before clamping is the legacy formula with offset 1 (the
    # official FGFI code, mmcv's bbox_overlaps; see csrc/box.h).
    return (hi - lo + offset).clamp_min(0.0)


def box_area(boxes: Tensor, offset: float = 0.0) -> Tensor:
    b = boxes.double()
    return _extent(b[..., 0], b[..., 2], offset) * _extent(b[..., 1], b[..., 3], offset)


def box_iou(boxes1: Tensor, boxes2: Tensor, *, offset: float = 0.0) -> Tensor:
    """[..., N, 4] x [..., M, 4] -> float64 [..., N, M]; 0 where the union is empty."""
    a = boxes1.double()[..., :, None, :]
    b = boxes2.double()[..., None, :, :]
    iw = _overlap(torch.maximum(a[..., 0], b[..., 0]), torch.minimum(a[..., 2], b[..., 2]), offset)
    ih = _overlap(torch.maximum(a[..., 1], b[..., 1]), torch.minimum(a[..., 3], b[..., 3]), offset)
    inter = iw * ih
    union = box_area(boxes1, offset)[..., :, None] + box_area(boxes2, offset)[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def imitation_mask(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_counts: Tensor,
    feat_size: Sequence[int],
    *,
    thresh: float = 0.5,
    offset: float = 0.0,
) -> Tensor:
    """The FGFI rule exactly as the official code states it -> bool [B, H, W]."""
    B, G = gt_boxes.shape[0], gt_boxes.shape[1]
    H, W = feat_size
    if anchors.dim() == 2:
        anchors = anchors.expand(B, *anchors.shape)
    iou = box_iou(anchors, gt_boxes, offset=offset)  # [B, A, G]
    valid = torch.arange(G, device=gt_boxes.device)[None, :] < gt_counts.to(gt_boxes.device)[:, None]
    iou = torch.where(valid[:, None, :], iou, 0.0)
    best = iou.amax(dim=1, keepdim=True) if iou.shape[1] > 0 else iou.sum(dim=1, keepdim=True)
    passes = (iou > thresh * best) & valid[:, None, :]
    K = anchors.shape[-2] // (H * W)
    return passes.any(dim=2).view(B, H, W, K).any(dim=3)


def imitation_loss(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """sum mask * sum_c (s - t)^2 / (2 N_p) in float64, 0 (with zero gradients) when N_p = 0.

    Differentiable through autograd: the gradients of this function are the reference gradients.
    Unmasked locations contribute nothing, even where the features are not finite.
    """
    w = mask.double()
    on = (w != 0)[:, None]
    # Selecting before squaring keeps both the value and the gradients clean of unmasked values.
    diff = torch.where(on, student.double() - teacher.double(), 0.0)
    per_loc = w * diff.pow(2).sum(dim=1)
    n_pos = w.sum()
    return torch.where(n_pos > 0, per_loc.sum() / (2 * n_pos.clamp_min(1e-300)), per_loc.sum() * 0)


def masked_adapt_loss(student: Tensor, teacher: Tensor, mask: Tensor, weight: Tensor, bias=None,
                      *, relu: bool = False) -> Tensor:
    """imitation_loss(act(conv2d(student, weight, bias, padding=k // 2)), teacher, mask) in float64,
    the dense composition fgd.ops.masked_adapt_loss computes at the masked locations only."""
    import torch.nn.functional as F

    b = None if bias is None else bias.double()
    B, _, H, W = student.shape
    k = weight.shape[-1]
    if B * H * W == 0:  # conv2d refuses an empty map; the loss of one is 0 (nothing is masked)
        y = weight.double().sum() * 0 + student.double().sum() * 0 + teacher.new_zeros(
            (B, weight.shape[0], H, W), dtype=torch.float64)
    else:
        # Features no masked location sees are zeroed: the same values and gradients for finite
        # features, and non-finite ones there count for nothing (as in imitation_loss), rather than
        # reaching the weight's gradient as 0 * NaN through the dense conv.
        on = (mask != 0).double()[:, None]
        seen = (F.max_pool2d(on, k, stride=1, padding=k // 2) if k > 1 else on) > 0
        y = F.conv2d(torch.where(seen, student.double(), 0.0), weight.double(), b, padding=k // 2)
    return imitation_loss(y.relu() if relu else y, teacher.double(), mask)
