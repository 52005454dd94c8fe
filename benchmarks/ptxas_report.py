"""Static GPU report: compiles each csrc/cuda/*.cu with `nvcc -Xptxas -v` for sm_80 and sm_90 and
prints, per kernel, its registers per thread, spill bytes and static shared memory (a Markdown
table for benchmarks/RESULTS.md). Needs nvcc (CUDA_HOME, else /usr/local/cuda), no GPU; about a
minute per file and architecture on a 2-core machine, so CI does not run it.

    python benchmarks/ptxas_report.py [--arch 80 90] [files...]

Exits 1 if any kernel spills or uses 48 KiB of static shared memory or more.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def nvcc_command(src: Path, archs: list[str], out: Path) -> list[str]:
    cuda = os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    from torch.utils import cpp_extension

    cmd = [f"{cuda}/bin/nvcc", "-std=c++20", "-O3", "-Xptxas", "-v", "-Xcompiler", "-fPIC",
           "-DFGD_WITH_CUDA", *cpp_extension.COMMON_NVCC_FLAGS, "-c", str(src), "-o", str(out)]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return cmd


def short(mangled: str) -> str:
    """`box_iou_kernel<float>` from the mangled entry name."""
    name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    name = re.sub(r"^void ", "", name.replace("(anonymous namespace)::", ""))
    return name.split("(")[0].replace("fgd::", "").replace("c10::", "")


def parse(log: str, file: str) -> list[dict]:
    rows, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if m:
            cur = dict(file=file, kernel=short(m.group(1)), arch=m.group(2), regs=0, stack=0,
                       spill_st=0, spill_ld=0, smem=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["80", "90"])
    ap.add_argument("files", nargs="*", type=Path)
    args = ap.parse_args(argv)
    files = args.files or sorted((REPO / "csrc" / "cuda").glob("*.cu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            r = subprocess.run(nvcc_command(f, args.arch, Path(tmp) / "x.o"), capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-4000:], file=sys.stderr)
                return 2
            rows += parse(r.stdout + r.stderr, f.name)
            print(f"compiled {f.name}", file=sys.stderr)
    print("| file | kernel | arch | registers | stack B | spill stores / loads B | static smem B |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["file"], r["kernel"], r["arch"])):
        print(f"| {r['file']} | `{r['kernel']}` | sm_{r['arch']} | {r['regs']} | {r['stack']} | "
              f"{r['spill_st']} / {r['spill_ld']} | {r['smem']} |")
    bad = [r for r in rows if r["spill_st"] or r["spill_ld"] or r["smem"] >= 48 * 1024]
    for r in bad:
        print(f"PROBLEM: {r['kernel']} sm_{r['arch']} spills or uses >= 48 KiB of static shared memory",
              file=sys.stderr)
    print(f"{len(rows)} kernels x arch, {len(bad)} spilling or over 48 KiB", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
