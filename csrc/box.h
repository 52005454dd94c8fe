// The one IoU formula every kernel (CPU and CUDA) uses, so that the two backends and the
// reference agree by construction.
#pragma once

#if defined(__CUDACC__)
#define FGD_HD __host__ __device__ __forceinline__
#else
#define FGD_HD inline __attribute__((always_inline))
#endif

namespace fgd {

// Length of the interval [lo, hi] under the pixel `offset` convention (0: continuous coordinates,
// 1: the legacy "+1" convention). An inverted interval has length 0 whatever the offset, so a
// degenerate box has zero area.
// Ternaries, not std::min/max: they work on the device and vectorise to blends on the CPU.
template <typename T>
FGD_HD T extent(T lo, T hi, T offset) {
  return hi >= lo ? hi - lo + offset : T(0);
}

template <typename T>
FGD_HD T box_area(T x1, T y1, T x2, T y2, T offset) {
  return extent(x1, x2, offset) * extent(y1, y2, offset);
}

// Length of the overlap of two intervals, lo = the larger start, hi = the smaller end:
// max(0, hi - lo + offset), adding before clamping. With offset 1 this is the legacy formula of the
// official FGFI code and mmcv's bbox_overlaps, under which intervals less than a pixel apart (or a
// sub-pixel box) still overlap; with offset 0 it is max(0, hi - lo).
template <typename T>
FGD_HD T overlap(T lo, T hi, T offset) {
  const T len = hi - lo + offset;
  return len > T(0) ? len : T(0);
}

// IoU of box a and box b given their areas; 0 where the union is empty (torchvision: NaN).
template <typename T>
FGD_HD T iou(T ax1, T ay1, T ax2, T ay2, T area_a,
             T bx1, T by1, T bx2, T by2, T area_b, T offset) {
  const T iw = overlap(ax1 > bx1 ? ax1 : bx1, ax2 < bx2 ? ax2 : bx2, offset);
  const T ih = overlap(ay1 > by1 ? ay1 : by1, ay2 < by2 ? ay2 : by2, offset);
  const T inter = iw * ih;
  const T uni = area_a + area_b - inter;
  return uni > T(0) ? inter / uni : T(0);
}

}  // namespace fgd
