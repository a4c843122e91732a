// gradguide native ops: the argument checks of gradguide::fused_combine and gradguide::clip_shift,
// shared by the CPU op
// (gradguide_ops.cpp) and the CUDA op (gradguide_ops_cuda.cu); host code only.
//
//   gradguide::fused_combine(str policy, Tensor[] operands, Tensor? gram, Tensor[] vectors,
//                            Tensor[] scalars, float? low, float? high, Tensor? log_scale=None,
//                            Tensor? slope=None, Tensor? offset=None, int scaled=0) -> Tensor
//   gradguide::fused_combine_out(..., float? high, Tensor(a!) out, <the same four>) -> ()   (into `out`)
//   operands: row-strided (samples contiguous, any batch stride: samples_contiguous below);
//   log_scale / slope / offset / scaled: Σ-scaled operands (ScaleArgs below);
//   vectors[v]: [Bv, Gv, K] (Bv in {1, B}, Gv in {1, G}, any strides; float32 or float64);
//   scalars[s]: 1 or B elements (float32 or float64, contiguous);
//   gram: [B, G, Kg, Kg] float64 contiguous over the FIRST Kg operands (Kg <= K); the vectors
//   whose inner products a policy takes are zero beyond Kg (the caller orders the operands).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <optional>

#include "gradguide_policies.h"

namespace gradguide {

// The checked program arguments; `n` receives the row length (elements per sample and group).
// The operands themselves are checked by the caller (shape, dtype, device, row-strided layout).
inline ProgramArgs fused_program_args(const char* op, c10::string_view policy_name, const at::Tensor& first, int64_t k,
                                      const std::optional<at::Tensor>& gram, at::TensorList vectors,
                                      at::TensorList scalars, int64_t& n) {
  const PolicyInfo* info = find_policy(policy_name.data(), policy_name.size());
  TORCH_CHECK_VALUE(info != nullptr, op, ": policy: expected ", kPolicyNames, ", got '", policy_name, "'");
  const int64_t b = first.size(0);
  TORCH_CHECK_VALUE(static_cast<int64_t>(vectors.size()) == info->n_vectors, op, ": vectors: policy '", policy_name,
              "' takes ", info->n_vectors, " coefficient vectors, got ", vectors.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(scalars.size()) == info->n_scalars, op, ": scalars: policy '", policy_name,
              "' takes ", info->n_scalars, " scalars, got ", scalars.size());
  ProgramArgs a{};
  a.policy = info->id;
  a.k = static_cast<int>(k);
  a.kg = 0;
  a.groups = 1;
  a.gram = nullptr;
  a.n_vectors = info->n_vectors;
  a.n_scalars = info->n_scalars;
  if (info->needs_gram) {
    TORCH_CHECK_VALUE(gram.has_value(), op, ": gram: policy '", policy_name, "' needs the Gram matrix (from reduce)");
    const auto& g = *gram;
    TORCH_CHECK_TYPE(g.scalar_type() == at::kDouble, op, ": gram: expected a float64 tensor, got ", g.scalar_type());
    TORCH_CHECK_VALUE(g.dim() == 4 && g.size(0) == b && g.size(2) == g.size(3) && g.size(2) >= 1 && g.size(2) <= k &&
                    g.scalar_type() == at::kDouble && g.is_contiguous() && g.device() == first.device(),
                op, ": gram: expected a contiguous float64 [B=", b, ", G, Kg, Kg] tensor with Kg <= K=", k,
                " on ", first.device(), ", got ", g.sizes(), " ", g.scalar_type());
    a.groups = g.size(1);
    a.kg = static_cast<int>(g.size(2));
    a.gram = g.const_data_ptr<double>();
  }
  for (size_t v = 0; v < vectors.size(); ++v) {
    const auto& t = vectors[v];
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": vectors[", v,
                     "]: expected a float32/float64 tensor, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 3 && (t.size(0) == 1 || t.size(0) == b) && t.size(2) == k && t.device() == first.device() &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                op, ": vectors[", v, "]: expected a float32/float64 [1 or B=", b, ", G, K=", k, "] tensor on ",
                first.device(), ", got ", t.sizes(), " ", t.scalar_type());
    if (!info->needs_gram && t.size(1) != 1) a.groups = std::max(a.groups, t.size(1));
  }
  for (size_t v = 0; v < vectors.size(); ++v) {
    const auto& t = vectors[v];
    TORCH_CHECK_VALUE(t.size(1) == 1 || t.size(1) == a.groups, op, ": vectors[", v, "]: ", t.size(1),
                " groups, expected 1 or ", a.groups);
    a.vectors[v] = ArgView{t.const_data_ptr(), t.size(0) == 1 ? 0 : t.stride(0), t.size(1) == 1 ? 0 : t.stride(1),
                           t.stride(2), t.scalar_type() == at::kDouble};
  }
  for (size_t j = 0; j < scalars.size(); ++j) {
    const auto& t = scalars[j];
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": scalars[", j,
                     "]: expected a float32/float64 tensor, got ", t.scalar_type());
    TORCH_CHECK_VALUE((t.numel() == 1 || t.numel() == b) && t.is_contiguous() && t.device() == first.device() &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                op, ": scalars[", j, "]: expected a contiguous float32/float64 tensor of 1 or B=", b, " elements on ",
                first.device(), ", got ", t.sizes(), " ", t.scalar_type());
    a.scalars[j] = ArgView{t.const_data_ptr(), t.numel() == 1 ? 0 : 1, 0, 0, t.scalar_type() == at::kDouble};
  }
  const int64_t per_sample = first.numel() / b;
  TORCH_CHECK_VALUE(per_sample % a.groups == 0, op, ": groups: expected a positive divisor of the per-sample size ",
              per_sample, ", got ", a.groups);
  n = per_sample / a.groups;
  return a;
}

// Row-strided operands: every sample t[b] contiguous (the strides of dims 1.. are those of a
// contiguous t.shape[1:]; size-1 dims ignored, as is_contiguous does), any batch stride: the
// halves out[:, :C], out[:, C:] of a [B, 2C, ...] model output are read in place.
inline bool samples_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// The batch stride a kernel steps by (elements); any value for B = 1.
inline int64_t batch_stride(const at::Tensor& t) { return t.size(0) == 1 ? 0 : t.stride(0); }

// Σ-scaled operands (gradguide/ops/reference.py, Scaling): operand k with bit k of `mask` set is
// read as op_k * exp(slope[b, k] * log_scale + offset[b, k]). Plain pointers and strides (elements).
struct ScaleArgs {
  const void* v;             // log_scale, shaped and typed like the operands, row-strided
  int64_t v_s0;              // its batch stride
  const double* slope;       // [1 or B, K] float64, any strides (s0 = 0 when shared)
  int64_t slope_s0, slope_s1;
  const double* offset;
  int64_t offset_s0, offset_s1;
  unsigned mask;             // 0: no operand is scaled (the other fields unused)
};

// The checked scaling of `op` (`scaled` is the mask): log_scale like operands[0] (shape, dtype,
// device; row-strided), slope and offset float64 [1 or B, K] on the same device, mask < 2**K.
// All three tensors or none; a nonzero mask needs them.
inline ScaleArgs scale_args(const char* op, const at::Tensor& first, int64_t k,
                            const std::optional<at::Tensor>& log_scale, const std::optional<at::Tensor>& slope,
                            const std::optional<at::Tensor>& offset, int64_t scaled) {
  ScaleArgs s{};
  TORCH_CHECK_VALUE(scaled >= 0 && scaled < (int64_t(1) << k), op, ": scaled: expected a mask in [0, 2**K) with K=",
                    k, " operands, got ", scaled);
  const bool any = log_scale.has_value() || slope.has_value() || offset.has_value();
  if (!any) {
    TORCH_CHECK_VALUE(scaled == 0, op, ": log_scale: scaled=", scaled, " needs log_scale, slope and offset");
    return s;
  }
  TORCH_CHECK_VALUE(log_scale.has_value() && slope.has_value() && offset.has_value(), op,
                    ": log_scale, slope, offset: expected all three or none");
  const at::Tensor& v = *log_scale;
  TORCH_CHECK_TYPE(v.scalar_type() == first.scalar_type(), op, ": log_scale: dtype ", v.scalar_type(),
                   " differs from the operands' ", first.scalar_type());
  TORCH_CHECK_VALUE(v.sizes() == first.sizes() && v.device() == first.device(), op, ": log_scale: expected a ",
                    first.sizes(), " tensor on ", first.device(), " (like operands[0]), got ", v.sizes(), " on ",
                    v.device());
  TORCH_CHECK_VALUE(samples_contiguous(v), op,
                    ": log_scale: expected contiguous samples (any batch stride), got strides ", v.strides());
  const int64_t b = first.size(0);
  const char* names[2] = {"slope", "offset"};
  const at::Tensor* ts[2] = {&*slope, &*offset};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *ts[i];
    TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, op, ": ", names[i], ": expected a float64 tensor, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 2 && (t.size(0) == 1 || t.size(0) == b) && t.size(1) == k &&
                          t.device() == first.device(),
                      op, ": ", names[i], ": expected a float64 [1 or B=", b, ", K=", k, "] tensor on ",
                      first.device(), ", got ", t.sizes(), " on ", t.device());
  }
  s.v = v.const_data_ptr();
  s.v_s0 = batch_stride(v);
  s.slope = slope->const_data_ptr<double>();
  s.slope_s0 = slope->size(0) == 1 ? 0 : slope->stride(0);
  s.slope_s1 = slope->stride(1);
  s.offset = offset->const_data_ptr<double>();
  s.offset_s0 = offset->size(0) == 1 ? 0 : offset->stride(0);
  s.offset_s1 = offset->stride(1);
  s.mask = static_cast<unsigned>(scaled);
  return s;
}

// fused_combine_out's `out`: a contiguous tensor like operands[0], no element stored twice.
inline void check_fused_out(const char* op, const at::Tensor& out, const at::Tensor& first) {
  TORCH_CHECK_VALUE(out.sizes() == first.sizes() && out.scalar_type() == first.scalar_type() &&
                  out.device() == first.device() && out.is_contiguous(),
              op, ": out: expected a contiguous ", first.sizes(), " ", first.scalar_type(), " tensor on ",
              first.device(), " (like operands[0]), got ", out.sizes(), " ", out.scalar_type(), " on ", out.device(),
              out.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
                    ": out: several of its elements share memory (e.g. an expanded tensor)");
}

// Whether fused_combine_out must compute into a temporary and copy (the repository's rule for
// an overlapping `out`): the kernels are elementwise, so `out` may be exactly an operand (an
// in-place update), but memory shared any other way with an operand would be read after it
// was written, and the CUDA kernel reads the program's inputs (gram, vectors, scalars) in
// every block while other blocks already write. Cheap: pointer and stride arithmetic.
inline bool fused_out_needs_temporary(const at::Tensor& out, at::TensorList operands,
                                      const std::optional<at::Tensor>& gram, at::TensorList vectors,
                                      at::TensorList scalars, const std::optional<at::Tensor>& log_scale = {},
                                      const std::optional<at::Tensor>& slope = {},
                                      const std::optional<at::Tensor>& offset = {}) {
  for (const auto& t : operands) {
    const auto s = at::get_overlap_status(out, t);
    if (s != at::MemOverlapStatus::No && s != at::MemOverlapStatus::Full) return true;
  }
  auto touches = [&](const at::Tensor& t) { return at::get_overlap_status(out, t) != at::MemOverlapStatus::No; };
  if (gram.has_value() && touches(*gram)) return true;
  for (const auto& t : vectors)
    if (touches(t)) return true;
  for (const auto& t : scalars)
    if (touches(t)) return true;
  for (const auto* t : {&log_scale, &slope, &offset})   // read in every row by every block/thread
    if (t->has_value() && touches(**t)) return true;
  return false;
}

// clip_shift's coefficient rows and clip bounds (the operands are checked by the caller):
// coef_p and coef_s alike, [1 or B, K], float32 or float64, on the operands' device.
inline void check_clip_shift_args(const char* op, const at::Tensor& coef_p, const at::Tensor& coef_s,
                                  const at::Tensor& first, int64_t k, double low, double high) {
  TORCH_CHECK_VALUE(low < high, op, ": low, high: expected low < high, got ", low, " and ", high);
  const int64_t b = first.size(0);
  const char* names[2] = {"coef_p", "coef_s"};
  const at::Tensor* coefs[2] = {&coef_p, &coef_s};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *coefs[i];
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", names[i],
                     ": expected a float32/float64 tensor, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 2 && (t.size(0) == 1 || t.size(0) == b) && t.size(1) == k &&
                          t.size(0) == coef_p.size(0) && t.device() == first.device(),
                      op, ": ", names[i], ": expected a [1 or B=", b, ", K=", k, "] tensor on ", first.device(),
                      " (coef_p and coef_s alike), got ", t.sizes(), " on ", t.device());
  }
}

}  // namespace gradguide
