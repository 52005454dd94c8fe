import pytest
import torch
import torchvision

import fgd
from fgd import reference as ref
from fgd.synthetic import random_boxes

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-12}


def _check(b1, b2, offset=0.0):
    got = fgd.box_iou(b1, b2, offset=offset)
    want = ref.box_iou(b1, b2, offset=offset)
    assert got.dtype == b1.dtype and got.shape == want.shape
    # half inputs are rounded before the IoU: compare with the reference on the rounded inputs
    torch.testing.assert_close(got.double(), want, atol=TOL[b1.dtype], rtol=0)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_random_against_reference(gen, dtype, offset):
    b1 = random_boxes(37, (300, 500), min_size=1, generator=gen, dtype=dtype)
    b2 = random_boxes(53, (300, 500), min_size=1, generator=gen, dtype=dtype)
    _check(b1, b2, offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_torchvision(gen, dtype):
    b1 = random_boxes(40, (200, 200), generator=gen, dtype=dtype)
    b2 = random_boxes(30, (200, 200), generator=gen, dtype=dtype)
    torch.testing.assert_close(fgd.box_iou(b1, b2), torchvision.ops.box_iou(b1, b2))


def test_batched(gen):
    b1 = random_boxes(7, (100, 100), generator=gen, batch=(3,))
    b2 = random_boxes(5, (100, 100), generator=gen, batch=(3,))
    got = _check(b1, b2)
    assert got.shape == (3, 7, 5)
    for b in range(3):
        torch.testing.assert_close(got[b], fgd.box_iou(b1[b], b2[b]))


@pytest.mark.parametrize("shape1,shape2,out", [((0, 4), (5, 4), (0, 5)), ((5, 4), (0, 4), (5, 0)),
                                               ((2, 0, 4), (2, 3, 4), (2, 0, 3)),
                                               ((0, 3, 4), (0, 2, 4), (0, 3, 2))])
def test_empty(shape1, shape2, out):
    assert fgd.box_iou(torch.zeros(shape1), torch.zeros(shape2)).shape == out


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_degenerate_boxes(offset):
    boxes = torch.tensor([[10.0, 10, 5, 20],   # x2 < x1
                          [10.0, 10, 20, 5],   # y2 < y1
                          [3.0, 3, 3, 3],      # a point: area 0 (offset 0) or 1 (offset 1)
                          [0.0, 0, 30, 30]])
    got = _check(boxes, boxes, offset)
    assert torch.isfinite(got).all()
    # inverted boxes overlap nothing, not even themselves
    assert (got[:2] == 0).all() and (got[:, :2] == 0).all()
    assert got[2, 2] == (1.0 if offset == 1.0 else 0.0)  # empty union gives 0, not NaN


def test_offset_one_matches_legacy_formula():
    a = torch.tensor([[0.0, 0, 9, 9]])   # 10 x 10 pixels under +1
    b = torch.tensor([[5.0, 5, 14, 14]])  # overlap 5 x 5
    assert fgd.box_iou(a, b, offset=1.0).item() == pytest.approx(25 / (100 + 100 - 25))


def legacy_iou(a, b):
    """IoU as the official FGFI code and mmcv's bbox_overlaps compute it with the +1 convention,
    written out: intersection max(0, min(x2) - max(x1) + 1), adding before clamping."""
    a, b = a.double()[:, None], b.double()[None]
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0]) + 1).clamp_min(0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1]) + 1).clamp_min(0)
    area = lambda x: (x[..., 2] - x[..., 0] + 1) * (x[..., 3] - x[..., 1] + 1)  # noqa: E731
    return iw * ih / (area(a) + area(b) - iw * ih)


def sub_pixel_boxes(gen, n=200):
    """Boxes under 3 pixels wide in a 20-pixel square: many sub-pixel ones and many less than a
    pixel apart, where adding before clamping decides whether they overlap."""
    xy = torch.rand(n, 2, generator=gen) * 20
    return torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 3], dim=1)


def test_offset_one_is_the_legacy_formula(gen):
    boxes = sub_pixel_boxes(gen)
    for dtype in (torch.float32, torch.float64):
        got = fgd.box_iou(boxes.to(dtype), boxes.to(dtype), offset=1.0)
        torch.testing.assert_close(got.double(), legacy_iou(boxes, boxes), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref.box_iou(boxes, boxes, offset=1.0), legacy_iou(boxes, boxes))
    a = torch.tensor([[0.0, 0, 9, 9]])   # 10 x 10 pixels under +1
    b = torch.tensor([[9.5, 0, 19, 9]])  # 10.5 x 10, half a pixel to the right: overlap 0.5 x 10
    assert fgd.box_iou(a, b, offset=1.0).item() == pytest.approx(5 / (100 + 105 - 5))
    assert fgd.box_iou(a, b, offset=0.0).item() == 0.0


def test_huge_and_far_boxes(gen):
    huge = torch.tensor([[-1e6, -1e6, 1e6, 1e6], [0.0, 0, 1e6, 5e5]])
    small = random_boxes(20, (600, 600), generator=gen)
    far = small + 1e6
    for b2 in (small, far):
        _check(huge, b2)
        _check(huge.double(), b2.double())
    assert (fgd.box_iou(small, small + 1e4) == 0).all()


def test_identical_boxes_are_one(gen):
    b = random_boxes(10, (50, 50), generator=gen)
    torch.testing.assert_close(fgd.box_iou(b, b).diagonal(), torch.ones(10))


def test_non_contiguous(gen):
    b1 = random_boxes(12, (100, 100), generator=gen).t().contiguous().t()  # column-major
    wide = random_boxes(18, (100, 100), generator=gen).repeat(1, 2)[:, ::2]  # strided
    assert not b1.is_contiguous() and not wide.is_contiguous()
    _check(b1, wide)


def test_not_differentiable(gen):
    b1 = random_boxes(4, (50, 50), generator=gen).requires_grad_()
    assert not fgd.box_iou(b1, b1.detach()).requires_grad


def test_opcheck(gen):
    b1 = random_boxes(6, (50, 50), generator=gen)
    b2 = random_boxes(9, (50, 50), generator=gen, batch=())
    torch.library.opcheck(torch.ops.fgd.box_iou.default, (b1, b2, 0.0))
    torch.library.opcheck(torch.ops.fgd.box_iou.default, (b1[None], b2[None], 1.0))
    torch.library.opcheck(torch.ops.fgd.box_iou.default, (b1.requires_grad_(), b2, 0.0))
