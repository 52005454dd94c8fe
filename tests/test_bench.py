import fgd.bench


def test_benchmark_prints_a_table_with_the_device(capsys):
    assert fgd.bench.main(["--quick", "--no-compile", "--device", "cpu", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "device: CPU" in out and "| imitation_mask |" in out
    assert "memory floor" in out and "(fgd = " in out


def test_benchmark_measures_every_op_against_a_baseline():
    rows = fgd.bench.run("cpu", quick=True, compile=False, repeat=1)
    assert {r.op for r in rows} == {"box_iou", "imitation_mask", "imitation_loss"}
    for op in ("box_iou", "imitation_mask", "imitation_loss"):
        impls = [r.impl for r in rows if r.op == op]
        assert impls[0] == "fgd" and len(impls) >= 2  # fgd and at least one baseline, same run
    assert all(r.ms > 0 for r in rows)


def test_eager_baselines_compute_what_fgd_computes():
    """The baselines must be the same computation, or the ratios mean nothing."""
    import torch
    from fgd.testing import fgfi_like_mask, grid_anchors, random_boxes, random_gt_batch

    g = torch.Generator().manual_seed(1)
    b1, b2 = random_boxes(20, (100, 100), generator=g), random_boxes(30, (100, 100), generator=g)
    torch.testing.assert_close(fgd.bench.eager_box_iou(b1, b2), fgd.box_iou(b1, b2))
    feat = (12, 20)
    anchors = grid_anchors(feat, 16)
    gt, counts = random_gt_batch(4, 6, (192, 320), g, min_size=16)
    assert torch.equal(fgd.bench.eager_imitation_mask(anchors, gt, counts, feat),
                       fgd.imitation_mask(anchors, gt, counts, feat))
    s, t = torch.randn(2, 8, *feat, generator=g), torch.randn(2, 8, *feat, generator=g)
    mask = fgfi_like_mask(2, feat, 0.15, g)
    torch.testing.assert_close(fgd.bench.eager_imitation_loss(s, t, mask), fgd.imitation_loss(s, t, mask))
