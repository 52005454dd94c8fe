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
int64_t chunk_rows(const AdaptShape& a, int64_t K, int64_t N) {
  const int64_t map = a.B * a.H * a.W * std::max(a.Cs, a.Ct);
  const int64_t budget = std::min<int64_t>(int64_t(1) << 23, map);
  return std::max<int64_t>(1, std::min(N, std::max<int64_t>(32, budget / K)));
}

struct Locations {
  at::Tensor idx;  // int64 [N]: b*H*W + y*W + x of every location with a non-zero weight
  at::Tensor w;    // [N] their weights, in the opmath dtype (bool -> 1)
  double total;    // N_p = the sum of all weights
};

// at::nonzero needs the count on the host (a sync on a GPU); the chunk loop needs it anyway.
Locations masked_locations(const at::Tensor& mask, at::ScalarType wtype) {
  const at::Tensor flat = mask.reshape(-1);
  Locations l;
  l.idx = at::nonzero(flat.scalar_type() == at::kBool ? flat : flat != 0).view(-1);
  l.w = flat.index_select(0, l.idx).to(wtype).contiguous();
  l.total = l.w.sum(at::kDouble).item<double>();
  return l;
}

c10::optional<at::Tensor> defined_bias(const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) return bias->contiguous();
  return c10::nullopt;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_adapt_forward(const AdaptKernels& kernels,
                                                        const at::Tensor& student,
                                                        const at::Tensor& teacher,
                                                        const at::Tensor& mask,
                                                        const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& bias,
                                                        bool relu, bool save) {
  const AdaptShape a = check_masked_adapt(student, teacher, mask, weight, bias);
  // The products run in the inputs' dtype even when called under autocast.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t K = a.Cs * a.k * a.k;
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const at::Tensor wmat = weight.reshape({a.Ct, K}).contiguous();
  const auto b = defined_bias(bias);
  const Locations loc = masked_locations(mask, at::toOpMathType(s.scalar_type()));
  const int64_t N = loc.idx.numel();
  const bool any = N > 0 && loc.total > 0;
  // Every column of `saved` is written below when any location counts; zeros otherwise.
  at::Tensor saved = any ? at::empty({a.Ct, save ? N : 0}, s.options())
                         : at::zeros({a.Ct, save ? N : 0}, s.options());
  at::Tensor loss = at::zeros({}, s.options().dtype(at::kDouble));
  if (any) {
    const int64_t rows = chunk_rows(a, K, N);
    at::Tensor cols = at::empty({K * rows}, s.options());
    at::Tensor zbuf = save ? at::Tensor() : at::empty({a.Ct * rows}, s.options());
    const auto mode = save ? EpilogueMode::kStudentGrad : EpilogueMode::kLossOnly;
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
      const int64_t n = std::min(rows, N - r0);
      const at::Tensor idx = loc.idx.narrow(0, r0, n);
      at::Tensor c = cols.narrow(0, 0, K * n).view({K, n});
      kernels.im2col(s, idx, a.k, c);
      // With save, the conv output goes straight into its slot of `saved` and is overwritten there
      // by its gradient: no chunk buffer for it.
      at::Tensor z = save ? saved.narrow(1, r0, n) : zbuf.narrow(0, 0, a.Ct * n).view({a.Ct, n});
      at::mm_out(z, wmat, c);
      loss += kernels.epilogue(z, t, idx, loc.w.narrow(0, r0, n), b, relu, mode).sum(at::kDouble);
    }
    loss /= 2 * loc.total;
  }
  return {loss.to(s.scalar_type()), saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_adapt_backward(
    const AdaptKernels& kernels, const at::Tensor& grad, const at::Tensor& saved,
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& mask,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool relu,
    std::array<bool, 4> output_mask) {
  const AdaptShape a = check_masked_adapt(student, teacher, mask, weight, bias);
  TORCH_CHECK_VALUE(grad.numel() == 1, "fgd._masked_adapt_backward: grad must be a scalar");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t K = a.Cs * a.k * a.k;
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const at::Tensor wmat = weight.reshape({a.Ct, K}).contiguous();
  const auto b = defined_bias(bias);
  const auto acc = at::toOpMathType(s.scalar_type());
  const Locations loc = masked_locations(mask, acc);
  const int64_t N = loc.idx.numel();
  TORCH_CHECK_VALUE(saved.dim() == 2 && saved.size(0) == a.Ct && saved.size(1) == N &&
                        saved.scalar_type() == s.scalar_type() && saved.device() == s.device(),
                    "fgd._masked_adapt_backward: saved must be the [Ct, N] = [", a.Ct, ", ", N,
                    "] tensor that _masked_adapt_forward(save=True) returned for these inputs, got ",
                    saved.sizes(), " ", saved.scalar_type());
  // The upstream gradient and 1/N_p, which `saved` leaves out.
  const at::Tensor g = grad.reshape({}).to(s.device(), acc) * (loc.total > 0 ? 1.0 / loc.total : 0.0);
  const auto [want_s, want_t, want_w, want_b] = output_mask;
  auto none = [&] { return at::empty({0}, s.options()); };  // outputs must not alias

  at::Tensor gs = want_s ? at::zeros(s.sizes(), s.options().dtype(acc)) : none();
  at::Tensor gt = want_t ? at::zeros(t.sizes(), t.options()) : none();
  at::Tensor gw = want_w ? at::zeros({a.Ct, K}, s.options().dtype(acc)) : none();
  at::Tensor gb = want_b && b ? (saved.sum(1, false, acc) * g).to(s.scalar_type()) : none();
  if (N > 0 && (want_s || want_t || want_w)) {
    const int64_t rows = chunk_rows(a, K, N), HW = a.H * a.W;
    at::Tensor cols = at::empty({K * rows}, s.options());
    const at::Tensor wt = wmat.t();
    const at::Tensor gt_rows = want_t ? gt.view({a.B, a.Ct, HW}).permute({0, 2, 1}) : at::Tensor();
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
      const int64_t n = std::min(rows, N - r0);
      const at::Tensor idx = loc.idx.narrow(0, r0, n);
      const at::Tensor sv = saved.narrow(1, r0, n);  // N_p * d(loss)/dz of this chunk
      at::Tensor c = cols.narrow(0, 0, K * n).view({K, n});
      if (want_w || (want_t && relu)) kernels.im2col(s, idx, a.k, c);
      if (want_w) {
        if (acc == s.scalar_type()) {
          gw.addmm_(sv, c.t());
        } else {
          gw += at::mm(sv, c.t());
        }
      }
      if (want_t) {
        // -N_p * d(loss)/dt = w * (act(z + b) - t): `saved` already, unless the ReLU zeroed part
        // of it; then recompute z for this chunk.
        at::Tensor d = sv;
        if (relu) {
          d = at::mm(wmat, c);
          kernels.epilogue(d, t, idx, loc.w.narrow(0, r0, n), b, relu, EpilogueMode::kDiff);
        }
        gt_rows.index_put_({idx.div(HW, "floor"), idx.remainder(HW)}, d.t());
      }
      if (want_s) {
        at::mm_out(c, wt, sv);
        kernels.col2im(c, idx, a.k, gs);
      }
    }
  }
  if (want_s) gs = (gs *= g).to(s.scalar_type());
  if (want_t) gt *= -g;
  if (want_w) gw = (gw *= g).to(s.scalar_type()).view(weight.sizes());
  return {gs, gt, gw, gb};
}

}  // namespace fgd
