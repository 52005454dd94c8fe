import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fgd
from fgd.distill import assign_fpn_levels
from helpers import tiny_detector


def pair(kind="fasterrcnn", **kw):
    torch.manual_seed(0)
    teacher = tiny_detector(kind, depth=34, out_channels=96)
    student = tiny_detector(kind, depth=18, out_channels=64)
    return teacher, student, fgd.Distiller(teacher, student, **{"warmup_iters": 0, **kw})


def batch(n_boxes=(2, 1), size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for n in n_boxes:
        images.append(torch.rand(3, size, size, generator=g))
        xy = torch.rand(n, 2, generator=g) * size / 2
        wh = 12 + torch.rand(n, 2, generator=g) * size / 2
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=size)], 1),
                        "labels": torch.randint(1, 4, (n,), generator=g)})
    return images, targets


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kind", ["fasterrcnn", "retinanet"])
def test_training_step_and_frozen_teacher(kind):
    teacher, student, d = pair(kind)
    before = snapshot(teacher)
    student_keys = set(student(*batch()).keys()) if student.train() else None
    opt = torch.optim.SGD(d.parameters(), lr=1e-3, momentum=0.9)
    assert not any(p is q for p in d.parameters() for q in teacher.parameters())
    for step in range(3):
        d.train()
        losses = d(*batch(seed=step))
        assert set(losses) == student_keys | {"loss_imitation"}
        li = losses["loss_imitation"]
        assert torch.isfinite(li) and li.item() > 0
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    after = snapshot(teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats
    # the hooks are gone: the student is a plain torchvision model again
    assert all(not m._forward_hooks for m in student.modules())


def test_gradients_reach_adapters_and_student_backbone():
    teacher, student, d = pair(imitation_weight=1.0)
    d.train()
    d(*batch())["loss_imitation"].backward()
    assert all(p.grad is not None for p in d.adapters.parameters())
    # these small boxes all belong to the finest level; the levels without GTs get zero gradients
    assert all(p.grad.abs().sum() > 0 for p in d.adapters[0].parameters())
    assert all(p.grad.abs().sum() == 0 for p in d.adapters[3].parameters())
    assert student.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert student.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_zero_without_gts_and_during_warmup():
    teacher, student, d = pair(warmup_iters=2)
    d.train()
    for _ in range(2):
        losses = d(*batch())
        assert losses["loss_imitation"].item() == 0.0
        sum(losses.values()).backward()  # still a valid graph
    assert d(*batch())["loss_imitation"].item() > 0
    empty = d(*batch(n_boxes=(0, 0)))["loss_imitation"]
    assert empty.item() == 0.0 and torch.isfinite(empty)
    assert all(not m.any() for m in d.last_masks)


def test_train_keeps_teacher_in_eval_and_eval_returns_detections():
    teacher, student, d = pair()
    d.train()
    assert d.training and student.training and not teacher.training
    d.eval()
    images, _ = batch()
    out = d(images)
    assert isinstance(out, list) and set(out[0]) == {"boxes", "labels", "scores"}


def test_masks_equal_the_op_called_by_hand():
    teacher, student, d = pair(level_policy="per_level")
    images, targets = batch(n_boxes=(3, 2))
    d.train()
    d(images, targets)
    # by hand: the student's transform, its anchor generator, fgd.ops.imitation_mask per level
    student.train()
    image_list, tv_targets = student.transform(images, copy.deepcopy(targets))
    feats = list(student.backbone(image_list.tensors).values())
    anchors = student.rpn.anchor_generator(image_list, feats)[0]
    sizes = [f.shape[-2] * f.shape[-1] * k for f, k in zip(feats, student.rpn.anchor_generator.num_anchors_per_location())]
    gt = torch.nn.utils.rnn.pad_sequence([t["boxes"] for t in tv_targets], batch_first=True)
    counts = torch.tensor([len(t["boxes"]) for t in tv_targets])
    for lvl, (a, f) in enumerate(zip(anchors.split(sizes), feats)):
        want = fgd.ops.imitation_mask(a, gt, counts, tuple(f.shape[-2:]))
        assert torch.equal(d.last_masks[lvl], want)
    assert d.last_masks[0].any()


# ---- crafted cases with known answers (generic hooks on a toy detector) ------------------------

class Toy(nn.Module):
    """Three feature levels at strides 4, 8, 16 of a 64 x 64 image, and a fake detection loss."""

    def __init__(self, channels):
        super().__init__()
        self.p2 = nn.Conv2d(3, channels, 3, stride=4, padding=1)
        self.p3 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.p4 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.out = nn.Identity()

    def forward(self, images, targets=None):
        f2 = self.p2(images)
        f4 = self.out(self.p4(self.p3(f2)))
        return {"loss_det": f4.mean() ** 2}


def toy_anchors(images, feats):
    # one square anchor per location, of side 4 * stride, centred on the cell centre
    out = []
    for f in feats:
        stride = images.shape[-1] // f.shape[-1]
        ys, xs = torch.meshgrid(torch.arange(f.shape[-2]), torch.arange(f.shape[-1]), indexing="ij")
        c = torch.stack([xs, ys], -1).reshape(-1, 2).float() * stride + stride / 2
        out.append(torch.cat([c - 2 * stride, c + 2 * stride], 1))
    return out


def toy_pair(**kw):
    torch.manual_seed(0)
    teacher, student = Toy(8), Toy(4)
    d = fgd.Distiller(teacher, student, teacher_layers=["p2", "p3", "p4"], student_layers=["p2", "p3", "p4"],
                      anchors_fn=toy_anchors, channels=[(4, 8)] * 3, warmup_iters=0, **kw)
    return d.train()


def test_fpn_level_assignment_rule():
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 448, 448], [0, 0, 112, 112], [0, 0, 8, 8],
                          [0, 0, 223, 223], [0, 0, 2000, 2000]], dtype=torch.float)
    assert assign_fpn_levels(boxes, [2, 3, 4, 5]).tolist() == [4, 5, 3, 2, 3, 5]
    assert assign_fpn_levels(boxes, [3, 4]).tolist() == [4, 4, 3, 3, 3, 4]
    assert assign_fpn_levels(boxes, [2, 5, 5, 6]).tolist() == [2, 5, 2, 2, 2, 6]  # gaps go to the finer level


def test_level_policies_on_a_known_case():
    # The toy's levels have strides 4, 8, 16 (FPN levels 2, 3, 4). On a 512 x 512 image a 224-px box
    # belongs to level floor(4 + log2(224 / 224)) = 4, a 112-px box to level 3 and a 32-px box to level
    # floor(4 + log2(32 / 224)) = 1, clamped to 2.
    images = torch.rand(1, 3, 512, 512)
    for side, want in ((224.0, [False, False, True]), (112.0, [False, True, False]), (32.0, [True, False, False])):
        targets = [{"boxes": torch.tensor([[100.0, 100.0, 100 + side, 100 + side]]), "labels": torch.tensor([1])}]
        d = toy_pair(level_policy="assigned")
        d(images, targets)
        assert [bool(m.any()) for m in d.last_masks] == want, side
        # per_level: every GT on every level
        d = toy_pair(level_policy="per_level")
        d(images, targets)
        assert [bool(m.any()) for m in d.last_masks] == [True, True, True]
    # two boxes of different levels in one image: each shows up on its own level only
    two = [{"boxes": torch.tensor([[0.0, 0.0, 224.0, 224.0], [300.0, 300.0, 332.0, 332.0]]),
            "labels": torch.tensor([1, 2])}]
    d = toy_pair(level_policy="assigned")
    d(images, two)
    only_big = toy_pair(level_policy="assigned")
    only_big(images, [{"boxes": two[0]["boxes"][:1], "labels": two[0]["labels"][:1]}])
    only_small = toy_pair(level_policy="assigned")
    only_small(images, [{"boxes": two[0]["boxes"][1:], "labels": two[0]["labels"][1:]}])
    assert torch.equal(d.last_masks[2], only_big.last_masks[2])
    assert torch.equal(d.last_masks[0], only_small.last_masks[0])


def test_mask_modes_on_a_known_case():
    images = torch.rand(1, 3, 64, 64)
    box = [{"boxes": torch.tensor([[16.0, 16.0, 40.0, 32.0]]), "labels": torch.tensor([1])}]
    d = toy_pair(mask_mode="gt_box", level_policy="per_level")
    d(images, box)
    # stride 8 level (8 x 8): cell centres 4, 12, 20, ...; inside x in [16, 40] -> 20, 28, 36 (cols 2..4),
    # y in [16, 32] -> 20, 28 (rows 2..3)
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[2:4, 2:5] = True
    assert torch.equal(d.last_masks[1][0], want)
    d = toy_pair(mask_mode="full")
    d(images, box)
    assert all(m.all() for m in d.last_masks)
    d = toy_pair(mask_mode="fgfi", level_policy="per_level")
    d(images, box)
    # fgfi: the anchors whose IoU with the box beats half of the best one, per level
    for lvl, (a, m) in enumerate(zip(toy_anchors(images, [torch.zeros(1, 1, 16 >> i, 16 >> i) for i in range(3)]), d.last_masks)):
        iou = fgd.box_iou(a, box[0]["boxes"])[:, 0]
        assert torch.equal(m[0].flatten(), iou > 0.5 * iou.max())


def test_state_dict_holds_adapters_and_iteration():
    teacher, student, d = pair(warmup_iters=5)
    d.train()
    for _ in range(3):
        d(*batch())
    sd = d.state_dict()
    assert any(k.startswith("adapters.0.conv.weight") for k in sd)
    assert not any(k.startswith("teacher") or k.startswith("_teacher") for k in sd)
    _, _, d2 = pair(warmup_iters=5)
    d2.load_state_dict(sd)
    assert d2.iteration == 3
    for k in sd:
        if isinstance(sd[k], torch.Tensor):
            assert torch.equal(sd[k], d2.state_dict()[k])
    d2.train()
    d2(*batch())
    d2(*batch())
    assert d2(*batch())["loss_imitation"].item() > 0  # iteration 5: warm-up over, not restarted


@pytest.mark.parametrize("where", ["student", "imitation"])
def test_iteration_counts_only_forwards_that_return(where, monkeypatch):
    teacher, student, d = pair()
    d.train()
    images, targets = batch()
    d(images, targets)
    bad = targets
    if where == "student":
        bad = [dict(t, boxes=t["boxes"][:, [2, 1, 0, 3]]) for t in targets]  # x2 < x1: torchvision refuses it
    else:
        def oom(*args, **kwargs):
            raise RuntimeError("out of memory")
        monkeypatch.setattr(d.imitation, "forward", oom)  # the core fails mid-step
    with pytest.raises((AssertionError, RuntimeError)):
        d(images, bad)
    monkeypatch.undo()
    assert d.iteration == 1  # a failed forward must not eat into the warm-up
    d(images, targets)
    assert d.iteration == 2


def test_student_saves_and_loads_without_fgd(tmp_path):
    teacher, student, d = pair()
    d.train()
    d(*batch())
    path = tmp_path / "student.pt"
    torch.save(d.student, path)
    code = f"""
        import sys, torch
        m = torch.load({str(path)!r}, weights_only=False)
        m.eval()
        out = m([torch.rand(3, 96, 96)])
        assert "fgd" not in sys.modules, "loading the student imported fgd"
        print(type(m).__module__, len(out))
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)  # outside the source tree, whose fgd/ may lack the compiled extension
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].startswith("torchvision.models.detection")


def test_teacher_in_lower_precision_and_student_under_autocast():
    teacher, student, d = pair()
    teacher.to(torch.bfloat16)
    d.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = d(*batch())
    assert torch.isfinite(losses["loss_imitation"]) and losses["loss_imitation"].item() > 0
    sum(losses.values()).backward()
    assert d.adapters[0].conv.weight.grad is not None


def test_clear_errors():
    t, s, _ = pair()
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        fgd.Distiller(t, s, mask_mode="boxes")
    with pytest.raises(ValueError, match="level_policy must be one of"):
        fgd.Distiller(t, s, level_policy="all")
    with pytest.raises(ValueError, match=r"thresh must be in \[0, 1\)"):
        fgd.Distiller(t, s, thresh=1.5)
    other = tiny_detector("fasterrcnn", image_size=128)
    with pytest.raises(ValueError, match="transforms differ"):
        fgd.Distiller(t, other)
    with pytest.raises(TypeError, match="not a torchvision detector"):
        fgd.Distiller(Toy(8), Toy(4))
    with pytest.raises(ValueError, match=r"teacher has no module 'p5'. Did you mean: 'p4', 'p3', 'p2'"):
        fgd.Distiller(Toy(8), Toy(4), teacher_layers=["p5"], student_layers=["p2"], anchors_fn=toy_anchors,
                      channels=[(4, 8)])
    with pytest.raises(ValueError, match="cannot tell the channels of student module 'out'"):
        fgd.Distiller(Toy(8), Toy(4), teacher_layers=["p4"], student_layers=["out"], anchors_fn=toy_anchors)
    # convolutions say their channels: no channels= needed
    d = fgd.Distiller(Toy(8), Toy(4), teacher_layers=["p4"], student_layers=["p4"], anchors_fn=toy_anchors)
    assert (d.adapters[0].conv.in_channels, d.adapters[0].conv.out_channels) == (4, 8)


def test_spatial_mismatch_names_the_layers():
    torch.manual_seed(0)
    d = fgd.Distiller(Toy(8), Toy(4), teacher_layers=["p3"], student_layers=["p2"], anchors_fn=toy_anchors,
                      channels=[(4, 8)], warmup_iters=0).train()
    targets = [{"boxes": torch.tensor([[0.0, 0, 30, 30]]), "labels": torch.tensor([1])}]
    with pytest.raises(ValueError, match=r"level 0: the student feature \(\['p2'\]\) has shape \(1, 4, 16, 16\) "
                                         r"and the teacher's \(\['p3'\]\) \(1, 8, 8, 8\)"):
        d(torch.rand(1, 3, 64, 64), targets)


def test_student_with_fewer_fpn_levels_imitates_the_teacher_levels_of_its_strides():
    torch.manual_seed(0)
    teacher = tiny_detector("fasterrcnn", depth=34, out_channels=96)             # strides 8, 16, 32, 64
    student = tiny_detector("fasterrcnn", depth=18, out_channels=64, layers=(3, 4))  # strides 16, 32, 64
    d = fgd.Distiller(teacher, student, warmup_iters=0, level_policy="per_level").train()
    losses = d(*batch())
    assert len(d.adapters) == 3 and [m.shape[-1] for m in d.last_masks] == [6, 3, 2]
    assert losses["loss_imitation"].item() > 0
    sum(losses.values()).backward()


@pytest.mark.parametrize("adapter,relu,mask_mode", [("3x3", False, "fgfi"), ("3x3", True, "fgfi"),
                                                    ("1x1", True, "gt_box"), ("3x3", False, "full")])
def test_sparse_and_dense_adaptation_agree(monkeypatch, adapter, relu, mask_mode):
    """The default sparse path (masked_adapt_loss) and the forced dense path give the same loss and
    the same gradients, on a torchvision detector pair; the sparse path really runs."""
    calls = []
    real = fgd.ops.masked_adapt_loss
    monkeypatch.setattr(fgd.ops, "masked_adapt_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for sparse in (True, False):
        teacher, student, d = pair(adapter=adapter, adapter_relu=relu, mask_mode=mask_mode,
                                   sparse_adaptation=sparse)
        with torch.no_grad():  # the official init is ~0: make the adapters matter
            for p in d.adapters.parameters():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        images, targets = batch((3, 1))
        losses = d(images, targets)
        losses["loss_imitation"].backward()
        grads = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
        results.append((losses["loss_imitation"].detach(), d.last_level_losses, grads))
    assert len(calls) == len(d.adapters)  # one sparse call per level, in the sparse run only
    (l_s, lv_s, g_s), (l_d, lv_d, g_d) = results
    assert l_s > 0
    torch.testing.assert_close(l_s, l_d, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.stack(lv_s), torch.stack(lv_d), rtol=1e-5, atol=1e-7)
    assert g_s.keys() == g_d.keys() and any(k.startswith("adapters.") for k in g_s)
    assert any(k.startswith("student.backbone") for k in g_s)
    for k in g_s:  # as vectors: single elements are sums that cancel, float32 rounding shows there
        err = ((g_s[k] - g_d[k]).norm() / g_d[k].norm().clamp_min(1e-12)).item()
        assert err < (2e-5 if k.startswith("adapters.") else 1e-4), (k, err)


def test_dense_path_for_adapters_the_op_cannot_compute(monkeypatch):
    teacher, student, d = pair()
    d.adapters[0].conv = nn.Conv2d(64, 96, 3, padding=2, dilation=2)  # not a same-padded k x k conv
    assert not fgd.distill.masked_adapt_supports(d.adapters[0].conv) and fgd.distill.masked_adapt_supports(d.adapters[1].conv)
    images, targets = batch()
    d(images, targets)["loss_imitation"].backward()
    assert d.adapters[0].conv.weight.grad is not None and d.adapters[1].conv.weight.grad is not None
