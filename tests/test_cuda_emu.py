"""The CUDA kernels' tests, on two backends:

- ``emu``: csrc/cuda/*.cu compiled for the CPU through the CUDA emulator (csrc/emulator/; built from
  the checkout's csrc/ by emu_build.py and loaded as torch.ops.fgd_emu.*). Runs everywhere, CI too.
- ``cuda``: the same cases on the real CUDA build (torch.ops.fgd.* on a GPU); skipped without one.

Both are compared with fgd.reference (float64) and with the CPU kernels. The emulated cases run with
lowered launch limits (few blocks, a small grid.y) so that every grid-stride loop is taken, and
with several seeds of the emulator's thread order where a missing barrier could hide.
"""
import os
import warnings

import pytest
import torch

import fgd
from fgd import reference as ref
from fgd.synthetic import fgfi_like_mask, grid_anchors, imitation_mask_at_density, random_boxes, random_gt_batch

from conftest import requires_cuda
from test_imitation_mask import ambiguous
from test_masked_adapt import TOL as ADAPT_TOL, check as check_adapt, inputs as adapt_inputs, large_gradient_inputs

LOWERED = dict(max_grid_y=3, max_blocks=6)  # the emulator's launch limits in most cases
HALF = (torch.float16, torch.bfloat16)


class Backend:
    """The public ops of one build: ``ops`` is torch.ops.fgd (CUDA) or torch.ops.fgd_emu."""

    def __init__(self, name, ops, device):
        self.name, self.ops, self.device = name, ops, device

    def to(self, *xs):
        return [x if x is None else x.to(self.device, copy=True) for x in xs]

    def configure(self, seed=0, max_grid_y=65535, max_blocks=4096):
        if self.name == "emu":
            self.ops._emu_configure(seed, max_grid_y, max_blocks)

    def box_iou(self, b1, b2, offset=0.0):
        return self.ops.box_iou.default(b1, b2, float(offset))

    def imitation_mask(self, anchors, gt, counts, feat, thresh=0.5, offset=0.0):
        return self.ops.imitation_mask.default(anchors, gt, counts, list(feat), float(thresh), float(offset))

    def imitation_loss(self, s, t, mask):
        return self.ops.imitation_loss.default(s, t, mask)

    def masked_adapt_loss(self, s, t, mask, w, b=None, *, relu=False):
        save = fgd.ops._backward_may_follow(s, t, w, b)
        return self.ops._masked_adapt_forward.default(s, t, mask, w, b, relu, save)[0]


# FGD_CUDA_TEST_BACKENDS=cuda runs only the real build (e.g. under compute-sanitizer), =emu only
# the emulated one.
BACKENDS = os.environ.get("FGD_CUDA_TEST_BACKENDS", "emu,cuda").split(",")
requires_emu = pytest.mark.skipif("emu" not in BACKENDS, reason="FGD_CUDA_TEST_BACKENDS excludes emu")


@pytest.fixture(scope="module", params=[pytest.param("emu", marks=requires_emu),
                                        pytest.param("cuda", marks=requires_cuda)])
def backend(request):
    if request.param == "cuda":
        return Backend("cuda", torch.ops.fgd, "cuda")
    import emu_build

    return Backend("emu", emu_build.load(), "cpu")


@pytest.fixture
def be(backend):
    """The backend, with the emulator's limits lowered and its seed fixed for this test."""
    backend.configure(0, **LOWERED)
    yield backend
    backend.configure()


def on(be, x):
    """x on the backend's device, checking the op really ran there."""
    assert x.device.type == torch.device(be.device).type
    return x.cpu()


# ---- box_iou ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_box_iou_parity(be, gen, dtype, offset):
    b1 = random_boxes(50, (300, 400), min_size=0, generator=gen, dtype=dtype, batch=(2,))
    b2 = random_boxes(70, (300, 400), min_size=0, generator=gen, dtype=dtype, batch=(2,))
    b1[0, 0] = torch.tensor([5.0, 5, 1, 1], dtype=dtype)  # degenerate
    b1[1, 0] = b2[1, 2]  # identical boxes: IoU 1
    got = on(be, be.box_iou(*be.to(b1, b2[:, ::2]), offset))
    assert got.dtype == dtype and got.shape == (2, 50, 35)
    tol = 1e-2 if dtype in HALF else 1e-6
    torch.testing.assert_close(got.double(), ref.box_iou(b1, b2[:, ::2], offset=offset), atol=tol, rtol=0)
    torch.testing.assert_close(got, fgd.box_iou(b1, b2[:, ::2], offset=offset), atol=tol, rtol=0)
    assert be.box_iou(*be.to(b1[:, :0], b2)).shape == (2, 0, 70)
    flat = on(be, be.box_iou(*be.to(b1[0], b2[0]), offset))  # [N, 4] x [M, 4]
    torch.testing.assert_close(flat, fgd.box_iou(b1[0], b2[0], offset=offset), atol=tol, rtol=0)


def test_box_iou_legacy_offset(be, gen):
    """offset=1 adds before clamping (the official code's and mmcv's formula)."""
    from test_box_iou import legacy_iou, sub_pixel_boxes

    boxes = sub_pixel_boxes(gen)
    got = on(be, be.box_iou(*be.to(boxes, boxes), 1.0))
    torch.testing.assert_close(got.double(), legacy_iou(boxes, boxes), rtol=1e-5, atol=1e-6)


# ---- imitation_mask -----------------------------------------------------------------------------

def check_mask(be, anchors, gt, counts, feat, thresh=0.5, offset=0.0):
    """The backend's mask equals the reference's (up to decisions within rounding of a threshold)
    and the CPU kernel's."""
    got = on(be, be.imitation_mask(*be.to(anchors, gt, counts), feat, thresh, offset))
    want = ref.imitation_mask(anchors, gt, counts, feat, thresh=thresh, offset=offset)
    assert got.dtype == torch.bool and got.shape == want.shape
    wrong = (got != want) & ~ambiguous(anchors, gt, counts, feat, thresh, offset)
    assert not wrong.any(), f"{int(wrong.sum())} locations differ from the reference"
    assert torch.equal(got, fgd.imitation_mask(anchors, gt, counts, feat, thresh=thresh, offset=offset))
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("thresh,offset", [(0.5, 0.0), (0.3, 1.0), (0.0, 0.0)])
def test_imitation_mask_parity(be, gen, dtype, thresh, offset):
    """More GTs than one shared-memory tile (128), H*W not a multiple of the block, anchors in
    several chunks (more than the lowered grid.y), an image without GTs, a full one."""
    feat = (30, 41)
    anchors = grid_anchors(feat, 16, dtype=dtype)  # 11070 anchors: 3 chunks of 4096
    gt, counts = random_gt_batch(4, 150, (480, 656), gen, dtype=dtype)
    counts[0], counts[1] = 0, 150
    m = check_mask(be, anchors, gt, counts, feat, thresh, offset)
    assert m[1:].any() and not m[0].any()


def test_imitation_mask_batch_above_grid_y(be, gen):
    """B = 8 images over a grid.y of 3 (lowered limit): the kernel's stride over the batch."""
    feat = (13, 17)
    anchors = grid_anchors(feat, 8, sizes=(16, 32, 64))
    gt, counts = random_gt_batch(8, 6, (104, 136), gen)
    counts[3] = 0
    assert check_mask(be, anchors, gt, counts, feat).any()


def test_imitation_mask_batched_anchors_and_cpu_counts(be, gen):
    feat = (20, 30)
    anchors = grid_anchors(feat, 8, sizes=(32, 64), ratios=(1.0,))
    gt, counts = random_gt_batch(3, 10, (160, 240), gen)
    per_image = torch.stack([anchors, anchors + 3, anchors - 5])
    got = be.imitation_mask(*be.to(per_image, gt), counts, feat)  # counts stay on the CPU
    assert torch.equal(on(be, got), fgd.imitation_mask(per_image, gt, counts, feat))


@pytest.mark.parametrize("case", ["K=1", "no GT slots", "all padded"])
def test_imitation_mask_edge_cases(be, gen, case):
    feat = (9, 14)
    K1 = case == "K=1"
    anchors = grid_anchors(feat, 16, sizes=(48,), ratios=(1.0,)) if K1 else grid_anchors(feat, 16)
    gt, counts = random_gt_batch(3, 5, (144, 224), gen)
    if case == "no GT slots":
        gt, counts = gt[:, :0], torch.zeros(3, dtype=torch.long)
    elif case == "all padded":
        counts = torch.zeros(3, dtype=torch.long)
    m = check_mask(be, anchors, gt, counts, feat)
    assert m.any() == K1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_imitation_mask_thread_orders(be, gen, seed):
    """Other seeds of the emulator's thread and block order: the same mask."""
    be.configure(seed, **LOWERED)
    feat = (11, 23)
    anchors = grid_anchors(feat, 16)
    gt, counts = random_gt_batch(2, 140, (176, 368), gen)
    check_mask(be, anchors, gt, counts, feat)


@requires_cuda
def test_imitation_mask_counts_on_gpu_are_clamped_not_read_out_of_bounds(gen):
    feat = (10, 10)
    anchors = grid_anchors(feat, 16)
    gt, _ = random_gt_batch(3, 4, (160, 160), gen)
    bad = torch.tensor([-3, 2, 99], device="cuda")  # not checked on the GPU (no sync): clamped to [0, G]
    got = fgd.imitation_mask(anchors.cuda(), gt.cuda(), bad, feat)
    assert torch.equal(got.cpu(), fgd.imitation_mask(anchors, gt, torch.tensor([0, 2, 4]), feat))


# ---- imitation_loss -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("mask_kind", ["bool", "weights", "empty", "full"])
def test_imitation_loss_parity(be, gen, dtype, mask_kind):
    shape = (3, 24, 33, 41)
    s = torch.randn(shape, generator=gen).to(dtype)
    t = torch.randn(shape, generator=gen).to(dtype)
    mask = {"bool": fgfi_like_mask(3, shape[2:], 0.15, gen),
            "weights": torch.rand(3, *shape[2:], generator=gen) * (torch.rand(3, *shape[2:], generator=gen) < 0.3),
            "empty": torch.zeros(3, *shape[2:], dtype=torch.bool),
            "full": torch.ones(3, *shape[2:], dtype=torch.bool)}[mask_kind]
    sb = be.to(s)[0].to(memory_format=torch.channels_last).requires_grad_()
    tb = be.to(t)[0].requires_grad_()
    loss = be.imitation_loss(sb, tb, be.to(mask)[0])
    loss.backward(torch.tensor(0.5, device=be.device, dtype=dtype))
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    want = ref.imitation_loss(s1.double(), t1.double(), mask)
    (want * 0.5).backward()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype in HALF else dict(rtol=1e-5, atol=1e-6)
    assert loss.dtype == dtype and loss.dim() == 0
    torch.testing.assert_close(on(be, loss).double(), want, **tol)
    torch.testing.assert_close(on(be, sb.grad).double(), s1.grad.double(), **tol)
    torch.testing.assert_close(on(be, tb.grad).double(), t1.grad.double(), **tol)
    cpu = fgd.imitation_loss(s, t, mask)
    torch.testing.assert_close(on(be, loss), cpu, **tol)


def test_imitation_loss_default_limits_and_planes_above_grid_y(backend, gen):
    """With the GPU's own limits (many blocks), and with B*C planes far above a grid.y of 2."""
    s = torch.randn(4, 40, 37, 29, generator=gen, dtype=torch.float64)
    t = torch.randn(4, 40, 37, 29, generator=gen, dtype=torch.float64)
    mask = fgfi_like_mask(4, (37, 29), 0.3, gen)
    want = ref.imitation_loss(s, t, mask)
    for limits in (dict(), dict(max_grid_y=2, max_blocks=3)):
        backend.configure(0, **limits)
        try:
            got = backend.imitation_loss(*backend.to(s, t, mask))
        finally:
            backend.configure()
        torch.testing.assert_close(on(backend, got), want, rtol=1e-12, atol=0)


def test_imitation_loss_gradcheck(be, gen):
    s, t = (torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    s, t = (x.requires_grad_() for x in be.to(s, t))
    mask = be.to(torch.rand(2, 4, 5, generator=gen) < 0.5)[0]
    assert torch.autograd.gradcheck(lambda a, b: be.imitation_loss(a, b, mask), (s, t))


# ---- masked_adapt_loss --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,relu", [(1, False), (3, True), (3, False)])
def test_masked_adapt_loss_parity(be, gen, dtype, k, relu):
    """Against the float64 dense reference, every gradient (teacher included); N_p = 0 too."""
    s, t, w, b = adapt_inputs(gen, 2, 48, 40, 30, 34, k, dtype=dtype)
    mask = imitation_mask_at_density(2, (30, 34), 0.2, gen)
    tol = dict(rtol=1e-3, atol=1e-5) if dtype == torch.float32 else ADAPT_TOL[dtype]  # TF32-free, looser sums
    for m in (mask, torch.zeros_like(mask)):
        got = check_adapt(*be.to(s, t, m, w, b), relu, tol=tol, fn=be.masked_adapt_loss)
        on(be, got)


@pytest.mark.parametrize("k", [1, 3])
def test_masked_adapt_loss_many_chunks_and_borders(be, gen, k):
    """Few channels in, many out: chunks of 32 locations, so the driver runs the kernels many times;
    a full mask reaches every border tap."""
    s, t, w, b = adapt_inputs(gen, 2, 3, 20, 12, 15, k, dtype=torch.float64)
    for mask in (torch.rand(2, 12, 15, generator=gen) < 0.6, torch.ones(2, 12, 15, dtype=torch.bool)):
        check_adapt(*be.to(s, t, mask, w, b), True, fn=be.masked_adapt_loss)


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("which", ["weight", "student"])
def test_masked_adapt_loss_half_gradients_near_the_float16_max(be, gen, which, dtype):
    """The backward's products sum N_p times the gradient: in float32, not float16 (-inf)."""
    (s, t, w, b), mask = large_gradient_inputs(gen, which, dtype)
    on(be, check_adapt(*be.to(s, t, mask, w, b), False, fn=be.masked_adapt_loss, upstream=1.0))


def test_masked_adapt_loss_opcheck_and_float_weights(be, gen):
    s, t, w, b = be.to(*adapt_inputs(gen, 2, 5, 6, 7, 8, 3))
    weights = be.to(torch.rand(2, 7, 8, generator=gen) * (torch.rand(2, 7, 8, generator=gen) < 0.5))[0]
    check_adapt(s, t, weights, w, b, True, fn=be.masked_adapt_loss)
    fwd = be.ops._masked_adapt_forward.default
    torch.library.opcheck(fwd, (s.requires_grad_(), t, weights, w.requires_grad_(), b, True, True))
    _, saved, idx = fwd(s.detach(), t, weights, w.detach(), b, True, True)
    torch.library.opcheck(be.ops._masked_adapt_backward.default,
                          (torch.tensor(0.5, device=be.device), saved, idx, s.detach(), t, weights,
                           w.detach(), b, True, [True, True, True, True]))


def test_opcheck(be, gen):
    b = be.to(random_boxes(6, (50, 50), generator=gen))[0]
    torch.library.opcheck(be.ops.box_iou.default, (b, b, 0.0))
    feat = (4, 5)
    anchors, gt = be.to(grid_anchors(feat, 16), random_gt_batch(2, 3, (64, 80), gen)[0])
    counts = be.to(torch.tensor([3, 1]))[0]
    torch.library.opcheck(be.ops.imitation_mask.default, (anchors, gt, counts, [4, 5], 0.5, 0.0))
    s = be.to(torch.randn(2, 4, 5, 6, generator=gen))[0].requires_grad_()
    mask = be.to(torch.ones(2, 5, 6))[0]
    torch.library.opcheck(be.ops.imitation_loss.default, (s, s.detach() + 1, mask))


def test_bad_inputs_are_clear_errors(be):
    """The same C++ checks guard both builds."""
    box = be.to(torch.tensor([[0.0, 0, 1, 1]]))[0]
    with pytest.raises(ValueError, match="offset must be 0"):
        be.box_iou(box, box, 0.5)
    with pytest.raises(TypeError, match="gt_counts must be an int64"):
        be.imitation_mask(box, box[None], be.to(torch.tensor([1.0]))[0], (1, 1))
    s = be.to(torch.zeros(1, 2, 3, 3))[0]
    with pytest.raises(ValueError, match=r"mask must have shape \[B, H, W\]"):
        be.imitation_loss(s, s, be.to(torch.ones(1, 3, 4, dtype=torch.bool))[0])
    with pytest.raises(RuntimeError, match="grad must be on the CPU or on student's device"):
        be.ops._imitation_loss_backward.default(torch.tensor(1.0, device="meta"), s, s,
                                                be.to(torch.ones(1, 3, 3, dtype=torch.bool))[0])


# ---- CUDA only ----------------------------------------------------------------------------------

@requires_cuda
def test_no_host_sync_in_loss_and_mask(gen):
    feat = (12, 16)
    anchors = grid_anchors(feat, 16).cuda()
    gt, counts = random_gt_batch(2, 5, (192, 256), gen)
    gt, counts = gt.cuda(), counts.cuda()
    s = torch.randn(2, 8, *feat, device="cuda", requires_grad=True)
    t = torch.randn(2, 8, *feat, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = fgd.imitation_mask(anchors, gt, counts, feat)
        fgd.imitation_loss(s, t, mask).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
def test_float_mask_weights_cost_one_sync(gen):
    """Their check reads the smallest and the largest weight back in one copy (it once made two)."""
    s = torch.randn(2, 8, 5, 6, generator=gen).cuda()
    mask = torch.rand(2, 5, 6, generator=gen).cuda()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fgd.imitation_loss(s, s + 1, mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert sum("synchroniz" in str(w.message) for w in seen) == 1


@requires_cuda
def test_device_mismatch_is_a_clear_error():
    b = torch.tensor([[0.0, 0, 1, 1]])
    with pytest.raises(RuntimeError, match="same device"):
        fgd.box_iou(b.cuda(), b)
    s = torch.zeros(1, 2, 3, 3, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        fgd.imitation_loss(s, s, torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="gt_counts must be on the CPU or on gt_boxes' device"):
        fgd.imitation_mask(b, b[None], torch.tensor([1], device="cuda"), (1, 1))


# ---- the emulator itself: it finds what it claims to ----------------------------------------------

@pytest.fixture(scope="module")
def emu():
    if "emu" not in BACKENDS:
        pytest.skip("FGD_CUDA_TEST_BACKENDS excludes emu")
    import emu_build

    return emu_build.load()


def test_emu_random_thread_order_exposes_a_missing_barrier(emu):
    """Thread i reads what thread i + 1 wrote to shared memory: right with the barrier whatever the
    seed; without it, the random order (and the poisoned shared memory) gives wrong values."""
    want = (torch.arange(128, dtype=torch.int32) + 1) % 128
    wrong = 0
    for seed in range(4):
        emu._emu_configure(seed)
        assert torch.equal(emu._emu_selftest("neighbour_sync"), want)
        wrong += int((emu._emu_selftest("neighbour_nosync") != want).sum())
    emu._emu_configure()
    assert wrong > 0


@pytest.mark.parametrize("case,message", [
    ("divergent_barrier", r"deadlock: threads wait at different __syncthreads \(.*emu_ops.cpp:\d+ and .*emu_ops.cpp:\d+\)"),
    ("shuffle_exited", r"shuffles with a mask naming lane 16, which has exited"),
    ("shuffle_vs_barrier", r"deadlock: 16 threads wait at __syncthreads, 16 at a warp shuffle"),
    ("block_too_large", r"a GPU would refuse this launch: more than 1024 threads per block"),
    ("grid_y_too_large", r"a GPU would refuse this launch: grid.y or grid.z > 65535"),
    ("zero_grid", r"a GPU would refuse this launch: a zero dimension"),
])
def test_emu_reports_what_a_gpu_would_hang_on_or_refuse(emu, case, message):
    with pytest.raises(RuntimeError, match=message) as e:
        emu._emu_selftest(case)
    assert "fgd emu: kernel " in str(e.value)  # names the kernel


def test_emu_lowered_grid_limit_is_enforced(emu):
    emu._emu_configure(0, 3, 4096)
    try:
        with pytest.raises(RuntimeError, match=r"grid.y or grid.z > 3"):
            emu._emu_selftest("grid_y_too_large")
    finally:
        emu._emu_configure()


def test_emu_atomics(emu):
    assert emu._emu_selftest("count_atomic").item() == 512.0
