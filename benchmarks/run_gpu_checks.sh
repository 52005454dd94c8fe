#!/usr/bin/env bash
# The one command for a machine with an NVIDIA GPU (e.g. the device tool's H100/H200, torch
# preinstalled, no internet): build fgd against the installed torch, run the CUDA tests (the cases
# CI runs through the emulator, here on the real build), compute-sanitizer memcheck, racecheck and
# synccheck over them, and the GPU benchmarks. Everything goes to ${OUT:-/tmp/fgd-gpu}/gpu_checks.txt
# (per-step logs beside it); it all belongs in benchmarks/RESULTS.md, with the device and date.
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
out="${OUT:-/tmp/fgd-gpu}"
mkdir -p "$out"
exec > >(tee "$out/gpu_checks.txt") 2>&1
step() { printf '\n## %s\n' "$*"; }

echo "# fgd GPU checks, $(date -u '+%F %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -5
cd "$out"  # outside the source tree: import the installed fgd
python3 -c "import fgd; assert fgd.cuda_compiled(), 'built without CUDA kernels'; print('fgd CUDA kernels: yes')" || exit 1

step "CUDA tests (real build) and the CPU suites of the ops"
FGD_CUDA_TEST_BACKENDS=cuda python3 -m pytest -q -p no:cacheprovider "$repo/tests/test_cuda_emu.py" \
  "$repo/tests/test_imitation_loss.py" "$repo/tests/test_masked_adapt.py" 2>&1 | tee "$out/cuda_tests.txt" | tail -5

for tool in memcheck racecheck synccheck; do
  step "compute-sanitizer --tool $tool"
  FGD_CUDA_TEST_BACKENDS=cuda compute-sanitizer --tool "$tool" --error-exitcode 1 \
    python3 -m pytest -q -x -p no:cacheprovider "$repo/tests/test_cuda_emu.py" > "$out/sanitizer_$tool.txt" 2>&1
  echo "exit code: $?"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|passed|failed" "$out/sanitizer_$tool.txt" | tail -5
done

step "benchmarks"
python3 -m fgd.bench --device cuda 2>&1 | tee "$out/bench.txt"
python3 "$repo/benchmarks/bench_adapt.py" --device cuda 2>&1 | tee "$out/bench_adapt.txt"
python3 "$repo/benchmarks/bench_distill.py" --device cuda --size 512 --batch 8 2>&1 | tee "$out/bench_distill.txt"
