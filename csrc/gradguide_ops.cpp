// gradguide native ops (CPU): the two passes of a guided step (docs/architecture.md).
//
//   gradguide::reduce(Tensor[] operands, int groups) -> (Tensor gram, Tensor sums)
//       gram[b, g, i, j] = <op_i[b, g], op_j[b, g]>,  sums[b, g, k] = sum(op_k[b, g])
//   gradguide::combine(Tensor coef, Tensor[] operands, float? low, float? high) -> Tensor
//   gradguide::combine_out(Tensor coef, Tensor[] operands, float? low, float? high, Tensor(a!) out) -> ()
//       out[b, g, :] = clamp(sum_k coef[b, g, k] * op_k[b, g, :])
//   gradguide::fused_combine / fused_combine_out: a built-in policy's coefficient program, then
//       combine (below; arguments in gradguide_fused_args.h)
//
// Design: a sample (or a group of it) is a "row" of N contiguous elements; rows are few and
// long (B <= 64, N up to millions), so each row is cut into chunks and the (row, chunk) pairs
// are spread over torch's intra-op threads (at::parallel_for, OpenMP). reduce writes one
// partial per chunk (fixed chunk size => the result does not depend on the thread count)
// and a second, serial stage adds the partials in chunk order. The inner loops
// (gradguide_cpu_kernels.h) work on blocks of 8 elements in vector registers, compiled for
// AVX-512, AVX2 and the baseline and picked at run time (cpu_isa()); every variant sums in
// the same order, so results do not depend on the instruction set either.
// Outputs: fresh outputs of 4 MiB and more are advised to use transparent huge pages
// (empty_output()): on first touch the kernel then maps and zeroes 2 MiB at a time instead
// of faulting every 4 KiB page, which otherwise costs more than the pass itself at ADM-256.
//
// Accumulation: reduce accumulates in float64 for every input dtype and returns a float64 Gram
// matrix and sums (as the reference). Why: rules take inner products of *small combinations of
// large operands* from the Gram matrix (u^T G u, e.g. a clipped guidance shift x0_gc - x0_c
// of norm 1e-3 between operands of norm 1.4); a float32 Gram loses ~1e-7 * |op|^2 absolutely,
// which is 8 % of such a norm^2 (docs/architecture.md#precision). Products of float32 (or fp16/bf16) values are exact
// in float64, so the float64 Gram is as good as the inputs. Cost: the operands are converted to
// double and the products run at half the SIMD width, which stays under the memory bound with
// AVX-512 or AVX2 (gradguide bench --suite native-bandwidth). combine also accumulates in
// float64 (weights in float64):
// a step's weights cancel (x̂_0 = (x_t − √(1−ᾱ) ε)/√ᾱ has |weights| ~160 at t = 999 for a
// result of size 1), and a float32 accumulator turns that into 1e-5 relative errors that
// projections and clipping carry to the samples (2e-4 on the pinned DDIM eta = 1 precision case; 5e-5 with
// float64). On a CPU the pass is memory-bound either way.
// Non-finite inputs: every product is formed, so NaN/inf poison exactly the Gram entries and
// outputs the reference poisons (0 * inf = NaN in combine). Clamping keeps NaN. fused_combine:
// a row whose coefficient program reads a NaN/inf or computes a non-finite weight is all NaN
// (gradguide_policies.h, row_coefficients: the rule of every backend).
// Errors: TORCH_CHECK_VALUE / TORCH_CHECK_TYPE (ValueError / TypeError in Python) naming the
// argument; a device without kernels, or a call with no tensor, reaches the fallbacks below.
// Limits: K <= 8 operands of one dtype, shape and device. reduce and fused_combine read
// row-strided operands (each sample contiguous, any batch stride: the halves of a [B, 2C, ...]
// model output) in place, and Σ-scaled ones (op * exp(slope * log_scale + offset), formed as
// they load: gradguide_cpu_kernels.h, load_scaled); anything else non-contiguous is made
// contiguous by the glue above (gradguide/ops/__init__.py) and rejected here.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "gradguide_fused_args.h"
#include "gradguide_policies.h"

namespace gradguide {

// The inner loops, once per instruction set (see the top of gradguide_cpu_kernels.h).
#define GG_ISA isa_default
#define GG_TARGET
#include "gradguide_cpu_kernels.h"
#undef GG_ISA
#undef GG_TARGET
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GG_X86_DISPATCH 1
#define GG_ISA isa_avx2
#define GG_TARGET __attribute__((target("avx2,fma,f16c")))
#include "gradguide_cpu_kernels.h"
#undef GG_ISA
#undef GG_TARGET
#define GG_ISA isa_avx512
#define GG_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#include "gradguide_cpu_kernels.h"
#undef GG_ISA
#undef GG_TARGET
#endif

constexpr int64_t kChunk = 16384;  // elements per parallel work item (a multiple of the 8-element block)

enum class Isa { kDefault, kAvx2, kAvx512 };

// The widest instruction set this CPU has, capped by ATEN_CPU_CAPABILITY (torch's knob for its
// own kernels: "default", "avx2", "avx512"), so tests can run every variant on one machine.
static Isa detect_isa() {
  Isa best = Isa::kDefault;
#if defined(GG_X86_DISPATCH)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    best = Isa::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      best = Isa::kAvx512;
  }
#endif
  if (const char* cap = std::getenv("ATEN_CPU_CAPABILITY")) {
    const std::string c(cap);
    if (c == "default") best = Isa::kDefault;
    else if (c == "avx2" && best == Isa::kAvx512) best = Isa::kAvx2;
  }
  return best;
}

static Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

static const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "default";
}

// The per-ISA variants of one kernel template, as a function pointer for this CPU.
#if defined(GG_X86_DISPATCH)
#define GG_PICK(kernel, ...)                                                     \
  (cpu_isa() == Isa::kAvx512 ? &isa_avx512::kernel<__VA_ARGS__>                   \
   : cpu_isa() == Isa::kAvx2 ? &isa_avx2::kernel<__VA_ARGS__>                     \
                             : &isa_default::kernel<__VA_ARGS__>)
#else
#define GG_PICK(kernel, ...) (&isa_default::kernel<__VA_ARGS__>)
#endif

// A fresh contiguous output like `like`. Large ones are advised to use transparent huge pages
// before anything touches them (Linux, THP in "madvise" or "always" mode; a no-op elsewhere):
// see "Outputs" at the top.
static at::Tensor empty_output(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = out.nbytes();
  if (like.device().is_cpu() && bytes >= 2 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only
  }
#endif
  return out;
}

// ---------------------------------------------------------------------------------------
// checks shared by both ops

// Errors name the argument (ValueError / TypeError in Python), as the Python API's do.
// `row_strided`: samples contiguous with any batch stride (reduce, fused_combine: read in place);
// otherwise contiguous (combine, clip_shift: the glue makes them so).
static void check_operands(const std::vector<at::Tensor>& ops, const char* op, bool row_strided = false) {
  TORCH_CHECK_VALUE(!ops.empty(), op, ": operands: expected a non-empty list of tensors");
  TORCH_CHECK_VALUE(ops.size() <= kMaxK, op, ": operands: expected at most ", kMaxK, " tensors, got ", ops.size());
  const auto& first = ops[0];
  for (size_t k = 0; k < ops.size(); ++k) {
    const auto& t = ops[k];
    TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), op, ": operands[", k, "]: dtype ", t.scalar_type(),
                     " differs from operands[0]'s ", first.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == first.sizes(), op, ": operands[", k, "]: shape ", t.sizes(),
                " differs from operands[0]'s ", first.sizes());
    TORCH_CHECK_VALUE(t.device() == first.device(), op, ": operands[", k, "]: device ", t.device(),
                " differs from operands[0]'s ", first.device());
    if (row_strided) {
      TORCH_CHECK_VALUE(samples_contiguous(t), op, ": operands[", k,
                        "]: expected contiguous samples (any batch stride), got strides ", t.strides());
    } else {
      TORCH_CHECK_VALUE(t.is_contiguous(), op, ": operands[", k, "]: expected a contiguous tensor");
    }
  }
  auto st = first.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
                   ": operands: expected float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK_VALUE(first.dim() >= 1 && first.size(0) >= 1, op,
              ": operands: expected tensors shaped [B, ...] with B >= 1, got ", first.sizes());
}

// `out` of an out= op: shares no memory with itself, and with an operand only as exactly that
// operand (the kernels are elementwise); `inputs` (weights) not at all.
static void check_out_overlap(const char* op, const at::Tensor& out, const std::vector<at::Tensor>& ops) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
                    ": out: several of its elements share memory (e.g. an expanded tensor)");
  for (size_t k = 0; k < ops.size(); ++k)
    TORCH_CHECK_VALUE(at::get_overlap_status(out, ops[k]) != at::MemOverlapStatus::Partial, op,
                      ": out: shares memory with operands[", k, "] other than by being exactly it");
}

// combine's weights and accumulator: float64 (see "Accumulation" above)
static at::ScalarType acc_type(at::ScalarType) { return at::kDouble; }

// Where row r = (b, g) of operand k starts: base[k] + b * s0[k] + g * n (row-strided operands;
// for contiguous ones s0 = G * n, i.e. base + r * n as before), and its Σ-scaling.
template <int K, typename scalar_t>
struct Rows {
  std::array<const scalar_t*, K> base;
  std::array<int64_t, K> s0;
  int64_t groups, n;
  ScaleArgs scale;

  Rows(const std::vector<at::Tensor>& ops, int64_t groups_, int64_t n_, const ScaleArgs& scale_)
      : groups(groups_), n(n_), scale(scale_) {
    for (int k = 0; k < K; ++k) {
      base[k] = ops[k].const_data_ptr<scalar_t>();
      s0[k] = batch_stride(ops[k]);
    }
  }
  void row(int64_t r, std::array<const scalar_t*, K>& ptrs, RowScale<scalar_t>& rs) const {
    const int64_t b = r / groups, g = r % groups;
    for (int k = 0; k < K; ++k) ptrs[k] = base[k] + b * s0[k] + g * n;
    rs.mask = scale.mask;
    if (scale.mask) {
      using T = scale_t<scalar_t>;
      rs.v = static_cast<const scalar_t*>(scale.v) + b * scale.v_s0 + g * n;
      for (int k = 0; k < K; ++k) {
        rs.a[k] = static_cast<T>(scale.slope[b * scale.slope_s0 + k * scale.slope_s1]);
        rs.c[k] = static_cast<T>(scale.offset[b * scale.offset_s0 + k * scale.offset_s1]);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
// reduce

template <int K, typename scalar_t>
static void reduce_impl(const std::vector<at::Tensor>& ops, int64_t rows, int64_t groups, int64_t n,
                        const ScaleArgs& scale, at::Tensor& gram, at::Tensor& sums) {
  using acc_t = double;  // see "Accumulation" at the top: the Gram is always float64
  constexpr int P = K * (K + 1) / 2;
  const int64_t chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  std::vector<acc_t> part_gram(rows * chunks * P), part_sums(rows * chunks * K);
  const Rows<K, scalar_t> layout(ops, groups, n, scale);
  // AVX-512 holds every accumulator in a register; the narrower sets run the tiled variant
  const bool scaled = scale.mask != 0;
  const auto span = cpu_isa() == Isa::kAvx512
                        ? (scaled ? GG_PICK(reduce_span, K, scalar_t, true) : GG_PICK(reduce_span, K, scalar_t, false))
                        : (scaled ? GG_PICK(reduce_span_tiled, K, scalar_t, true)
                             : GG_PICK(reduce_span_tiled, K, scalar_t, false));
  at::parallel_for(0, rows * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t r = item / chunks, c = item % chunks;
      std::array<const scalar_t*, K> ptrs;
      RowScale<scalar_t> rs;
      layout.row(r, ptrs, rs);
      span(ptrs.data(), rs, c * kChunk, std::min(n, (c + 1) * kChunk), part_gram.data() + item * P,
           part_sums.data() + item * K);
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
static void reduce_dispatch_k(const std::vector<at::Tensor>& ops, int64_t rows, int64_t groups, int64_t n,
                              const ScaleArgs& sc, at::Tensor& gram, at::Tensor& sums) {
  switch (ops.size()) {
    case 1: return reduce_impl<1, scalar_t>(ops, rows, groups, n, sc, gram, sums);
    case 2: return reduce_impl<2, scalar_t>(ops, rows, groups, n, sc, gram, sums);
    case 3: return reduce_impl<3, scalar_t>(ops, rows, groups, n, sc, gram, sums);
    case 4: return reduce_impl<4, scalar_t>(ops, rows, groups, n, sc, gram, sums);
    case 5: return reduce_impl<5, scalar_t>(ops, rows, groups, n, sc, gram, sums);
    case 6: return reduce_impl<6, scalar_t>(ops, rows, groups, n, sc, gram, sums);
    case 7: return reduce_impl<7, scalar_t>(ops, rows, groups, n, sc, gram, sums);
    case 8: return reduce_impl<8, scalar_t>(ops, rows, groups, n, sc, gram, sums);
  }
}

static int64_t check_groups(const at::Tensor& first, int64_t groups, const char* op) {
  const int64_t per_sample = first.numel() / first.size(0);
  TORCH_CHECK_VALUE(groups >= 1 && per_sample % groups == 0, op,
              ": groups: expected a positive divisor of the per-sample size ", per_sample, ", got ", groups);
  return per_sample / groups;
}

std::tuple<at::Tensor, at::Tensor> reduce_cpu(at::TensorList operands, int64_t groups,
                                              const std::optional<at::Tensor>& log_scale,
                                              const std::optional<at::Tensor>& slope,
                                              const std::optional<at::Tensor>& offset, int64_t scaled) {
  std::vector<at::Tensor> ops(operands.begin(), operands.end());
  check_operands(ops, "gradguide::reduce", /*row_strided=*/true);
  const auto& first = ops[0];
  TORCH_CHECK_VALUE(first.device().is_cpu(), "gradguide::reduce: operands: expected CPU tensors, got ", first.device());
  const int64_t b = first.size(0), k = static_cast<int64_t>(ops.size());
  const int64_t n = check_groups(first, groups, "gradguide::reduce");
  const ScaleArgs sc = scale_args("gradguide::reduce", first, k, log_scale, slope, offset, scaled);
  auto opts = first.options().dtype(at::kDouble);
  at::Tensor gram = at::empty({b, groups, k, k}, opts);
  at::Tensor sums = at::empty({b, groups, k}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_reduce", [&] {
    reduce_dispatch_k<scalar_t>(ops, b * groups, groups, n, sc, gram, sums);
  });
  return {gram, sums};
}

// ---------------------------------------------------------------------------------------
// combine

template <typename scalar_t>
using combine_acc_t = double;

// cf: [rows, K] contiguous float64 weights; rows = B x groups; out contiguous
template <int K, typename scalar_t>
static void combine_impl(const std::vector<at::Tensor>& ops, const combine_acc_t<scalar_t>* cf, int64_t rows,
                         int64_t groups, int64_t n, const ScaleArgs& scale, bool has_low, double low, bool has_high,
                         double high, at::Tensor& out) {
  static_assert(std::is_same_v<combine_acc_t<scalar_t>, double>, "the combine kernels accumulate in float64");
  const int64_t chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  const Rows<K, scalar_t> layout(ops, groups, n, scale);
  scalar_t* dst = out.data_ptr<scalar_t>();
  const auto span = scale.mask ? GG_PICK(combine_span, K, scalar_t, true) : GG_PICK(combine_span, K, scalar_t, false);
  at::parallel_for(0, rows * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t r = item / chunks, c = item % chunks;
      std::array<const scalar_t*, K> ptrs;
      RowScale<scalar_t> rs;
      layout.row(r, ptrs, rs);
      span(ptrs.data(), rs, cf + r * K, c * kChunk, std::min(n, (c + 1) * kChunk), has_low, low, has_high, high,
           dst + r * n);
    }
  });
}

template <typename scalar_t>
static void combine_dispatch_k(const std::vector<at::Tensor>& ops, const combine_acc_t<scalar_t>* coef,
                               int64_t rows, int64_t g, int64_t n, const ScaleArgs& sc, bool hl, double l, bool hh,
                               double h, at::Tensor& out) {
  switch (ops.size()) {
    case 1: return combine_impl<1, scalar_t>(ops, coef, rows, g, n, sc, hl, l, hh, h, out);
    case 2: return combine_impl<2, scalar_t>(ops, coef, rows, g, n, sc, hl, l, hh, h, out);
    case 3: return combine_impl<3, scalar_t>(ops, coef, rows, g, n, sc, hl, l, hh, h, out);
    case 4: return combine_impl<4, scalar_t>(ops, coef, rows, g, n, sc, hl, l, hh, h, out);
    case 5: return combine_impl<5, scalar_t>(ops, coef, rows, g, n, sc, hl, l, hh, h, out);
    case 6: return combine_impl<6, scalar_t>(ops, coef, rows, g, n, sc, hl, l, hh, h, out);
    case 7: return combine_impl<7, scalar_t>(ops, coef, rows, g, n, sc, hl, l, hh, h, out);
    case 8: return combine_impl<8, scalar_t>(ops, coef, rows, g, n, sc, hl, l, hh, h, out);
  }
}

void combine_out_cpu(const at::Tensor& coef_in, at::TensorList operands, std::optional<double> low,
                     std::optional<double> high, at::Tensor& out) {
  std::vector<at::Tensor> ops(operands.begin(), operands.end());
  check_operands(ops, "gradguide::combine");
  const auto& first = ops[0];
  TORCH_CHECK_VALUE(first.device().is_cpu(), "gradguide::combine: operands: expected CPU tensors, got ",
              first.device());
  const int64_t b = first.size(0), k = static_cast<int64_t>(ops.size());
  TORCH_CHECK_TYPE(coef_in.is_floating_point(), "gradguide::combine: coef: expected a real floating dtype, got ",
                   coef_in.scalar_type());
  TORCH_CHECK_VALUE(coef_in.dim() == 3 && coef_in.size(0) == b && coef_in.size(2) == k,
              "gradguide::combine: coef: expected shape [B=", b, ", G, K=", k, "], got ", coef_in.sizes());
  TORCH_CHECK_VALUE(coef_in.device() == first.device(), "gradguide::combine: coef: device ", coef_in.device(),
              " differs from the operands' ", first.device());
  const int64_t groups = coef_in.size(1);
  const int64_t n = check_groups(first, groups, "gradguide::combine");
  TORCH_CHECK_VALUE(out.sizes() == first.sizes() && out.scalar_type() == first.scalar_type() &&
                  out.device() == first.device() && out.is_contiguous(),
              "gradguide::combine: out: expected a contiguous ", first.sizes(), " ", first.scalar_type(),
              " tensor on ", first.device(), ", got ", out.sizes(), " ", out.scalar_type(), " on ", out.device());
  // The kernel is elementwise: out may be exactly an operand (in place), but memory shared any
  // other way would be read after it was written (the Python glue computes into a temporary).
  check_out_overlap("gradguide::combine", out, ops);
  TORCH_CHECK_VALUE(at::get_overlap_status(out, coef_in) == at::MemOverlapStatus::No,
                    "gradguide::combine: out: shares memory with coef");
  // one clamp rule on every backend: a NaN bound is an error, not an ignored bound
  TORCH_CHECK_VALUE(!(low.has_value() && std::isnan(*low)), "gradguide::combine: low: NaN is not a bound");
  TORCH_CHECK_VALUE(!(high.has_value() && std::isnan(*high)), "gradguide::combine: high: NaN is not a bound");
  at::Tensor coef = coef_in.to(acc_type(first.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_combine", [&] {
    combine_dispatch_k<scalar_t>(ops, coef.data_ptr<combine_acc_t<scalar_t>>(), b * groups, groups, n, ScaleArgs{},
                                 low.has_value(),
                                 low.value_or(0.0), high.has_value(), high.value_or(0.0), out);
  });
}

at::Tensor combine_cpu(const at::Tensor& coef, at::TensorList operands, std::optional<double> low,
                       std::optional<double> high) {
  check_operands(std::vector<at::Tensor>(operands.begin(), operands.end()), "gradguide::combine");
  at::Tensor out = empty_output(operands[0]);
  combine_out_cpu(coef, operands, low, high, out);
  return out;
}


// ---------------------------------------------------------------------------------------
// fused_combine: a built-in policy's coefficient program, then combine, in one call
//
// The per-row (sample, or sample x group) coefficient program (gradguide_policies.h, shared
// with the CUDA op; the plain-torch truth is gradguide/ops/policies.py) runs here in float64
// on the float64 Gram matrix, then the rows are combined as in combine. So a CPU step is one
// reduce and one fused_combine: no tiny torch ops in between. Arguments: gradguide_fused_args.h.

static double read_double(const at::Tensor& t, int64_t offset) {
  return t.scalar_type() == at::kDouble ? t.const_data_ptr<double>()[offset]
                                        : static_cast<double>(t.const_data_ptr<float>()[offset]);
}

// The checks and the coefficient program, then the combine into `out` (checked by the caller).
static void fused_combine_into(const char* op, c10::string_view policy_name, const std::vector<at::Tensor>& ops,
                               const std::optional<at::Tensor>& gram, at::TensorList vectors,
                               at::TensorList scalars, std::optional<double> low, std::optional<double> high,
                               const ScaleArgs& sc, at::Tensor& out) {
  const auto& first = ops[0];
  TORCH_CHECK_VALUE(!(low.has_value() && std::isnan(*low)), op, ": low: NaN is not a bound");
  TORCH_CHECK_VALUE(!(high.has_value() && std::isnan(*high)), op, ": high: NaN is not a bound");
  const int64_t b = first.size(0), k = static_cast<int64_t>(ops.size());
  int64_t n = 0;
  const ProgramArgs args = fused_program_args(op, policy_name, first, k, gram, vectors, scalars, n);
  const int64_t rows = b * args.groups;
  // coefficient program, per row, in float64 (rows are few: B x G)
  std::vector<double> coef(rows * k);
  for (int64_t r = 0; r < rows; ++r) row_coefficients(args, r, coef.data() + r * k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_fused_combine", [&] {
    combine_dispatch_k<scalar_t>(ops, coef.data(), rows, args.groups, n, sc, low.has_value(), low.value_or(0.0),
                                 high.has_value(), high.value_or(0.0), out);
  });
}

static std::vector<at::Tensor> fused_operands(const char* op, at::TensorList operands) {
  std::vector<at::Tensor> ops(operands.begin(), operands.end());
  check_operands(ops, op, /*row_strided=*/true);
  TORCH_CHECK_VALUE(ops[0].device().is_cpu(), op, ": operands: expected CPU tensors, got ", ops[0].device());
  return ops;
}

at::Tensor fused_combine_cpu(c10::string_view policy_name, at::TensorList operands, const std::optional<at::Tensor>& gram,
                             at::TensorList vectors, at::TensorList scalars, std::optional<double> low,
                             std::optional<double> high, const std::optional<at::Tensor>& log_scale,
                             const std::optional<at::Tensor>& slope, const std::optional<at::Tensor>& offset,
                             int64_t scaled) {
  const char* op = "gradguide::fused_combine";
  const auto ops = fused_operands(op, operands);
  const ScaleArgs sc = scale_args(op, ops[0], static_cast<int64_t>(ops.size()), log_scale, slope, offset, scaled);
  at::Tensor out = empty_output(ops[0]);
  fused_combine_into(op, policy_name, ops, gram, vectors, scalars, low, high, sc, out);
  return out;
}

// Into an existing `out` (a sampling loop's recycled buffer: no fresh pages to fault in, see
// "Outputs" at the top). `out` may overlap the inputs: exactly an operand is an in-place
// update, any other overlap is computed into a temporary and copied (gradguide_fused_args.h).
void fused_combine_out_cpu(c10::string_view policy_name, at::TensorList operands,
                           const std::optional<at::Tensor>& gram, at::TensorList vectors, at::TensorList scalars,
                           std::optional<double> low, std::optional<double> high, at::Tensor& out,
                           const std::optional<at::Tensor>& log_scale, const std::optional<at::Tensor>& slope,
                           const std::optional<at::Tensor>& offset, int64_t scaled) {
  const char* op = "gradguide::fused_combine_out";
  const auto ops = fused_operands(op, operands);
  const ScaleArgs sc = scale_args(op, ops[0], static_cast<int64_t>(ops.size()), log_scale, slope, offset, scaled);
  check_fused_out(op, out, ops[0]);
  if (fused_out_needs_temporary(out, operands, gram, vectors, scalars, log_scale, slope, offset)) {
    at::Tensor tmp = empty_output(ops[0]);
    fused_combine_into(op, policy_name, ops, gram, vectors, scalars, low, high, sc, tmp);
    out.copy_(tmp);
    return;
  }
  fused_combine_into(op, policy_name, ops, gram, vectors, scalars, low, high, sc, out);
}


// ---------------------------------------------------------------------------------------
// clip_shift: a clipped x̂_0 and the clipped guidance shift, in one pass
//
//   gradguide::clip_shift(Tensor coef_p, Tensor coef_s, Tensor[] operands, float low, float high)
//       -> (Tensor clipped, Tensor shift)
//   p = sum_k coef_p[b, k] op_k,  s = sum_k coef_s[b, k] op_k  (coef: [1 or B, K])
//   clipped = clamp(p),  shift = clamp(p + s) - clamp(p), and exactly s where neither clips:
//   formed as a difference of the two clamped values, the shift (~1e-3 of |p| in a guided
//   step) would keep only p's absolute precision (docs/architecture.md#precision). Reference: ops/reference.py.

template <int K, typename scalar_t>
static void clip_shift_impl(const std::vector<at::Tensor>& ops, const std::vector<double>& wp_all,
                            const std::vector<double>& ws_all, int64_t coef_rows, int64_t b, int64_t n, double low,
                            double high, at::Tensor& clipped, at::Tensor& shift) {
  const int64_t chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  std::array<const scalar_t*, K> base;
  for (int k = 0; k < K; ++k) base[k] = ops[k].data_ptr<scalar_t>();
  scalar_t* out_c = clipped.data_ptr<scalar_t>();
  scalar_t* out_s = shift.data_ptr<scalar_t>();
  const auto span = GG_PICK(clip_shift_span, K, scalar_t);
  at::parallel_for(0, b * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t r = item / chunks, c = item % chunks;
      const int64_t row = coef_rows == 1 ? 0 : r;
      std::array<const scalar_t*, K> ptrs;
      for (int k = 0; k < K; ++k) ptrs[k] = base[k] + r * n;
      span(ptrs.data(), wp_all.data() + row * K, ws_all.data() + row * K, c * kChunk, std::min(n, (c + 1) * kChunk),
           low, high, out_c + r * n, out_s + r * n);
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
  TORCH_CHECK_VALUE(first.device().is_cpu(), op, ": operands: expected CPU tensors, got ", first.device());
  const int64_t b = first.size(0), k = static_cast<int64_t>(ops.size());
  check_clip_shift_args(op, coef_p, coef_s, first, k, low, high);
  const int64_t rows = coef_p.size(0);
  std::vector<double> wp(rows * k), ws(rows * k);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < k; ++i) {
      wp[r * k + i] = read_double(coef_p, r * coef_p.stride(0) + i * coef_p.stride(1));
      ws[r * k + i] = read_double(coef_s, r * coef_s.stride(0) + i * coef_s.stride(1));
    }
  const int64_t n = first.numel() / b;
  at::Tensor clipped = empty_output(first);
  at::Tensor shift = empty_output(first);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_clip_shift", [&] {
    clip_shift_dispatch_k<scalar_t>(ops, wp, ws, rows, b, n, low, high, clipped, shift);
  });
  return {clipped, shift};
}

TORCH_LIBRARY(gradguide, m) {
  // the trailing optional arguments (row-strided and Σ-scaled operands, gradguide_fused_args.h)
  // keep every older call valid and its result unchanged
  m.def("reduce(Tensor[] operands, int groups, Tensor? log_scale=None, Tensor? slope=None, Tensor? offset=None, "
        "int scaled=0) -> (Tensor, Tensor)");
  m.def("combine(Tensor coef, Tensor[] operands, float? low, float? high) -> Tensor");
  m.def("combine_out(Tensor coef, Tensor[] operands, float? low, float? high, Tensor(a!) out) -> ()");
  m.def("fused_combine(str policy, Tensor[] operands, Tensor? gram, Tensor[] vectors, Tensor[] scalars, "
        "float? low, float? high, Tensor? log_scale=None, Tensor? slope=None, Tensor? offset=None, "
        "int scaled=0) -> Tensor");
  m.def("fused_combine_out(str policy, Tensor[] operands, Tensor? gram, Tensor[] vectors, Tensor[] scalars, "
        "float? low, float? high, Tensor(a!) out, Tensor? log_scale=None, Tensor? slope=None, "
        "Tensor? offset=None, int scaled=0) -> ()");
  m.def("clip_shift(Tensor coef_p, Tensor coef_s, Tensor[] operands, float low, float high) -> (Tensor, Tensor)");
}

// A device without kernels in this build (CUDA tensors in a CPU-only build, MPS, ...), and a
// call with no tensor at all (an empty operand list: the dispatcher has no device to pick a
// kernel by): the arguments' own errors first, then one naming the device, instead of the
// dispatcher's NotImplementedError. Meta / fake tensors have their own kernels
// (gradguide/ops/native_backend.py).
[[noreturn]] static void no_kernel(const char* op, at::TensorList operands) {
  check_operands(std::vector<at::Tensor>(operands.begin(), operands.end()), op);
  TORCH_CHECK_VALUE(false, op, ": operands: no kernel for ", operands[0].device().type(),
                    " tensors in this build of gradguide._C (it has CPU kernels, and CUDA ones where it was built "
                    "with nvcc and a CUDA torch)");
}

using OptT = std::optional<at::Tensor>;
std::tuple<at::Tensor, at::Tensor> reduce_fallback(at::TensorList operands, int64_t, const OptT&, const OptT&,
                                                   const OptT&, int64_t) {
  no_kernel("gradguide::reduce", operands);
}
at::Tensor combine_fallback(const at::Tensor&, at::TensorList operands, std::optional<double>,
                            std::optional<double>) {
  no_kernel("gradguide::combine", operands);
}
void combine_out_fallback(const at::Tensor&, at::TensorList operands, std::optional<double>, std::optional<double>,
                          at::Tensor&) {
  no_kernel("gradguide::combine_out", operands);
}
at::Tensor fused_combine_fallback(c10::string_view, at::TensorList operands, const std::optional<at::Tensor>&,
                                  at::TensorList, at::TensorList, std::optional<double>, std::optional<double>,
                                  const OptT&, const OptT&, const OptT&, int64_t) {
  no_kernel("gradguide::fused_combine", operands);
}
void fused_combine_out_fallback(c10::string_view, at::TensorList operands, const std::optional<at::Tensor>&,
                                at::TensorList, at::TensorList, std::optional<double>, std::optional<double>,
                                at::Tensor&, const OptT&, const OptT&, const OptT&, int64_t) {
  no_kernel("gradguide::fused_combine_out", operands);
}
std::tuple<at::Tensor, at::Tensor> clip_shift_fallback(const at::Tensor&, const at::Tensor&, at::TensorList operands,
                                                       double, double) {
  no_kernel("gradguide::clip_shift", operands);
}

TORCH_LIBRARY_IMPL(gradguide, CompositeExplicitAutograd, m) {
  m.impl("reduce", &reduce_fallback);
  m.impl("combine", &combine_fallback);
  m.impl("combine_out", &combine_out_fallback);
  m.impl("fused_combine", &fused_combine_fallback);
  m.impl("fused_combine_out", &fused_combine_out_fallback);
  m.impl("clip_shift", &clip_shift_fallback);
}

TORCH_LIBRARY_IMPL(gradguide, CPU, m) {
  m.impl("reduce", &reduce_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("combine_out", &combine_out_cpu);
  m.impl("fused_combine", &fused_combine_cpu);
  m.impl("fused_combine_out", &fused_combine_out_cpu);
  m.impl("clip_shift", &clip_shift_cpu);
}

}  // namespace gradguide

// The Python module: importing it runs the static registration above. cpu_isa() names the
// instruction set the CPU kernels run with ("avx512", "avx2" or "default"; benchmarks record it).
static PyObject* gradguide_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(gradguide::isa_name(gradguide::cpu_isa()));
}
static PyMethodDef gradguide_c_methods[] = {
    {"cpu_isa", gradguide_cpu_isa, METH_NOARGS, "The instruction set of the CPU kernels: avx512, avx2 or default."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef gradguide_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, gradguide_c_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&gradguide_c_module); }
