#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (e.g. the device tool's H100/H200, torch preinstalled, no
# internet): build fgd against the installed torch, run the CUDA tests, compute-sanitizer over them
# and the GPU benchmarks. Everything it prints belongs in benchmarks/RESULTS.md (device, date,
# command). Writes its logs to ${OUT:-/tmp/fgd-gpu}.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/fgd-gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/device.txt"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -5
cd "$out"  # outside the source tree: import the installed fgd
python3 -c "import fgd; assert fgd.cuda_compiled(), 'built without CUDA kernels'; print('fgd CUDA kernels: yes')"
repo="$OLDPWD"
python3 -m pytest -q "$repo/tests/test_cuda.py" "$repo/tests/test_imitation_loss.py" "$repo/tests/test_masked_adapt.py" 2>&1 | tee "$out/cuda_tests.txt" | tail -3
compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -x "$repo/tests/test_cuda.py" \
  > "$out/sanitizer.txt" 2>&1; echo "compute-sanitizer memcheck exit code: $?" | tee -a "$out/sanitizer.txt"
tail -3 "$out/sanitizer.txt"
python3 -m fgd.bench --device cuda 2>&1 | tee "$out/bench.txt"
python3 "$repo/benchmarks/bench_adapt.py" --device cuda 2>&1 | tee "$out/bench_adapt.txt"
python3 "$repo/benchmarks/bench_distill.py" --device cuda --size 512 --batch 8 2>&1 | tee "$out/bench_distill.txt"
