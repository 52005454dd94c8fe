// Two passes over anchor chunks, never holding the [B, A, G] IoU tensor: pass 1 takes each GT's
// best IoU over all anchors, pass 2 thresholds and ORs per location. A chunk is a run of whole
// locations; its bounding box lets both passes skip GTs that cannot touch it (IoU 0 never passes:
// the comparison is strict and the threshold is >= 0).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "../fgd.h"
#include "vec.h"

namespace fgd {
namespace {

constexpr int64_t kChunkAnchors = 256;
// The least work (anchor-box pairs) worth a task of its own: smaller calls run on the calling
// thread instead of paying for a parallel region (benchmarks/RESULTS.md, "Threads: small calls pay
// no parallel region").
constexpr int64_t kMinPairsPerTask = 32768;
inline int64_t grain(int64_t pairs_per_item) {
  return std::max<int64_t>(1, kMinPairsPerTask / std::max<int64_t>(pairs_per_item, 1));
}

// Locations per chunk: about kChunkAnchors anchors, and a whole number of kLanes-wide vectors of
// them wherever that keeps the size within -50 % .. +25 %, so the vector loops of both passes run no
// scalar remainder but in the last chunk (a remainder per chunk and GT cost about as much as the
// vectors before it: benchmarks/RESULTS.md, "CPU kernels on an AVX-512 machine").
inline int64_t chunk_locations(int64_t K) {
  const int64_t locs = std::max<int64_t>(1, kChunkAnchors / K);
  const int64_t step = kLanes / std::gcd<int64_t>(K, kLanes);  // locations per whole vector count
  const int64_t up = (locs + step - 1) / step * step, down = locs / step * step;
  return up * K <= kChunkAnchors * 5 / 4 ? up : down > 0 ? down : locs;
}

template <typename T>
FGD_HD T max_iou_impl(BoxesSoA<T> a, int64_t lo, int64_t hi, const T* __restrict__ g, T area_g,
                      T off) {
  // kLanes independent running maxima: a max reduction the compiler vectorises without fast-math.
  T lane[kLanes] = {};
  int64_t j = lo;
  for (; j + kLanes <= hi; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t i = j + l;
      const T v = iou(a.x1[i], a.y1[i], a.x2[i], a.y2[i], a.area[i], g[0], g[1], g[2], g[3], area_g,
                      off);
      lane[l] = v > lane[l] ? v : lane[l];
    }
  }
  T m = 0;
  for (; j < hi; ++j) {
    const T v = iou(a.x1[j], a.y1[j], a.x2[j], a.y2[j], a.area[j], g[0], g[1], g[2], g[3], area_g,
                    off);
    m = v > m ? v : m;
  }
  for (int l = 0; l < kLanes; ++l) m = lane[l] > m ? lane[l] : m;
  return m;
}
FGD_PER_ISA(float, max_iou,
            (BoxesSoA<float> a, int64_t lo, int64_t hi, const float* g, float area_g, float off),
            (a, lo, hi, g, area_g, off))
FGD_PER_ISA(double, max_iou,
            (BoxesSoA<double> a, int64_t lo, int64_t hi, const double* g, double area_g,
             double off),
            (a, lo, hi, g, area_g, off))

// hit[j - lo] = 1 where anchor j's IoU with g exceeds thr (hit keeps earlier ones).
template <typename T>
FGD_HD void mark_impl(BoxesSoA<T> a, int64_t lo, int64_t hi, const T* __restrict__ g, T area_g,
                      T thr, T off, T* __restrict__ hit) {
  for (int64_t j = lo; j < hi; ++j) {
    const T v = iou(a.x1[j], a.y1[j], a.x2[j], a.y2[j], a.area[j], g[0], g[1], g[2], g[3], area_g,
                    off);
    hit[j - lo] = v > thr ? T(1) : hit[j - lo];
  }
}
FGD_PER_ISA(void, mark,
            (BoxesSoA<float> a, int64_t lo, int64_t hi, const float* g, float area_g, float thr,
             float off, float* hit),
            (a, lo, hi, g, area_g, thr, off, hit))
FGD_PER_ISA(void, mark,
            (BoxesSoA<double> a, int64_t lo, int64_t hi, const double* g, double area_g,
             double thr, double off, double* hit),
            (a, lo, hi, g, area_g, thr, off, hit))

// Conservative: false only if no anchor in the chunk can overlap g.
template <typename T>
inline bool may_touch(const T* bbox, const T* g) {
  return !(g[2] < bbox[0] || g[0] > bbox[2] || g[3] < bbox[1] || g[1] > bbox[3]);
}

template <typename T>
void imitation_mask_kernel(const MaskShape& s, const T* anchors, const T* gts,
                           const int64_t* counts, T thresh, T off, bool* out) {
  const int64_t HW = s.H * s.W, A = s.A, K = s.K, G = s.G, B = s.B;
  const int64_t locs_per_chunk = chunk_locations(K);
  const int64_t nchunks = (HW + locs_per_chunk - 1) / locs_per_chunk;
  const int64_t nsets = s.batched_anchors ? B : 1;

  // Anchors as SoA and each chunk's bounding box, per anchor set.
  std::vector<T> soa(static_cast<size_t>(nsets * 5 * A));
  std::vector<T> bbox(static_cast<size_t>(nsets * nchunks * 4));
  at::parallel_for(0, nsets, grain(A), [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      T* dst = soa.data() + n * 5 * A;
      to_soa(anchors + n * A * 4, A, off, dst);
      const BoxesSoA<T> a = soa_view<T>(dst, A);
      for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t j0 = c * locs_per_chunk * K, j1 = std::min(A, j0 + locs_per_chunk * K);
        T* bb = bbox.data() + (n * nchunks + c) * 4;
        bb[0] = a.x1[j0], bb[1] = a.y1[j0], bb[2] = a.x2[j0], bb[3] = a.y2[j0];
        for (int64_t j = j0 + 1; j < j1; ++j) {
          bb[0] = std::min(bb[0], a.x1[j]), bb[1] = std::min(bb[1], a.y1[j]);
          bb[2] = std::max(bb[2], a.x2[j]), bb[3] = std::max(bb[3], a.y2[j]);
        }
      }
    }
  });
  auto count = [&](int64_t b) { return std::clamp<int64_t>(counts[b], 0, G); };
  auto set_of = [&](int64_t b) { return s.batched_anchors ? b : 0; };

  // Pass 1: the best IoU of every valid GT over all anchors.
  std::vector<T> best(static_cast<size_t>(B * G), T(0));
  at::parallel_for(0, B * G, grain(A), [&](int64_t lo, int64_t hi) {
    for (int64_t bg = lo; bg < hi; ++bg) {
      const int64_t b = bg / G, n = set_of(b);
      if (bg % G >= count(b)) continue;
      const T* g = gts + bg * 4;
      const T area_g = box_area(g[0], g[1], g[2], g[3], off);
      const BoxesSoA<T> a = soa_view<T>(soa.data() + n * 5 * A, A);
      T m = 0;
      for (int64_t c = 0; c < nchunks; ++c) {
        if (!may_touch(bbox.data() + (n * nchunks + c) * 4, g)) continue;
        const int64_t j0 = c * locs_per_chunk * K, j1 = std::min(A, j0 + locs_per_chunk * K);
        const T v = max_iou(a, j0, j1, g, area_g, off);
        m = v > m ? v : m;
      }
      best[bg] = m;
    }
  });

  // Pass 2: a location is on if any of its anchors beats thresh * best for any GT.
  at::parallel_for(0, B * nchunks, grain(locs_per_chunk * K * G), [&](int64_t lo, int64_t hi) {
    std::vector<T> hit(static_cast<size_t>(locs_per_chunk * K));
    for (int64_t bc = lo; bc < hi; ++bc) {
      const int64_t b = bc / nchunks, c = bc % nchunks, n = set_of(b);
      const int64_t l0 = c * locs_per_chunk, l1 = std::min(HW, l0 + locs_per_chunk);
      const int64_t j0 = l0 * K, j1 = l1 * K;
      const T* bb = bbox.data() + (n * nchunks + c) * 4;
      const BoxesSoA<T> a = soa_view<T>(soa.data() + n * 5 * A, A);
      std::fill(hit.begin(), hit.end(), T(0));
      for (int64_t gi = 0, ng = count(b); gi < ng; ++gi) {
        const T* g = gts + (b * G + gi) * 4;
        const T m = best[b * G + gi];
        if (!(m > T(0)) || !may_touch(bb, g)) continue;
        mark(a, j0, j1, g, box_area(g[0], g[1], g[2], g[3], off), thresh * m, off, hit.data());
      }
      for (int64_t l = l0; l < l1; ++l) {
        bool on = false;
        for (int64_t k = 0; k < K; ++k) on |= hit[(l - l0) * K + k] != T(0);
        out[b * HW + l] = on;
      }
    }
  });
}

at::Tensor imitation_mask_cpu(const at::Tensor& anchors, const at::Tensor& gt_boxes,
                              const at::Tensor& gt_counts, c10::SymIntArrayRef feat_size,
                              double thresh, double offset) {
  const MaskShape s = check_imitation_mask(anchors, gt_boxes, gt_counts, feat_size, thresh, offset);
  const auto acc = anchors.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor a = anchors.to(acc).contiguous();
  const at::Tensor g = gt_boxes.to(acc).contiguous();
  const at::Tensor n = gt_counts.contiguous();
  at::Tensor out = at::empty({s.B, s.H, s.W}, gt_boxes.options().dtype(at::kBool));
  if (s.B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(acc, "fgd_imitation_mask_cpu", [&] {
    imitation_mask_kernel<scalar_t>(s, a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                                    n.const_data_ptr<int64_t>(), static_cast<scalar_t>(thresh),
                                    static_cast<scalar_t>(offset), out.mutable_data_ptr<bool>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fgd, CPU, m) { m.impl("imitation_mask", &imitation_mask_cpu); }

}  // namespace fgd
