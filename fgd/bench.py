"""Kernel benchmarks: each fgd op against the eager PyTorch composition a user would write and
against torch.compile of that same composition, timed in one run on one device.

    python benchmarks/bench_ops.py            # or: fgd-bench
    python benchmarks/bench_ops.py --quick    # tiny sizes, a smoke run
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

import fgd
from fgd.synthetic import fgfi_like_mask, grid_anchors, random_boxes, random_gt_batch
from fgd.timing import compiled, device_name, time_ms


# ---- the compositions fgd replaces -------------------------------------------------------------

def eager_box_iou(b1, b2):
    """torchvision.ops.box_iou's formula (broadcast, inter / union)."""
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    lt = torch.max(b1[:, None, :2], b2[None, :, :2])
    rb = torch.min(b1[:, None, 2:], b2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def eager_imitation_mask(anchors, gt, counts, feat_size, thresh: float = 0.5):
    """The FGFI rule as one would write it in PyTorch: the [B, A, G] IoU tensor, max, threshold, any."""
    B, G = gt.shape[:2]
    a = anchors[None, :, None, :]
    g = gt[:, None, :, :]
    lt = torch.max(a[..., :2], g[..., :2])
    rb = torch.min(a[..., 2:], g[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_g = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])
    iou = inter / (area_a + area_g - inter)
    valid = torch.arange(G, device=gt.device)[None, None, :] < counts[:, None, None]
    iou = torch.where(valid, iou, 0.0)
    best = iou.amax(dim=1, keepdim=True)
    on = ((iou > thresh * best) & valid & (best > 0)).any(dim=2)
    return on.view(B, feat_size[0], feat_size[1], -1).any(dim=3)


def eager_imitation_loss(student, teacher, mask):
    m = mask.to(student.dtype)
    n_pos = m.sum()
    return ((student - teacher).pow(2).sum(dim=1) * m).sum() / (2 * n_pos.clamp_min(1))


FLOOR = "memory floor"


@dataclass
class Row:
    op: str
    workload: str
    impl: str
    ms: float
    fgd_ms: float

    @property
    def is_floor(self) -> bool:
        return self.impl.startswith(FLOOR)

    @property
    def speedup(self) -> str:
        if self.is_floor:  # a bound, not a competitor: fgd can only approach it
            return f"(fgd = {self.fgd_ms / self.ms:.2f}x this)"
        return "1.00x" if self.impl == "fgd" else f"{self.ms / self.fgd_ms:.2f}x"


def fwd_bwd(loss_fn, student, teacher, mask):
    def run():
        student.grad = None
        loss_fn(student, teacher, mask).backward()
    return run


# ---- workloads ---------------------------------------------------------------------------------

def workloads(device, quick):
    big = device.type == "cuda"
    if quick:
        return dict(iou=(64, 32), masks={"C4": (2, (10, 16), 16, (128, 256, 512), (0.5, 1.0, 2.0), 5)},
                    loss=(2, 16, 16, 16))
    masks = {
        "C4": (8, (38, 63), 16, (128, 256, 512), (0.5, 1.0, 2.0), 20),
        "FPN-P3": (16, (100, 168), 8, (32, 40.3, 50.8), (1.0,), 100),
    }
    loss = (16, 256, 128, 128) if big else (4, 256, 64, 64)
    return dict(iou=(20000, 100) if big else (10000, 100), masks=masks, loss=loss)


def run(device="cpu", quick=False, compile=True, repeat=None, density=0.15):
    device = torch.device(device)
    repeat = repeat or (3 if quick else 20)
    gen = torch.Generator().manual_seed(0)
    w = workloads(device, quick)
    rows: list[Row] = []

    def add(op, workload, impls):
        fgd_ms = impls[0][1]
        for name, ms in impls:
            if ms is not None:
                rows.append(Row(op, workload, name, ms, fgd_ms))

    # box_iou
    n, m = w["iou"]
    b1 = random_boxes(n, (800, 1333), generator=gen).to(device)
    b2 = random_boxes(m, (800, 1333), generator=gen).to(device)
    comp = compiled(eager_box_iou, compile)
    import torchvision

    add("box_iou", f"{n}x{m}", [
        ("fgd", time_ms(lambda: fgd.box_iou(b1, b2), device, repeat)),
        ("torchvision", time_ms(lambda: torchvision.ops.box_iou(b1, b2), device, repeat)),
        ("torch.compile", time_ms(lambda: comp(b1, b2), device, repeat) if comp else None),
    ])

    # imitation_mask
    for name, (B, feat, stride, sizes, ratios, G) in w["masks"].items():
        anchors = grid_anchors(feat, stride, sizes, ratios, device=device)
        image = (feat[0] * stride, feat[1] * stride)
        gt, _ = random_gt_batch(B, G, image, gen, min_size=16, max_size=min(image) / 2)
        gt, counts = gt.to(device), torch.full((B,), G, device=device)
        K = len(sizes) * len(ratios)
        comp = compiled(eager_imitation_mask, compile)
        workload = f"{name}: B {B}, {feat[0]}x{feat[1]}, K {K}, G {G}"
        add("imitation_mask", workload, [
            ("fgd", time_ms(lambda: fgd.imitation_mask(anchors, gt, counts, feat), device, repeat)),
            ("eager", time_ms(lambda: eager_imitation_mask(anchors, gt, counts, feat), device, repeat)),
            ("torch.compile", time_ms(lambda: comp(anchors, gt, counts, feat), device, repeat) if comp else None),
        ])

    # imitation_loss, forward + backward
    B, C, H, W = w["loss"]
    student = torch.randn(B, C, H, W, generator=gen).to(device).requires_grad_()
    teacher = torch.randn(B, C, H, W, generator=gen).to(device)
    mask = fgfi_like_mask(B, (H, W), density, gen).to(device)
    out = torch.empty_like(teacher)
    comp = compiled(eager_imitation_loss, compile)
    workload = f"B {B}, C {C}, {H}x{W}, {mask.float().mean().item():.0%} masked, fwd+bwd"
    add("imitation_loss", workload, [
        ("fgd", time_ms(fwd_bwd(fgd.imitation_loss, student, teacher, mask), device, repeat)),
        ("eager", time_ms(fwd_bwd(eager_imitation_loss, student, teacher, mask), device, repeat)),
        ("torch.compile", time_ms(fwd_bwd(comp, student, teacher, mask), device, repeat) if comp else None),
        (f"{FLOOR}: torch.sub(s, t, out=o)",
         time_ms(lambda: torch.sub(student.detach(), teacher, out=out), device, repeat)),
    ])
    return rows


def format_table(rows) -> str:
    lines = ["| op | workload | implementation | time (ms) | fgd is faster by |",
             "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.op} | {r.workload} | {r.impl} | {r.ms:.3f} | {r.speedup} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile baselines (they take a while to compile)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (median)")
    p.add_argument("--density", type=float, default=0.15, help="masked fraction for the loss")
    args = p.parse_args(argv)
    print(f"fgd {fgd.__version__} | torch {torch.__version__} | device: {device_name(args.device)}")
    print("median wall time per call; 'fgd is faster by' = that row's time / fgd's time, same run\n",
          flush=True)
    rows = run(args.device, args.quick, args.compile, args.repeat, args.density)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
