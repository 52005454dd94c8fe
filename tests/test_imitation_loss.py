import pytest
import torch

import fgd
from fgd import reference as ref
from fgd.synthetic import fgfi_like_mask

# float16 features are rounded to float16 before the loss; the loss itself accumulates in float32.
TOL = {torch.float16: dict(rtol=2e-3, atol=1e-3), torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
       torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def features(gen, shape, dtype=torch.float32):
    s = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return s, t


def check(student, teacher, mask, teacher_grad=True):
    """Value and gradients of fgd against the float64 reference."""
    dtype = student.dtype
    s1 = student.detach().clone().requires_grad_()
    t1 = teacher.detach().clone().requires_grad_(teacher_grad)
    s2 = student.detach().clone().requires_grad_()
    t2 = teacher.detach().clone().requires_grad_(teacher_grad)
    got = fgd.imitation_loss(s1, t1, mask)
    want = ref.imitation_loss(s2, t2, mask)
    assert got.dtype == dtype and got.dim() == 0
    torch.testing.assert_close(got.double(), want, **TOL[dtype])
    upstream = 0.7
    (got * upstream).backward()
    (want * upstream).backward()
    assert s1.grad.dtype == dtype and s1.grad.shape == student.shape
    torch.testing.assert_close(s1.grad.double(), s2.grad.double(), **TOL[dtype])
    if teacher_grad:
        torch.testing.assert_close(t1.grad.double(), t2.grad.double(), **TOL[dtype])
    return got


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_random_bool_mask(gen, dtype):
    s, t = features(gen, (3, 16, 20, 27), dtype)
    check(s, t, torch.rand(3, 20, 27, generator=gen) < 0.2)


@pytest.mark.parametrize("feat_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.float32, torch.float64])
def test_float_weights(gen, feat_dtype, mask_dtype):
    s, t = features(gen, (2, 8, 13, 18), feat_dtype)
    w = torch.rand(2, 13, 18, generator=gen) * (torch.rand(2, 13, 18, generator=gen) < 0.4)
    check(s, t, w.to(mask_dtype))


@pytest.mark.parametrize("density", [0.05, 0.15, 0.3, 1.0])
def test_fgfi_like_masks(gen, density):
    s, t = features(gen, (2, 32, 40, 48))
    check(s, t, fgfi_like_mask(2, (40, 48), density, gen))


def test_odd_sizes_and_one_channel(gen):
    for shape in [(1, 1, 1, 1), (2, 1, 3, 5), (1, 3, 1, 37), (2, 5, 17, 1)]:
        s, t = features(gen, shape)
        mask = torch.rand(shape[0], *shape[2:], generator=gen) < 0.5
        mask.view(-1)[0] = True
        check(s, t, mask)


def test_empty_mask_gives_zero_and_zero_grads(gen):
    s, t = features(gen, (2, 4, 5, 6))
    for mask in (torch.zeros(2, 5, 6, dtype=torch.bool), torch.zeros(2, 5, 6)):
        s1 = s.clone().requires_grad_()
        t1 = t.clone().requires_grad_()
        loss = fgd.imitation_loss(s1, t1, mask)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(s1.grad, torch.zeros_like(s)) and torch.equal(t1.grad, torch.zeros_like(t))
    check(s, t, torch.zeros(2, 5, 6, dtype=torch.bool))


def test_known_value():
    s = torch.zeros(1, 2, 1, 2)
    t = torch.tensor([[[[1.0, 5.0]], [[2.0, 5.0]]]])  # location 0: 1 + 4 = 5; location 1: 50
    mask = torch.tensor([[[True, False]]])
    assert fgd.imitation_loss(s, t, mask).item() == pytest.approx(5 / 2)
    weights = torch.tensor([[[1.0, 3.0]]])
    assert fgd.imitation_loss(s, t, weights).item() == pytest.approx((5 + 150) / (2 * 4))


def test_unmasked_non_finite_values_do_not_leak(gen):
    s, t = features(gen, (1, 4, 6, 6))
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 2:4, 2:4] = True
    s[0, :, 0, 0] = float("nan")
    t[0, :, 5, 5] = float("inf")
    got = check(s, t, mask)
    assert torch.isfinite(got)


def test_non_contiguous(gen):
    s, t = features(gen, (2, 6, 9, 11))
    mask = torch.rand(2, 11, 9, generator=gen).transpose(1, 2) < 0.3
    cl_s = s.to(memory_format=torch.channels_last)
    wide_t = torch.cat([t, t], dim=3)[..., ::2]
    assert not cl_s.is_contiguous() and not wide_t.is_contiguous() and not mask.is_contiguous()
    check(cl_s, wide_t.contiguous(), mask)
    check(s, torch.cat([t, t], dim=3)[..., :11], mask)
    check(cl_s, t.to(memory_format=torch.channels_last), mask)


def test_teacher_without_grad(gen):
    s, t = features(gen, (2, 3, 4, 5))
    check(s, t, torch.rand(2, 4, 5, generator=gen) < 0.5, teacher_grad=False)


def test_direct_op_is_differentiable(gen):
    s, t = features(gen, (1, 3, 4, 4))
    s.requires_grad_()
    loss = torch.ops.fgd.imitation_loss.default(s, t, torch.ones(1, 4, 4, dtype=torch.bool))
    loss.backward()
    torch.testing.assert_close(s.grad, (s - t).detach() / 16)


def test_gradcheck(gen):
    s, t = features(gen, (2, 3, 4, 5), torch.float64)
    s.requires_grad_()
    t.requires_grad_()
    for mask in (torch.rand(2, 4, 5, generator=gen, dtype=torch.float64) < 0.5,
                 torch.rand(2, 4, 5, generator=gen, dtype=torch.float64),
                 torch.zeros(2, 4, 5, dtype=torch.bool)):
        assert torch.autograd.gradcheck(lambda a, b: fgd.imitation_loss(a, b, mask), (s, t))


def test_opcheck(gen):
    s, t = features(gen, (2, 4, 5, 6))
    mask = torch.rand(2, 5, 6, generator=gen) < 0.5
    torch.library.opcheck(torch.ops.fgd.imitation_loss.default, (s.requires_grad_(), t, mask))
    torch.library.opcheck(torch.ops.fgd.imitation_loss.default,
                          (s.double(), t.double().requires_grad_(), mask.double()))
    torch.library.opcheck(torch.ops.fgd._imitation_loss_backward.default,
                          (torch.tensor(1.0), s.detach(), t, mask))
