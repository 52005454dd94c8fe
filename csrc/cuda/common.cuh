// What every fgd CUDA file needs. Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in
// cusparse.h, which not every toolkit install has.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace fgd {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n items: enough to fill the GPU, never more than needed.
inline int64_t grid_for(int64_t n, int64_t per_thread = 1) {
  const int64_t need = (n + kThreads * per_thread - 1) / (kThreads * per_thread);
  return std::max<int64_t>(1, std::min<int64_t>(need, 4096));
}

// Block-wide reduction; the result is valid in thread 0. `op` must be associative.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op) {
  __shared__ T warp_vals[kThreads / 32];
  for (int d = 16; d > 0; d /= 2) v = op(v, __shfl_down_sync(0xffffffffu, v, d));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_vals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < blockDim.x / 32 ? warp_vals[lane] : T(0);
    for (int d = 16; d > 0; d /= 2) v = op(v, __shfl_down_sync(0xffffffffu, v, d));
  }
  return v;
}

}  // namespace fgd
