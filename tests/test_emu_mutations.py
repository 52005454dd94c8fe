"""The emulated CUDA tests can fail: each case seeds one defect into a copy of csrc/, builds it
through the emulator (only the changed files recompile) and runs test_cuda_emu.py's tests for that
kernel in a subprocess. A defect the emulator is expected to catch must make them fail; one it
cannot see (a plain `+=` racing between threads: fibers switch only at barriers and shuffles) must
not, so that this file also records the emulator's blind spots.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (id, file under csrc/, text, replacement, tests to run (-k), caught?[, what the failure must say])
MUTATIONS = [
    ("mask-no-barrier-after-tile-fill", "cuda/imitation_mask.cu",
     "__syncthreads();\n      if (l >= HW || on) continue;", "if (l >= HW || on) continue;",
     "imitation_mask", True),
    ("mask-no-barrier-before-tile-refill", "cuda/imitation_mask.cu",
     "__syncthreads();\n      for (const int64_t i : block_threads(0, tn)) {",
     "for (const int64_t i : block_threads(0, tn)) {", "imitation_mask", True),
    ("block-reduce-shuffle-offset-starts-at-8", "cuda/common.cuh",
     "for (int d = 16; d > 0; d /= 2) v[i] = op(v[i], __shfl_down_sync(0xffffffffu, v[i], d));\n    if (lane",
     "for (int d = 8; d > 0; d /= 2) v[i] = op(v[i], __shfl_down_sync(0xffffffffu, v[i], d));\n    if (lane",
     "imitation_loss_parity or imitation_mask_parity", True),
    ("mask-barrier-skipped-by-finished-threads", "cuda/imitation_mask.cu",
     "__syncthreads();\n      if (l >= HW || on) continue;", "if (l >= HW || on) continue;\n      __syncthreads();",
     "imitation_mask_parity", True, "deadlock: threads wait at different __syncthreads"),
    ("best-iou-plain-store-instead-of-atomicMax", "cuda/imitation_mask.cu",
     "atomic_max_nonneg(best + b * G + g0 + i, m[i])", "best[b * G + g0 + i] = m[i]", "imitation_mask", True),
    ("mask-gt-tile-loop-one-short", "cuda/imitation_mask.cu",
     "for (int64_t i = 0; i < tn; ++i) {", "for (int64_t i = 0; i < tn - 1; ++i) {", "imitation_mask", True),
    ("mask-gt-tile-loop-one-past", "cuda/imitation_mask.cu",
     "for (int64_t i = 0; i < tn; ++i) {", "for (int64_t i = 0; i <= tn; ++i) {", "imitation_mask", True),
    ("grid-stride-loop-one-short", "cuda/common.cuh",
     "bool operator!=(const It&) const { return i < n; }",
     "bool operator!=(const It&) const { return i < n - 1; }", "box_iou or imitation_loss_parity", True),
    ("col2im-plain-add-instead-of-atomicAdd", "cuda/masked_adapt.cu",
     "if (dst >= 0) atomicAdd(grad + dst, static_cast<acc_t<scalar_t>>(cols[row * g.n + i]));",
     "if (dst >= 0) grad[dst] += static_cast<acc_t<scalar_t>>(cols[row * g.n + i]);", "masked_adapt", False),
]


@pytest.mark.parametrize("name,file,text,replacement,tests,caught,message",
                         [m if len(m) == 7 else (*m, None) for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_seeded_defect(tmp_path, name, file, text, replacement, tests, caught, message):
    csrc = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", csrc)
    path = csrc / file
    source = path.read_text()
    assert source.count(text) == 1, f"the mutation {name} no longer matches {file}: update it"
    path.write_text(source.replace(text, replacement))
    env = dict(os.environ, FGD_EMU_CSRC=str(csrc), FGD_CUDA_TEST_BACKENDS="emu")
    # Outside the source tree: its fgd/ has no compiled extension after `pip install .`.
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        str(REPO / "tests" / "test_cuda_emu.py"), "-k", tests],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    assert " error" not in summary, f"the mutant did not build or run:\n{out[-4000:]}"
    if caught:
        assert r.returncode == 1 and "failed" in summary, f"{name} was not caught:\n{out[-3000:]}"
        assert message is None or message in out, f"{name}: the failure does not say {message!r}"
    else:
        assert r.returncode == 0 and "passed" in summary, f"{name} is now caught: mark it so\n{out[-3000:]}"
