// Forward: one grid-stride pass summing w * (s - t)^2 into per-block partials (summed by ATen, so
// the result is deterministic); backward: one elementwise pass. Both load the features only where
// w != 0, so unmasked locations cost no feature traffic and non-finite values there never count.
// N_p and the backward scale stay on the device: no host sync.
#include <ATen/OpMathType.h>

#include "../fgd.h"
#include "common.cuh"

namespace fgd {
namespace {

template <typename scalar_t, typename W>
__global__ void loss_forward_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                    const W* __restrict__ w, int64_t C, int64_t HW, int64_t total,
                                    W* __restrict__ partial) {
  W acc = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const W wi = w[(i / (C * HW)) * HW + i % HW];
    if (wi != W(0)) {
      const W d = static_cast<W>(s[i]) - static_cast<W>(t[i]);
      acc += wi * d * d;
    }
  }
  acc = block_reduce(acc, [](W x, W y) { return x + y; });
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <typename scalar_t, typename W>
__global__ void loss_backward_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                     const W* __restrict__ w, const W* __restrict__ scale,
                                     int64_t C, int64_t HW, int64_t total,
                                     scalar_t* __restrict__ out) {
  const W k = *scale;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const W wi = w[(i / (C * HW)) * HW + i % HW];
    W g = 0;
    if (wi != W(0)) g = k * wi * (static_cast<W>(s[i]) - static_cast<W>(t[i]));
    out[i] = static_cast<scalar_t>(g);
  }
}

at::ScalarType weight_type(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor imitation_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& mask) {
  check_imitation_loss(student, teacher, mask);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const at::Tensor w = mask_weights(mask, weight_type(student));
  const int64_t C = s.size(1), HW = s.size(2) * s.size(3), total = s.numel();
  const int64_t blocks = grid_for(total, 4);
  at::Tensor partial = at::zeros({blocks}, w.options());
  if (total > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "fgd_loss_cuda", [&] {
      using W = at::opmath_type<scalar_t>;
      loss_forward_kernel<scalar_t, W><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), w.const_data_ptr<W>(), C, HW,
          total, partial.mutable_data_ptr<W>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor n_pos = w.sum(at::kDouble);
  const at::Tensor loss = at::where(n_pos > 0, partial.sum(at::kDouble) / (2 * n_pos),
                                    at::zeros_like(n_pos));
  return loss.to(s.scalar_type());
}

at::Tensor imitation_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& student,
                                        const at::Tensor& teacher, const at::Tensor& mask) {
  check_imitation_loss(student, teacher, mask);
  TORCH_CHECK_VALUE(grad.numel() == 1, "fgd._imitation_loss_backward: grad must be a scalar");
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const auto wt = weight_type(student);
  const at::Tensor w = mask_weights(mask, wt);
  const at::Tensor n_pos = w.sum(at::kDouble);
  const at::Tensor scale =
      at::where(n_pos > 0, grad.to(s.device(), at::kDouble).reshape({}) / n_pos,
                at::zeros_like(n_pos))
          .to(wt);
  at::Tensor out = at::empty_like(s);
  const int64_t C = s.size(1), HW = s.size(2) * s.size(3), total = s.numel();
  if (total > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "fgd_loss_bwd_cuda",
                                    [&] {
      using W = at::opmath_type<scalar_t>;
      loss_backward_kernel<scalar_t, W><<<grid_for(total, 4), kThreads, 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(
          s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), w.const_data_ptr<W>(),
          scale.const_data_ptr<W>(), C, HW, total, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fgd, CUDA, m) {
  m.impl("imitation_loss", &imitation_loss_cuda);
  m.impl("_imitation_loss_backward", &imitation_loss_backward_cuda);
}

}  // namespace fgd
