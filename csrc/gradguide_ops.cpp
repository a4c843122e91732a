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
// Accumulation: float32 for fp16/bf16/fp32 inputs, float64 for fp64 (as the reference).
// Non-finite inputs: every product is formed, so NaN/inf poison exactly the Gram entries and
// outputs the reference poisons (0 * inf = NaN in combine). Clamping keeps NaN.
// Limits: K <= 8 operands of one dtype, shape and device; non-contiguous operands are made
// contiguous by the Python glue (gradguide/ops/native_backend.py), and rejected here.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>

#include <algorithm>
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

static at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

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
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
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
  auto opts = first.options().dtype(acc_type(first.scalar_type()));
  at::Tensor gram = at::empty({b, groups, k, k}, opts);
  at::Tensor sums = at::empty({b, groups, k}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_reduce", [&] {
    reduce_dispatch_k<scalar_t>(ops, b * groups, n, gram, sums);
  });
  return {gram, sums};
}

// ---------------------------------------------------------------------------------------
// combine

template <int K, typename scalar_t>
static void combine_impl(const std::vector<at::Tensor>& ops, const at::Tensor& coef, int64_t rows, int64_t n,
                         bool has_low, double low_d, bool has_high, double high_d, at::Tensor& out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  std::array<const scalar_t*, K> base;
  for (int k = 0; k < K; ++k) base[k] = ops[k].data_ptr<scalar_t>();
  const acc_t* cf = coef.data_ptr<acc_t>();
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
static void combine_dispatch_k(const std::vector<at::Tensor>& ops, const at::Tensor& coef, int64_t rows,
                               int64_t n, bool hl, double l, bool hh, double h, at::Tensor& out) {
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
  // The kernel is elementwise: out may be exactly an operand (in place), but memory shared any
  // other way would be read after it was written (the Python glue computes into a temporary).
  at::assert_no_internal_overlap(out);
  for (const auto& t : ops) at::assert_no_partial_overlap(out, t);
  at::assert_no_overlap(out, coef_in);
  // one clamp rule on every backend: a NaN bound is an error, not an ignored bound
  TORCH_CHECK_VALUE(!(low.has_value() && std::isnan(*low)), "gradguide::combine: low: NaN is not a bound");
  TORCH_CHECK_VALUE(!(high.has_value() && std::isnan(*high)), "gradguide::combine: high: NaN is not a bound");
  at::Tensor coef = coef_in.to(acc_type(first.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_combine", [&] {
    combine_dispatch_k<scalar_t>(ops, coef, b * groups, n, low.has_value(), low.value_or(0.0), high.has_value(),
                                 high.value_or(0.0), out);
  });
}

at::Tensor combine_cpu(const at::Tensor& coef, at::TensorList operands, std::optional<double> low,
                       std::optional<double> high) {
  TORCH_CHECK(!operands.empty(), "gradguide::combine: operands: expected a non-empty list of tensors");
  at::Tensor out = at::empty_like(operands[0], at::MemoryFormat::Contiguous);
  combine_out_cpu(coef, operands, low, high, out);
  return out;
}

TORCH_LIBRARY(gradguide, m) {
  m.def("reduce(Tensor[] operands, int groups) -> (Tensor, Tensor)");
  m.def("combine(Tensor coef, Tensor[] operands, float? low, float? high) -> Tensor");
  m.def("combine_out(Tensor coef, Tensor[] operands, float? low, float? high, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(gradguide, CPU, m) {
  m.impl("reduce", &reduce_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("combine_out", &combine_out_cpu);
}

}  // namespace gradguide

// An importable (empty) Python module: importing it runs the static registration above.
static struct PyModuleDef gradguide_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&gradguide_c_module); }
