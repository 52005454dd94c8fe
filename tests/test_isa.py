"""The CPU code paths (csrc/cpu/vec.h): each hot loop is compiled for AVX-512, AVX2 and baseline
x86-64, and fgd runs the one torch's CPU capability names (ATEN_CPU_CAPABILITY), lowered to what
the CPU has. Here: the path reported is the path chosen; the op parity tests pass on every path this
CPU can run (each other path in a child process); the built library holds vector code for each hot
loop; the vectorisable half / bfloat16 conversions equal c10's on every value."""
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fgd

HERE = Path(__file__).resolve().parent
PATHS = ["default", "avx2", "avx512"]  # lowest to highest
X86_LINUX = platform.machine() in ("x86_64", "AMD64") and sys.platform.startswith("linux")


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def supported_paths() -> list:
    flags = cpu_flags()
    paths = ["default"]
    if X86_LINUX and {"avx2", "fma", "f16c"} <= flags:
        paths.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            paths.append("avx512")
    return paths


def test_cpu_capability_is_torchs_lowered_to_the_cpu():
    torch_path = torch.backends.cpu.get_cpu_capability().lower()
    wanted = torch_path if torch_path in PATHS else "default"
    best = supported_paths()[-1]
    expected = PATHS[min(PATHS.index(wanted), PATHS.index(best))]
    assert fgd.cpu_capability() == expected, (torch_path, supported_paths())
    # In the children below: the path asked for is the path taken.
    asked = os.environ.get("FGD_TEST_EXPECT_CPU_CAPABILITY")
    if asked:
        assert fgd.cpu_capability() == asked


PARITY_FILES = ["test_box_iou.py", "test_imitation_mask.py", "test_imitation_loss.py",
                "test_masked_adapt.py", "test_isa.py"]


@pytest.mark.parametrize("path", PATHS)
def test_parity_on_every_path(path, tmp_path):
    """Every op's parity tests (against fgd.reference, all dtypes and edge cases), rerun with the CPU
    kernels on `path`. The path this process runs is covered by the main test run."""
    if path not in supported_paths():
        pytest.skip(f"this CPU cannot run the {path} path")
    if path == fgd.cpu_capability():
        pytest.skip(f"{path} is this process's path: the main test run covers it")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": path, "FGD_TEST_EXPECT_CPU_CAPABILITY": path}
    files = [str(HERE / f) for f in PARITY_FILES]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "-k", "not test_parity_on_every_path and not test_vector_code", *files],
                       capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, f"{path}:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    assert " passed" in r.stdout.splitlines()[-1], r.stdout[-2000:]


# ---- the vectorisable conversions, exhaustively -------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 1 / 3, 0.7, 1e-3, 3e-8, 1.5e4, 2.0 ** -20])
def test_half_conversions_match_torch(dtype, scale):
    """The imitation_loss gradient with teacher 0 and a full mask is from_float(scale * to_float(s)):
    over all 2^16 values of s, bit for bit what torch computes in float32 and rounds (NaN as NaN).
    scale 1 checks the round trip, the others the rounding (subnormals, overflow to inf included)."""
    bits = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    s = bits.view(dtype).view(1, 1, 256, 256)
    t = torch.zeros_like(s)
    mask = torch.ones(1, 256, 256, dtype=torch.bool)
    # scale = grad / N_p; grad = scale * 2^16 is exact, so the kernel's float scale is float32(scale).
    grad = torch.tensor(scale * 2.0 ** 16, dtype=torch.float64)
    got = torch.ops.fgd._imitation_loss_backward(grad, s, t, mask)
    want = (torch.tensor(scale, dtype=torch.float32) * s.float()).to(dtype)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    diff = (got.view(torch.int16) != want.view(torch.int16)) & ~nan
    assert not diff.any(), f"{int(diff.sum())} values differ, e.g. s = {s[diff][:5].tolist()}"


# ---- the vector code exists -----------------------------------------------------------------------

# The hot loops (csrc/cpu), each instantiated for these argument types. im2col is left out: its
# copies and fills compile to memcpy / memset.
HOT = {
    "iou_row": ["float const*", "double const*"],
    "max_iou": ["fgd::BoxesSoA<float>", "fgd::BoxesSoA<double>"],
    "mark": ["fgd::BoxesSoA<float>", "fgd::BoxesSoA<double>"],
    **{fn: ["float const*", "double const*", "c10::BFloat16 const*", "c10::Half const*"]
       for fn in ("plane_sq", "plane_diff", "col2im_row")},
    "epilogue_row": ["float*", "double*", "c10::BFloat16*", "c10::Half*"],
}


def disassembly() -> dict:
    """{(function, first argument type, path): assembly text} of the built extension's CPU loops."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", "-j", ".text", fgd._C.__file__],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for block in re.split(r"\n(?=[0-9a-f]+ <)", out):
        m = re.match(r"[0-9a-f]+ <fgd::\(anonymous namespace\)::(\w+)_(avx512|avx2|default)\(([^,)]*)",
                     block)
        if m and m.group(1) in HOT:
            key = (m.group(1), m.group(3), m.group(2))
            found[key] = found.get(key, "") + block  # a function and its compiler clones
    return found


@pytest.mark.skipif(not X86_LINUX or shutil.which("objdump") is None,
                    reason="needs x86-64 Linux and objdump")
def test_vector_code():
    """Each hot loop's AVX2 copy uses 256-bit registers and its AVX-512 copy 256- or 512-bit ones; the
    baseline copy neither. A compiler or code change that leaves a loop scalar fails here."""
    code = disassembly()
    problems = []
    for fn, types in HOT.items():
        for ty in types:
            avx512, avx2, base = (code.get((fn, ty, p)) for p in ("avx512", "avx2", "default"))
            if avx512 is None or avx2 is None or base is None:
                problems.append(f"{fn}({ty}): a copy is missing from the library")
                continue
            if "ymm" not in avx2:
                problems.append(f"{fn}({ty}): the AVX2 copy is scalar (no ymm register)")
            if "ymm" not in avx512 and "zmm" not in avx512:
                problems.append(f"{fn}({ty}): the AVX-512 copy is scalar (no ymm/zmm register)")
            if "ymm" in base or "zmm" in base:
                problems.append(f"{fn}({ty}): the baseline copy uses AVX registers")
    assert not problems, "\n".join(problems)
