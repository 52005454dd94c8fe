import fgd
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
    from fgd.synthetic import fgfi_like_mask, grid_anchors, random_boxes, random_gt_batch

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


def _bench_adapt():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_adapt.py"
    spec = importlib.util.spec_from_file_location("bench_adapt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adapt_benchmark_runs_every_density_against_the_dense_path(capsys):
    assert _bench_adapt().main(["--quick", "--no-compile", "--device", "cpu", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "device: CPU" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "loc.)" in line]
    assert len(rows) == 8 and sum("fgd masked_adapt_loss" in r for r in rows) == 4
    assert "100.0%" in rows[-1]


def test_adapt_benchmark_baseline_computes_what_fgd_computes():
    import torch

    b = _bench_adapt()
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 6, 9, 10, generator=g), torch.randn(2, 6, 9, 10, generator=g)
    w, bias = torch.randn(6, 6, 3, 3, generator=g) / 8, torch.randn(6, generator=g)
    mask = torch.rand(2, 9, 10, generator=g) < 0.3
    want = b.sparse(s, t, mask, w, bias)
    torch.testing.assert_close(b.dense(fgd.bench.eager_imitation_loss)(s, t, mask, w, bias), want)
    torch.testing.assert_close(b.dense(fgd.imitation_loss)(s, t, mask, w, bias), want)
