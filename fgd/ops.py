"""The public ops: thin wrappers over torch.ops.fgd.* plus their fake (shape) and autograd rules.

The C++ side checks every tensor argument (TypeError for a dtype, ValueError for a shape or a
value); these wrappers only check what C++ cannot name well: arguments that are not tensors.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["box_iou", "imitation_mask", "imitation_loss"]


def _tensor(x, name: str, op: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"fgd.{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _number(x, name: str, op: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"fgd.{op}: {name} must be a number, got {type(x).__name__}")
    return float(x)


def box_iou(boxes1: Tensor, boxes2: Tensor, *, offset: float = 0.0) -> Tensor:
    """IoU of every box in ``boxes1`` [N, 4] with every box in ``boxes2`` [M, 4] -> [N, M].

    Batched inputs [B, N, 4] x [B, M, 4] give [B, N, M]. Boxes are (x1, y1, x2, y2); width is
    x2 - x1 + offset, with offset 0 (continuous coordinates, torchvision) or 1 (the legacy "+1 pixel"
    convention of the FGFI code and mmcv). Degenerate boxes have zero area; an empty union gives 0.
    float16/bfloat16 are computed in float32 and returned in their own dtype. Not differentiable.
    """
    _tensor(boxes1, "boxes1", "box_iou")
    _tensor(boxes2, "boxes2", "box_iou")
    return torch.ops.fgd.box_iou.default(boxes1, boxes2, _number(offset, "offset", "box_iou"))


def imitation_mask(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_counts: Tensor,
    feat_size: Sequence[int],
    *,
    thresh: float = 0.5,
    offset: float = 0.0,
) -> Tensor:
    """The FGFI imitation region of a batch -> bool [B, H, W].

    ``anchors`` [H*W*K, 4] (shared) or [B, H*W*K, 4], location-major (anchor (h*W + w)*K + k, as
    torchvision's AnchorGenerator orders one level); ``gt_boxes`` [B, G, 4] padded, of which the first
    ``gt_counts[b]`` rows of image b are real. For each real GT g, M_g is its best IoU over all anchors;
    location (h, w) is on when any of its K anchors has IoU > ``thresh`` * M_g for any g.
    """
    op = "imitation_mask"
    _tensor(anchors, "anchors", op)
    _tensor(gt_boxes, "gt_boxes", op)
    _tensor(gt_counts, "gt_counts", op)
    if isinstance(feat_size, torch.Size):
        feat_size = tuple(feat_size)
    if (
        not isinstance(feat_size, (tuple, list))
        or len(feat_size) != 2
        or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in feat_size)
    ):
        raise TypeError(f"fgd.{op}: feat_size must be a pair of ints (H, W), got {feat_size!r}")
    return torch.ops.fgd.imitation_mask.default(
        anchors, gt_boxes, gt_counts, list(feat_size),
        _number(thresh, "thresh", op), _number(offset, "offset", op),
    )


def imitation_loss(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """sum_{b,h,w} mask * sum_c (student - teacher)^2 / (2 * N_p), N_p = sum(mask); 0 when N_p = 0.

    ``student`` (the adapted student feature) and ``teacher``: [B, C, H, W], one floating dtype;
    ``mask``: [B, H, W], bool or non-negative float weights. Returns a 0-dim tensor of the student's
    dtype (fp16/bf16 accumulate in float32), differentiable w.r.t. student and teacher.
    """
    op = "imitation_loss"
    _tensor(student, "student", op)
    _tensor(teacher, "teacher", op)
    _tensor(mask, "mask", op)
    return torch.ops.fgd.imitation_loss.default(student, teacher, mask)


# ---- shapes for torch.compile / meta tensors ---------------------------------------------------

@torch.library.register_fake("fgd::box_iou")
def _box_iou_fake(boxes1, boxes2, offset=0.0):
    return boxes1.new_empty((*boxes1.shape[:-1], boxes2.shape[-2]))


@torch.library.register_fake("fgd::imitation_mask")
def _imitation_mask_fake(anchors, gt_boxes, gt_counts, feat_size, thresh=0.5, offset=0.0):
    return gt_boxes.new_empty((gt_boxes.shape[0], feat_size[0], feat_size[1]), dtype=torch.bool)


@torch.library.register_fake("fgd::imitation_loss")
def _imitation_loss_fake(student, teacher, mask):
    return student.new_empty(())


@torch.library.register_fake("fgd::_imitation_loss_backward")
def _imitation_loss_backward_fake(grad, student, teacher, mask):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


# ---- autograd ----------------------------------------------------------------------------------

def _loss_setup_context(ctx, inputs, output):
    student, teacher, mask = inputs
    ctx.save_for_backward(student, teacher, mask)


def _loss_backward(ctx, grad):
    student, teacher, mask = ctx.saved_tensors
    grad_student = None
    grad_teacher = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        g = torch.ops.fgd._imitation_loss_backward.default(grad, student, teacher, mask)
        grad_student = g if ctx.needs_input_grad[0] else None
        grad_teacher = -g if ctx.needs_input_grad[1] else None
    return grad_student, grad_teacher, None


torch.library.register_autograd(
    "fgd::imitation_loss", _loss_backward, setup_context=_loss_setup_context
)
