#include "../box.h"
#include "common.cuh"

namespace fgd {
namespace {

// One thread per output; half types are computed in float32. 2-D blocks: x over the M columns
// (as wide as M needs, up to 256), y over the B*N rows, so no output needs a division to find its
// boxes (one per row).
template <typename scalar_t>
__global__ void box_iou_kernel(const scalar_t* __restrict__ b1, const scalar_t* __restrict__ b2,
                               int64_t N, int64_t M, int64_t rows, float offset,
                               scalar_t* __restrict__ out) {
  using T = acc_t<scalar_t>;
  const T off = static_cast<T>(offset);
  for (const int64_t bn : thread_stride_y(rows)) {
    const scalar_t* p = b1 + bn * 4;
    const T ax1 = p[0], ay1 = p[1], ax2 = p[2], ay2 = p[3];
    const T area_a = box_area(ax1, ay1, ax2, ay2, off);
    const scalar_t* q0 = b2 + (bn / N) * M * 4;
    for (const int64_t m : thread_stride_x(M)) {
      const scalar_t* q = q0 + m * 4;
      const T bx1 = q[0], by1 = q[1], bx2 = q[2], by2 = q[3];
      out[bn * M + m] = static_cast<scalar_t>(
          iou(ax1, ay1, ax2, ay2, area_a, bx1, by1, bx2, by2, box_area(bx1, by1, bx2, by2, off), off));
    }
  }
}

at::Tensor box_iou_cuda(const at::Tensor& boxes1, const at::Tensor& boxes2, double offset) {
  check_box_iou(boxes1, boxes2, offset);
  const DeviceGuard guard(boxes1.device());
  const bool batched = boxes1.dim() == 3;
  const at::Tensor b1 = (batched ? boxes1 : boxes1.unsqueeze(0)).contiguous();
  const at::Tensor b2 = (batched ? boxes2 : boxes2.unsqueeze(0)).contiguous();
  const int64_t B = b1.size(0), N = b1.size(1), M = b2.size(1);
  at::Tensor out = at::empty({B, N, M}, b1.options());
  if (out.numel() > 0) {
    const int64_t rows = B * N;
    const int64_t bx = std::min<int64_t>(kThreads, (M + 31) / 32 * 32), by = kThreads / bx;
    const dim3 block(bx, by);
    const int64_t gx = std::min((M + bx - 1) / bx, max_blocks());
    const dim3 grid(gx, std::clamp<int64_t>(max_blocks() / gx, 1,
                                             std::min((rows + by - 1) / by, max_grid_y())));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b1.scalar_type(), "fgd_box_iou_cuda",
                                    [&] {
      FGD_LAUNCH(grid, block, current_stream(), box_iou_kernel<scalar_t>)(
          b1.const_data_ptr<scalar_t>(), b2.const_data_ptr<scalar_t>(), N, M, rows,
          static_cast<float>(offset), out.mutable_data_ptr<scalar_t>());
      FGD_LAUNCH_CHECK();
    });
  }
  return batched ? out : out.squeeze(0);
}

}  // namespace

FGD_CUDA_IMPL(m) { m.impl("box_iou", &box_iou_cuda); }

}  // namespace fgd
