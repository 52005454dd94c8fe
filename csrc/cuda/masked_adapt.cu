// CUDA kernels of masked_adapt_loss (the products and the chunking are in ../masked_adapt.cpp).
// Each works on a [rows, n] chunk matrix with a 2-D grid: x over the n masked locations (the index
// fastest, so neighbouring threads touch neighbouring locations) and y over the rows, so a thread
// decodes a location once for all the rows it visits. col2im scatters with atomics: a feature
// element receives at most k*k contributions per chunk, so contention stays low.
#include "../masked_adapt.h"
#include "common.cuh"

namespace fgd {
namespace {

struct Geometry {
  int64_t C, H, W, n;
};

// A masked location: flat index b*H*W + y*W + x, decoded.
struct Location {
  int64_t b, y, x;
};
__device__ __forceinline__ Location location(int64_t p, const Geometry& g) {
  const int64_t HW = g.H * g.W, b = p / HW, y = (p - b * HW) / g.W;
  return {b, y, p - b * HW - y * g.W};
}

// Offset in the [B, C, H, W] feature of what row `row` (channel and k x k tap) of an im2col matrix
// reads at location l, or -1 where the tap falls in the zero padding. k is a template parameter:
// divisions by a constant are multiplications, where a run-time k costs three 64-bit divisions
// per element.
template <int k>
__device__ __forceinline__ int64_t tap_offset(const Location& l, int64_t row, const Geometry& g) {
  const int64_t c = row / (k * k), tap = row - c * (k * k);
  const int64_t yy = l.y + tap / k - k / 2;
  const int64_t xx = l.x + tap % k - k / 2;
  if (yy < 0 || yy >= g.H || xx < 0 || xx >= g.W) return -1;
  return ((l.b * g.C + c) * g.H + yy) * g.W + xx;
}

template <typename scalar_t, int k>
__global__ void im2col_kernel(const scalar_t* __restrict__ s, const int64_t* __restrict__ idx,
                              Geometry g, int64_t rows, scalar_t* __restrict__ cols) {
  for (const int64_t i : thread_stride_x(g.n)) {
    const Location l = location(idx[i], g);
    for (const int64_t row : block_stride_y(rows)) {
      const int64_t src = tap_offset<k>(l, row, g);
      cols[row * g.n + i] = src >= 0 ? s[src] : scalar_t(0);
    }
  }
}

template <typename scalar_t, int k>
__global__ void col2im_kernel(const scalar_t* __restrict__ cols, const int64_t* __restrict__ idx,
                              Geometry g, int64_t rows, acc_t<scalar_t>* __restrict__ grad) {
  for (const int64_t i : thread_stride_x(g.n)) {
    const Location l = location(idx[i], g);
    for (const int64_t row : block_stride_y(rows)) {
      const int64_t dst = tap_offset<k>(l, row, g);
      if (dst >= 0) atomicAdd(grad + dst, static_cast<acc_t<scalar_t>>(cols[row * g.n + i]));
    }
  }
}

// Rows are the teacher's channels.
template <typename scalar_t>
__global__ void epilogue_kernel(scalar_t* __restrict__ z, int64_t ld,
                                const scalar_t* __restrict__ t, const int64_t* __restrict__ idx,
                                const acc_t<scalar_t>* __restrict__ w,
                                const scalar_t* __restrict__ bias, Geometry g, bool relu,
                                EpilogueMode mode, acc_t<scalar_t>* __restrict__ partial) {
  using A = acc_t<scalar_t>;
  A sum = 0;
  for (const int64_t i : thread_stride_x(g.n)) {
    const Location l = location(idx[i], g);
    const A wi = w[i];
    for (const int64_t row : block_stride_y(g.C)) {
      scalar_t* zp = z + row * ld + i;
      const A v = static_cast<A>(*zp) + (bias ? static_cast<A>(bias[row]) : A(0));
      const A tv = static_cast<A>(t[((l.b * g.C + row) * g.H + l.y) * g.W + l.x]);
      const A d = (relu && v < 0 ? A(0) : v) - tv;
      sum += wi * d * d;
      if (mode == EpilogueMode::kStudentGrad) {
        *zp = static_cast<scalar_t>(relu && v <= A(0) ? A(0) : wi * d);
      } else if (mode == EpilogueMode::kDiff) {
        *zp = static_cast<scalar_t>(wi * d);
      }
    }
  }
  sum = block_reduce(sum, [](A a, A b) { return a + b; });
  if (threadIdx.x == 0) partial[blockIdx.y * gridDim.x + blockIdx.x] = sum;
}

// Calls f(std::integral_constant<int, k>{}) for the adapter's kernel size k (1 or 3).
template <typename F>
void with_kernel_size(int64_t k, const F& f) {
  if (k == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, 3>{});
  }
}

void im2col_cuda(const at::Tensor& student, const at::Tensor& idx, int64_t k, at::Tensor& cols) {
  const Geometry g{student.size(1), student.size(2), student.size(3), idx.numel()};
  if (cols.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "fgd_im2col_cuda",
                                  [&] {
    with_kernel_size(k, [&](auto ks) {
      FGD_LAUNCH(grid_2d(g.n, cols.size(0)), kThreads, current_stream(),
                 im2col_kernel<scalar_t, decltype(ks)::value>)(
          student.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), g, cols.size(0),
          cols.mutable_data_ptr<scalar_t>());
      FGD_LAUNCH_CHECK();
    });
  });
}

void col2im_cuda(const at::Tensor& cols, const at::Tensor& idx, int64_t k, at::Tensor& grad) {
  const Geometry g{grad.size(1), grad.size(2), grad.size(3), idx.numel()};
  if (cols.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cols.scalar_type(), "fgd_col2im_cuda",
                                  [&] {
    with_kernel_size(k, [&](auto ks) {
      FGD_LAUNCH(grid_2d(g.n, cols.size(0)), kThreads, current_stream(),
                 col2im_kernel<scalar_t, decltype(ks)::value>)(
          cols.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), g, cols.size(0),
          grad.mutable_data_ptr<acc_t<scalar_t>>());
      FGD_LAUNCH_CHECK();
    });
  });
}

at::Tensor epilogue_cuda(at::Tensor& z, const at::Tensor& teacher, const at::Tensor& idx,
                         const at::Tensor& w, const c10::optional<at::Tensor>& bias, bool relu,
                         EpilogueMode mode) {
  const Geometry g{teacher.size(1), teacher.size(2), teacher.size(3), idx.numel()};
  if (z.numel() == 0) return at::zeros({1}, w.options());
  const dim3 grid = grid_2d(g.n, g.C);
  at::Tensor partial = at::empty({int64_t(grid.x) * grid.y}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fgd_epilogue_cuda",
                                  [&] {
    using A = acc_t<scalar_t>;
    FGD_LAUNCH(grid, kThreads, current_stream(), epilogue_kernel<scalar_t>)(
        z.mutable_data_ptr<scalar_t>(), z.stride(0), teacher.const_data_ptr<scalar_t>(),
        idx.const_data_ptr<int64_t>(), w.const_data_ptr<A>(),
        bias ? bias->const_data_ptr<scalar_t>() : nullptr, g, relu, mode,
        partial.mutable_data_ptr<A>());
    FGD_LAUNCH_CHECK();
  });
  return partial;
}

const AdaptKernels kCudaKernels{&im2col_cuda, &col2im_cuda, &epilogue_cuda};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& mask,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool relu, bool save) {
  const DeviceGuard guard(student.device());
  return masked_adapt_forward(kCudaKernels, student, teacher, mask, weight, bias, relu, save);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& idx,
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& mask,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool relu,
    std::array<bool, 4> output_mask) {
  const DeviceGuard guard(student.device());
  return masked_adapt_backward(kCudaKernels, grad, saved, idx, student, teacher, mask, weight, bias,
                               relu, output_mask);
}

}  // namespace

FGD_CUDA_IMPL(m) {
  m.impl("_masked_adapt_forward", &forward_cuda);
  m.impl("_masked_adapt_backward", &backward_cuda);
}

}  // namespace fgd
