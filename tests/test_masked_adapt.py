"""masked_adapt_loss against the dense composition imitation_loss(act(conv2d(...))) in float64."""
import pytest
import torch
import torch.nn.functional as F

import fgd
from fgd import reference as ref
from fgd.synthetic import fgfi_like_mask, imitation_mask_at_density

TOL = {torch.float16: dict(rtol=2e-2, atol=2e-3), torch.bfloat16: dict(rtol=5e-2, atol=2e-2),
       torch.float32: dict(rtol=1e-4, atol=1e-6), torch.float64: dict(rtol=1e-9, atol=1e-12)}


def dense_reference(student, teacher, mask, weight, bias, relu):
    """The composition masked_adapt_loss replaces, in float64 (differentiable)."""
    return ref.masked_adapt_loss(student, teacher, mask, weight, bias, relu=relu)


def inputs(gen, B, Cs, Ct, H, W, k, bias=True, dtype=torch.float32):
    s = torch.randn(B, Cs, H, W, generator=gen, dtype=torch.float64)
    t = torch.randn(B, Ct, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(Ct, Cs, k, k, generator=gen, dtype=torch.float64) / (Cs * k * k) ** 0.5
    b = torch.randn(Ct, generator=gen, dtype=torch.float64) * 0.1 if bias else None
    return [x if x is None else x.to(dtype) for x in (s, t, w, b)]


def check(s, t, mask, w, b, relu, teacher_grad=True, tol=None, fn=None, upstream=0.7):
    """Value and every gradient of fgd (or ``fn``, another build of the op) against the float64
    dense reference, the upstream gradient ``upstream``."""
    tol = tol or TOL[s.dtype]
    fn = fn or fgd.ops.masked_adapt_loss
    leaves = [x.detach().clone().requires_grad_(x is not t or teacher_grad) if x is not None else None
              for x in (s, t, w, b)]
    ref_leaves = [x.detach().double().requires_grad_(x is not t or teacher_grad) if x is not None else None
                  for x in (s, t, w, b)]
    got = fn(leaves[0], leaves[1], mask, leaves[2], leaves[3], relu=relu)
    want = dense_reference(ref_leaves[0], ref_leaves[1], mask, ref_leaves[2], ref_leaves[3], relu)
    assert got.dtype == s.dtype and got.dim() == 0
    torch.testing.assert_close(got.double(), want, **tol)
    (got * upstream).backward()
    (want * upstream).backward()
    for name, a, r in zip(("student", "teacher", "weight", "bias"), leaves, ref_leaves):
        if a is None or not a.requires_grad:
            continue
        assert a.grad is not None and a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
        torch.testing.assert_close(a.grad.double(), r.grad, **tol, msg=lambda m: f"{name}: {m}")
    return got


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_float64(gen, k, relu, bias):
    s, t, w, b = inputs(gen, 2, 3, 4, 6, 7, k, bias, torch.float64)
    mask = torch.rand(2, 6, 7, generator=gen) < 0.4
    leaves = [x.requires_grad_() for x in (s, t, w, b) if x is not None]

    def fn(s, t, w, *b):
        return fgd.ops.masked_adapt_loss(s, t, mask, w, b[0] if b else None, relu=relu)

    assert torch.autograd.gradcheck(fn, tuple(leaves))
    check(s, t, mask, w, b, relu)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("density", [0.05, 0.15, 0.3])
def test_float32_realistic(gen, k, relu, density):
    """Real FGFI masks on a feature map of a realistic width; many chunks of locations."""
    s, t, w, b = inputs(gen, 2, 64, 96, 40, 48, k)
    mask = imitation_mask_at_density(2, (40, 48), density, gen)
    check(s, t, mask, w, b, relu)


@pytest.mark.parametrize("k", [1, 3])
def test_empty_mask_gives_zero_and_zero_grads(gen, k):
    s, t, w, b = inputs(gen, 2, 5, 6, 7, 8, k)
    mask = torch.zeros(2, 7, 8, dtype=torch.bool)
    got = check(s, t, mask, w, b, relu=True)
    assert got.item() == 0.0
    leaves = [x.requires_grad_() for x in (s, t, w, b)]
    fgd.ops.masked_adapt_loss(*leaves[:2], mask, *leaves[2:]).backward()
    assert all(x.grad is not None and not x.grad.any() for x in leaves)
    empty = fgd.ops.masked_adapt_loss(s[:0], t[:0], mask[:0], w, b)  # no images at all
    assert empty.item() == 0.0


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("relu", [False, True])
def test_full_mask_and_borders(gen, k, relu):
    s, t, w, b = inputs(gen, 2, 8, 8, 5, 9, k)
    check(s, t, torch.ones(2, 5, 9, dtype=torch.bool), w, b, relu)
    one = torch.zeros(2, 5, 9, dtype=torch.bool)  # only corners: every padded tap
    one[0, 0, 0] = one[0, -1, -1] = one[1, 0, -1] = one[1, -1, 0] = True
    check(s, t, one, w, b, relu)


def test_one_by_one_map_and_one_channel(gen):
    s, t, w, b = inputs(gen, 3, 1, 1, 1, 1, 3)
    check(s, t, torch.tensor([True, False, True]).view(3, 1, 1), w, b, True)


@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.float32, torch.float64])
def test_float_weights(gen, mask_dtype):
    s, t, w, b = inputs(gen, 2, 6, 5, 9, 11, 3)
    weights = torch.rand(2, 9, 11, generator=gen) * (torch.rand(2, 9, 11, generator=gen) < 0.4)
    check(s, t, weights.to(mask_dtype), w, b, relu=True)


def test_non_contiguous_inputs(gen):
    s, t, w, b = inputs(gen, 2, 6, 5, 9, 11, 3)
    s_cl = s.to(memory_format=torch.channels_last)
    t_view = torch.randn(2, 11, 9, 5, generator=gen).permute(0, 3, 2, 1)  # [2, 5, 9, 11] strided
    w_view = torch.randn(6, 5, 3, 3, generator=gen).transpose(0, 1) / 7  # [5, 6, 3, 3] strided
    b_view = torch.randn(10, generator=gen)[::2]
    mask = (torch.rand(2, 11, 9, generator=gen) < 0.3).transpose(1, 2)
    assert not (s_cl.is_contiguous() or t_view.is_contiguous() or w_view.is_contiguous()
                or b_view.is_contiguous() or mask.is_contiguous())
    check(s_cl, t_view, mask, w_view, b_view, relu=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(gen, dtype):
    s, t, w, b = inputs(gen, 2, 16, 12, 10, 12, 3, dtype=dtype)
    check(s, t, fgfi_like_mask(2, (10, 12), 0.3, gen), w, b, relu=True)


def large_gradient_inputs(gen, which, dtype, k=3):
    """Inputs [2, 4, 8, 8] -> 4 channels, for a full mask (N_p = 128), whose float64 gradient of
    ``which`` ("weight" or "student") is large but within float16's range, while N_p times it is
    not: the backward's products sum N_p * d(loss)/dz (d(loss)/dz ~ -55 / N_p here; the 1/N_p comes
    after them), over the locations times a student of ~1000 for the weight's gradient (~ -5.5e4),
    over the channels times weights of 100 to 400 for the student's (~ -4.5e3)."""
    B, Cs, Ct, H, W = 2, 4, 4, 8, 8
    if which == "weight":
        s = 1000 + 10 * torch.randn(B, Cs, H, W, generator=gen, dtype=torch.float64)
        w = torch.randn(Ct, Cs, k, k, generator=gen, dtype=torch.float64) * 1e-3
    else:
        s = 0.01 * torch.randn(B, Cs, H, W, generator=gen, dtype=torch.float64)
        w = 100 + 300 * torch.rand(Ct, Cs, k, k, generator=gen, dtype=torch.float64)
    b = torch.randn(Ct, generator=gen, dtype=torch.float64)
    t = F.conv2d(s, w, b, padding=k // 2) + 55 + torch.randn(B, Ct, H, W, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (s, t, w, b)], torch.ones(B, H, W, dtype=torch.bool)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("which", ["weight", "student"])
def test_half_gradients_near_the_float16_max(gen, which, dtype):
    """The backward's products in float16 overflowed to -inf where the gradient fits (a weight
    gradient of -5.5e4): they sum in float32. bfloat16, with float32's range, did not overflow."""
    (s, t, w, b), mask = large_gradient_inputs(gen, which, dtype)
    leaves = [x.double().requires_grad_() for x in (s, w)]
    dense_reference(leaves[0], t, mask, leaves[1], b, False).backward()
    largest = (leaves[1] if which == "weight" else leaves[0]).grad.abs().max().item()
    fp16_max = torch.finfo(torch.float16).max
    assert fp16_max / mask.sum() < largest < fp16_max  # it fits, N_p times it does not
    check(s, t, mask, w, b, relu=False, upstream=1.0)


@pytest.mark.parametrize("relu", [False, True])
def test_only_some_gradients(gen, relu):
    """A frozen adapter, a student without grad, a teacher that requires grad: each path alone."""
    s, t, w, b = inputs(gen, 2, 6, 7, 8, 9, 3)
    mask = fgfi_like_mask(2, (8, 9), 0.3, gen)
    want = dense_reference(s, t, mask, w, b, relu)
    for needs in ([True, False, False, False], [False, False, True, False],
                  [False, True, False, False], [False, False, False, True]):
        leaves = [x.detach().clone().requires_grad_(n) for x, n in zip((s, t, w, b), needs)]
        ref_leaves = [x.detach().double().requires_grad_(n) for x, n in zip((s, t, w, b), needs)]
        got = fgd.ops.masked_adapt_loss(leaves[0], leaves[1], mask, leaves[2], leaves[3], relu=relu)
        torch.testing.assert_close(got.double(), want, **TOL[torch.float32])
        got.backward()
        dense_reference(*ref_leaves[:2], mask, *ref_leaves[2:], relu).backward()
        for a, r, n in zip(leaves, ref_leaves, needs):
            assert (a.grad is not None) == n
            if n:
                torch.testing.assert_close(a.grad.double(), r.grad, **TOL[torch.float32])


def test_no_grad_forward_matches(gen):
    s, t, w, b = inputs(gen, 2, 6, 7, 8, 9, 3)
    mask = fgfi_like_mask(2, (8, 9), 0.3, gen)
    with torch.no_grad():
        loss = fgd.ops.masked_adapt_loss(s.requires_grad_(), t, mask, w, b, relu=True)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), dense_reference(s, t, mask, w, b, True))
    _, saved, idx = torch.ops.fgd._masked_adapt_forward(s, t, mask, w, b, True, False)
    assert saved.shape == (7, 0) and idx.shape == (0,)  # nothing kept when no backward will run


def test_non_finite_features_outside_the_neighbourhood_never_count(gen):
    """The dense path's weight gradient turns NaN here (0 * NaN in conv's backward); ours is the
    gradient of the finite features the masked locations read."""
    s, t, w, b = inputs(gen, 1, 4, 4, 8, 8, 3)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    bad_s, bad_t = s.clone(), t.clone()
    bad_s[..., 5:, 5:] = float("nan")  # beyond the 3x3 neighbourhood of every masked location
    bad_t[..., 4:, :] = float("inf")
    leaves = [x.clone().requires_grad_() for x in (bad_s, bad_t, w, b)]
    got = fgd.ops.masked_adapt_loss(leaves[0], leaves[1], mask, *leaves[2:], relu=True)
    got.backward()
    clean = [x.double().requires_grad_() for x in (s, t, w, b)]
    want = dense_reference(clean[0], clean[1], mask, *clean[2:], True)
    want.backward()
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])
    for a, r in zip(leaves, clean):
        torch.testing.assert_close(a.grad.double(), r.grad, **TOL[torch.float32])


def test_peak_memory_below_the_dense_map(gen):
    """At 15 % density no allocation of a forward + backward is as large as the adapted map, and the
    peak stays below the dense path's."""
    from fgd.timing import peak_memory

    B, Cs, Ct, H, W = 2, 32, 128, 48, 48
    s, t, w, b = inputs(gen, B, Cs, Ct, H, W, 3)
    mask = imitation_mask_at_density(B, (H, W), 0.15, gen)
    s.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    adapted_map = B * Ct * H * W * 4

    def sparse():
        fgd.ops.masked_adapt_loss(s, t, mask, w, b, relu=True).backward()

    def dense():
        fgd.imitation_loss(F.conv2d(s, w, b, padding=1).relu(), t, mask).backward()

    sparse_peak, sparse_largest = peak_memory(sparse, "cpu")
    dense_peak, dense_largest = peak_memory(dense, "cpu")
    assert dense_largest >= adapted_map  # the measurement sees the dense map
    assert sparse_largest < adapted_map
    assert sparse_peak < dense_peak


def test_opcheck(gen):
    s, t, w, b = inputs(gen, 2, 3, 4, 5, 6, 3)
    mask = torch.rand(2, 5, 6, generator=gen) < 0.5
    fwd = torch.ops.fgd._masked_adapt_forward.default
    torch.library.opcheck(fwd, (s.requires_grad_(), t, mask, w.requires_grad_(), b, True, True))
    torch.library.opcheck(fwd, (s.double(), t.double().requires_grad_(), mask.double(), w.double(), None,
                                False, True))
    torch.library.opcheck(fwd, (s.detach(), t, mask, w.detach(), b, False, False))
    _, saved, idx = fwd(s.detach(), t, mask, w.detach(), b, True, True)
    assert torch.equal(idx, mask.reshape(-1).nonzero().view(-1))
    torch.library.opcheck(torch.ops.fgd._masked_adapt_backward.default,
                          (torch.tensor(0.5), saved, idx, s.detach(), t, mask, w.detach(), b, True,
                           [True, True, True, True]))
    torch.library.opcheck(torch.ops.fgd._masked_adapt_backward.default,
                          (torch.tensor(0.5), saved, idx, s.detach(), t, mask, w.detach(), None, True,
                           [True, False, False, False]))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(gen, backend):
    torch._dynamo.reset()
    s, t, w, b = inputs(gen, 2, 6, 5, 9, 10, 3)
    mask = fgfi_like_mask(2, (9, 10), 0.3, gen)

    def step(s, t, mask, w, b):
        return fgd.ops.masked_adapt_loss(s * 1.0, t, mask, w, b, relu=True) * 2

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    leaves_e = [x.clone().requires_grad_() for x in (s, w, b)]
    leaves_c = [x.clone().requires_grad_() for x in (s, w, b)]
    eager = step(leaves_e[0], t, mask, *leaves_e[1:])
    got = compiled(leaves_c[0], t, mask, *leaves_c[1:])
    torch.testing.assert_close(got, eager)
    eager.backward()
    got.backward()
    for a, e in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, e.grad)
    with torch.no_grad():
        torch.testing.assert_close(compiled(s, t, mask, w, b), eager.detach())


S, T, M = torch.zeros(2, 4, 5, 6), torch.zeros(2, 8, 5, 6), torch.ones(2, 5, 6, dtype=torch.bool)
W3, B8 = torch.zeros(8, 4, 3, 3), torch.zeros(8)
BAD = [
    (ValueError, r"weight .* takes 3 input channels but student .* has 4", (S, T, M, torch.zeros(8, 3, 3, 3), B8)),
    (ValueError, r"teacher must have shape \[B, Ct, H, W\] = \[2, 8, 5, 6\]", (S, T[:, :7], M, W3, B8)),
    (ValueError, r"teacher must have shape", (S, T[..., :5], M, W3, B8)),
    (ValueError, "k = 1 or 3", (S, T, M, torch.zeros(8, 4, 2, 2), B8)),
    (ValueError, "k = 1 or 3", (S, T, M, torch.zeros(8, 4, 5, 5), B8)),
    (ValueError, "k = 1 or 3", (S, T, M, torch.zeros(8, 4, 3, 1), B8)),
    (ValueError, "k = 1 or 3", (S, T, M, torch.zeros(8, 4, 9), B8)),
    (ValueError, r"mask must have shape \[B, H, W\] = \[2, 5, 6\]", (S, T, M[:, :4], W3, B8)),
    (ValueError, r"mask must have shape", (S, T, M[0], W3, B8)),
    (ValueError, r"bias must have shape \[Ct\] = \[8\]", (S, T, M, W3, torch.zeros(4))),
    (ValueError, r"student must have shape \[B, Cs, H, W\]", (S[0], T, M, W3, B8)),
    (ValueError, "non-negative", (S, T, M.float() - 2, W3, B8)),
    (TypeError, "teacher must have the student's dtype", (S, T.double(), M, W3, B8)),
    (TypeError, "weight must have the student's dtype", (S, T, M, W3.half(), B8)),
    (TypeError, "bias must have the student's dtype", (S, T, M, W3, B8.double())),
    (TypeError, "student must be a floating-point", (S.long(), T, M, W3, B8)),
    (TypeError, "mask must be a bool tensor or a floating-point", (S, T, M.int(), W3, B8)),
]


@pytest.mark.parametrize("exc,match,args", BAD, ids=[m for _, m, _ in BAD])
def test_bad_inputs(exc, match, args):
    with pytest.raises(exc, match=match):
        fgd.ops.masked_adapt_loss(*args)
    with pytest.raises(exc, match=match):
        torch.ops.fgd._masked_adapt_forward.default(*args, False, True)


def test_bad_python_arguments():
    with pytest.raises(TypeError, match="relu must be a bool"):
        fgd.ops.masked_adapt_loss(S, T, M, W3, B8, relu=1)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        fgd.ops.masked_adapt_loss(S, T, M, [[1.0]])
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        fgd.ops.masked_adapt_loss(S, T, M, W3, 0.0)


def test_backward_rejects_a_foreign_saved_tensor():
    idx = torch.arange(60)
    with pytest.raises(ValueError, match=r"saved \[Ct, N\] and idx \[N\] must be the tensors .* \(Ct = 8\)"):
        torch.ops.fgd._masked_adapt_backward(torch.tensor(1.0), torch.zeros(8, 3), idx, S, T, M, W3, B8,
                                             False, [True, False, False, False])


def test_autocast_runs_in_the_autocast_dtype_like_conv2d(gen):
    s, t, w, b = inputs(gen, 2, 8, 6, 9, 10, 3)
    mask = fgfi_like_mask(2, (9, 10), 0.3, gen)
    leaves = [x.clone().requires_grad_() for x in (s, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fgd.ops.masked_adapt_loss(leaves[0], t, mask, leaves[1], leaves[2], relu=True)
        a = F.conv2d(s, w, b, padding=1).relu()
        want = fgd.imitation_loss(a, t.to(a.dtype), mask)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])
    got.backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float32 for x in leaves)


def test_float16_gradients_survive_a_large_n_p(gen):
    """1/N_p is applied in backward, together with the upstream (loss-scaled) gradient: a float16
    buffer holding d(loss)/dz itself would underflow here (|d| / N_p ~ 5e-4 / 16384 < 2^-24)."""
    s, _, w, b = inputs(gen, 1, 8, 8, 128, 128, 3, dtype=torch.float64)
    s, b = s * 0.01, b * 0.01  # features ~1e-2: float16 resolves differences of 5e-4 there
    t = F.conv2d(s, w, b, padding=1) + 5e-4 * torch.randn(1, 8, 128, 128, generator=gen, dtype=torch.float64)
    s, t, w, b = (x.half() for x in (s, t, w, b))
    mask = torch.ones(1, 128, 128, dtype=torch.bool)
    leaves = [x.clone().requires_grad_() for x in (s, w, b)]
    got = fgd.ops.masked_adapt_loss(leaves[0], t, mask, leaves[1], leaves[2])
    (got * 2.0 ** 15).backward()  # what a GradScaler does
    ref_leaves = [x.double().requires_grad_() for x in (s, w, b)]
    (dense_reference(ref_leaves[0], t, mask, *ref_leaves[1:], False) * 2.0 ** 15).backward()
    for a, r in zip(leaves, ref_leaves):
        err = ((a.grad.double() - r.grad).norm() / r.grad.norm()).item()
        assert err < 2e-2, err
