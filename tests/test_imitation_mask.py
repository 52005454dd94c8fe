import pytest
import torch

import fgd
from fgd import reference as ref
from fgd.synthetic import grid_anchors, random_gt_batch

REL = 1e-5  # decisions this close to thresh * M_g may go either way in float32


def ambiguous(anchors, gt, counts, feat, thresh, offset):
    """Locations where some anchor's IoU is within float rounding of its GT's threshold."""
    B, G = gt.shape[:2]
    a = anchors.expand(B, *anchors.shape[-2:]) if anchors.dim() == 2 else anchors
    iou = ref.box_iou(a, gt, offset=offset)
    valid = torch.arange(G)[None, :] < counts[:, None]
    iou = torch.where(valid[:, None, :], iou, 0.0)
    thr = thresh * iou.amax(dim=1, keepdim=True) if iou.shape[1] else iou
    near = ((iou - thr).abs() <= REL * thr.abs() + 1e-12) & valid[:, None, :] & (thr > 0)
    return near.any(dim=2).view(B, *feat, -1).any(dim=3)


def check(anchors, gt, counts, feat, thresh=0.5, offset=0.0):
    got = fgd.imitation_mask(anchors, gt, counts, feat, thresh=thresh, offset=offset)
    want = ref.imitation_mask(anchors, gt, counts, feat, thresh=thresh, offset=offset)
    assert got.dtype == torch.bool and got.shape == want.shape
    wrong = got != want
    if wrong.any():
        wrong &= ~ambiguous(anchors, gt, counts, feat, thresh, offset)
    assert not wrong.any(), f"{int(wrong.sum())} locations differ from the reference"
    return got


@pytest.mark.parametrize("thresh", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_c4_like_against_reference(gen, thresh, offset):
    feat = (19, 31)
    anchors = grid_anchors(feat, 16)
    gt, counts = random_gt_batch(4, 12, (19 * 16, 31 * 16), gen, min_size=4)
    m = check(anchors, gt, counts, feat, thresh, offset)
    assert m.any()  # the random case is not trivially empty


def test_fpn_like_small_anchors(gen):
    feat = (25, 42)
    anchors = grid_anchors(feat, 8, sizes=(32, 40, 50), ratios=(1.0,))
    gt, counts = random_gt_batch(3, 40, (200, 336), gen, min_size=4, max_size=120)
    check(anchors, gt, counts, feat)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(gen, dtype):
    feat = (9, 13)
    anchors = grid_anchors(feat, 16, dtype=dtype)
    gt, counts = random_gt_batch(3, 6, (144, 208), gen, dtype=dtype)
    check(anchors, gt, counts, feat)


def test_batched_anchors_equal_shared(gen):
    feat = (11, 7)
    anchors = grid_anchors(feat, 16)
    gt, counts = random_gt_batch(3, 5, (176, 112), gen)
    shared = fgd.imitation_mask(anchors, gt, counts, feat)
    batched = fgd.imitation_mask(anchors.expand(3, -1, -1), gt, counts, feat)
    assert torch.equal(shared, batched)
    # different anchors per image are honoured
    per_image = torch.stack([anchors, anchors + 1000, anchors])
    check(per_image, gt, counts, feat)


def test_no_gt_and_all_padded(gen):
    feat = (6, 8)
    anchors = grid_anchors(feat, 16)
    gt, _ = random_gt_batch(3, 4, (96, 128), gen)
    empty = fgd.imitation_mask(anchors, gt, torch.zeros(3, dtype=torch.long), feat)
    assert empty.shape == (3, 6, 8) and not empty.any()
    no_rows = fgd.imitation_mask(anchors, torch.zeros(3, 0, 4), torch.zeros(3, dtype=torch.long), feat)
    assert not no_rows.any()
    # padded rows beyond the count are ignored whatever they hold
    gt2 = gt.clone()
    counts = torch.tensor([2, 0, 4])
    gt2[0, 2:] = torch.tensor([0.0, 0, 128, 96])
    assert torch.equal(fgd.imitation_mask(anchors, gt2, counts, feat),
                       fgd.imitation_mask(anchors, gt, counts, feat))
    assert not fgd.imitation_mask(anchors, gt, counts, feat)[1].any()


def test_empty_batch():
    out = fgd.imitation_mask(torch.zeros(12, 4), torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.long), (2, 3))
    assert out.shape == (0, 2, 3)


def test_k1_and_1x1_feature_map(gen):
    anchors = grid_anchors((1, 1), 16, sizes=(64,), ratios=(1.0,)) + 32  # covers the 64 x 64 image
    assert anchors.shape == (1, 4)
    gt, counts = random_gt_batch(4, 3, (64, 64), gen)
    counts[0] = 3
    m = check(anchors, gt, counts, (1, 1))
    # with one anchor, any GT that overlaps it has it as its best anchor
    assert m[0, 0, 0]
    feat = (5, 9)
    check(grid_anchors(feat, 16, sizes=(32,), ratios=(1.0,)), *random_gt_batch(2, 7, (80, 144), gen), feat)


def test_known_answer():
    # 2 x 3 grid, stride 10, one 10 x 10 anchor per location (corners at multiples of 10 - 5)
    anchors = grid_anchors((2, 3), 10, sizes=(10,), ratios=(1.0,))
    gt = torch.tensor([[[-5.0, -5, 5, 5], [0, 0, 0, 0]],      # exactly anchor (0, 0): M = 1
                       [[10.0, 0, 20, 10], [0, 0, 0, 0]]])    # a quarter of (0,1),(0,2),(1,1),(1,2): IoU 1/7 each
    counts = torch.tensor([1, 1])
    got = fgd.imitation_mask(anchors, gt, counts, (2, 3))
    want = torch.tensor([[[True, False, False], [False, False, False]],
                         [[False, True, True], [False, True, True]]])
    assert torch.equal(got, want)
    # thresh 0.9 keeps only the ties at the maximum
    assert torch.equal(fgd.imitation_mask(anchors, gt, counts, (2, 3), thresh=0.9), want)


def test_strictly_greater_than_threshold():
    # Anchors with IoU 1 and 0.5 against the GT: with thresh 0.5 the second sits exactly on
    # the threshold (0.5 * 1) and must not pass.
    anchors = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 20, 10]])  # 2 locations, K = 1
    gt = torch.tensor([[[0.0, 0, 10, 10]]])
    m = fgd.imitation_mask(anchors, gt, torch.tensor([1]), (1, 2), thresh=0.5)
    assert m.tolist() == [[[True, False]]]
    assert fgd.imitation_mask(anchors, gt, torch.tensor([1]), (1, 2), thresh=0.49).tolist() == [[[True, True]]]


def test_zero_area_and_far_away_gts_mark_nothing(gen):
    feat = (8, 8)
    anchors = grid_anchors(feat, 16, sizes=(32,), ratios=(1.0,))
    gt = torch.tensor([[[40.0, 40, 40, 60],        # zero width
                        [1e6, 1e6, 1e6 + 50, 1e6 + 50],  # far away
                        [50.0, 50, 30, 30]]])     # inverted
    m = check(anchors, gt, torch.tensor([3]), feat)
    assert not m.any()


def test_huge_gt_and_coordinates(gen):
    feat = (7, 10)
    anchors = grid_anchors(feat, 16)
    gt = torch.tensor([[[-1e6, -1e6, 1e6, 1e6], [20.0, 20, 60, 60]]])
    check(anchors, gt, torch.tensor([2]), feat)
    far = anchors + 5e5
    check(far, gt + 5e5, torch.tensor([2]), feat)
    check(far.double(), gt.double() + 5e5, torch.tensor([2]), feat)


def test_non_contiguous(gen):
    feat = (10, 12)
    anchors = grid_anchors(feat, 16).t().contiguous().t()
    gt, counts = random_gt_batch(5, 6, (160, 192), gen)
    gt = gt.transpose(0, 1).contiguous().transpose(0, 1)
    assert not anchors.is_contiguous() and not gt.is_contiguous()
    check(anchors, gt, counts[::1], feat)
    check(anchors, gt[::2], counts[::2], feat)


def test_opcheck(gen):
    feat = (4, 5)
    anchors = grid_anchors(feat, 16)
    gt, counts = random_gt_batch(2, 3, (64, 80), gen)
    counts[0] = 2
    torch.library.opcheck(torch.ops.fgd.imitation_mask.default, (anchors, gt, counts, [4, 5], 0.5, 0.0))
    torch.library.opcheck(torch.ops.fgd.imitation_mask.default,
                          (anchors.double().expand(2, -1, -1), gt.double(), counts, [4, 5], 0.3, 1.0))
