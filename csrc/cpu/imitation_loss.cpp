// Forward: one pass summing w * (s - t)^2; backward: one pass writing w * (s - t) * grad / N_p.
// Both read the features only in the 16-element segments of each H*W plane where the mask has a
// non-zero weight (a sparse FGFI mask leaves most segments unread), and within a segment they
// select on w != 0, so non-finite features at unmasked locations never reach the loss.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../fgd.h"
#include "vec.h"

namespace fgd {
namespace {

constexpr int64_t kSegment = 16;

// [begin, end) runs of the H*W plane of each image holding a non-zero weight, at segment
// granularity; spans of image b are spans[first[b] .. first[b + 1]).
struct Spans {
  std::vector<int64_t> begin, end, first;
  double total_weight = 0;
};

template <typename W>
Spans find_spans(const W* w, int64_t B, int64_t HW) {
  Spans sp;
  sp.first.push_back(0);
  for (int64_t b = 0; b < B; ++b) {
    const W* wb = w + b * HW;
    bool open = false;
    for (int64_t s0 = 0; s0 < HW; s0 += kSegment) {
      const int64_t s1 = std::min(HW, s0 + kSegment);
      bool any = false;
      for (int64_t i = s0; i < s1; ++i) {
        any |= wb[i] != W(0);
        sp.total_weight += static_cast<double>(wb[i]);
      }
      if (any && open) {
        sp.end.back() = s1;
      } else if (any) {
        sp.begin.push_back(s0), sp.end.push_back(s1);
      }
      open = any;
    }
    sp.first.push_back(static_cast<int64_t>(sp.begin.size()));
  }
  return sp;
}

// Software prefetch for a walk over the spans of s and t: keeps kAheadLines cache lines requested
// ahead of the loop. Hardware prefetchers lose a stream that skips segments, and the sparse walk
// then waits on memory (measured before and after: benchmarks/RESULTS.md, "Against the targets of
// #14, AVX2 path").
template <typename S>
struct SpanPrefetch {
  static constexpr int64_t kLine = 64 / sizeof(S), kAheadLines = 32;
  const S *s, *t;
  const int64_t *begin, *end;
  int64_t nspans, k = 0, pos = 0, ahead = 0;
  FGD_HD SpanPrefetch(const S* s_, const S* t_, const int64_t* b, const int64_t* e, int64_t n)
      : s(s_), t(t_), begin(b), end(e), nspans(n), pos(n > 0 ? b[0] : 0) {}
  // Call before reading `len` more elements.
  FGD_HD void before(int64_t len) {
    ahead = std::max<int64_t>(0, ahead - len / kLine);
    for (; ahead < kAheadLines && k < nspans; ++ahead) {
      __builtin_prefetch(s + pos), __builtin_prefetch(t + pos);
      pos += kLine;
      if (pos >= end[k] && ++k < nspans) pos = begin[k];
    }
  }
};

// One H*W plane over its spans. Spans are whole segments (but for the plane's tail), so the lane
// loop covers nearly everything; kLanes independent partial sums let it vectorise without
// fast-math. The span loop sits inside the vectorised function: one call per plane, not per span.
template <typename S, typename W>
FGD_HD W plane_sq_impl(const S* __restrict__ s, const S* __restrict__ t, const W* __restrict__ w,
                       const int64_t* begin, const int64_t* end, int64_t nspans) {
  W lane[kLanes] = {};
  W acc = 0;
  SpanPrefetch<S> prefetch(s, t, begin, end, nspans);
  for (int64_t k = 0; k < nspans; ++k) {
    prefetch.before(end[k] - begin[k]);
    int64_t j = begin[k];
    for (; j + kLanes <= end[k]; j += kLanes) {
      // Unrolled, this loop would reach the straight-line vectoriser, which cannot if-convert the
      // select; left as a loop it becomes one vector operation and a blend.
#pragma GCC unroll 1
      for (int l = 0; l < kLanes; ++l) {
        const W d = to_float(s[j + l]) - to_float(t[j + l]);
        const W v = w[j + l] * d * d;
        lane[l] += w[j + l] != W(0) ? v : W(0);
      }
    }
    for (; j < end[k]; ++j) {
      const W d = to_float(s[j]) - to_float(t[j]);
      const W v = w[j] * d * d;
      acc += w[j] != W(0) ? v : W(0);
    }
  }
  for (int l = 0; l < kLanes; ++l) acc += lane[l];
  return acc;
}

// The gradient of one plane: scale * w * (s - t) inside the spans, 0 everywhere else.
template <typename S, typename W>
FGD_HD void plane_diff_impl(const S* __restrict__ s, const S* __restrict__ t,
                            const W* __restrict__ w, W scale, const int64_t* begin,
                            const int64_t* end, int64_t nspans, int64_t n, S* __restrict__ out) {
  int64_t pos = 0;
  SpanPrefetch<S> prefetch(s, t, begin, end, nspans);
  for (int64_t k = 0; k < nspans; ++k) {
    prefetch.before(end[k] - begin[k]);
    for (int64_t j = pos; j < begin[k]; ++j) out[j] = S(0);
    for (int64_t j = begin[k]; j < end[k]; ++j) {
      const W d = to_float(s[j]) - to_float(t[j]);
      const W v = scale * w[j] * d;
      out[j] = from_float(w[j] != W(0) ? v : W(0), S());
    }
    pos = end[k];
  }
  for (int64_t j = pos; j < n; ++j) out[j] = S(0);
}

// One vectorised copy per ISA for each feature type.
#define FGD_LOSS_CLONES(S, W)                                                                   \
  FGD_PER_ISA(W, plane_sq,                                                                      \
              (const S* s, const S* t, const W* w, const int64_t* begin, const int64_t* end,    \
               int64_t nspans),                                                                 \
              (s, t, w, begin, end, nspans))                                                    \
  FGD_PER_ISA(void, plane_diff,                                                                 \
              (const S* s, const S* t, const W* w, W scale, const int64_t* begin,               \
               const int64_t* end, int64_t nspans, int64_t n, S* out),                          \
              (s, t, w, scale, begin, end, nspans, n, out))
FGD_LOSS_CLONES(float, float)
FGD_LOSS_CLONES(double, double)
FGD_LOSS_CLONES(c10::BFloat16, float)
FGD_LOSS_CLONES(c10::Half, float)
#undef FGD_LOSS_CLONES

#if FGD_X86_ISAS
// The float gradient with streaming (non-temporal) stores, for the AVX2 and AVX-512 paths: the
// gradient is written once, is read only by a later op and at feature-map sizes does not fit in
// cache, and a plain store first reads every line it writes (read for ownership): a third of the
// traffic. The same arithmetic as plane_diff_impl, in the same order (bit-identical results).
// Needs `out` 64-byte aligned: spans start and end on 16-float segments, so every vector store
// but the plane's tail is aligned.
template <int kWidth, typename Vec, typename Load, typename Kernel, typename Stream>
FGD_HD void plane_diff_stream_impl(const float* s, const float* t, const float* w, float scale,
                                   const int64_t* begin, const int64_t* end, int64_t nspans,
                                   int64_t n, float* out, Vec zero, Load load, Kernel kernel,
                                   Stream stream) {
  auto zeros = [&](int64_t lo, int64_t hi) {
    int64_t j = lo;
    for (; j + kWidth <= hi; j += kWidth) stream(out + j, zero);
    for (; j < hi; ++j) out[j] = 0.0f;
  };
  SpanPrefetch<float> prefetch(s, t, begin, end, nspans);
  int64_t pos = 0;
  for (int64_t k = 0; k < nspans; ++k) {
    prefetch.before(end[k] - begin[k]);
    zeros(pos, begin[k]);
    int64_t j = begin[k];
    for (; j + kWidth <= end[k]; j += kWidth)
      stream(out + j, kernel(load(s + j), load(t + j), load(w + j)));
    for (; j < end[k]; ++j) {
      const float v = scale * w[j] * (s[j] - t[j]);
      out[j] = w[j] != 0.0f ? v : 0.0f;
    }
    pos = end[k];
  }
  zeros(pos, n);
}

FGD_TARGET_AVX512 __attribute__((noinline)) void plane_diff_stream_avx512(
    const float* s, const float* t, const float* w, float scale, const int64_t* begin,
    const int64_t* end, int64_t nspans, int64_t n, float* out) {
  const __m512 zero = _mm512_setzero_ps(), sc = _mm512_set1_ps(scale);
  plane_diff_stream_impl<16>(
      s, t, w, scale, begin, end, nspans, n, out, zero,
      [](const float* p) FGD_TARGET_AVX512 { return _mm512_loadu_ps(p); },
      [&](__m512 sv, __m512 tv, __m512 wv) FGD_TARGET_AVX512 {
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(sc, wv), _mm512_sub_ps(sv, tv));
        return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(wv, zero, _CMP_NEQ_UQ), v);  // w != 0
      },
      [](float* p, __m512 v) FGD_TARGET_AVX512 { _mm512_stream_ps(p, v); });
  _mm_sfence();  // streamed stores are visible to other threads (the caller's) after this
}

FGD_TARGET_AVX2 __attribute__((noinline)) void plane_diff_stream_avx2(
    const float* s, const float* t, const float* w, float scale, const int64_t* begin,
    const int64_t* end, int64_t nspans, int64_t n, float* out) {
  const __m256 zero = _mm256_setzero_ps(), sc = _mm256_set1_ps(scale);
  plane_diff_stream_impl<8>(
      s, t, w, scale, begin, end, nspans, n, out, zero,
      [](const float* p) FGD_TARGET_AVX2 { return _mm256_loadu_ps(p); },
      [&](__m256 sv, __m256 tv, __m256 wv) FGD_TARGET_AVX2 {
        const __m256 v = _mm256_mul_ps(_mm256_mul_ps(sc, wv), _mm256_sub_ps(sv, tv));
        return _mm256_and_ps(_mm256_cmp_ps(wv, zero, _CMP_NEQ_UQ), v);  // w != 0, else +0
      },
      [](float* p, __m256 v) FGD_TARGET_AVX2 { _mm256_stream_ps(p, v); });
  _mm_sfence();
}

// The streaming copy where the path and the alignment allow it, else plane_diff.
inline void plane_diff_float(const float* s, const float* t, const float* w, float scale,
                             const int64_t* begin, const int64_t* end, int64_t nspans, int64_t n,
                             float* out) {
  const bool aligned = reinterpret_cast<uintptr_t>(out) % 64 == 0;
  if (aligned && isa() == Isa::kAvx512) return plane_diff_stream_avx512(s, t, w, scale, begin, end, nspans, n, out);
  if (aligned && isa() == Isa::kAvx2) return plane_diff_stream_avx2(s, t, w, scale, begin, end, nspans, n, out);
  plane_diff(s, t, w, scale, begin, end, nspans, n, out);
}
#endif

template <typename S, typename W>
double loss_forward(const S* s, const S* t, const W* w, int64_t B, int64_t C, int64_t HW,
                    const Spans& sp) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1));
  return at::parallel_reduce(
      0, B * C, grain, 0.0,
      [&](int64_t lo, int64_t hi, double acc) {
        for (int64_t p = lo; p < hi; ++p) {
          const int64_t b = p / C, i = sp.first[b];
          acc += static_cast<double>(plane_sq(s + p * HW, t + p * HW, w + b * HW, sp.begin.data() + i,
                                              sp.end.data() + i, sp.first[b + 1] - i));
        }
        return acc;
      },
      std::plus<double>());
}

template <typename S, typename W>
void loss_backward(const S* s, const S* t, const W* w, W scale, int64_t B, int64_t C, int64_t HW,
                   const Spans& sp, S* out) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t b = p / C, i = sp.first[b];
#if FGD_X86_ISAS
      if constexpr (std::is_same_v<S, float>) {
        plane_diff_float(s + p * HW, t + p * HW, w + b * HW, scale, sp.begin.data() + i,
                         sp.end.data() + i, sp.first[b + 1] - i, HW, out + p * HW);
        continue;
      }
#endif
      plane_diff(s + p * HW, t + p * HW, w + b * HW, scale, sp.begin.data() + i, sp.end.data() + i,
                 sp.first[b + 1] - i, HW, out + p * HW);
    }
  });
}

at::Tensor imitation_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                              const at::Tensor& mask) {
  check_imitation_loss(student, teacher, mask);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const at::Tensor w = mask_weights(mask, student);
  const int64_t B = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  double loss = 0;
  // Empty features: nothing to sum (and the span search must not walk 2^40 empty images).
  if (s.numel() == 0) return at::scalar_tensor(loss, s.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "fgd_loss_cpu", [&] {
    using W = at::opmath_type<scalar_t>;  // the weights' type (mask_weights)
    const W* wp = w.const_data_ptr<W>();
    const Spans sp = find_spans(wp, B, HW);
    if (sp.total_weight > 0) {
      loss = loss_forward(s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), wp, B, C, HW,
                          sp) /
             (2.0 * sp.total_weight);
    }
  });
  return at::scalar_tensor(loss, s.options());
}

at::Tensor imitation_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& student,
                                       const at::Tensor& teacher, const at::Tensor& mask) {
  check_imitation_loss_backward(grad, student, teacher, mask);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const at::Tensor w = mask_weights(mask, student);
  const int64_t B = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  at::Tensor out = at::empty_like(s);
  if (s.numel() == 0) return out;
  const double g = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "fgd_loss_bwd_cpu", [&] {
    using W = at::opmath_type<scalar_t>;  // the weights' type (mask_weights)
    const W* wp = w.const_data_ptr<W>();
    const Spans sp = find_spans(wp, B, HW);
    const W scale = sp.total_weight > 0 ? static_cast<W>(g / sp.total_weight) : W(0);
    loss_backward(s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), wp, scale, B, C, HW,
                  sp, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fgd, CPU, m) {
  m.impl("imitation_loss", &imitation_loss_cpu);
  m.impl("_imitation_loss_backward", &imitation_loss_backward_cpu);
}

}  // namespace fgd
