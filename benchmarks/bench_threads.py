"""Does a small call pay for a parallel region? Each fgd op at the `fgd bench --quick` size and at a
default size, with 1 and with 2 torch threads, interleaved; median of 200 (small) or 30 (large) calls.

    python benchmarks/bench_threads.py
"""
import statistics
import time

import torch

import fgd
from fgd.synthetic import fgfi_like_mask, grid_anchors, random_boxes, random_gt_batch
from fgd.timing import device_name

g = torch.Generator().manual_seed(0)


def case_iou(n, m):
    b1, b2 = random_boxes(n, (800, 1333), generator=g), random_boxes(m, (800, 1333), generator=g)
    return lambda: fgd.box_iou(b1, b2)
def case_mask(B, feat, stride, sizes, ratios, G):
    a = grid_anchors(feat, stride, sizes, ratios)
    gt, _ = random_gt_batch(B, G, (feat[0]*stride, feat[1]*stride), g, min_size=16, max_size=min(feat)*stride/2)
    c = torch.full((B,), G)
    return lambda: fgd.imitation_mask(a, gt, c, feat)
def case_loss(B, C, H, W):
    s = torch.randn(B, C, H, W, generator=g).requires_grad_(); t = torch.randn(B, C, H, W, generator=g)
    m = fgfi_like_mask(B, (H, W), 0.15, g)
    def run():
        s.grad = None; fgd.imitation_loss(s, t, m).backward()
    return run
def case_adapt(B, C, H, W):
    s = torch.randn(B, C, H, W, generator=g).requires_grad_(); t = torch.randn(B, C, H, W, generator=g)
    w = (torch.randn(C, C, 3, 3, generator=g) * 0.05).requires_grad_()
    m = fgfi_like_mask(B, (H, W), 0.15, g)
    def run():
        s.grad = w.grad = None; fgd.ops.masked_adapt_loss(s, t, m, w, relu=True).backward()
    return run
cases = {
 "box_iou 64x32 (--quick)": case_iou(64, 32),
 "box_iou 10000x100": case_iou(10000, 100),
 "imitation_mask C4 B2 10x16 (--quick)": case_mask(2, (10, 16), 16, (128, 256, 512), (0.5, 1.0, 2.0), 5),
 "imitation_mask C4 B8 38x63": case_mask(8, (38, 63), 16, (128, 256, 512), (0.5, 1.0, 2.0), 20),
 "imitation_loss B2 C16 16x16 (--quick)": case_loss(2, 16, 16, 16),
 "imitation_loss B4 C256 64x64": case_loss(4, 256, 64, 64),
 "masked_adapt_loss B2 C16 16x16": case_adapt(2, 16, 16, 16),
 "masked_adapt_loss B2 C64 32x32": case_adapt(2, 64, 32, 32),
}
print(f"fgd {fgd.__version__} | torch {torch.__version__} | device: {device_name('cpu')}")
print("| call | 1 thread (ms) | 2 threads (ms) | 2 threads / 1 |\n|---|---:|---:|---:|")
for name, fn in cases.items():
    res = {1: [], 2: []}
    for th in (1, 2):
        torch.set_num_threads(th); fn(); fn()
    reps = 200 if "quick" in name or "16x16" in name else 30
    for r in range(reps):
        for th in (1, 2):
            torch.set_num_threads(th)
            t0 = time.perf_counter(); fn(); res[th].append((time.perf_counter() - t0) * 1e3)
    a, b = statistics.median(res[1]), statistics.median(res[2])
    print(f"| {name} | {a:.3f} | {b:.3f} | {b/a:.2f} |")
