// Only in the emulated build (tests/emu_build.py): the emulator's settings, and kernels with
// deliberate defects that show it catches what it claims to (tests/test_cuda_emu.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "emu.h"

namespace {

void configure(int64_t seed, int64_t max_grid_y, int64_t max_blocks) {
  TORCH_CHECK_VALUE(max_grid_y >= 1 && max_grid_y <= 65535, "max_grid_y must be in [1, 65535]");
  TORCH_CHECK_VALUE(max_blocks >= 1, "max_blocks must be positive");
  auto& c = fgd::emu::config();
  c.seed = static_cast<uint64_t>(seed);
  c.max_grid_y = max_grid_y;
  c.max_blocks = max_blocks;
}

constexpr int kN = 128;

// out[i] = what thread i + 1 wrote to shared memory; without the barrier thread i may read it first.
template <bool kSync>
__global__ void neighbour_kernel(int* out) {
  __shared__ int slot[kN];
  const int i = threadIdx.x;
  slot[i] = i;
  if (kSync) __syncthreads();
  out[i] = slot[(i + 1) % kN];
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Lanes 16..31 exit, then lanes 0..15 shuffle with a mask naming all 32.
__global__ void shuffle_exited_kernel(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, int(threadIdx.x), 1);
}

// Half of the warp shuffles while the other half waits at the barrier.
__global__ void shuffle_vs_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, int(threadIdx.x), 1);
  } else {
    __syncthreads();
  }
}

// Every thread adds 1 to out[0]: racy with a plain +=, exact with atomicAdd (ThreadSanitizer
// reports the first in the FGD_EMU_THREADS build, never the second).
template <bool kAtomic>
__global__ void count_kernel(float* out) {
  if (kAtomic) {
    atomicAdd(out, 1.0f);
  } else {
    out[0] += 1.0f;
  }
}

__global__ void noop_kernel(int*) {}

// Runs the named case; returns what its kernel wrote (the error cases throw).
at::Tensor selftest(c10::string_view name) {
  at::Tensor out = at::zeros({kN}, at::kInt);
  int* p = out.mutable_data_ptr<int>();
  at::Tensor count = at::zeros({1}, at::kFloat);
  float* c = count.mutable_data_ptr<float>();
  if (name == "neighbour_sync") {
    FGD_EMU_LAUNCH(1, kN, neighbour_kernel<true>)(p);
  } else if (name == "neighbour_nosync") {
    FGD_EMU_LAUNCH(1, kN, neighbour_kernel<false>)(p);
  } else if (name == "divergent_barrier") {
    FGD_EMU_LAUNCH(1, kN, divergent_barrier_kernel)(p);
  } else if (name == "shuffle_exited") {
    FGD_EMU_LAUNCH(1, 32, shuffle_exited_kernel)(p);
  } else if (name == "shuffle_vs_barrier") {
    FGD_EMU_LAUNCH(1, 32, shuffle_vs_barrier_kernel)(p);
  } else if (name == "block_too_large") {
    FGD_EMU_LAUNCH(1, 1025, noop_kernel)(p);
  } else if (name == "grid_y_too_large") {
    FGD_EMU_LAUNCH(dim3(1, fgd::emu::config().max_grid_y + 1), 32, noop_kernel)(p);
  } else if (name == "zero_grid") {
    FGD_EMU_LAUNCH(0, 32, noop_kernel)(p);
  } else if (name == "count_plain" || name == "count_atomic") {
    if (name == "count_plain") {
      FGD_EMU_LAUNCH(4, kN, count_kernel<false>)(c);
    } else {
      FGD_EMU_LAUNCH(4, kN, count_kernel<true>)(c);
    }
    return count;
  } else {
    TORCH_CHECK_VALUE(false, "no self-test named ", name);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fgd_emu, m) {
  m.def("_emu_configure(int seed=0, int max_grid_y=65535, int max_blocks=4096) -> ()", &configure);
  m.def("_emu_selftest(str name) -> Tensor", &selftest);
}
