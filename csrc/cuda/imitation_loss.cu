// Forward: one pass summing w * (s - t)^2 into per-block partials (summed by ATen, so the result is
// deterministic); backward: one elementwise pass. Both load the features only where w != 0, so
// unmasked locations cost no feature traffic and non-finite values there never count. The grid is
// 2-D, x over the H*W locations of a plane and y over the B*C planes, so that the mask entry of an
// element needs no 64-bit division or modulo: one division per plane. N_p and the backward scale
// stay on the device: no host sync.
#include "common.cuh"

namespace fgd {
namespace {

template <typename scalar_t>
__global__ void loss_forward_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                    const acc_t<scalar_t>* __restrict__ w, int64_t C, int64_t HW,
                                    int64_t planes, acc_t<scalar_t>* __restrict__ partial) {
  using W = acc_t<scalar_t>;
  W acc = 0;
  for (const int64_t p : block_stride_y(planes)) {
    const W* wp = w + (p / C) * HW;
    const scalar_t* sp = s + p * HW;
    const scalar_t* tp = t + p * HW;
    for (const int64_t i : thread_stride_x(HW)) {
      const W wi = wp[i];
      if (wi != W(0)) {
        const W d = static_cast<W>(sp[i]) - static_cast<W>(tp[i]);
        acc += wi * d * d;
      }
    }
  }
  acc = block_reduce(acc, [](W x, W y) { return x + y; });
  if (threadIdx.x == 0) partial[blockIdx.y * gridDim.x + blockIdx.x] = acc;
}

template <typename scalar_t>
__global__ void loss_backward_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                     const acc_t<scalar_t>* __restrict__ w,
                                     const acc_t<scalar_t>* __restrict__ scale, int64_t C,
                                     int64_t HW, int64_t planes, scalar_t* __restrict__ out) {
  using W = acc_t<scalar_t>;
  const W k = *scale;
  for (const int64_t p : block_stride_y(planes)) {
    const W* wp = w + (p / C) * HW;
    const int64_t o = p * HW;
    for (const int64_t i : thread_stride_x(HW)) {
      const W wi = wp[i];
      W g = 0;
      if (wi != W(0)) g = k * wi * (static_cast<W>(s[o + i]) - static_cast<W>(t[o + i]));
      out[o + i] = static_cast<scalar_t>(g);
    }
  }
}

at::Tensor imitation_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& mask) {
  check_imitation_loss(student, teacher, mask);
  const DeviceGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const at::Tensor w = mask_weights(mask, student);
  const int64_t C = s.size(1), HW = s.size(2) * s.size(3), planes = s.size(0) * C;
  const dim3 grid = s.numel() > 0 ? grid_2d(HW, planes) : dim3(1);
  at::Tensor partial = at::zeros({int64_t(grid.x) * grid.y}, w.options());
  if (s.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "fgd_loss_cuda", [&] {
      using W = acc_t<scalar_t>;
      FGD_LAUNCH(grid, kThreads, current_stream(), loss_forward_kernel<scalar_t>)(
          s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), w.const_data_ptr<W>(), C, HW,
          planes, partial.mutable_data_ptr<W>());
      FGD_LAUNCH_CHECK();
    });
  }
  const at::Tensor n_pos = w.sum(at::kDouble);
  const at::Tensor loss = at::where(n_pos > 0, partial.sum(at::kDouble) / (2 * n_pos),
                                    at::zeros_like(n_pos));
  return loss.to(s.scalar_type());
}

at::Tensor imitation_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& student,
                                        const at::Tensor& teacher, const at::Tensor& mask) {
  check_imitation_loss_backward(grad, student, teacher, mask);
  const DeviceGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const at::Tensor w = mask_weights(mask, student);
  const at::Tensor n_pos = w.sum(at::kDouble);
  const at::Tensor scale =
      at::where(n_pos > 0, grad.to(s.device(), at::kDouble).reshape({}) / n_pos,
                at::zeros_like(n_pos))
          .to(w.scalar_type());
  at::Tensor out = at::empty_like(s);
  const int64_t C = s.size(1), HW = s.size(2) * s.size(3), planes = s.size(0) * C;
  if (s.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "fgd_loss_bwd_cuda",
                                    [&] {
      using W = acc_t<scalar_t>;
      FGD_LAUNCH(grid_2d(HW, planes), kThreads, current_stream(), loss_backward_kernel<scalar_t>)(
          s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), w.const_data_ptr<W>(),
          scale.const_data_ptr<W>(), C, HW, planes, out.mutable_data_ptr<scalar_t>());
      FGD_LAUNCH_CHECK();
    });
  }
  return out;
}

}  // namespace

FGD_CUDA_IMPL(m) {
  m.impl("imitation_loss", &imitation_loss_cuda);
  m.impl("_imitation_loss_backward", &imitation_loss_backward_cuda);
}

}  // namespace fgd
