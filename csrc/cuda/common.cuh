// What every fgd CUDA file needs, for both of its builds: nvcc for the GPU, or a host compiler with
// FGD_EMU defined, which runs the same kernels on the CPU through csrc/emulator/ (tests/emu_build.py).
// Under nvcc only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cusparse.h, which not every
// toolkit install has.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>

#include "../fgd.h"

// FGD_LAUNCH(grid, block, stream, kernel<...>)(args...): `kernel<<<grid, block, 0, stream>>>(args...)`
// under nvcc, the emulator's launcher otherwise. The kernel comes last, as __VA_ARGS__, because a
// template argument list has commas. FGD_LAUNCH_CHECK() follows every launch.
// FGD_CUDA_IMPL(m) registers a file's kernels: for CUDA tensors in fgd, or for CPU tensors in
// fgd_emu (FGD_LIBRARY) when emulated.
// fgd::Stream, current_stream(), DeviceGuard, max_grid_y() and max_blocks() are the stream, device
// guard and launch limits of the build.
#define FGD_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#if defined(FGD_EMU)
#include "../emulator/runtime.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define FGD_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#define FGD_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define FGD_CUDA_IMPL(m) FGD_TORCH_LIBRARY_IMPL(FGD_LIBRARY, CUDA, m)

namespace fgd {
using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline int64_t max_grid_y() { return 65535; }  // the hardware limit of grid.y and grid.z
inline int64_t max_blocks() { return 4096; }   // enough to fill any current GPU
}  // namespace fgd
#endif

namespace fgd {

constexpr int kThreads = 256;

// The type a kernel accumulates and computes in: float for float16 / bfloat16 / float32, double
// for float64 (ATen's opmath type; at::toOpMathType on the host).
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// Blocks for a grid-stride loop over n items: enough to fill the GPU, never more than needed.
inline int64_t grid_for(int64_t n, int64_t per_thread = 1) {
  const int64_t need = (n + kThreads * per_thread - 1) / (kThreads * per_thread);
  return std::max<int64_t>(1, std::min<int64_t>(need, max_blocks()));
}

// A 2-D grid for a [rows, n] pass: x over n (thread_stride_x), y over the rows (block_stride_y),
// about grid_for(rows * n, per_thread) blocks in all. rows and n must be positive.
inline dim3 grid_2d(int64_t n, int64_t rows, int64_t per_thread = 4) {
  const int64_t x = grid_for(n);
  const int64_t y = std::clamp<int64_t>(grid_for(rows * n, per_thread) / x, 1,
                                        std::min(rows, max_grid_y()));
  return dim3(x, y);
}

// The one grid-stride loop: `for (int64_t i : Stride(first, n, step))` visits first, first + step,
// ... below n. thread_stride_x / thread_stride_y cover [0, n) with every thread of the grid along x
// / y; block_stride_y with the blocks along y (every thread of a block visits the same items);
// block_threads(lo, hi) covers [lo, hi) with the threads of one block (1-D blocks).
struct Stride {
  struct It {
    int64_t i, step, n;
    __device__ __forceinline__ int64_t operator*() const { return i; }
    __device__ __forceinline__ It& operator++() {
      i += step;
      return *this;
    }
    // Range-for's end test: "not done" is "below n", whatever the step lands on.
    __device__ __forceinline__ bool operator!=(const It&) const { return i < n; }
  };
  int64_t first, n, step;
  __device__ __forceinline__ It begin() const { return {first, step, n}; }
  __device__ __forceinline__ It end() const { return {n, step, n}; }
};
__device__ __forceinline__ Stride thread_stride_x(int64_t n) {
  return {blockIdx.x * (int64_t)blockDim.x + threadIdx.x, n, (int64_t)gridDim.x * blockDim.x};
}
__device__ __forceinline__ Stride thread_stride_y(int64_t n) {
  return {blockIdx.y * (int64_t)blockDim.y + threadIdx.y, n, (int64_t)gridDim.y * blockDim.y};
}
__device__ __forceinline__ Stride block_stride_y(int64_t n) {
  return {(int64_t)blockIdx.y, n, (int64_t)gridDim.y};
}
__device__ __forceinline__ Stride block_threads(int64_t lo, int64_t hi) {
  return {lo + threadIdx.x, hi, (int64_t)blockDim.x};
}

// Block-wide reductions of the n values every thread holds, with one barrier; the results are
// valid in thread 0. `op` must be associative.
template <typename T, int n, typename Op>
__device__ void block_reduce(T (&v)[n], Op op) {
  __shared__ T warp_vals[n][kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int i = 0; i < n; ++i) {
    for (int d = 16; d > 0; d /= 2) v[i] = op(v[i], __shfl_down_sync(0xffffffffu, v[i], d));
    if (lane == 0) warp_vals[i][warp] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
    for (int i = 0; i < n; ++i) {
      v[i] = lane < blockDim.x / 32 ? warp_vals[i][lane] : T(0);
      for (int d = 16; d > 0; d /= 2) v[i] = op(v[i], __shfl_down_sync(0xffffffffu, v[i], d));
    }
  }
}
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op) {
  T a[1] = {v};
  block_reduce(a, op);
  return a[0];
}

}  // namespace fgd
