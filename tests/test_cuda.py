"""CPU-CUDA parity. Skipped cleanly where there is no GPU or fgd was built without CUDA."""
import pytest
import torch

import fgd
from fgd import reference as ref
from fgd.testing import fgfi_like_mask, grid_anchors, random_boxes, random_gt_batch

from conftest import requires_cuda
from test_imitation_mask import ambiguous, check as check_mask

pytestmark = requires_cuda
DEV = "cuda"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_box_iou_parity(gen, dtype, offset):
    b1 = random_boxes(50, (300, 400), min_size=0, generator=gen, dtype=dtype, batch=(2,))
    b2 = random_boxes(70, (300, 400), min_size=0, generator=gen, dtype=dtype, batch=(2,))
    b1[0, 0] = torch.tensor([5.0, 5, 1, 1], dtype=dtype)  # degenerate
    got = fgd.box_iou(b1.to(DEV), b2.to(DEV)[:, ::2], offset=offset)
    want = fgd.box_iou(b1, b2[:, ::2], offset=offset)
    assert got.dtype == dtype and got.device.type == "cuda"
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6
    torch.testing.assert_close(got.cpu().double(), want.double(), atol=tol, rtol=0)
    assert fgd.box_iou(b1.to(DEV)[:, :0], b2.to(DEV)).shape == (2, 0, 70)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("thresh,offset", [(0.5, 0.0), (0.3, 1.0), (0.0, 0.0)])
def test_imitation_mask_parity(gen, dtype, thresh, offset):
    feat = (38, 63)
    anchors = grid_anchors(feat, 16, dtype=dtype)
    gt, counts = random_gt_batch(6, 300, (608, 1008), gen, dtype=dtype)  # more GTs than one tile
    counts[0], counts[1] = 0, 300
    got = fgd.imitation_mask(anchors.to(DEV), gt.to(DEV), counts.to(DEV), feat, thresh=thresh, offset=offset)
    assert got.device.type == "cuda"
    # against the reference, with the same tolerance for decisions at the threshold as the CPU
    want = ref.imitation_mask(anchors, gt, counts, feat, thresh=thresh, offset=offset)
    if not torch.equal(got.cpu(), want):
        wrong = (got.cpu() != want) & ~ambiguous(anchors, gt, counts, feat, thresh, offset)
        assert not wrong.any()
    check_mask(anchors, gt, counts, feat, thresh, offset)  # the CPU kernel on the same input


def test_imitation_mask_batched_anchors_and_cpu_counts(gen):
    feat = (20, 30)
    anchors = grid_anchors(feat, 8, sizes=(32, 64), ratios=(1.0,))
    gt, counts = random_gt_batch(3, 10, (160, 240), gen)
    per_image = torch.stack([anchors, anchors + 3, anchors - 5])
    got = fgd.imitation_mask(per_image.to(DEV), gt.to(DEV), counts, feat)  # counts stay on the CPU
    assert torch.equal(got.cpu(), fgd.imitation_mask(per_image, gt, counts, feat))


def test_imitation_mask_counts_on_gpu_are_clamped_not_read_out_of_bounds(gen):
    feat = (10, 10)
    anchors = grid_anchors(feat, 16)
    gt, _ = random_gt_batch(3, 4, (160, 160), gen)
    bad = torch.tensor([-3, 2, 99], device=DEV)  # not checked on the GPU (no sync): clamped to [0, G]
    got = fgd.imitation_mask(anchors.to(DEV), gt.to(DEV), bad, feat)
    want = fgd.imitation_mask(anchors, gt, torch.tensor([0, 2, 4]), feat)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("mask_kind", ["bool", "weights", "empty", "full"])
def test_imitation_loss_parity(gen, dtype, mask_kind):
    shape = (3, 24, 33, 41)
    s = torch.randn(shape, generator=gen).to(dtype)
    t = torch.randn(shape, generator=gen).to(dtype)
    mask = {"bool": fgfi_like_mask(3, shape[2:], 0.15, gen),
            "weights": torch.rand(3, *shape[2:], generator=gen) * (torch.rand(3, *shape[2:], generator=gen) < 0.3),
            "empty": torch.zeros(3, *shape[2:], dtype=torch.bool),
            "full": torch.ones(3, *shape[2:], dtype=torch.bool)}[mask_kind]
    sc = s.to(DEV).to(memory_format=torch.channels_last).requires_grad_()
    tc = t.to(DEV).requires_grad_()
    loss = fgd.imitation_loss(sc, tc, mask.to(DEV))
    loss.backward(torch.tensor(0.5, device=DEV, dtype=dtype))
    s1 = s.clone().requires_grad_()
    t1 = t.clone().requires_grad_()
    want = fgd.imitation_loss(s1, t1, mask)
    want.backward(torch.tensor(0.5, dtype=dtype))
    tol = dict(rtol=1e-2, atol=1e-2) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-5, atol=1e-6)
    assert loss.dtype == dtype and loss.dim() == 0
    torch.testing.assert_close(loss.cpu(), want, **tol)
    torch.testing.assert_close(sc.grad.cpu(), s1.grad, **tol)
    torch.testing.assert_close(tc.grad.cpu(), t1.grad, **tol)


def test_imitation_loss_gradcheck_cuda(gen):
    s = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()
    t = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()
    mask = (torch.rand(2, 4, 5, generator=gen) < 0.5).to(DEV)
    assert torch.autograd.gradcheck(lambda a, b: fgd.imitation_loss(a, b, mask), (s, t))


def test_no_host_sync_in_loss_and_mask(gen):
    feat = (12, 16)
    anchors = grid_anchors(feat, 16).to(DEV)
    gt, counts = random_gt_batch(2, 5, (192, 256), gen)
    gt, counts = gt.to(DEV), counts.to(DEV)
    s = torch.randn(2, 8, *feat, device=DEV, requires_grad=True)
    t = torch.randn(2, 8, *feat, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = fgd.imitation_mask(anchors, gt, counts, feat)
        fgd.imitation_loss(s, t, mask).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_device_mismatch_is_a_clear_error():
    b = torch.tensor([[0.0, 0, 1, 1]])
    with pytest.raises(ValueError, match="same device"):
        fgd.box_iou(b.to(DEV), b)
    s = torch.zeros(1, 2, 3, 3, device=DEV)
    with pytest.raises(ValueError, match="same device"):
        fgd.imitation_loss(s, s, torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="gt_counts must be on the CPU or on gt_boxes' device"):
        fgd.imitation_mask(b, b[None], torch.tensor([1], device=DEV), (1, 1))


def test_opcheck_cuda(gen):
    b = random_boxes(6, (50, 50), generator=gen).to(DEV)
    torch.library.opcheck(torch.ops.fgd.box_iou.default, (b, b, 0.0))
    feat = (4, 5)
    anchors = grid_anchors(feat, 16).to(DEV)
    gt, counts = random_gt_batch(2, 3, (64, 80), gen)
    torch.library.opcheck(torch.ops.fgd.imitation_mask.default, (anchors, gt.to(DEV), counts.to(DEV), [4, 5], 0.5, 0.0))
    s = torch.randn(2, 4, 5, 6, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.fgd.imitation_loss.default, (s, s.detach() + 1, torch.ones(2, 5, 6, device=DEV)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,relu", [(1, False), (3, True), (3, False)])
def test_masked_adapt_loss_parity(gen, dtype, k, relu):
    """CUDA against the float64 dense reference, every gradient (teacher included)."""
    from test_masked_adapt import TOL, check, inputs
    from fgd.testing import imitation_mask_at_density

    s, t, w, b = inputs(gen, 2, 48, 40, 30, 34, k, dtype=dtype)
    mask = imitation_mask_at_density(2, (30, 34), 0.2, gen)
    tol = dict(rtol=1e-3, atol=1e-5) if dtype == torch.float32 else TOL[dtype]  # TF32-free, looser sums
    check(*(x.to(DEV) for x in (s, t)), mask.to(DEV), *(x.to(DEV) for x in (w, b)), relu, tol=tol)
    empty = torch.zeros_like(mask)
    check(*(x.to(DEV) for x in (s, t)), empty.to(DEV), *(x.to(DEV) for x in (w, b)), relu, tol=tol)


def test_masked_adapt_loss_opcheck_and_float_weights(gen):
    from test_masked_adapt import check, inputs

    s, t, w, b = [x.to(DEV) for x in inputs(gen, 2, 5, 6, 7, 8, 3)]
    weights = (torch.rand(2, 7, 8, generator=gen) * (torch.rand(2, 7, 8, generator=gen) < 0.5)).to(DEV)
    check(s, t, weights, w, b, True)
    fwd = torch.ops.fgd._masked_adapt_forward.default
    torch.library.opcheck(fwd, (s.requires_grad_(), t, weights, w.requires_grad_(), b, True, True))
    _, saved, idx = fwd(s.detach(), t, weights, w.detach(), b, True, True)
    torch.library.opcheck(torch.ops.fgd._masked_adapt_backward.default,
                          (torch.tensor(0.5, device=DEV), saved, idx, s.detach(), t, weights, w.detach(), b,
                           True, [True, True, True, True]))
