#!/usr/bin/env bash
# The one command for recording fgd's CPU kernels on a machine (issue #14): the CPU, then for each
# code path the CPU supports (avx512, avx2, default: ATEN_CPU_CAPABILITY picks it) fgd-bench and
# bench_adapt, then bench_threads and tests/test_isa.py (parity on every other path, vector code).
# Uses the fgd importable from here (build it first). Everything goes to
# ${OUT:-/tmp/fgd-cpu}/cpu_checks.txt; it belongs in benchmarks/RESULTS.md with the CPU and date.
#   bash benchmarks/run_cpu_checks.sh            # full (long: its run time is in RESULTS.md)
#   QUICK=1 bash benchmarks/run_cpu_checks.sh    # tiny sizes, no torch.compile: a smoke run
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
out="${OUT:-/tmp/fgd-cpu}"
mkdir -p "$out"
exec > >(tee "$out/cpu_checks.txt") 2>&1
step() { printf '\n## %s\n' "$*"; }
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick --no-compile)

echo "# fgd CPU checks, $(date -u '+%F %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
grep -m1 "model name" /proc/cpuinfo
echo "cores: $(nproc); ISA flags: $(grep -m1 '^flags' /proc/cpuinfo | grep -o -w 'avx512f\|avx512bw\|avx512vl\|avx512dq\|avx2\|fma\|f16c' | sort -u | tr '\n' ' ')"
python3 -c "import torch, fgd; print('torch', torch.__version__, '| torch CPU capability', torch.backends.cpu.get_cpu_capability(), '| fgd path', fgd.cpu_capability())"

flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { for f in "$@"; do grep -qw "$f" <<<"$flags" || return 1; done; }
paths=(default)
has avx2 fma f16c && paths=(avx2 default)
has avx2 fma f16c avx512f avx512bw avx512vl avx512dq && paths=(avx512 avx2 default)
for path in "${paths[@]}"; do
  # A separate inductor cache per path: kernels cached under one capability fail to compile under
  # another (seen with ATEN_CPU_CAPABILITY=default after avx2, torch 2.14).
  export ATEN_CPU_CAPABILITY="$path" TORCHINDUCTOR_CACHE_DIR="$out/inductor-$path"
  step "path $path: fgd-bench ${quick[*]}"
  python3 -m fgd.bench "${quick[@]}"
  step "path $path: bench_adapt ${quick[*]}"
  python3 "$repo/benchmarks/bench_adapt.py" "${quick[@]}" 2>&1 | grep -v "USDT\|DeviceProperties"
done
unset ATEN_CPU_CAPABILITY TORCHINDUCTOR_CACHE_DIR

step "threads: 1 vs 2"
python3 "$repo/benchmarks/bench_threads.py"
step "tests/test_isa.py"
python3 -m pytest -q -p no:cacheprovider -rs "$repo/tests/test_isa.py" 2>&1 | tail -8
