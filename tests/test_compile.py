import torch

import fgd
from fgd.synthetic import grid_anchors, random_gt_batch


def step(anchors, gt, counts, student, teacher):
    """What a distillation step does with the three ops."""
    H, W = student.shape[-2:]
    mask = fgd.imitation_mask(anchors, gt, counts, (H, W))
    iou = fgd.box_iou(gt, gt)
    loss = fgd.imitation_loss(student, teacher, mask)
    return loss + 0 * iou.sum(), mask


def test_compile_fullgraph_forward_and_backward(gen):
    torch._dynamo.reset()
    H, W = 9, 14
    anchors = grid_anchors((H, W), 16)
    gt, counts = random_gt_batch(3, 5, (H * 16, W * 16), gen)
    counts[0] = 5
    teacher = torch.randn(3, 8, H, W, generator=gen)
    student0 = torch.randn(3, 8, H, W, generator=gen)

    s_eager = student0.clone().requires_grad_()
    loss_e, mask_e = step(anchors, gt, counts, s_eager, teacher)
    loss_e.backward()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s_comp = student0.clone().requires_grad_()
    loss_c, mask_c = compiled(anchors, gt, counts, s_comp, teacher)
    loss_c.backward()

    assert torch.equal(mask_c, mask_e)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(s_comp.grad, s_eager.grad)


def test_compile_inductor_dynamic_shapes(gen):
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for H, W in ((6, 7), (8, 5)):
        anchors = grid_anchors((H, W), 16)
        gt, counts = random_gt_batch(2, 4, (H * 16, W * 16), gen)
        teacher = torch.randn(2, 4, H, W, generator=gen)
        s = torch.randn(2, 4, H, W, generator=gen, requires_grad=True)
        loss, mask = compiled(anchors, gt, counts, s, teacher)
        loss.backward()
        want_loss, want_mask = step(anchors, gt, counts, s.detach(), teacher)
        assert torch.equal(mask, want_mask)
        torch.testing.assert_close(loss, want_loss)
