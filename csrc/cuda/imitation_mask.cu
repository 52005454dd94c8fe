// Two kernels, never holding the [B, A, G] IoU tensor:
//  1. best IoU per (image, GT): blocks over (image, group of 4 GTs; anchor chunks strided over
//     grid.y), a block reduction, then one atomic max per GT and block on the float bits (IoU >= 0,
//     so the bits order like the values);
//  2. one thread per location: its K anchors against the image's GTs, staged in shared memory,
//     stopping at the first that passes.
#include "../box.h"
#include "common.cuh"

namespace fgd {
namespace {

constexpr int kAnchorsPerThread = 16;
constexpr int kGtsPerBlock = 4;
constexpr int kGtTile = 128;

__device__ __forceinline__ void atomic_max_nonneg(float* addr, float v) {
  atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
}
__device__ __forceinline__ void atomic_max_nonneg(double* addr, double v) {
  atomicMax(reinterpret_cast<unsigned long long*>(addr),
            static_cast<unsigned long long>(__double_as_longlong(v)));
}

__device__ __forceinline__ int64_t clamped_count(const int64_t* counts, int64_t b, int64_t G) {
  const int64_t n = counts[b];
  return n < 0 ? 0 : (n > G ? G : n);
}

// Blocks over (image, group of kGtsPerBlock GTs) along x and anchor chunks (strided) along y.
// Every anchor a thread loads is compared with the whole group, so the anchors are read from L2
// once per group rather than once per GT.
template <typename T>
__global__ void best_iou_kernel(const T* __restrict__ anchors, const T* __restrict__ gts,
                                const int64_t* __restrict__ counts, int64_t G, int64_t A,
                                bool batched_anchors, T off, T* __restrict__ best) {
  const int64_t groups = (G + kGtsPerBlock - 1) / kGtsPerBlock;
  const int64_t b = blockIdx.x / groups, g0 = (blockIdx.x - b * groups) * kGtsPerBlock;
  const int64_t n = clamped_count(counts, b, G) - g0;  // real GTs in the group
  if (n <= 0) return;  // uniform across the block
  T gx1[kGtsPerBlock], gy1[kGtsPerBlock], gx2[kGtsPerBlock], gy2[kGtsPerBlock];
  T area_g[kGtsPerBlock], m[kGtsPerBlock];
  for (int i = 0; i < kGtsPerBlock; ++i) {
    const T* gt = gts + (b * G + g0 + (i < n ? i : 0)) * 4;  // a padded slot repeats a real GT
    gx1[i] = gt[0], gy1[i] = gt[1], gx2[i] = gt[2], gy2[i] = gt[3];
    area_g[i] = box_area(gx1[i], gy1[i], gx2[i], gy2[i], off);
    m[i] = 0;
  }
  const T* a = anchors + (batched_anchors ? b * A * 4 : 0);
  constexpr int64_t kChunk = kThreads * kAnchorsPerThread;
  for (const int64_t chunk : block_stride_y((A + kChunk - 1) / kChunk)) {
    const int64_t hi = A < (chunk + 1) * kChunk ? A : (chunk + 1) * kChunk;
    for (const int64_t j : block_threads(chunk * kChunk, hi)) {
      const T ax1 = a[4 * j], ay1 = a[4 * j + 1], ax2 = a[4 * j + 2], ay2 = a[4 * j + 3];
      const T area_a = box_area(ax1, ay1, ax2, ay2, off);
      for (int i = 0; i < kGtsPerBlock; ++i) {
        const T v = iou(ax1, ay1, ax2, ay2, area_a, gx1[i], gy1[i], gx2[i], gy2[i], area_g[i], off);
        m[i] = v > m[i] ? v : m[i];
      }
    }
  }
  block_reduce(m, [](T x, T y) { return x > y ? x : y; });
  if (threadIdx.x == 0) {
    for (int i = 0; i < kGtsPerBlock && i < n; ++i) {
      if (m[i] > T(0)) atomic_max_nonneg(best + b * G + g0 + i, m[i]);
    }
  }
}

template <typename T>
__global__ void mask_kernel(const T* __restrict__ anchors, const T* __restrict__ gts,
                            const int64_t* __restrict__ counts, const T* __restrict__ best,
                            int64_t B, int64_t G, int64_t HW, int64_t K, bool batched_anchors,
                            T thresh, T off, bool* __restrict__ out) {
  __shared__ T tile[6][kGtTile];  // x1, y1, x2, y2, area, threshold
  const int64_t l = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  for (const int64_t b : block_stride_y(B)) {
    const int64_t n = clamped_count(counts, b, G);
    const T* a = anchors + (batched_anchors ? b * HW * K * 4 : 0);
    bool on = false;
    for (int64_t t0 = 0; t0 < n; t0 += kGtTile) {
      const int64_t tn = n - t0 < kGtTile ? n - t0 : kGtTile;
      __syncthreads();
      for (const int64_t i : block_threads(0, tn)) {
        const T* g = gts + (b * G + t0 + i) * 4;
        const T m = best[b * G + t0 + i];
        tile[0][i] = g[0], tile[1][i] = g[1], tile[2][i] = g[2], tile[3][i] = g[3];
        tile[4][i] = box_area(g[0], g[1], g[2], g[3], off);
        tile[5][i] = m > T(0) ? thresh * m : T(2);  // IoU <= 1: a GT that overlaps nothing marks nothing
      }
      __syncthreads();
      if (l >= HW || on) continue;
      for (int64_t k = 0; k < K && !on; ++k) {
        const T* p = a + (l * K + k) * 4;
        const T ax1 = p[0], ay1 = p[1], ax2 = p[2], ay2 = p[3];
        const T area_a = box_area(ax1, ay1, ax2, ay2, off);
        for (int64_t i = 0; i < tn; ++i) {
          if (iou(ax1, ay1, ax2, ay2, area_a, tile[0][i], tile[1][i], tile[2][i], tile[3][i],
                  tile[4][i], off) > tile[5][i]) {
            on = true;
            break;
          }
        }
      }
    }
    if (l < HW) out[b * HW + l] = on;
  }
}

at::Tensor imitation_mask_cuda(const at::Tensor& anchors, const at::Tensor& gt_boxes,
                               const at::Tensor& gt_counts, c10::SymIntArrayRef feat_size,
                               double thresh, double offset) {
  const MaskShape s = check_imitation_mask(anchors, gt_boxes, gt_counts, feat_size, thresh, offset);
  const DeviceGuard guard(gt_boxes.device());
  const auto acc = at::toOpMathType(anchors.scalar_type());
  const at::Tensor a = anchors.to(acc).contiguous();
  const at::Tensor g = gt_boxes.to(acc).contiguous();
  const at::Tensor n = gt_counts.to(gt_boxes.device()).contiguous();
  const int64_t HW = s.H * s.W;
  at::Tensor out = at::empty({s.B, s.H, s.W}, gt_boxes.options().dtype(at::kBool));
  if (s.B == 0) return out;
  const int64_t chunks = (s.A + kThreads * kAnchorsPerThread - 1) / (kThreads * kAnchorsPerThread);
  const int64_t groups = (s.G + kGtsPerBlock - 1) / kGtsPerBlock;
  TORCH_CHECK_VALUE(s.B * groups <= INT32_MAX && (HW + kThreads - 1) / kThreads <= INT32_MAX,
                    "fgd.imitation_mask: too many boxes or locations for the CUDA kernel (B*G = ",
                    s.B * s.G, ", H*W = ", HW, ")");
  at::Tensor best = at::zeros({s.B, s.G}, g.options());
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(acc, "fgd_imitation_mask_cuda", [&] {
    const auto off = static_cast<scalar_t>(offset);
    if (s.G > 0) {
      const dim3 grid(s.B * groups, std::min(chunks, max_grid_y()));
      FGD_LAUNCH(grid, kThreads, stream, best_iou_kernel<scalar_t>)(
          a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), n.const_data_ptr<int64_t>(),
          s.G, s.A, s.batched_anchors, off, best.mutable_data_ptr<scalar_t>());
      FGD_LAUNCH_CHECK();
    }
    const dim3 grid((HW + kThreads - 1) / kThreads, std::min(s.B, max_grid_y()));
    FGD_LAUNCH(grid, kThreads, stream, mask_kernel<scalar_t>)(
        a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), n.const_data_ptr<int64_t>(),
        best.const_data_ptr<scalar_t>(), s.B, s.G, HW, s.K, s.batched_anchors,
        static_cast<scalar_t>(thresh), off, out.mutable_data_ptr<bool>());
    FGD_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

FGD_CUDA_IMPL(m) { m.impl("imitation_mask", &imitation_mask_cuda); }

}  // namespace fgd
