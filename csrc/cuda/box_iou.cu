#include <ATen/OpMathType.h>

#include "../box.h"
#include "../fgd.h"
#include "common.cuh"

namespace fgd {
namespace {

// One thread per output; half types are computed in float32.
template <typename scalar_t>
__global__ void box_iou_kernel(const scalar_t* __restrict__ b1, const scalar_t* __restrict__ b2,
                               int64_t N, int64_t M, int64_t total, float offset,
                               scalar_t* __restrict__ out) {
  using T = at::opmath_type<scalar_t>;
  const T off = static_cast<T>(offset);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t bn = i / M, m = i % M, b = bn / N;
    const scalar_t* p = b1 + bn * 4;
    const scalar_t* q = b2 + (b * M + m) * 4;
    const T ax1 = p[0], ay1 = p[1], ax2 = p[2], ay2 = p[3];
    const T bx1 = q[0], by1 = q[1], bx2 = q[2], by2 = q[3];
    out[i] = static_cast<scalar_t>(iou(ax1, ay1, ax2, ay2, box_area(ax1, ay1, ax2, ay2, off), bx1,
                                       by1, bx2, by2, box_area(bx1, by1, bx2, by2, off), off));
  }
}

at::Tensor box_iou_cuda(const at::Tensor& boxes1, const at::Tensor& boxes2, double offset) {
  check_box_iou(boxes1, boxes2, offset);
  const c10::cuda::CUDAGuard guard(boxes1.device());
  const bool batched = boxes1.dim() == 3;
  const at::Tensor b1 = (batched ? boxes1 : boxes1.unsqueeze(0)).contiguous();
  const at::Tensor b2 = (batched ? boxes2 : boxes2.unsqueeze(0)).contiguous();
  const int64_t B = b1.size(0), N = b1.size(1), M = b2.size(1);
  at::Tensor out = at::empty({B, N, M}, b1.options());
  const int64_t total = out.numel();
  if (total > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b1.scalar_type(), "fgd_box_iou_cuda",
                                    [&] {
      box_iou_kernel<scalar_t><<<grid_for(total), kThreads, 0,
                                 c10::cuda::getCurrentCUDAStream()>>>(
          b1.const_data_ptr<scalar_t>(), b2.const_data_ptr<scalar_t>(), N, M, total,
          static_cast<float>(offset), out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return batched ? out : out.squeeze(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fgd, CUDA, m) { m.impl("box_iou", &box_iou_cuda); }

}  // namespace fgd
