// CPU kernels of masked_adapt_loss (the products and the chunking are in ../masked_adapt.cpp).
// Each kernel parallelises over rows of the [channels, n] chunk matrices and runs along the
// locations inside a row, so it reads each feature plane at increasing addresses; col2im gives
// every thread whole input channels, so the scatter-add needs no atomics.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../fgd.h"
#include "../masked_adapt.h"

namespace fgd {
namespace {

// Where the chunk's locations sit: off = b*C*H*W + y*W + x in a [B, C, H, W] tensor, and y, x.
struct Locs {
  std::vector<int64_t> off;
  std::vector<int> y, x;
};

Locs locate(const at::Tensor& idx, int64_t C, int64_t H, int64_t W) {
  const int64_t n = idx.numel(), HW = H * W;
  const int64_t* p = idx.const_data_ptr<int64_t>();
  Locs l{std::vector<int64_t>(n), std::vector<int>(n), std::vector<int>(n)};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = p[i] / HW, yx = p[i] % HW;
    l.off[i] = b * C * HW + yx;
    l.y[i] = static_cast<int>(yx / W);
    l.x[i] = static_cast<int>(yx % W);
  }
  return l;
}

// Row r of a chunk matrix = (channel c, tap dy, tap dx): its offset from a location, and the tap.
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
inline bool inside(int y, int x, int H, int W) {
  return static_cast<unsigned>(y) < static_cast<unsigned>(H) &&
         static_cast<unsigned>(x) < static_cast<unsigned>(W);
}

void im2col_cpu(const at::Tensor& student, const at::Tensor& idx, int64_t k, at::Tensor& cols) {
  const int64_t Cs = student.size(1), H = student.size(2), W = student.size(3), n = idx.numel();
  const Locs l = locate(idx, Cs, H, W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "fgd_im2col", [&] {
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    scalar_t* out = cols.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, cols.size(0), std::max<int64_t>(1, 8192 / std::max<int64_t>(n, 1)),
                     [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const Tap tp = tap(r, k, H, W);
        scalar_t* o = out + r * n;
        for (int64_t i = 0; i < n; ++i) {
          o[i] = inside(l.y[i] + tp.dy, l.x[i] + tp.dx, H, W) ? s[l.off[i] + tp.shift] : scalar_t(0);
        }
      }
    });
  });
}

void col2im_cpu(const at::Tensor& cols, const at::Tensor& idx, int64_t k, at::Tensor& grad) {
  const int64_t Cs = grad.size(1), H = grad.size(2), W = grad.size(3), n = idx.numel();
  const Locs l = locate(idx, Cs, H, W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cols.scalar_type(), "fgd_col2im", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = cols.const_data_ptr<scalar_t>();
    acc_t* g = grad.mutable_data_ptr<acc_t>();
    at::parallel_for(0, Cs, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        for (int64_t r = c * k * k; r < (c + 1) * k * k; ++r) {
          const Tap tp = tap(r, k, H, W);
          const scalar_t* row = in + r * n;
          for (int64_t i = 0; i < n; ++i) {
            if (inside(l.y[i] + tp.dy, l.x[i] + tp.dx, H, W)) {
              g[l.off[i] + tp.shift] += static_cast<acc_t>(row[i]);
            }
          }
        }
      }
    });
  });
}

at::Tensor epilogue_cpu(at::Tensor& z, const at::Tensor& teacher, const at::Tensor& idx,
                        const at::Tensor& w, const c10::optional<at::Tensor>& bias, bool relu,
                        double scale, EpilogueMode mode) {
  const int64_t Ct = teacher.size(1), H = teacher.size(2), W = teacher.size(3), n = idx.numel();
  const int64_t ld = z.stride(0);
  const Locs l = locate(idx, Ct, H, W);
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fgd_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t sc = static_cast<acc_t>(scale);
    loss = at::parallel_reduce(
        0, Ct, std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)), 0.0,
        [&](int64_t lo, int64_t hi, double sum) {
          for (int64_t c = lo; c < hi; ++c) {
            const acc_t bc = bp ? static_cast<acc_t>(bp[c]) : acc_t(0);
            scalar_t* zc = zp + c * ld;
            const scalar_t* tc = t + c * H * W;
            acc_t part = 0;
            for (int64_t i = 0; i < n; ++i) {
              const acc_t v = static_cast<acc_t>(zc[i]) + bc;
              const acc_t d = (relu && v < 0 ? acc_t(0) : v) - static_cast<acc_t>(tc[l.off[i]]);
              part += wp[i] * d * d;
              if (mode == EpilogueMode::kStudentGrad) {
                zc[i] = static_cast<scalar_t>(relu && !(v > 0) ? acc_t(0) : sc * wp[i] * d);
              } else if (mode == EpilogueMode::kDiff) {
                zc[i] = static_cast<scalar_t>(sc * wp[i] * d);
              }
            }
            sum += static_cast<double>(part);
          }
          return sum;
        },
        std::plus<double>());
  });
  return at::scalar_tensor(loss, at::kDouble);
}

const AdaptKernels kCpuKernels{&im2col_cpu, &col2im_cpu, &epilogue_cpu};

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                               const at::Tensor& mask, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& bias, bool relu,
                                               bool save) {
  return masked_adapt_forward(kCpuKernels, student, teacher, mask, weight, bias, relu, save);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& student,
    const at::Tensor& teacher, const at::Tensor& mask, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, bool relu, std::array<bool, 4> output_mask) {
  return masked_adapt_backward(kCpuKernels, grad, saved, student, teacher, mask, weight, bias, relu,
                               output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fgd, CPU, m) {
  m.impl("_masked_adapt_forward", &forward_cpu);
  m.impl("_masked_adapt_backward", &backward_cpu);
}

}  // namespace fgd
