"""Bad input raises a Python exception naming the argument: TypeError for a dtype, ValueError for a
shape or a value. Each case runs through the public wrapper and through torch.ops directly (the
checks live in C++, so both are safe)."""
import pytest
import torch

import fgd
from conftest import requires_cuda

F = torch.float32


def boxes(*shape, dtype=F):
    return torch.tensor([0.0, 0, 10, 10], dtype=dtype).expand(*shape, 4).contiguous()


def direct(name):
    return getattr(torch.ops.fgd, name).default


A = boxes(2 * 3 * 2)  # H = 2, W = 3, K = 2
GT = boxes(2, 5)
N = torch.tensor([1, 5])
S = torch.zeros(2, 4, 3, 5)
M = torch.ones(2, 3, 5, dtype=torch.bool)

BOX_IOU = [
    (TypeError, "boxes1 must be a floating-point", (boxes(3).long(), boxes(2))),
    (TypeError, "boxes2 must be a floating-point", (boxes(3), boxes(2, dtype=torch.int32))),
    (TypeError, "same dtype", (boxes(3), boxes(2, dtype=torch.float64))),
    (ValueError, r"boxes1 must have shape \[N, 4\]", (torch.zeros(3, 5), boxes(2))),
    (ValueError, r"boxes2 must have shape \[N, 4\]", (boxes(3), torch.zeros(4))),
    (ValueError, r"boxes1 must have shape", (torch.zeros(1, 2, 3, 4), boxes(2))),
    (ValueError, "both be batched", (boxes(2, 3), boxes(3))),
    (ValueError, "same batch size", (boxes(2, 3), boxes(3, 3))),
]

MASK = [
    (TypeError, "anchors must be a floating-point", (A.int(), GT, N, [2, 3])),
    (TypeError, "gt_boxes must be a floating-point", (A, GT.long(), N, [2, 3])),
    (TypeError, "anchors and gt_boxes must have the same dtype", (A, GT.double(), N, [2, 3])),
    (TypeError, "gt_counts must be an int64", (A, GT, N.int(), [2, 3])),
    (TypeError, "gt_counts must be an int64", (A, GT, N.float(), [2, 3])),
    (ValueError, r"gt_boxes must have shape \[B, G, 4\]", (A, boxes(5), N, [2, 3])),
    (ValueError, r"gt_boxes must have shape \[B, G, 4\]", (A, torch.zeros(2, 5, 3), N, [2, 3])),
    (ValueError, r"anchors must have shape", (torch.zeros(12, 5), GT, N, [2, 3])),
    (ValueError, r"anchors must have shape", (torch.zeros(1, 1, 12, 4), GT, N, [2, 3])),
    (ValueError, "batched anchors must have the batch size", (boxes(3, 12), GT, N, [2, 3])),
    (ValueError, r"gt_counts must have shape \[B\]", (A, GT, torch.tensor([1, 2, 3]), [2, 3])),
    (ValueError, r"gt_counts must have shape \[B\]", (A, GT, N[:, None], [2, 3])),
    (ValueError, "positive multiple of H\\*W", (A, GT, N, [5, 3])),
    (ValueError, "positive multiple of H\\*W", (boxes(0), GT, N, [2, 3])),
    (ValueError, "feat_size must be two positive", (A, GT, N, [0, 3])),
    (ValueError, "feat_size must be two positive", (A, GT, N, [-2, -3])),
    (ValueError, r"gt_counts must be in \[0, G\]", (A, GT, torch.tensor([-1, 2]), [2, 3])),
    (ValueError, r"gt_counts must be in \[0, G\]", (A, GT, torch.tensor([0, 6]), [2, 3])),
]
MASK_KW = [
    (ValueError, r"thresh must be in \[0, 1\)", dict(thresh=1.0)),
    (ValueError, r"thresh must be in \[0, 1\)", dict(thresh=-0.1)),
    (ValueError, r"thresh must be in \[0, 1\)", dict(thresh=float("nan"))),
    (ValueError, "offset must be 0", dict(offset=0.5)),
]

LOSS = [
    (TypeError, "student must be a floating-point", (S.long(), S, M)),
    (TypeError, "teacher must be a floating-point", (S, S.int(), M)),
    (TypeError, "same dtype", (S, S.double(), M)),
    (TypeError, "same dtype", (S.half(), S, M)),
    (TypeError, "mask must be a bool tensor or a floating-point", (S, S, M.long())),
    (TypeError, "mask must be a bool tensor or a floating-point", (S, S, M.to(torch.uint8))),
    (ValueError, r"student must have shape \[B, C, H, W\]", (S[0], S[0], M[0])),
    (ValueError, "teacher must have the shape of student", (S, S[:, :3], M)),
    (ValueError, "teacher must have the shape of student", (S, S[:1], M)),
    (ValueError, r"mask must have shape \[B, H, W\] = \[2, 3, 5\]", (S, S, M[:, :2])),
    (ValueError, r"mask must have shape \[B, H, W\]", (S, S, M[:1])),
    (ValueError, r"mask must have shape \[B, H, W\]", (S, S, M[:, None])),
    (ValueError, "mask weights must be finite and non-negative", (S, S, -M.float())),
]


@pytest.mark.parametrize("exc,msg,args", BOX_IOU)
def test_box_iou(exc, msg, args):
    with pytest.raises(exc, match=msg):
        fgd.box_iou(*args)
    with pytest.raises(exc, match=msg):
        direct("box_iou")(*args)


def test_box_iou_offset():
    for bad in (0.5, -1.0, 2.0):
        with pytest.raises(ValueError, match="offset must be 0"):
            fgd.box_iou(boxes(2), boxes(2), offset=bad)


@pytest.mark.parametrize("exc,msg,args", MASK)
def test_imitation_mask(exc, msg, args):
    with pytest.raises(exc, match=msg):
        fgd.imitation_mask(*args)
    with pytest.raises(exc, match=msg):
        direct("imitation_mask")(*args)


@pytest.mark.parametrize("exc,msg,kwargs", MASK_KW)
def test_imitation_mask_options(exc, msg, kwargs):
    with pytest.raises(exc, match=msg):
        fgd.imitation_mask(A, GT, N, (2, 3), **kwargs)
    with pytest.raises(exc, match=msg):
        direct("imitation_mask")(A, GT, N, [2, 3], kwargs.get("thresh", 0.5), kwargs.get("offset", 0.0))


@pytest.mark.parametrize("exc,msg,args", LOSS)
def test_imitation_loss(exc, msg, args):
    with pytest.raises(exc, match=msg):
        fgd.imitation_loss(*args)
    with pytest.raises(exc, match=msg):
        direct("imitation_loss")(*args)


@pytest.mark.parametrize("call,msg", [
    (lambda: fgd.box_iou([[0, 0, 1, 1]], boxes(2)), "boxes1 must be a torch.Tensor"),
    (lambda: fgd.box_iou(boxes(2), boxes(2), offset="1"), "offset must be a number"),
    (lambda: fgd.imitation_mask(A, GT, [1, 5], (2, 3)), "gt_counts must be a torch.Tensor"),
    (lambda: fgd.imitation_mask(A, GT, N, 6), "feat_size must be a pair of ints"),
    (lambda: fgd.imitation_mask(A, GT, N, (2, 3, 1)), "feat_size must be a pair of ints"),
    (lambda: fgd.imitation_mask(A, GT, N, (2.0, 3.0)), "feat_size must be a pair of ints"),
    (lambda: fgd.imitation_mask(A, GT, N, (2, 3), thresh=None), "thresh must be a number"),
    (lambda: fgd.imitation_loss(S, S.numpy(), M), "teacher must be a torch.Tensor"),
])
def test_non_tensor_arguments(call, msg):
    with pytest.raises(TypeError, match=msg):
        call()


def test_feat_size_accepts_torch_size():
    assert fgd.imitation_mask(A, GT, N, torch.Size([2, 3])).shape == (2, 2, 3)


def test_empty_boxes_still_checked():
    with pytest.raises(ValueError, match="boxes1 must have shape"):
        fgd.box_iou(torch.zeros(0, 3), boxes(2))


# ---- what used to crash the process, return uninitialised memory or be silently wrong ----------

def meta(t):
    return t.to("meta")


HUGE = 2**40
CRASHERS = [
    # (exception, message, op name, args): each once killed the process (SIGFPE), read garbage or
    # returned a wrong value without a word
    (ValueError, "multiple of H\\*W", "imitation_mask", (A, GT, N, [2**32, 2**32], 0.5, 0.0)),  # H*W wraps to 0
    (ValueError, "multiple of H\\*W", "imitation_mask", (A, GT, N, [2**62, 4], 0.5, 0.0)),
    (ValueError, "overflows int64", "imitation_loss", (torch.empty(HUGE, 0, HUGE, 1), torch.empty(HUGE, 0, HUGE, 1),
                                                        M)),  # an empty tensor whose B*H*W wraps
    (ValueError, "overflows int64", "box_iou", (torch.empty(0, HUGE, 4), torch.empty(0, HUGE, 4), 0.0)),
    (ValueError, "at least one input and one output channel", "_masked_adapt_forward",
     (torch.zeros(1, 0, 3, 3), torch.zeros(1, 2, 3, 3), torch.ones(1, 3, 3, dtype=torch.bool),
      torch.zeros(2, 0, 3, 3), None, False, False)),  # Cs = 0 divided by
    (RuntimeError, "same device", "box_iou", (boxes(3), meta(boxes(2)), 0.0)),
    (RuntimeError, "same device", "box_iou", (meta(boxes(3)), boxes(2), 0.0)),
    (RuntimeError, "same device", "imitation_loss", (S, meta(S), M)),
    (RuntimeError, "same device", "imitation_loss", (S, S, meta(M))),
    (RuntimeError, "same device", "imitation_mask", (A, meta(GT), N, [2, 3], 0.5, 0.0)),
    (RuntimeError, "gt_counts must be on the CPU", "imitation_mask", (A, GT, meta(N), [2, 3], 0.5, 0.0)),
    (RuntimeError, "same device", "_masked_adapt_forward",
     (S, meta(torch.zeros(2, 3, 3, 5)), M, torch.zeros(3, 4, 1, 1), None, False, False)),
    (ValueError, r"boxes1 must have shape", "box_iou", (meta(torch.zeros(3, 5)), meta(boxes(2)), 0.0)),  # meta checks
    (ValueError, "mask must have shape", "imitation_loss", (meta(S), meta(S), meta(M[:1]))),
    (ValueError, "finite coordinates", "box_iou", (torch.tensor([[0.0, 0, 1e20, 1e20]]), boxes(2), 0.0)),  # area overflow
    (ValueError, "finite coordinates", "box_iou", (boxes(2), torch.tensor([[0.0, 0, float("nan"), 1]]), 0.0)),
    (ValueError, "finite coordinates", "box_iou", (torch.tensor([[0.0, 0, float("inf"), 1]]), boxes(2), 0.0)),
    (ValueError, "finite coordinates", "imitation_mask",
     (A, torch.tensor([[[0.0, 0, 3e19, 3e19]]]).expand(2, 5, 4), N, [2, 3], 0.5, 0.0)),
    (ValueError, "finite coordinates", "imitation_mask", (A * float("nan"), GT, N, [2, 3], 0.5, 0.0)),
    (ValueError, "finite and non-negative", "imitation_loss", (S, S, M.float() * float("nan"))),
    (ValueError, "finite and non-negative", "imitation_loss", (S, S, M.float() * float("inf"))),
    (ValueError, "finite and non-negative", "_masked_adapt_forward",
     (S, torch.zeros(2, 3, 3, 5), M.float() * float("nan"), torch.zeros(3, 4, 1, 1), None, False, False)),
]


@pytest.mark.parametrize("exc,msg,name,args", CRASHERS)
def test_no_input_crashes_or_reads_garbage(exc, msg, name, args):
    with pytest.raises(exc, match=msg):
        direct(name)(*args)


def test_area_of_large_float32_boxes_is_not_wrong():
    # 1e18 is the largest accepted magnitude: its float32 area (1e36) and a union of two are finite
    b = torch.tensor([[0.0, 0, 1e18, 1e18], [0, 0, 5e17, 1e18]])
    torch.testing.assert_close(fgd.box_iou(b, b).double(), fgd.reference.box_iou(b, b), rtol=1e-6, atol=0)


def test_empty_features_with_a_huge_size_are_not_walked():
    # 2**40 empty images: once a 2**40-step loop (a hang); now nothing to do
    s = torch.empty(HUGE, 0, 0, 0)
    assert fgd.imitation_loss(s, s, torch.empty(HUGE, 0, 0, dtype=torch.bool)).item() == 0


@pytest.mark.parametrize("op", ["imitation_loss", "masked_adapt_loss"])
def test_second_derivative_is_a_clear_error(op):
    s = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    if op == "imitation_loss":
        loss = fgd.imitation_loss(s, torch.randn(2, 4, 3, 5, dtype=torch.float64), M)
    else:
        loss = fgd.ops.masked_adapt_loss(s, torch.randn(2, 3, 3, 5, dtype=torch.float64), M,
                                         torch.randn(3, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="second-order gradients are not supported"):
        torch.autograd.grad(loss, s, create_graph=True)
    assert torch.autograd.grad(loss, s)[0].shape == s.shape  # first order still works


def test_meta_tensors_give_shapes():
    assert direct("box_iou")(meta(boxes(3)), meta(boxes(2)), 0.0).shape == (3, 2)
    assert direct("imitation_mask")(meta(A), meta(GT), N, [2, 3], 0.5, 0.0).shape == (2, 2, 3)
    assert direct("imitation_loss")(meta(S), meta(S), meta(M)).shape == ()


# ---- the private backward ops the autograd rules call, called directly ---------------------------

BACKWARD_TENSORS = {"_imitation_loss_backward": ("grad", "student", "teacher", "mask"),
                    "_masked_adapt_backward": ("grad", "saved", "idx", "student", "teacher", "mask",
                                               "weight", "bias")}


def backward_args(op):
    """Well-formed arguments of a private backward op: its tensors by name, then the rest."""
    if op == "_imitation_loss_backward":
        return dict(grad=torch.tensor(1.0), student=S, teacher=S + 1, mask=M), ()
    s, t, w, b = torch.randn(2, 4, 3, 5), torch.randn(2, 3, 3, 5), torch.randn(3, 4, 3, 3), torch.randn(3)
    _, saved, idx = direct("_masked_adapt_forward")(s, t, M, w, b, False, True)
    return (dict(grad=torch.tensor(1.0), saved=saved, idx=idx, student=s, teacher=t, mask=M, weight=w, bias=b),
            (False, [True, True, True, True]))


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("op,name", [(op, n) for op, names in BACKWARD_TENSORS.items() for n in names])
def test_backward_op_with_a_tensor_on_another_device(op, name, device):
    """One tensor on another device (a meta grad, saved or idx beside cpu tensors once returned an
    uninitialised cpu tensor: zeros, 2e31): RuntimeError naming it, as the forward ops raise."""
    tensors, rest = backward_args(op)
    tensors[name] = tensors[name].to(device)
    with pytest.raises(RuntimeError, match=rf"\b{name}\b.*device|device.*\b{name}\b"):
        direct(op)(*tensors.values(), *rest)


@pytest.mark.parametrize("op,name,exc,msg,bad", [
    ("_imitation_loss_backward", "grad", TypeError, "grad must be a floating-point", torch.tensor(1)),
    ("_imitation_loss_backward", "grad", ValueError, "grad must be a scalar", torch.ones(2)),
    ("_masked_adapt_backward", "grad", TypeError, "grad must be a floating-point", torch.tensor(True)),
    ("_masked_adapt_backward", "grad", ValueError, "grad must be a scalar", torch.ones(1, 2)),
    ("_masked_adapt_backward", "idx", TypeError, "idx must be an int64", "int32"),
    ("_masked_adapt_backward", "saved", TypeError, "saved must have the student's dtype", "float64"),
])
def test_backward_op_bad_grad_saved_idx(op, name, exc, msg, bad):
    tensors, rest = backward_args(op)
    tensors[name] = tensors[name].to(getattr(torch, bad)) if isinstance(bad, str) else bad
    with pytest.raises(exc, match=msg):
        direct(op)(*tensors.values(), *rest)
