#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../fgd.h"
#include "vec.h"

namespace fgd {
namespace {

template <typename T>
FGD_HD void iou_row_impl(const T* __restrict__ a, T offset, BoxesSoA<T> b, int64_t m,
                         T* __restrict__ out) {
  const T area_a = box_area(a[0], a[1], a[2], a[3], offset);
  for (int64_t j = 0; j < m; ++j)
    out[j] = iou(a[0], a[1], a[2], a[3], area_a, b.x1[j], b.y1[j], b.x2[j], b.y2[j], b.area[j],
                 offset);
}
FGD_PER_ISA(void, iou_row, (const float* a, float off, BoxesSoA<float> b, int64_t m, float* out),
            (a, off, b, m, out))
FGD_PER_ISA(void, iou_row,
            (const double* a, double off, BoxesSoA<double> b, int64_t m, double* out),
            (a, off, b, m, out))

template <typename T>
void box_iou_kernel(const T* b1, const T* b2, int64_t B, int64_t N, int64_t M, T offset, T* out) {
  std::vector<T> soa(static_cast<size_t>(B * 5 * M));
  for (int64_t b = 0; b < B; ++b) to_soa(b2 + b * M * 4, M, offset, soa.data() + b * 5 * M);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(M, 1));
  at::parallel_for(0, B * N, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / N;
      iou_row(b1 + r * 4, offset, soa_view(soa.data() + b * 5 * M, M), M, out + r * M);
    }
  });
}

at::Tensor box_iou_cpu(const at::Tensor& boxes1, const at::Tensor& boxes2, double offset) {
  check_box_iou(boxes1, boxes2, offset);
  const bool batched = boxes1.dim() == 3;
  // Half types are computed in float32 and returned in their own dtype.
  const auto acc = boxes1.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor b1 = (batched ? boxes1 : boxes1.unsqueeze(0)).to(acc).contiguous();
  const at::Tensor b2 = (batched ? boxes2 : boxes2.unsqueeze(0)).to(acc).contiguous();
  const int64_t B = b1.size(0), N = b1.size(1), M = b2.size(1);
  at::Tensor out = at::empty({B, N, M}, b1.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "fgd_box_iou_cpu", [&] {
      box_iou_kernel(b1.const_data_ptr<scalar_t>(), b2.const_data_ptr<scalar_t>(), B, N, M,
                     static_cast<scalar_t>(offset), out.mutable_data_ptr<scalar_t>());
    });
  }
  out = out.to(boxes1.scalar_type());
  return batched ? out : out.squeeze(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fgd, CPU, m) { m.impl("box_iou", &box_iou_cpu); }

}  // namespace fgd
