"""masked_adapt_loss against the dense adaptation it replaces, forward + backward.

    python benchmarks/bench_adapt.py [--device cuda] [--no-compile] [--quick]

Dense: conv2d(k x k) + ReLU + fgd.imitation_loss (the fastest dense composition: fgd's own loss),
and torch.compile of conv2d + ReLU + the eager loss. Masks are real FGFI masks (fgd.imitation_mask
on random GT boxes, added until the mask covers ~5 / 15 / 30 %) and the full mask (100 %). Gradients
for student, weight and bias (the teacher is frozen, as in training). Also: peak memory above the
inputs during the step, and the rate of the three matmul products (2 * N * Ct * Cs * k^2 FLOPs
each; the dense rate counts the dense conv's three products over every location).
"""
import argparse

import torch
import torch.nn.functional as F

import fgd
from fgd.bench import eager_imitation_loss
from fgd.synthetic import imitation_mask_at_density
from fgd.timing import compiled, device_name, peak_memory, time_ms


def dense(loss):
    def fn(s, t, mask, w, b):
        return loss(F.conv2d(s, w, b, padding=w.shape[-1] // 2).relu(), t, mask)
    return fn


def sparse(s, t, mask, w, b):
    return fgd.ops.masked_adapt_loss(s, t, mask, w, b, relu=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--k", type=int, default=3, choices=[1, 3])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    B, C, H, W = (2, 16, 16, 16) if args.quick else (16, 256, 128, 128) if gpu else (4, 256, 64, 64)
    repeat = args.repeat or (2 if args.quick else 10)
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(B, C, H, W, generator=gen).to(device).requires_grad_()
    t = torch.randn(B, C, H, W, generator=gen).to(device)
    w = (torch.randn(C, C, args.k, args.k, generator=gen) / (C * args.k ** 2) ** 0.5).to(device).requires_grad_()
    b = torch.zeros(C).to(device).requires_grad_()
    impls = [("fgd masked_adapt_loss", sparse), ("dense conv2d + ReLU + fgd.imitation_loss", dense(fgd.imitation_loss))]
    if args.compile:
        impls.append(("torch.compile(dense conv2d + ReLU + loss)", compiled(dense(eager_imitation_loss), True)))

    print(f"fgd {fgd.__version__} | torch {torch.__version__} | device: {device_name(device)}")
    print(f"student/teacher B {B}, C {C}, {H}x{W}; adapter {args.k}x{args.k} conv {C}->{C} + ReLU; "
          f"fwd+bwd (grads: student, weight, bias); median of {repeat}\n")
    print("| mask | implementation | time (ms) | fgd is faster by | peak memory (MiB) | matmul GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|")
    flops_per_loc = 3 * 2 * C * C * args.k ** 2
    for density in (0.05, 0.15, 0.30, 1.0):
        if density < 1:
            mask = imitation_mask_at_density(B, (H, W), density, gen).to(device)
        else:
            mask = torch.ones(B, H, W, dtype=torch.bool, device=device)
        n_p = int(mask.sum())
        label = f"{n_p / mask.numel():.1%} ({n_p} loc.)"
        fgd_ms = None
        for name, fn in impls:
            def step():
                s.grad = w.grad = b.grad = None
                fn(s, t, mask, w, b).backward()
            ms = time_ms(step, device, repeat)
            s.grad = w.grad = b.grad = None
            peak, _ = peak_memory(step, device)
            fgd_ms = fgd_ms or ms
            locs = n_p if fn is sparse else mask.numel()
            gflops = flops_per_loc * locs / (ms * 1e-3) / 1e9
            print(f"| {label} | {name} | {ms:.1f} | {ms / fgd_ms:.2f}x | {peak / 2**20:.0f} | {gflops:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
