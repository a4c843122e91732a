// gradguide native ops (CPU): the two passes of a guided step (DESIGN.md).
//
//   gradguide::reduce(Tensor[] operands, int groups) -> (Tensor gram, Tensor sums)
//       gram[b, g, i, j] = <op_i[b, g], op_j[b, g]>,  sums[b, g, k] = sum(op_k[b, g])
//   gradguide::combine(Tensor coef, Tensor[] operands, float? low, float? high) -> Tensor
//   gradguide::combine_out(Tensor coef, Tensor[] operands, float? low, float? high, Tensor(a!) out) -> ()
//       out[b, g, :] = clamp(sum_k coef[b, g, k] * op_k[b, g, :])
//
// Design: a sample (or a group of it) is a "row" of N contiguous elements; rows are few and
// long (B <= 64, N up to millions), so each row is cut into chunks and the (row, chunk) pairs
// are spread over torch's intra-op threads (at::parallel_for, OpenMP). reduce writes one
// partial per chunk (fixed chunk size => the result does not depend on the thread count)
// and a second, serial stage adds the partials in chunk order. Inner loops work on tiles of
// kTile elements converted to the accumulation type, with kLanes independent accumulators per
// Gram entry, so the compiler vectorises them and the sums are blocked (better rounding than
// one long serial sum).
//
// Accumulation: reduce accumulates in float64 for every input dtype and returns a float64 Gram
// matrix and sums (as the reference). Why: rules take inner products of *small combinations of
// large operands* from the Gram matrix (u^T G u, e.g. a clipped guidance shift x0_gc - x0_c
// of norm 1e-3 between operands of norm 1.4); a float32 Gram loses ~1e-7 * |op|^2 absolutely,
// which is 8 % of such a norm^2 (issue 12). Products of float32 (or fp16/bf16) values are exact
// in float64, so the float64 Gram is as good as the inputs. Cost: the tile is converted to
// double and the FMAs run at half the SIMD width, which stays under the memory bound (measured
// with `gradguide bench --suite ops`). combine also accumulates in float64 (weights in float64):
// a step's weights cancel (x̂_0 = (x_t − √(1−ᾱ) ε)/√ᾱ has |weights| ~160 at t = 999 for a
// result of size 1), and a float32 accumulator turns that into 1e-5 relative errors that
// projections and clipping carry to the samples (2e-4 on issue 12's eta = 1 case; 5e-5 with
// float64). On a CPU the pass is memory-bound either way.
// Non-finite inputs: every product is formed, so NaN/inf poison exactly the Gram entries and
// outputs the reference poisons (0 * inf = NaN in combine). Clamping keeps NaN.
// Limits: K <= 8 operands of one dtype, shape and device; non-contiguous operands are made
// contiguous by the Python glue (gradguide/ops/native_backend.py), and rejected here.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <array>
#include <vector>

namespace gradguide {

constexpr int kMaxK = 8;
constexpr int64_t kTile = 256;     // elements per tile (fits L1 for K = 8 in float32)
constexpr int kLanes = 16;         // independent accumulators per Gram entry
constexpr int64_t kChunk = 16384;  // elements per parallel work item in reduce / combine

// ---------------------------------------------------------------------------------------
// checks shared by both ops

static void check_operands(const std::vector<at::Tensor>& ops, const char* op) {
  TORCH_CHECK(!ops.empty(), op, ": operands: expected a non-empty list of tensors");
  TORCH_CHECK(ops.size() <= kMaxK, op, ": operands: expected at most ", kMaxK, " tensors, got ", ops.size());
  const auto& first = ops[0];
  TORCH_CHECK(first.dim() >= 1 && first.size(0) >= 1, op,
              ": operands: expected tensors shaped [B, ...] with B >= 1, got ", first.sizes());
  for (size_t k = 0; k < ops.size(); ++k) {
    const auto& t = ops[k];
    TORCH_CHECK(t.sizes() == first.sizes(), op, ": operands[", k, "]: shape ", t.sizes(),
                " differs from operands[0]'s ", first.sizes());
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": operands[", k, "]: dtype ", t.scalar_type(),
                " differs from operands[0]'s ", first.scalar_type());
    TORCH_CHECK(t.device() == first.device(), op, ": operands[", k, "]: device ", t.device(),
                " differs from operands[0]'s ", first.device());
    TORCH_CHECK(t.is_contiguous(), op, ": operands[", k, "]: expected a contiguous tensor");
  }
  auto st = first.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": operands: expected float16, bfloat16, float32 or float64, got ", st);
}

// combine's weights and accumulator: float64 (see "Accumulation" above)
static at::ScalarType acc_type(at::ScalarType) { return at::kDouble; }

// ---------------------------------------------------------------------------------------
// reduce

// Partial Gram (upper triangle, row-major i <= j) and sums of K rows over [begin, end).
template <int K, typename scalar_t, typename acc_t>
static void reduce_span(const scalar_t* const* rows, int64_t begin, int64_t end, acc_t* gram_out,
                        acc_t* sums_out) {
  constexpr int P = K * (K + 1) / 2;
  alignas(64) acc_t acc[P][kLanes];
  alignas(64) acc_t sum[K][kLanes];
  alignas(64) acc_t tile[K][kTile];
  for (int p = 0; p < P; ++p)
    for (int l = 0; l < kLanes; ++l) acc[p][l] = 0;
  for (int k = 0; k < K; ++k)
    for (int l = 0; l < kLanes; ++l) sum[k][l] = 0;
  for (int64_t start = begin; start < end; start += kTile) {
    const int64_t n = std::min(kTile, end - start);
    for (int k = 0; k < K; ++k) {
      const scalar_t* src = rows[k] + start;
      for (int64_t e = 0; e < n; ++e) tile[k][e] = static_cast<acc_t>(src[e]);
      for (int64_t e = n; e < kTile; ++e) tile[k][e] = 0;  // zero padding adds nothing
    }
    for (int k = 0; k < K; ++k)
      for (int64_t e = 0; e < kTile; e += kLanes)
        for (int l = 0; l < kLanes; ++l) sum[k][l] += tile[k][e + l];
    int p = 0;
    for (int i = 0; i < K; ++i)
      for (int j = i; j < K; ++j, ++p)
        for (int64_t e = 0; e < kTile; e += kLanes)
          for (int l = 0; l < kLanes; ++l) acc[p][l] += tile[i][e + l] * tile[j][e + l];
  }
  for (int p = 0; p < P; ++p) {
    acc_t s = 0;
    for (int l = 0; l < kLanes; ++l) s += acc[p][l];
    gram_out[p] = s;
  }
  for (int k = 0; k < K; ++k) {
    acc_t s = 0;
    for (int l = 0; l < kLanes; ++l) s += sum[k][l];
    sums_out[k] = s;
  }
}

template <int K, typename scalar_t>
static void reduce_impl(const std::vector<at::Tensor>& ops, int64_t rows, int64_t n, at::Tensor& gram,
                        at::Tensor& sums) {
  using acc_t = double;  // see "Accumulation" at the top: the Gram is always float64
  constexpr int P = K * (K + 1) / 2;
  const int64_t chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  std::vector<acc_t> part_gram(rows * chunks * P), part_sums(rows * chunks * K);
  std::array<const scalar_t*, K> base;
  for (int k = 0; k < K; ++k) base[k] = ops[k].data_ptr<scalar_t>();
  at::parallel_for(0, rows * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t r = item / chunks, c = item % chunks;
      std::array<const scalar_t*, K> ptrs;
      for (int k = 0; k < K; ++k) ptrs[k] = base[k] + r * n;
      reduce_span<K, scalar_t, acc_t>(ptrs.data(), c * kChunk, std::min(n, (c + 1) * kChunk),
                                      part_gram.data() + item * P, part_sums.data() + item * K);
    }
  });
  // second stage: add the partials in chunk order (deterministic), mirror the triangle
  acc_t* g = gram.data_ptr<acc_t>();
  acc_t* s = sums.data_ptr<acc_t>();
  for (int64_t r = 0; r < rows; ++r) {
    std::array<acc_t, P> tg{};
    std::array<acc_t, K> ts{};
    for (int64_t c = 0; c < chunks; ++c) {
      for (int p = 0; p < P; ++p) tg[p] += part_gram[(r * chunks + c) * P + p];
      for (int k = 0; k < K; ++k) ts[k] += part_sums[(r * chunks + c) * K + k];
    }
    int p = 0;
    for (int i = 0; i < K; ++i)
      for (int j = i; j < K; ++j, ++p) g[(r * K + i) * K + j] = g[(r * K + j) * K + i] = tg[p];
    for (int k = 0; k < K; ++k) s[r * K + k] = ts[k];
  }
}

template <typename scalar_t>
static void reduce_dispatch_k(const std::vector<at::Tensor>& ops, int64_t rows, int64_t n, at::Tensor& gram,
                              at::Tensor& sums) {
  switch (ops.size()) {
    case 1: return reduce_impl<1, scalar_t>(ops, rows, n, gram, sums);
    case 2: return reduce_impl<2, scalar_t>(ops, rows, n, gram, sums);
    case 3: return reduce_impl<3, scalar_t>(ops, rows, n, gram, sums);
    case 4: return reduce_impl<4, scalar_t>(ops, rows, n, gram, sums);
    case 5: return reduce_impl<5, scalar_t>(ops, rows, n, gram, sums);
    case 6: return reduce_impl<6, scalar_t>(ops, rows, n, gram, sums);
    case 7: return reduce_impl<7, scalar_t>(ops, rows, n, gram, sums);
    case 8: return reduce_impl<8, scalar_t>(ops, rows, n, gram, sums);
  }
}

static int64_t check_groups(const at::Tensor& first, int64_t groups, const char* op) {
  const int64_t per_sample = first.numel() / first.size(0);
  TORCH_CHECK(groups >= 1 && per_sample % groups == 0, op,
              ": groups: expected a positive divisor of the per-sample size ", per_sample, ", got ", groups);
  return per_sample / groups;
}

std::tuple<at::Tensor, at::Tensor> reduce_cpu(at::TensorList operands, int64_t groups) {
  std::vector<at::Tensor> ops(operands.begin(), operands.end());
  check_operands(ops, "gradguide::reduce");
  const auto& first = ops[0];
  TORCH_CHECK(first.device().is_cpu(), "gradguide::reduce: operands: expected CPU tensors, got ", first.device());
  const int64_t b = first.size(0), k = static_cast<int64_t>(ops.size());
  const int64_t n = check_groups(first, groups, "gradguide::reduce");
  auto opts = first.options().dtype(at::kDouble);
  at::Tensor gram = at::empty({b, groups, k, k}, opts);
  at::Tensor sums = at::empty({b, groups, k}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_reduce", [&] {
    reduce_dispatch_k<scalar_t>(ops, b * groups, n, gram, sums);
  });
  return {gram, sums};
}

// ---------------------------------------------------------------------------------------
// combine

template <typename scalar_t>
using combine_acc_t = double;

// cf: [rows, K] contiguous weights in the accumulation type
template <int K, typename scalar_t>
static void combine_impl(const std::vector<at::Tensor>& ops, const combine_acc_t<scalar_t>* cf, int64_t rows,
                         int64_t n, bool has_low, double low_d, bool has_high, double high_d, at::Tensor& out) {
  using acc_t = combine_acc_t<scalar_t>;
  const int64_t chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  std::array<const scalar_t*, K> base;
  for (int k = 0; k < K; ++k) base[k] = ops[k].data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  const acc_t low = static_cast<acc_t>(low_d), high = static_cast<acc_t>(high_d);
  at::parallel_for(0, rows * chunks, 1, [&](int64_t lo, int64_t hi) {
    alignas(64) acc_t acc[kTile];
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t r = item / chunks, c = item % chunks;
      const int64_t end = std::min(n, (c + 1) * kChunk);
      std::array<acc_t, K> w;
      for (int k = 0; k < K; ++k) w[k] = cf[r * K + k];
      for (int64_t start = c * kChunk; start < end; start += kTile) {
        const int64_t m = std::min(kTile, end - start);
        const int64_t off = r * n + start;
        // every operand is multiplied, even by a zero weight: 0 * inf = NaN, as the reference
        for (int64_t e = 0; e < m; ++e) acc[e] = w[0] * static_cast<acc_t>(base[0][off + e]);
        for (int k = 1; k < K; ++k) {
          const scalar_t* src = base[k] + off;
          for (int64_t e = 0; e < m; ++e) acc[e] += w[k] * static_cast<acc_t>(src[e]);
        }
        if (has_low)  // comparisons are false for NaN, so NaN stays NaN (torch.clamp does the same)
          for (int64_t e = 0; e < m; ++e) acc[e] = acc[e] < low ? low : acc[e];
        if (has_high)
          for (int64_t e = 0; e < m; ++e) acc[e] = acc[e] > high ? high : acc[e];
        for (int64_t e = 0; e < m; ++e) dst[off + e] = static_cast<scalar_t>(acc[e]);
      }
    }
  });
}

template <typename scalar_t>
static void combine_dispatch_k(const std::vector<at::Tensor>& ops, const combine_acc_t<scalar_t>* coef,
                               int64_t rows, int64_t n, bool hl, double l, bool hh, double h, at::Tensor& out) {
  switch (ops.size()) {
    case 1: return combine_impl<1, scalar_t>(ops, coef, rows, n, hl, l, hh, h, out);
    case 2: return combine_impl<2, scalar_t>(ops, coef, rows, n, hl, l, hh, h, out);
    case 3: return combine_impl<3, scalar_t>(ops, coef, rows, n, hl, l, hh, h, out);
    case 4: return combine_impl<4, scalar_t>(ops, coef, rows, n, hl, l, hh, h, out);
    case 5: return combine_impl<5, scalar_t>(ops, coef, rows, n, hl, l, hh, h, out);
    case 6: return combine_impl<6, scalar_t>(ops, coef, rows, n, hl, l, hh, h, out);
    case 7: return combine_impl<7, scalar_t>(ops, coef, rows, n, hl, l, hh, h, out);
    case 8: return combine_impl<8, scalar_t>(ops, coef, rows, n, hl, l, hh, h, out);
  }
}

void combine_out_cpu(const at::Tensor& coef_in, at::TensorList operands, std::optional<double> low,
                     std::optional<double> high, at::Tensor& out) {
  std::vector<at::Tensor> ops(operands.begin(), operands.end());
  check_operands(ops, "gradguide::combine");
  const auto& first = ops[0];
  TORCH_CHECK(first.device().is_cpu(), "gradguide::combine: operands: expected CPU tensors, got ",
              first.device());
  const int64_t b = first.size(0), k = static_cast<int64_t>(ops.size());
  TORCH_CHECK(coef_in.dim() == 3 && coef_in.size(0) == b && coef_in.size(2) == k,
              "gradguide::combine: coef: expected shape [B=", b, ", G, K=", k, "], got ", coef_in.sizes());
  TORCH_CHECK(coef_in.device() == first.device(), "gradguide::combine: coef: device ", coef_in.device(),
              " differs from the operands' ", first.device());
  const int64_t groups = coef_in.size(1);
  const int64_t n = check_groups(first, groups, "gradguide::combine");
  TORCH_CHECK(out.sizes() == first.sizes() && out.scalar_type() == first.scalar_type() &&
                  out.device() == first.device() && out.is_contiguous(),
              "gradguide::combine: out: expected a contiguous ", first.sizes(), " ", first.scalar_type(),
              " tensor on ", first.device(), ", got ", out.sizes(), " ", out.scalar_type(), " on ", out.device());
  at::Tensor coef = coef_in.to(acc_type(first.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_combine", [&] {
    combine_dispatch_k<scalar_t>(ops, coef.data_ptr<combine_acc_t<scalar_t>>(), b * groups, n, low.has_value(),
                                 low.value_or(0.0), high.has_value(), high.value_or(0.0), out);
  });
}

at::Tensor combine_cpu(const at::Tensor& coef, at::TensorList operands, std::optional<double> low,
                       std::optional<double> high) {
  TORCH_CHECK(!operands.empty(), "gradguide::combine: operands: expected a non-empty list of tensors");
  at::Tensor out = at::empty_like(operands[0], at::MemoryFormat::Contiguous);
  combine_out_cpu(coef, operands, low, high, out);
  return out;
}


// ---------------------------------------------------------------------------------------
// fused_combine: a built-in policy's coefficient program, then combine, in one call
//
//   gradguide::fused_combine(str policy, Tensor[] operands, Tensor? gram, Tensor[] vectors,
//                            Tensor[] scalars, float? low, float? high) -> Tensor
//
// The per-row (sample, or sample x group) coefficient program of gradguide/ops/policies.py —
// the plain-torch truth, mirrored line by line in coefficients() below — runs here in float64
// on the float64 Gram matrix, then the rows are combined as in combine. So a CPU step is one
// reduce and one fused_combine: no tiny torch ops in between.
//   vectors[v]: [Bv, Gv, K] (Bv in {1, B}, Gv in {1, G}, any strides; float32 or float64);
//   scalars[s]: 1 or B elements (float32 or float64, contiguous);
//   gram: [B, G, Kg, Kg] float64 contiguous over the FIRST Kg operands (Kg <= K); the vectors
//   whose inner products a policy takes are zero beyond Kg (the caller orders the operands).

enum Policy { kLinear, kCfg, kPxpA, kPxpB, kPxpC, kApg, kGloss, kLookahead };

static Policy policy_id(const std::string& name, int64_t& n_vectors, int64_t& n_scalars, bool& needs_gram) {
  static const std::vector<std::tuple<std::string, Policy, int, int, bool>> table = {
      {"linear", kLinear, 1, 0, false},   {"cfg", kCfg, 3, 1, false},  {"pxp-a", kPxpA, 4, 1, true},
      {"pxp-b", kPxpB, 4, 1, true},       {"pxp-c", kPxpC, 3, 4, true}, {"apg", kApg, 3, 4, true},
      {"gloss", kGloss, 2, 5, true},      {"lookahead", kLookahead, 4, 8, true}};
  for (const auto& [n, id, nv, ns, g] : table) {
    if (n == name) {
      n_vectors = nv;
      n_scalars = ns;
      needs_gram = g;
      return id;
    }
  }
  TORCH_CHECK(false, "gradguide::fused_combine: policy: expected linear, cfg, pxp-a, pxp-b, pxp-c, apg, gloss or "
              "lookahead, got '", name, "'");
}

using Vec = std::array<double, kMaxK>;

struct RowProgram {
  const double* gram;  // [Kg, Kg] of this row (nullptr without a Gram)
  int kg, k;
  double dot(const Vec& u, const Vec& v) const {
    double total = 0;
    for (int i = 0; i < kg; ++i) {
      double gv = 0;
      for (int j = 0; j < kg; ++j) gv += gram[i * kg + j] * v[j];
      total += u[i] * gv;
    }
    return total;
  }
  static double safe_div(double num, double den) { return den > 0 ? num / den : 0.0; }
  Vec axpy(const Vec& a, double f, const Vec& b) const {  // a + f b
    Vec r{};
    for (int i = 0; i < k; ++i) r[i] = a[i] + f * b[i];
    return r;
  }
  // PC_delta(a|b) = a - delta min(0, <a,b>)/|b|^2 b  (a where |b| = 0)
  Vec pc(const Vec& a, const Vec& b, double delta) const {
    const double f = safe_div(std::min(dot(a, b), 0.0), std::max(dot(b, b), 0.0));
    return axpy(a, -f * delta, b);
  }
};

// C = policy(vectors, scalars) for one row; mirrors gradguide/ops/policies.py::coefficients
static Vec coefficients(Policy policy, const RowProgram& p, const std::vector<Vec>& v, const std::vector<double>& s) {
  const int k = p.k;
  Vec c{};
  switch (policy) {
    case kLinear:
      return v[0];
    case kCfg:  // base + uncond + scale (cond - uncond)
      for (int i = 0; i < k; ++i) c[i] = v[0][i] + v[2][i] + s[0] * (v[1][i] - v[2][i]);
      return c;
    case kPxpA:
    case kPxpB: {  // base, den, cls, div; delta
      const Vec den1 = p.pc(v[1], v[2], s[0]), cls1 = p.pc(v[2], v[1], s[0]);
      if (policy == kPxpA) {
        for (int i = 0; i < k; ++i) c[i] = v[0][i] + den1[i] + cls1[i] + v[3][i];
        return c;
      }
      const Vec cls2 = p.pc(cls1, v[3], s[0]), div1 = p.pc(v[3], v[2], s[0]);
      for (int i = 0; i < k; ++i) c[i] = v[0][i] + den1[i] + cls2[i] + div1[i];
      return c;
    }
    case kPxpC: {  // base, x0_cond, x0_uncond; scale, delta, delta2, post
      Vec delta{};
      for (int i = 0; i < k; ++i) delta[i] = (v[1][i] - v[2][i]) * (s[0] - 1.0);
      const Vec a = p.pc(v[1], delta, s[1]), b = p.pc(delta, v[1], s[2]);
      for (int i = 0; i < k; ++i) c[i] = v[0][i] + s[3] * (a[i] + b[i]);
      return c;
    }
    case kApg: {  // base, d_cond, d_uncond; scale, eta, norm_threshold, post
      const Vec& dc = v[1];
      Vec delta{};
      for (int i = 0; i < k; ++i) delta[i] = dc[i] - v[2][i];
      const double r = s[2];
      const double norm = std::sqrt(std::max(p.dot(delta, delta), 0.0));
      const double clip = norm > 0 ? std::min(RowProgram::safe_div(r, norm), 1.0) : 1.0;
      if (r > 0)
        for (int i = 0; i < k; ++i) delta[i] *= clip;
      const double f = RowProgram::safe_div(p.dot(delta, dc), std::max(p.dot(dc, dc), 0.0));
      for (int i = 0; i < k; ++i) {
        const double par = dc[i] * f;
        c[i] = v[0][i] + s[3] * (dc[i] + (delta[i] - par + par * s[1]) * (s[0] - 1.0));
      }
      return c;
    }
    case kGloss: {  // base, vjp; a, h, sigma, residual, post
      const double a2 = s[0] * s[0];
      const double beta = (a2 / 2) / (a2 * s[2] * s[2] + s[1] * std::max(p.dot(v[1], v[1]), 0.0));
      for (int i = 0; i < k; ++i) c[i] = v[0][i] + v[1][i] * (s[4] * s[3] * beta);
      return c;
    }
    case kLookahead: {  // base, x0, vjp, reward; a, h, sigma, target, multiplier, beta, beta_per_sample, post
      const double a2 = s[0] * s[0];
      const double per_sample = (a2 / 2) / (a2 * s[2] * s[2] + s[1] * std::max(p.dot(v[2], v[2]), 0.0));
      const double beta = s[6] != 0.0 ? per_sample : s[5];
      const double residual = 2 * s[4] * (s[3] - p.dot(v[3], v[1]));
      for (int i = 0; i < k; ++i) c[i] = v[0][i] + v[2][i] * (s[7] * residual * beta);
      return c;
    }
  }
  return c;
}

static double read_double(const at::Tensor& t, int64_t offset) {
  return t.scalar_type() == at::kDouble ? t.const_data_ptr<double>()[offset]
                                        : static_cast<double>(t.const_data_ptr<float>()[offset]);
}

at::Tensor fused_combine_cpu(c10::string_view policy_name, at::TensorList operands, const std::optional<at::Tensor>& gram,
                             at::TensorList vectors, at::TensorList scalars, std::optional<double> low,
                             std::optional<double> high) {
  const char* op = "gradguide::fused_combine";
  std::vector<at::Tensor> ops(operands.begin(), operands.end());
  check_operands(ops, op);
  const auto& first = ops[0];
  TORCH_CHECK(first.device().is_cpu(), op, ": operands: expected CPU tensors, got ", first.device());
  int64_t n_vectors = 0, n_scalars = 0;
  bool needs_gram = false;
  const Policy policy = policy_id(std::string(policy_name), n_vectors, n_scalars, needs_gram);
  const int64_t b = first.size(0), k = static_cast<int64_t>(ops.size());
  TORCH_CHECK(static_cast<int64_t>(vectors.size()) == n_vectors, op, ": vectors: policy '", policy_name, "' takes ",
              n_vectors, " coefficient vectors, got ", vectors.size());
  TORCH_CHECK(static_cast<int64_t>(scalars.size()) == n_scalars, op, ": scalars: policy '", policy_name, "' takes ",
              n_scalars, " scalars, got ", scalars.size());
  int64_t groups = 1, kg = 0;
  if (needs_gram) {
    TORCH_CHECK(gram.has_value(), op, ": gram: policy '", policy_name, "' needs the Gram matrix (from reduce)");
    const auto& g = *gram;
    TORCH_CHECK(g.dim() == 4 && g.size(0) == b && g.size(2) == g.size(3) && g.size(2) >= 1 && g.size(2) <= k &&
                    g.scalar_type() == at::kDouble && g.is_contiguous() && g.device() == first.device(),
                op, ": gram: expected a contiguous float64 [B=", b, ", G, Kg, Kg] tensor with Kg <= K=", k,
                " on ", first.device(), ", got ", g.sizes(), " ", g.scalar_type());
    groups = g.size(1);
    kg = g.size(2);
  }
  for (size_t v = 0; v < vectors.size(); ++v) {
    const auto& t = vectors[v];
    TORCH_CHECK(t.dim() == 3 && (t.size(0) == 1 || t.size(0) == b) && t.size(2) == k && t.device() == first.device() &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                op, ": vectors[", v, "]: expected a float32/float64 [1 or B=", b, ", G, K=", k, "] tensor on ",
                first.device(), ", got ", t.sizes(), " ", t.scalar_type());
    if (!needs_gram && t.size(1) != 1) groups = std::max(groups, t.size(1));
  }
  for (size_t v = 0; v < vectors.size(); ++v)
    TORCH_CHECK(vectors[v].size(1) == 1 || vectors[v].size(1) == groups, op, ": vectors[", v, "]: ",
                vectors[v].size(1), " groups, expected 1 or ", groups);
  for (size_t j = 0; j < scalars.size(); ++j) {
    const auto& t = scalars[j];
    TORCH_CHECK((t.numel() == 1 || t.numel() == b) && t.is_contiguous() && t.device() == first.device() &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                op, ": scalars[", j, "]: expected a contiguous float32/float64 tensor of 1 or B=", b, " elements on ",
                first.device(), ", got ", t.sizes(), " ", t.scalar_type());
  }
  const int64_t n = check_groups(first, groups, op);
  const int64_t rows = b * groups;

  // coefficient program, per row, in float64 (rows are few: B x G)
  std::vector<double> coef(rows * k);
  std::vector<Vec> vec(vectors.size());
  std::vector<double> sc(scalars.size());
  const double* gram_data = needs_gram ? gram->const_data_ptr<double>() : nullptr;
  for (int64_t bi = 0; bi < b; ++bi) {
    for (size_t j = 0; j < scalars.size(); ++j) sc[j] = read_double(scalars[j], scalars[j].numel() == 1 ? 0 : bi);
    for (int64_t gi = 0; gi < groups; ++gi) {
      for (size_t v = 0; v < vectors.size(); ++v) {
        const auto& t = vectors[v];
        const int64_t base = (t.size(0) == 1 ? 0 : bi) * t.stride(0) + (t.size(1) == 1 ? 0 : gi) * t.stride(1);
        for (int64_t i = 0; i < k; ++i) vec[v][i] = read_double(t, base + i * t.stride(2));
      }
      const int64_t r = bi * groups + gi;
      RowProgram prog{gram_data ? gram_data + r * kg * kg : nullptr, static_cast<int>(kg), static_cast<int>(k)};
      const Vec c = coefficients(policy, prog, vec, sc);
      for (int64_t i = 0; i < k; ++i) coef[r * k + i] = c[i];
    }
  }
  at::Tensor out = at::empty_like(first, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_fused_combine", [&] {
    using acc_t = combine_acc_t<scalar_t>;
    std::vector<acc_t> cf(coef.begin(), coef.end());
    combine_dispatch_k<scalar_t>(ops, cf.data(), rows, n, low.has_value(), low.value_or(0.0), high.has_value(),
                                 high.value_or(0.0), out);
  });
  return out;
}


// ---------------------------------------------------------------------------------------
// clip_shift: a clipped x̂_0 and the clipped guidance shift, in one pass
//
//   gradguide::clip_shift(Tensor coef_p, Tensor coef_s, Tensor[] operands, float low, float high)
//       -> (Tensor clipped, Tensor shift)
//   p = sum_k coef_p[b, k] op_k,  s = sum_k coef_s[b, k] op_k  (coef: [1 or B, K])
//   clipped = clamp(p),  shift = clamp(p + s) - clamp(p), and exactly s where neither clips:
//   formed as a difference of the two clamped values, the shift (~1e-3 of |p| in a guided
//   step) would keep only p's absolute precision (issue 12). Reference: ops/reference.py.

template <int K, typename scalar_t>
static void clip_shift_impl(const std::vector<at::Tensor>& ops, const std::vector<double>& wp_all,
                            const std::vector<double>& ws_all, int64_t coef_rows, int64_t b, int64_t n, double low_d,
                            double high_d, at::Tensor& clipped, at::Tensor& shift) {
  using acc_t = combine_acc_t<scalar_t>;
  const int64_t chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  std::array<const scalar_t*, K> base;
  for (int k = 0; k < K; ++k) base[k] = ops[k].data_ptr<scalar_t>();
  scalar_t* out_c = clipped.data_ptr<scalar_t>();
  scalar_t* out_s = shift.data_ptr<scalar_t>();
  const acc_t low = static_cast<acc_t>(low_d), high = static_cast<acc_t>(high_d);
  at::parallel_for(0, b * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t r = item / chunks, c = item % chunks;
      const int64_t row = coef_rows == 1 ? 0 : r;
      std::array<acc_t, K> wp, ws;
      for (int k = 0; k < K; ++k) {
        wp[k] = static_cast<acc_t>(wp_all[row * K + k]);
        ws[k] = static_cast<acc_t>(ws_all[row * K + k]);
      }
      const int64_t begin = r * n + c * kChunk, end = r * n + std::min(n, (c + 1) * kChunk);
      for (int64_t e = begin; e < end; ++e) {
        acc_t p = 0, sh = 0;
        for (int k = 0; k < K; ++k) {
          const acc_t v = static_cast<acc_t>(base[k][e]);
          p += wp[k] * v;
          sh += ws[k] * v;
        }
        const acc_t q = p + sh;
        const acc_t pc = p < low ? low : (p > high ? high : p);
        const acc_t qc = q < low ? low : (q > high ? high : q);
        const bool inside = p > low && p < high && q > low && q < high;
        out_c[e] = static_cast<scalar_t>(pc);
        out_s[e] = static_cast<scalar_t>(inside ? sh : qc - pc);
      }
    }
  });
}

template <typename scalar_t>
static void clip_shift_dispatch_k(const std::vector<at::Tensor>& ops, const std::vector<double>& wp,
                                  const std::vector<double>& ws, int64_t rows, int64_t b, int64_t n, double low,
                                  double high, at::Tensor& clipped, at::Tensor& shift) {
  switch (ops.size()) {
    case 1: return clip_shift_impl<1, scalar_t>(ops, wp, ws, rows, b, n, low, high, clipped, shift);
    case 2: return clip_shift_impl<2, scalar_t>(ops, wp, ws, rows, b, n, low, high, clipped, shift);
    case 3: return clip_shift_impl<3, scalar_t>(ops, wp, ws, rows, b, n, low, high, clipped, shift);
    case 4: return clip_shift_impl<4, scalar_t>(ops, wp, ws, rows, b, n, low, high, clipped, shift);
    case 5: return clip_shift_impl<5, scalar_t>(ops, wp, ws, rows, b, n, low, high, clipped, shift);
    case 6: return clip_shift_impl<6, scalar_t>(ops, wp, ws, rows, b, n, low, high, clipped, shift);
    case 7: return clip_shift_impl<7, scalar_t>(ops, wp, ws, rows, b, n, low, high, clipped, shift);
    case 8: return clip_shift_impl<8, scalar_t>(ops, wp, ws, rows, b, n, low, high, clipped, shift);
  }
}

std::tuple<at::Tensor, at::Tensor> clip_shift_cpu(const at::Tensor& coef_p, const at::Tensor& coef_s,
                                                  at::TensorList operands, double low, double high) {
  const char* op = "gradguide::clip_shift";
  std::vector<at::Tensor> ops(operands.begin(), operands.end());
  check_operands(ops, op);
  const auto& first = ops[0];
  TORCH_CHECK(first.device().is_cpu(), op, ": operands: expected CPU tensors, got ", first.device());
  TORCH_CHECK(low < high, op, ": expected low < high, got ", low, " and ", high);
  const int64_t b = first.size(0), k = static_cast<int64_t>(ops.size());
  for (const auto* t : {&coef_p, &coef_s})
    TORCH_CHECK(t->dim() == 2 && (t->size(0) == 1 || t->size(0) == b) && t->size(1) == k && t->size(0) == coef_p.size(0) &&
                    t->device() == first.device() && (t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble),
                op, ": coef: expected float32/float64 [1 or B=", b, ", K=", k, "] tensors (both alike), got ",
                t->sizes(), " ", t->scalar_type());
  const int64_t rows = coef_p.size(0);
  std::vector<double> wp(rows * k), ws(rows * k);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < k; ++i) {
      wp[r * k + i] = read_double(coef_p, r * coef_p.stride(0) + i * coef_p.stride(1));
      ws[r * k + i] = read_double(coef_s, r * coef_s.stride(0) + i * coef_s.stride(1));
    }
  const int64_t n = first.numel() / b;
  at::Tensor clipped = at::empty_like(first, at::MemoryFormat::Contiguous);
  at::Tensor shift = at::empty_like(first, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_clip_shift", [&] {
    clip_shift_dispatch_k<scalar_t>(ops, wp, ws, rows, b, n, low, high, clipped, shift);
  });
  return {clipped, shift};
}

TORCH_LIBRARY(gradguide, m) {
  m.def("reduce(Tensor[] operands, int groups) -> (Tensor, Tensor)");
  m.def("combine(Tensor coef, Tensor[] operands, float? low, float? high) -> Tensor");
  m.def("combine_out(Tensor coef, Tensor[] operands, float? low, float? high, Tensor(a!) out) -> ()");
  m.def("fused_combine(str policy, Tensor[] operands, Tensor? gram, Tensor[] vectors, Tensor[] scalars, "
        "float? low, float? high) -> Tensor");
  m.def("clip_shift(Tensor coef_p, Tensor coef_s, Tensor[] operands, float low, float high) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gradguide, CPU, m) {
  m.impl("reduce", &reduce_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("combine_out", &combine_out_cpu);
  m.impl("fused_combine", &fused_combine_cpu);
  m.impl("clip_shift", &clip_shift_cpu);
}

}  // namespace gradguide

// An importable (empty) Python module: importing it runs the static registration above.
static struct PyModuleDef gradguide_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&gradguide_c_module); }
