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
// degenerate box has zero area and an intersection that is empty stays empty with offset 1.
// Ternaries, not std::min/max: they work on the device and vectorise to blends on the CPU.
template <typename T>
FGD_HD T extent(T lo, T hi, T offset) {
  return hi >= lo ? hi - lo + offset : T(0);
}

template <typename T>
FGD_HD T box_area(T x1, T y1, T x2, T y2, T offset) {
  return extent(x1, x2, offset) * extent(y1, y2, offset);
}

// IoU of box a and box b given their areas; 0 where the union is empty (torchvision: NaN).
template <typename T>
FGD_HD T iou(T ax1, T ay1, T ax2, T ay2, T area_a,
             T bx1, T by1, T bx2, T by2, T area_b, T offset) {
  const T iw = extent(ax1 > bx1 ? ax1 : bx1, ax2 < bx2 ? ax2 : bx2, offset);
  const T ih = extent(ay1 > by1 ? ay1 : by1, ay2 < by2 ? ay2 : by2, offset);
  const T inter = iw * ih;
  const T uni = area_a + area_b - inter;
  return uni > T(0) ? inter / uni : T(0);
}

}  // namespace fgd
