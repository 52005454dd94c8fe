"""The public ops: thin wrappers over torch.ops.fgd.* plus their fake (shape) and autograd rules.

The C++ side checks every tensor argument (TypeError for a dtype, ValueError for a shape or a
value); these wrappers only check what C++ cannot name well: arguments that are not tensors.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["box_iou", "imitation_mask", "imitation_loss", "masked_adapt_loss"]


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
    Coordinates must be finite and within +-1e18, so that float32 areas cannot overflow (checked for
    CPU tensors; on a GPU the check would cost a device sync, so it is not made).
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
    ``mask``: [B, H, W], bool or finite non-negative float weights (checked on every device; on a
    GPU float weights cost one sync, bool masks none). Returns a 0-dim tensor of the student's
    dtype (fp16/bf16 accumulate in float32), differentiable w.r.t. student and teacher (first order:
    a second derivative is a RuntimeError).
    """
    op = "imitation_loss"
    _tensor(student, "student", op)
    _tensor(teacher, "teacher", op)
    _tensor(mask, "mask", op)
    return torch.ops.fgd.imitation_loss.default(student, teacher, mask)


def masked_adapt_loss(student: Tensor, teacher: Tensor, mask: Tensor, weight: Tensor,
                      bias: Optional[Tensor] = None, *, relu: bool = False) -> Tensor:
    """``imitation_loss(act(conv2d(student, weight, bias, padding=k // 2)), teacher, mask)``, computed
    at the masked locations only: act is ReLU when ``relu`` else the identity.

    ``student`` [B, Cs, H, W], ``teacher`` [B, Ct, H, W], ``mask`` [B, H, W] (bool or non-negative
    float weights), ``weight`` [Ct, Cs, k, k] with k = 1 or 3 (stride 1, zero padding k // 2),
    ``bias`` [Ct] or None; one floating dtype. The cost is O(N_p * Cs * Ct * k^2) and the dense adapted
    map is never built, so the adaptation layer costs in proportion to the masked locations. Value
    and gradients (student, weight, bias, and teacher when it requires grad) equal the dense
    composition's up to rounding; 0 with zero gradients when nothing is masked. Under autocast it
    runs in the autocast dtype, as conv2d would. Syncs with a GPU once (to count the masked
    locations).
    """
    op = "masked_adapt_loss"
    for x, name in ((student, "student"), (teacher, "teacher"), (mask, "mask"), (weight, "weight")):
        _tensor(x, name, op)
    if bias is not None:
        _tensor(bias, "bias", op)
    if not isinstance(relu, bool):
        raise TypeError(f"fgd.{op}: relu must be a bool, got {type(relu).__name__}")
    # Under autocast the dense path's conv2d would run in the autocast dtype: so does this.
    if not student.is_meta and torch.is_autocast_enabled(student.device.type) and student.is_floating_point():
        dtype = torch.get_autocast_dtype(student.device.type)
        student, teacher, weight = student.to(dtype), teacher.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return torch.ops.fgd._masked_adapt_forward.default(
        student, teacher, mask, weight, bias, relu, _backward_may_follow(student, teacher, weight, bias))[0]


def _backward_may_follow(*tensors) -> bool:
    """Whether masked_adapt_loss must keep its [Ct, N_p] gradient buffer for a backward."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


# ---- shapes for torch.compile / meta tensors, and autograd ------------------------------------

def _checked(check):
    """Run the op's C++ checks in its shape function when the tensors are real meta tensors: those
    reach the shape function instead of a kernel, and a bad shape or a meta tensor beside a CPU one
    must fail as it does on a real device, not return an empty (uninitialised) tensor. Under
    torch.compile the tensors are FakeTensors, possibly of symbolic shape: the kernel checks at run
    time instead."""
    def wrap(fake):
        signature = inspect.signature(fake)

        @functools.wraps(fake)
        def checked_fake(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = list(bound.arguments.values())
            if not any(isinstance(v, FakeTensor) for v in values):
                check(*values)
            return fake(*values)
        return checked_fake
    return wrap


def _fakes(ops):
    @_checked(ops._check_box_iou)
    def box_iou(boxes1, boxes2, offset=0.0):
        return boxes1.new_empty((*boxes1.shape[:-1], boxes2.shape[-2]))

    @_checked(ops._check_imitation_mask)
    def imitation_mask(anchors, gt_boxes, gt_counts, feat_size, thresh=0.5, offset=0.0):
        return gt_boxes.new_empty((gt_boxes.shape[0], feat_size[0], feat_size[1]), dtype=torch.bool)

    @_checked(ops._check_imitation_loss)
    def imitation_loss(student, teacher, mask):
        return student.new_empty(())

    @_checked(ops._check_imitation_loss_backward)
    def _imitation_loss_backward(grad, student, teacher, mask):
        return torch.empty_like(student, memory_format=torch.contiguous_format)

    @_checked(lambda s, t, m, w, b, relu, save: ops._check_masked_adapt(s, t, m, w, b))
    def _masked_adapt_forward(student, teacher, mask, weight, bias, relu, save):
        n = torch.library.get_ctx().new_dynamic_size() if save else 0
        return (student.new_empty(()), student.new_empty((weight.shape[0], n)),
                student.new_empty((n,), dtype=torch.long))

    @_checked(lambda *args: ops._check_masked_adapt_backward(*args[:8]))
    def _masked_adapt_backward(grad, saved, idx, student, teacher, mask, weight, bias, relu, output_mask):
        like = (student, teacher, weight, bias)
        return tuple(
            torch.empty_like(x, memory_format=torch.contiguous_format) if want and x is not None
            else student.new_empty((0,))
            for want, x in zip(output_mask, like)
        )

    return {name: fake for name, fake in locals().items() if name != "ops"}


def _no_double_backward(op: str):
    # The backward kernels are not differentiable: without this error a second derivative would
    # silently come back None (with only a warning).
    if torch.is_grad_enabled():
        raise RuntimeError(f"fgd.{op}: second-order gradients are not supported (the backward ran with "
                           "create_graph=True); use the reference composition (fgd.reference) for those")


def _loss_setup_context(ctx, inputs, output):
    student, teacher, mask = inputs
    ctx.save_for_backward(student, teacher, mask)


def _adapt_setup_context(ctx, inputs, output):
    student, teacher, mask, weight, bias, relu, save = inputs
    ctx.relu = relu
    ctx.has_bias = bias is not None
    ctx.save_for_backward(output[1], output[2], student, teacher, mask, weight, bias)


def _register(lib: str) -> None:
    """Fake kernels and autograd rules for the ops of library ``lib``: fgd, or fgd_emu (the CUDA
    kernels built for the CPU through the emulator, tests/emu_build.py), which shares its schemas."""
    ops = getattr(torch.ops, lib)
    for name, fake in _fakes(ops).items():
        torch.library.register_fake(f"{lib}::{name}", fake)

    def loss_backward(ctx, grad):
        student, teacher, mask = ctx.saved_tensors
        grad_student = None
        grad_teacher = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            _no_double_backward("imitation_loss")
            g = ops._imitation_loss_backward.default(grad, student, teacher, mask)
            grad_student = g if ctx.needs_input_grad[0] else None
            grad_teacher = -g if ctx.needs_input_grad[1] else None
        return grad_student, grad_teacher, None

    def adapt_backward(ctx, grad, _grad_saved, _grad_idx):
        saved, idx, student, teacher, mask, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        output_mask = [need[0], need[1], need[3], need[4] and ctx.has_bias]
        grads = [None] * 7
        if any(output_mask):
            _no_double_backward("masked_adapt_loss")
            out = ops._masked_adapt_backward.default(
                grad, saved, idx, student, teacher, mask, weight, bias, ctx.relu, output_mask)
            for slot, want, g in zip((0, 1, 3, 4), output_mask, out):
                grads[slot] = g if want else None
        return tuple(grads)

    torch.library.register_autograd(f"{lib}::imitation_loss", loss_backward,
                                    setup_context=_loss_setup_context)
    torch.library.register_autograd(f"{lib}::_masked_adapt_forward", adapt_backward,
                                    setup_context=_adapt_setup_context)


_register("fgd")
