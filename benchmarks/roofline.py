"""A roofline MODEL of fgd's CUDA kernels on an H100 at the GPU benchmark workloads (fgd.bench's
`--device cuda` sizes, bench_adapt's GPU size). Nothing here is measured: it counts the bytes each
kernel must move to and from HBM and the arithmetic it must do, and divides by the machine's rates.

    python benchmarks/roofline.py

Rates (H100 SXM): HBM 3.0 TB/s (measured by others; 3.35 peak), L2 about 5.5 TB/s (assumed), FP32
67 TFLOP/s (an FMA as 2), 32-bit integer ops 15.5 Tops/s (64 per SM per clock, 132 SMs, 1.83 GHz).
A 64-bit integer division or modulo is a software routine on NVIDIA GPUs: counted as ~70 integer
instructions, so a kernel doing a few per element is bound by them, not by memory.
"""
from __future__ import annotations

HBM, L2, FP32, INT = 3.0e12, 5.5e12, 67e12, 15.5e12
DIV64 = 70  # integer instructions per 64-bit division or modulo (model)
F32 = 4


def us(x):
    return f"{x * 1e6:.1f}"


def rows():
    out = []

    def add(kernel, workload, hbm, flops, l2=0.0, div64=0.0, note=""):
        t = {"HBM": hbm / HBM, "FP32": flops / FP32, "L2": l2 / L2, "int (64-bit div)": div64 * DIV64 / INT}
        bound = max(t, key=t.get)
        out.append((kernel, workload, hbm / 1e6, flops / 1e9, t, bound, note))

    # box_iou: N x M outputs; ~20 FLOPs an IoU (two areas, four min/max, the division)
    N, M = 20000, 100
    add("box_iou_kernel<float>", "20000 x 100", (N + M) * 16 + N * M * F32, 20 * N * M,
        note="was 3 x 64-bit div/mod per output (i / M, i % M, bn / N): "
             f"{us(3 * N * M * DIV64 / INT)} us; 2-D blocks now: one per row")

    # imitation_mask: best IoU (every GT x every anchor) then the mask (early exit: at most as much)
    for name, (B, H, W, K, G) in {"C4": (8, 38, 63, 9, 20), "FPN-P3": (16, 100, 168, 3, 100)}.items():
        A = H * W * K
        ious = B * G * A
        hbm = A * 16 + B * G * 16 + B * H * W
        add("best_iou_kernel<float>", f"{name}: B {B}, A {A}, G {G}", hbm, 25 * ious,
            l2=ious * 16 / 4,
            note=f"anchors re-read from L2 once per group of 4 GTs (was once per GT: {us(ious * 16 / L2)} us)")
        add("mask_kernel<float>", f"{name} (worst case, no early exit)", hbm, 25 * ious,
            note="GTs staged in shared memory, 128 at a time")

    # imitation_loss: B 16, C 256, 128 x 128, 15 % masked (rectangular blobs: ~20 % of 32-byte sectors)
    B, C, HW, sectors = 16, 256, 128 * 128, 0.20
    feat = B * C * HW * F32
    add("loss_forward_kernel<float>", "16 x 256 x 128 x 128, 15 %", 2 * feat * sectors + B * HW * F32,
        3 * 0.15 * B * C * HW,
        note=f"was a 64-bit div + mod per element: {us(2 * B * C * HW * DIV64 / INT)} us; "
             "2-D grid now: one division per plane")
    add("loss_backward_kernel<float>", "same", 2 * feat * sectors + B * HW * F32 + feat,
        3 * 0.15 * B * C * HW, note="writes the whole dense gradient")

    # masked_adapt: B 16, Cs = Ct = 256, 128 x 128, 3x3, 15 % of the locations
    Cs = Ct = 256
    n = int(0.15 * B * HW)
    rows_ = Cs * 9
    cols = rows_ * n * F32
    touched = 0.25 * B * Cs * HW * F32  # the student taps around masked locations (dilated mask)
    add("im2col_kernel<float, 3>", f"N_p {n}, Cs*9 = {rows_}", cols + touched, 0,
        note=f"was 3 x 64-bit div per element (run-time k): {us(3 * rows_ * n * DIV64 / INT)} us; "
             "k is a template parameter now")
    add("matmul (cuBLAS, fp32)", f"[{Ct}, {rows_}] x [{rows_}, {n}]", cols + Ct * n * F32,
        2 * Ct * rows_ * n, note="TF32 off (torch's default); x3 in fwd+bwd")
    add("epilogue_kernel<float>", f"[{Ct}, {n}]", 3 * Ct * n * F32, 8 * Ct * n,
        note="teacher gathered at the masked locations")
    add("col2im_kernel<float, 3>", f"[{rows_}, {n}]", cols + touched, rows_ * n,
        note="fp32 atomics into L2; at most 9 per element")
    return out


def main():
    print("MODEL, not a measurement: H100 roofline of fgd's CUDA kernels (benchmarks/roofline.py)\n")
    print("| kernel | workload | HBM MB | GFLOP | HBM us | FP32 us | L2 us | int us | bound by | note |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
    for kernel, workload, mb, gf, t, bound, note in rows():
        print(f"| `{kernel}` | {workload} | {mb:.1f} | {gf:.2f} | {us(t['HBM'])} | {us(t['FP32'])} | "
              f"{us(t['L2'])} | {us(t['int (64-bit div)'])} | {bound} | {note} |")


if __name__ == "__main__":
    main()
