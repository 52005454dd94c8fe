// CPU kernels of masked_adapt_loss (the products and the chunking are in ../masked_adapt.cpp).
// Each kernel parallelises over rows of the [channels, n] chunk matrices and walks the locations
// of a row run by run, reading each feature plane at increasing addresses; col2im gives every
// thread whole input channels, so the scatter-add needs no atomics.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../fgd.h"
#include "../masked_adapt.h"
#include "vec.h"

namespace fgd {
namespace {

// The chunk's locations as runs along image rows (masks are blobs, so runs are long): location
// i0 + j, j < len, sits at off + j in a [B, C, H, W] tensor (off = b*C*H*W + y*W + x0). A run turns
// every kernel's inner loop into a contiguous copy, add or reduction that the compiler vectorises.
struct Run {
  int64_t i0, len, off;
  int y, x0;
};

std::vector<Run> runs(const at::Tensor& idx, int64_t C, int64_t H, int64_t W) {
  const int64_t n = idx.numel(), HW = H * W;
  const int64_t* p = idx.const_data_ptr<int64_t>();
  std::vector<Run> out;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = p[i] / HW, yx = p[i] % HW;
    if (!out.empty() && p[i] == p[i - 1] + 1 && yx % W != 0) {
      ++out.back().len;
    } else {
      out.push_back({i, 1, b * C * HW + yx, static_cast<int>(yx / W), static_cast<int>(yx % W)});
    }
  }
  return out;
}

// Row r of a chunk matrix = (channel c, tap dy, dx) and the part of a run that tap sees inside the
// map: run positions [lo, hi) read the input at run.off + shift + j.
struct Tap {
  int64_t c, shift;
  int dy, dx;
};
inline Tap tap(int64_t r, int64_t k, int64_t H, int64_t W) {
  const int64_t kk = k * k, p = k / 2;
  Tap t{r / kk, 0, static_cast<int>((r / k) % k - p), static_cast<int>(r % k - p)};
  t.shift = t.c * H * W + t.dy * W + t.dx;
  return t;
}
inline void inside(const Run& run, const Tap& t, int64_t H, int64_t W, int64_t& lo, int64_t& hi) {
  lo = hi = 0;
  const int64_t y = run.y + t.dy, x = run.x0 + t.dx;
  if (y < 0 || y >= H) return;
  lo = std::max<int64_t>(0, -x);
  hi = std::max(lo, std::min(run.len, W - x));
}

// The row r of cols (tap tp) for every run: the student's values where the tap falls inside the
// map, zeros where it falls outside (the conv's zero padding). Copies and fills: they compile to
// memcpy / memset, which pick their own vector code, so one copy serves every ISA.
template <typename S>
void im2col_row(const S* __restrict__ s, const Run* rs, int64_t nruns, Tap tp, int64_t H,
                int64_t W, S* __restrict__ out) {
  for (int64_t i = 0; i < nruns; ++i) {
    const Run& run = rs[i];
    int64_t lo, hi;
    inside(run, tp, H, W, lo, hi);
    S* o = out + run.i0;
    const S* src = s + run.off + tp.shift;
    for (int64_t j = 0; j < lo; ++j) o[j] = S(0);
    for (int64_t j = lo; j < hi; ++j) o[j] = src[j];
    for (int64_t j = std::max(lo, hi); j < run.len; ++j) o[j] = S(0);
  }
}

// The transpose: grad += row r of cols, tap tp, for every run.
template <typename S, typename A>
FGD_HD void col2im_row_impl(const S* __restrict__ row, const Run* rs, int64_t nruns, Tap tp,
                            int64_t H, int64_t W, A* __restrict__ g) {
  for (int64_t i = 0; i < nruns; ++i) {
    const Run& run = rs[i];
    int64_t lo, hi;
    inside(run, tp, H, W, lo, hi);
    const S* r = row + run.i0;
    A* dst = g + run.off + tp.shift;
    for (int64_t j = lo; j < hi; ++j) dst[j] += to_float(r[j]);
  }
}

// One output channel over the chunk's n locations, the teacher already gathered to t[n]: returns
// sum_j w_j (act(z_j + b) - t_j)^2 and rewrites z as kMode says. kLanes partial sums let the
// reduction vectorise; the flags are template arguments so that each loop is branch-free.
template <bool kRelu, EpilogueMode kMode, typename S, typename A>
FGD_HD A epilogue_one(S& z, S t, A w, A bias) {
  const A v = to_float(z) + bias;
  const A d = (kRelu && v < A(0) ? A(0) : v) - to_float(t);
  if constexpr (kMode == EpilogueMode::kStudentGrad) {
    const A g = w * d;
    z = from_float(kRelu && v <= A(0) ? A(0) : g, S());
  } else if constexpr (kMode == EpilogueMode::kDiff) {
    z = from_float(w * d, S());
  }
  return w * d * d;
}
template <bool kRelu, EpilogueMode kMode, typename S, typename A>
FGD_HD A epilogue_row_t(S* __restrict__ z, const S* __restrict__ t, const A* __restrict__ w,
                        A bias, int64_t n) {
  A lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma GCC unroll 1
    for (int l = 0; l < kLanes; ++l)
      lane[l] += epilogue_one<kRelu, kMode>(z[j + l], t[j + l], w[j + l], bias);
  }
  A acc = 0;
  for (; j < n; ++j) acc += epilogue_one<kRelu, kMode>(z[j], t[j], w[j], bias);
  for (int l = 0; l < kLanes; ++l) acc += lane[l];
  return acc;
}
template <typename S, typename A>
FGD_HD A epilogue_row_impl(S* z, const S* t, const A* w, A bias, int64_t n, bool relu,
                           EpilogueMode mode) {
  switch (mode) {
    case EpilogueMode::kStudentGrad:
      return relu ? epilogue_row_t<true, EpilogueMode::kStudentGrad>(z, t, w, bias, n)
                  : epilogue_row_t<false, EpilogueMode::kStudentGrad>(z, t, w, bias, n);
    case EpilogueMode::kDiff:
      return relu ? epilogue_row_t<true, EpilogueMode::kDiff>(z, t, w, bias, n)
                  : epilogue_row_t<false, EpilogueMode::kDiff>(z, t, w, bias, n);
    default:
      return relu ? epilogue_row_t<true, EpilogueMode::kLossOnly>(z, t, w, bias, n)
                  : epilogue_row_t<false, EpilogueMode::kLossOnly>(z, t, w, bias, n);
  }
}

// One vectorised copy per ISA for each feature type S (accumulated in A).
#define FGD_ADAPT_CLONES(S, A)                                                                  \
  FGD_PER_ISA(void, col2im_row,                                                                 \
              (const S* row, const Run* rs, int64_t nruns, Tap tp, int64_t H, int64_t W, A* g), \
              (row, rs, nruns, tp, H, W, g))                                                    \
  FGD_PER_ISA(A, epilogue_row,                                                                  \
              (S * z, const S* t, const A* w, A bias, int64_t n, bool relu, EpilogueMode mode), \
              (z, t, w, bias, n, relu, mode))
FGD_ADAPT_CLONES(float, float)
FGD_ADAPT_CLONES(double, double)
FGD_ADAPT_CLONES(c10::BFloat16, float)
FGD_ADAPT_CLONES(c10::Half, float)
#undef FGD_ADAPT_CLONES

void im2col_cpu(const at::Tensor& student, const at::Tensor& idx, int64_t k, at::Tensor& cols) {
  const int64_t Cs = student.size(1), H = student.size(2), W = student.size(3), n = idx.numel();
  const std::vector<Run> rs = runs(idx, Cs, H, W);
  const int64_t nruns = static_cast<int64_t>(rs.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "fgd_im2col", [&] {
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    scalar_t* out = cols.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, cols.size(0), std::max<int64_t>(1, 8192 / std::max<int64_t>(n, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        im2col_row(s, rs.data(), nruns, tap(r, k, H, W), H, W, out + r * n);
    });
  });
}

void col2im_cpu(const at::Tensor& cols, const at::Tensor& idx, int64_t k, at::Tensor& grad) {
  const int64_t Cs = grad.size(1), H = grad.size(2), W = grad.size(3), n = idx.numel();
  const std::vector<Run> rs = runs(idx, Cs, H, W);
  const int64_t nruns = static_cast<int64_t>(rs.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cols.scalar_type(), "fgd_col2im", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = cols.const_data_ptr<scalar_t>();
    acc_t* g = grad.mutable_data_ptr<acc_t>();
    at::parallel_for(0, Cs, std::max<int64_t>(1, 8192 / std::max<int64_t>(n * k * k, 1)),
                     [&](int64_t c0, int64_t c1) {
      for (int64_t r = c0 * k * k; r < c1 * k * k; ++r)
        col2im_row(in + r * n, rs.data(), nruns, tap(r, k, H, W), H, W, g);
    });
  });
}

at::Tensor epilogue_cpu(at::Tensor& z, const at::Tensor& teacher, const at::Tensor& idx,
                        const at::Tensor& w, const c10::optional<at::Tensor>& bias, bool relu,
                        EpilogueMode mode) {
  const int64_t Ct = teacher.size(1), H = teacher.size(2), W = teacher.size(3), n = idx.numel();
  const int64_t ld = z.stride(0);
  const std::vector<Run> rs = runs(idx, Ct, H, W);
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fgd_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    loss = at::parallel_reduce(
        0, Ct, std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)), 0.0,
        [&](int64_t c0, int64_t c1, double sum) {
          // The teacher's values at the chunk's locations, gathered run by run (contiguous
          // copies) so that the arithmetic below is one long vector loop.
          std::vector<scalar_t> tc(static_cast<size_t>(n));
          for (int64_t c = c0; c < c1; ++c) {
            for (const Run& run : rs)
              std::copy_n(t + run.off + c * H * W, run.len, tc.data() + run.i0);
            const acc_t bc = bp ? static_cast<acc_t>(bp[c]) : acc_t(0);
            sum += static_cast<double>(epilogue_row(zp + c * ld, tc.data(), wp, bc, n, relu, mode));
          }
          return sum;
        },
        std::plus<double>());
  });
  return at::scalar_tensor(loss, at::kDouble);
}

const AdaptKernels kCpuKernels{&im2col_cpu, &col2im_cpu, &epilogue_cpu};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& mask,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool relu, bool save) {
  return masked_adapt_forward(kCpuKernels, student, teacher, mask, weight, bias, relu, save);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& idx,
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& mask,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool relu,
    std::array<bool, 4> output_mask) {
  return masked_adapt_backward(kCpuKernels, grad, saved, idx, student, teacher, mask, weight, bias,
                               relu, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fgd, CPU, m) {
  m.impl("_masked_adapt_forward", &forward_cpu);
  m.impl("_masked_adapt_backward", &backward_cpu);
}

}  // namespace fgd
