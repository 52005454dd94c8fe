// The device-generic half of masked_adapt_loss: masked locations, chunking and the products.
#include "masked_adapt.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>

#include "fgd.h"

namespace fgd {
namespace {

// Locations per chunk: the [Cs*k*k, n] chunk buffer holds at most 2^23 elements and no more than
// one feature map, so it never outweighs the adapted map the dense path holds, whatever the size.
// The chunks are of equal size: a small last chunk runs its products at a lower rate
// (benchmarks/RESULTS.md, "CPU kernels on an AVX-512 machine").
int64_t chunk_rows(const AdaptShape& a, int64_t K, int64_t N) {
  const int64_t map = a.B * a.H * a.W * std::max(a.Cs, a.Ct);
  const int64_t budget = std::min<int64_t>(int64_t(1) << 23, map);
  // K is 0 when the student has no channels (the conv is then its bias alone)
  const int64_t most = std::max<int64_t>(1, std::min(N, std::max<int64_t>(32, budget / std::max<int64_t>(K, 1))));
  const int64_t chunks = (N + most - 1) / most;
  return (N + chunks - 1) / chunks;
}

struct Locations {
  at::Tensor idx;    // int64 [N]: b*H*W + y*W + x of every location with a non-zero weight
  at::Tensor w;      // [N] their weights, in the opmath dtype (bool -> 1)
  at::Tensor scale;  // 0-dim double, 1 / N_p (N_p = the sum of the weights), or 0 when N_p = 0
};

// The weights and 1 / N_p of the locations idx; no host sync.
Locations locations(const at::Tensor& mask, at::Tensor idx, at::ScalarType wtype) {
  Locations l{std::move(idx)};
  l.w = mask.reshape(-1).index_select(0, l.idx).to(wtype).contiguous();
  // Only the weights' ratios matter (the loss divides by their sum): scaled to a maximum of 1, so
  // that w * (a - t) in a half-precision `saved` neither overflows (weights like 1e30) nor
  // underflows (1e-30).
  if (l.w.numel() > 0) l.w.div_(l.w.amax());
  const at::Tensor total = l.w.sum(at::kDouble);
  l.scale = at::where(total > 0, total.reciprocal(), at::zeros_like(total));
  return l;
}

// What forward and backward both start from: the checked shapes and contiguous operands.
struct Operands {
  AdaptShape a;
  int64_t K;  // Cs * k * k
  at::Tensor s, t, wmat;  // student, teacher, weight as [Ct, K]
  c10::optional<at::Tensor> b;
  at::ScalarType acc;  // opmath dtype
};

Operands operands(const AdaptShape& checked, const at::Tensor& student, const at::Tensor& teacher,
                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  Operands o{checked};
  o.K = o.a.Cs * o.a.k * o.a.k;
  o.s = student.contiguous();
  o.t = teacher.contiguous();
  o.wmat = weight.reshape({o.a.Ct, o.K}).contiguous();
  if (bias.has_value() && bias->defined()) o.b = bias->contiguous();
  o.acc = at::toOpMathType(student.scalar_type());
  return o;
}

// a @ b summed and returned in acc (float) for half-type a, b: the backward's products sum over the
// masked locations, or the channels, N_p times a gradient (the 1/N_p comes after them), which
// overflows float16 where the gradient itself fits. cuBLAS multiplies half inputs into a float
// result; the CPU has no such product, so it multiplies float copies.
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::mm(a, b);
  return a.is_cuda() ? at::mm(a, b, acc) : at::mm(a.to(acc), b.to(acc));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_adapt_forward(
    const AdaptKernels& kernels, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& mask, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    bool relu, bool save) {
  const Operands o =
      operands(check_masked_adapt(student, teacher, mask, weight, bias), student, teacher, weight,
               bias);
  // The products run in the inputs' dtype even when called under autocast.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // at::nonzero needs the count on the host (a sync on a GPU); the chunk loop needs it anyway.
  const at::Tensor flat = mask.reshape(-1);
  const Locations loc =
      locations(mask, at::nonzero(flat.scalar_type() == at::kBool ? flat : flat != 0).view(-1),
                o.acc);
  const int64_t N = loc.idx.numel();
  // Every column of `saved` is written below.
  at::Tensor saved = at::empty({o.a.Ct, save ? N : 0}, o.s.options());
  at::Tensor loss = at::zeros({}, o.s.options().dtype(at::kDouble));
  if (N > 0) {
    const int64_t rows = chunk_rows(o.a, o.K, N);
    at::Tensor cols = at::empty({o.K * rows}, o.s.options());
    at::Tensor zbuf = save ? at::Tensor() : at::empty({o.a.Ct * rows}, o.s.options());
    const auto mode = save ? EpilogueMode::kStudentGrad : EpilogueMode::kLossOnly;
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
      const int64_t n = std::min(rows, N - r0);
      const at::Tensor idx = loc.idx.narrow(0, r0, n);
      at::Tensor c = cols.narrow(0, 0, o.K * n).view({o.K, n});
      kernels.im2col(o.s, idx, o.a.k, c);
      // With save, the conv output goes straight into its slot of `saved` and is overwritten there
      // by its gradient: no chunk buffer for it.
      at::Tensor z = save ? saved.narrow(1, r0, n) : zbuf.narrow(0, 0, o.a.Ct * n).view({o.a.Ct, n});
      at::mm_out(z, o.wmat, c);
      loss += kernels.epilogue(z, o.t, idx, loc.w.narrow(0, r0, n), o.b, relu, mode)
                  .sum(at::kDouble);
    }
    loss *= loc.scale / 2;
  }
  return {loss.to(o.s.scalar_type()), saved, save ? loc.idx : at::empty({0}, loc.idx.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_adapt_backward(
    const AdaptKernels& kernels, const at::Tensor& grad, const at::Tensor& saved,
    const at::Tensor& idx, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& mask, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    bool relu, std::array<bool, 4> output_mask) {
  const Operands o = operands(
      check_masked_adapt_backward(grad, saved, idx, student, teacher, mask, weight, bias), student,
      teacher, weight, bias);
  const auto& [a, K, s, t, wmat, b, acc] = o;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // The forward's locations, so no second nonzero (and no sync with a GPU) here.
  const Locations loc = locations(mask, idx, acc);
  const int64_t N = idx.numel();
  // The upstream gradient and 1/N_p, which `saved` leaves out.
  const at::Tensor g = grad.reshape({}).to(s.device(), acc) * loc.scale.to(acc);
  const bool fold = acc == s.scalar_type();
  const auto [want_s, want_t, want_w, want_b] = output_mask;
  auto none = [&] { return at::empty({0}, s.options()); };  // outputs must not alias

  at::Tensor gs = want_s ? at::zeros(s.sizes(), s.options().dtype(acc)) : none();
  at::Tensor gt = want_t ? at::zeros(t.sizes(), t.options()) : none();
  at::Tensor gw = want_w ? at::zeros({a.Ct, K}, s.options().dtype(acc)) : none();
  at::Tensor gb = want_b && b ? (saved.sum(1, false, acc) * g).to(s.scalar_type()) : none();
  if (N > 0 && (want_s || want_t || want_w)) {
    const int64_t rows = chunk_rows(a, K, N), HW = a.H * a.W;
    at::Tensor cols = at::empty({K * rows}, s.options());
    // float / double: the upstream scale is folded into the small [K, Ct] operand rather than
    // applied to the student-sized gradient (one pass over it less). Half types would underflow
    // there: their products run through mm_acc, into float, and g is applied after.
    const at::Tensor wt = want_s && fold ? wmat.t() * g : wmat.t();
    const at::Tensor gt_rows = want_t ? gt.view({a.B, a.Ct, HW}).permute({0, 2, 1}) : at::Tensor();
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
      const int64_t n = std::min(rows, N - r0);
      const at::Tensor ci = loc.idx.narrow(0, r0, n);
      const at::Tensor sv = saved.narrow(1, r0, n);  // N_p * d(loss)/dz of this chunk
      at::Tensor c = cols.narrow(0, 0, K * n).view({K, n});
      if (want_w || (want_t && relu)) kernels.im2col(s, ci, a.k, c);
      if (want_w) {
        if (fold) {
          gw.addmm_(sv, c.t());
        } else {
          gw += mm_acc(sv, c.t(), acc);
        }
      }
      if (want_t) {
        // -N_p * d(loss)/dt = w * (act(z + b) - t): `saved` already, unless the ReLU zeroed part
        // of it; then recompute z for this chunk.
        at::Tensor d = sv;
        if (relu) {
          d = at::mm(wmat, c);
          kernels.epilogue(d, t, ci, loc.w.narrow(0, r0, n), b, relu, EpilogueMode::kDiff);
        }
        // Scaled here, in acc: only the masked locations, and a half type's product with a float
        // 0-dim CUDA tensor would round g to half (a subnormal, or 0, for a large N_p).
        d = (d.to(acc) * -g).to(t.scalar_type());
        gt_rows.index_put_({ci.div(HW, "floor"), ci.remainder(HW)}, d.t());
      }
      if (want_s) kernels.col2im(fold ? at::mm_out(c, wt, sv) : mm_acc(wt, sv, acc), ci, a.k, gs);
    }
  }
  if (want_s) gs = (fold ? gs : gs *= g).to(s.scalar_type());
  if (want_w) gw = (gw *= g).to(s.scalar_type()).view(weight.sizes());
  return {gs, gt, gw, gb};
}

}  // namespace fgd
