// CUDA kernels of masked_adapt_loss (the products and the chunking are in ../masked_adapt.cpp).
// One thread per element of a [rows, n] chunk matrix, the location index fastest, so neighbouring
// threads touch neighbouring locations. col2im scatters with atomics: a feature element receives
// at most k*k contributions per chunk, so contention stays low.
#include <ATen/OpMathType.h>

#include "../fgd.h"
#include "../masked_adapt.h"
#include "common.cuh"

namespace fgd {
namespace {

struct Geometry {
  int64_t C, H, W, n, k;
};

// Element e of a [rows, n] chunk matrix: its row and its location (b, y, x).
struct Element {
  int64_t b, y, x, row, i;
};
__device__ inline Element element(const int64_t* idx, int64_t e, int64_t n, int64_t H, int64_t W) {
  Element el;
  el.row = e / n;
  el.i = e - el.row * n;
  const int64_t p = idx[el.i], HW = H * W;
  el.b = p / HW;
  el.y = (p - el.b * HW) / W;
  el.x = p - el.b * HW - el.y * W;
  return el;
}

// Offset in the [B, C, H, W] feature of what element e of an im2col matrix reads (row = channel
// and k x k tap), or -1 where the tap falls in the zero padding.
__device__ inline int64_t tap_offset(const int64_t* idx, int64_t e, const Geometry& g) {
  const Element el = element(idx, e, g.n, g.H, g.W);
  const int64_t c = el.row / (g.k * g.k);
  const int64_t yy = el.y + (el.row / g.k) % g.k - g.k / 2;
  const int64_t xx = el.x + el.row % g.k - g.k / 2;
  if (yy < 0 || yy >= g.H || xx < 0 || xx >= g.W) return -1;
  return ((el.b * g.C + c) * g.H + yy) * g.W + xx;
}

template <typename scalar_t>
__global__ void im2col_kernel(const scalar_t* __restrict__ s, const int64_t* __restrict__ idx,
                              Geometry g, int64_t total, scalar_t* __restrict__ cols) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t src = tap_offset(idx, e, g);
    cols[e] = src >= 0 ? s[src] : scalar_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void col2im_kernel(const scalar_t* __restrict__ cols, const int64_t* __restrict__ idx,
                              Geometry g, int64_t total, acc_t* __restrict__ grad) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t dst = tap_offset(idx, e, g);
    if (dst >= 0) atomicAdd(grad + dst, static_cast<acc_t>(cols[e]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void epilogue_kernel(scalar_t* __restrict__ z, int64_t ld,
                                const scalar_t* __restrict__ t, const int64_t* __restrict__ idx,
                                const acc_t* __restrict__ w, const scalar_t* __restrict__ bias,
                                Geometry g, int64_t total, bool relu, EpilogueMode mode,
                                acc_t* __restrict__ partial) {
  acc_t sum = 0;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    const Element el = element(idx, e, g.n, g.H, g.W);  // row = teacher channel
    scalar_t* zp = z + el.row * ld + el.i;
    const acc_t v = static_cast<acc_t>(*zp) + (bias ? static_cast<acc_t>(bias[el.row]) : acc_t(0));
    const acc_t tv = static_cast<acc_t>(t[((el.b * g.C + el.row) * g.H + el.y) * g.W + el.x]);
    const acc_t d = (relu && v < 0 ? acc_t(0) : v) - tv;
    const acc_t wi = w[el.i];
    sum += wi * d * d;
    if (mode == EpilogueMode::kStudentGrad) {
      *zp = static_cast<scalar_t>(relu && !(v > 0) ? acc_t(0) : wi * d);
    } else if (mode == EpilogueMode::kDiff) {
      *zp = static_cast<scalar_t>(wi * d);
    }
  }
  sum = block_reduce(sum, [](acc_t a, acc_t b) { return a + b; });
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

void im2col_cuda(const at::Tensor& student, const at::Tensor& idx, int64_t k, at::Tensor& cols) {
  const Geometry g{student.size(1), student.size(2), student.size(3), idx.numel(), k};
  const int64_t total = cols.numel();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "fgd_im2col_cuda",
                                  [&] {
    im2col_kernel<scalar_t><<<grid_for(total, 4), kThreads, 0, stream()>>>(
        student.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), g, total,
        cols.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void col2im_cuda(const at::Tensor& cols, const at::Tensor& idx, int64_t k, at::Tensor& grad) {
  const Geometry g{grad.size(1), grad.size(2), grad.size(3), idx.numel(), k};
  const int64_t total = cols.numel();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cols.scalar_type(), "fgd_col2im_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    col2im_kernel<scalar_t, acc_t><<<grid_for(total, 4), kThreads, 0, stream()>>>(
        cols.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), g, total,
        grad.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor epilogue_cuda(at::Tensor& z, const at::Tensor& teacher, const at::Tensor& idx,
                         const at::Tensor& w, const c10::optional<at::Tensor>& bias, bool relu,
                         EpilogueMode mode) {
  const Geometry g{teacher.size(1), teacher.size(2), teacher.size(3), idx.numel(), 1};
  const int64_t total = z.size(0) * z.size(1), blocks = grid_for(total, 4);
  at::Tensor partial = at::zeros({blocks}, w.options());
  if (total == 0) return partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fgd_epilogue_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    epilogue_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream()>>>(
        z.mutable_data_ptr<scalar_t>(), z.stride(0), teacher.const_data_ptr<scalar_t>(),
        idx.const_data_ptr<int64_t>(), w.const_data_ptr<acc_t>(),
        bias ? bias->const_data_ptr<scalar_t>() : nullptr, g, total, relu, mode,
        partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial;
}

const AdaptKernels kCudaKernels{&im2col_cuda, &col2im_cuda, &epilogue_cuda};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& mask,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool relu, bool save) {
  const c10::cuda::CUDAGuard guard(student.device());
  return masked_adapt_forward(kCudaKernels, student, teacher, mask, weight, bias, relu, save);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& idx,
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& mask,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool relu,
    std::array<bool, 4> output_mask) {
  const c10::cuda::CUDAGuard guard(student.device());
  return masked_adapt_backward(kCudaKernels, grad, saved, idx, student, teacher, mask, weight, bias,
                               relu, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fgd, CUDA, m) {
  m.impl("_masked_adapt_forward", &forward_cuda);
  m.impl("_masked_adapt_backward", &backward_cuda);
}

}  // namespace fgd
