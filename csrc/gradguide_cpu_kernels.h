// gradguide native ops (CPU): the inner loops of reduce, combine and clip_shift.
//
// No include guard on purpose: gradguide_ops.cpp includes this file once per instruction set,
// with GG_ISA naming the namespace (isa_default, isa_avx2, isa_avx512) and GG_TARGET the
// function attribute that lets the compiler use that set (empty for the baseline), and picks
// one at run time (cpu_isa() there). Why not -march=native: the extension must run on any
// x86-64 it is copied to, and the baseline (SSE2) has 2 double lanes.
//
// Every loop works on blocks of 8 elements held in GCC/Clang vector types (dvec: 8 doubles,
// one AVX-512 register, two AVX2 ones): operands are loaded once per block, converted to
// float64 (exact for fp16/bf16/fp32), and each of the K(K+1)/2 Gram products and K sums
// accumulates into its own 8-lane register. The lane count and the order of every sum are
// the same on every instruction set (and the build has -ffp-contract=off), so all three
// variants give bit-identical results (tests/test_kernels.py checks this).
//
// References: gradguide/ops/reference.py (reduce, combine, clip_shift), plain torch.

#ifndef GG_ROW_SCALE_DEFINED
#define GG_ROW_SCALE_DEFINED
// Shared by every instruction set's variant (one type, so GG_PICK's pointers agree).
template <typename scalar_t>
using scale_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
struct RowScale {            // one row's Σ-scaling (see load_scaled); unused where the mask bit is clear
  const scalar_t* v;         // the row of log_scale
  scale_t<scalar_t> a[8], c[8];
  unsigned mask;
};
#endif

namespace GG_ISA {

typedef double dvec __attribute__((vector_size(64)));
typedef float fvec __attribute__((vector_size(32)));
constexpr int kW = 8;  // elements per block (lanes of dvec)

#define GG_INLINE inline __attribute__((always_inline))

template <typename scalar_t>
GG_TARGET GG_INLINE dvec load_block(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    dvec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    fvec v;
    std::memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, dvec);
  } else {  // fp16 / bf16: widen to float (exact) element by element, then to double
    fvec v;
    for (int l = 0; l < kW; ++l) v[l] = static_cast<float>(p[l]);
    return __builtin_convertvector(v, dvec);
  }
}

// the first m < kW elements, zeros after them (zeros add nothing to a sum or a product)
template <typename scalar_t>
GG_TARGET GG_INLINE dvec load_tail(const scalar_t* p, int64_t m) {
  dvec v = {};
  for (int64_t l = 0; l < m; ++l) {
    if constexpr (std::is_same_v<scalar_t, double>)
      v[l] = p[l];
    else
      v[l] = static_cast<double>(static_cast<float>(p[l]));
  }
  return v;
}

template <typename scalar_t>
GG_TARGET GG_INLINE void store_block(scalar_t* p, dvec v) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    std::memcpy(p, &v, sizeof v);
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    const fvec f = __builtin_convertvector(v, fvec);
    std::memcpy(p, &f, sizeof f);
  } else {
    for (int l = 0; l < kW; ++l) p[l] = static_cast<scalar_t>(v[l]);
  }
}

template <typename scalar_t>
GG_TARGET GG_INLINE void store_tail(scalar_t* p, dvec v, int64_t m) {
  for (int64_t l = 0; l < m; ++l) p[l] = static_cast<scalar_t>(v[l]);
}

// Σ-scaled operands: op * exp(a * v + c) per element (a, c: the row's slope and offset of the
// operand), formed in float for fp16/bf16/fp32 data and in double for fp64 (gradguide/ops/reference.py,
// Scaling), then widened: the product is the operand's value, never rounded to its dtype.
//
// exp, 8 lanes at a time (libm's scalar exp made the scaled pass ~20x slower than the memory
// bound): exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in two parts (|r| <= ln2/2;
// the high part has few bits, so n * hi is exact), exp(r) by its Taylor polynomial (degree 7 for
// float: truncation r^8/8! < 3e-9; degree 13 for double: < 5e-18 relative), 2^n applied as two
// exponent-field factors (n/2 each) so subnormal and overflowing results round once. Plain
// IEEE mul/add in a fixed order (-ffp-contract=off): every instruction set gives the same bits.
// NaN stays NaN; +inf -> inf, -inf -> 0 (the clamps); tests/kernels/test_scaled_operands_native.py
// checks it against float64 exp.
typedef int32_t ivec __attribute__((vector_size(32)));
typedef int64_t lvec __attribute__((vector_size(64)));

GG_TARGET GG_INLINE fvec vexp(fvec x) {
  const fvec lo = fvec{} - 104.0f, hi = fvec{} + 89.0f;  // exp(-104) < half the least subnormal; exp(89) > max
  fvec t = x < lo ? lo : x;                              // NaN compares false: stays NaN
  t = t > hi ? hi : t;
  const fvec magic = fvec{} + 12582912.0f;               // 1.5 * 2^23: adding it rounds to an integer
  fvec n = (t * 1.44269502162933349609f + magic) - magic;
  n = n == n ? n : fvec{};                               // NaN lanes: n = 0 (the result is NaN anyway)
  const fvec r = (t - n * 0.693359375f) - n * -2.12194441701285541058e-4f;
  fvec p = fvec{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const ivec ni = __builtin_convertvector(n, ivec);
  const ivec n1 = ni >> 1, n2 = ni - n1;
  const fvec y = (p * (fvec)((n1 + 127) << 23)) * (fvec)((n2 + 127) << 23);
  return x == x ? y : x;
}

GG_TARGET GG_INLINE dvec vexp(dvec x) {
  const dvec lo = dvec{} - 746.0, hi = dvec{} + 710.0;   // beyond: 0 and inf
  dvec t = x < lo ? lo : x;
  t = t > hi ? hi : t;
  const dvec magic = dvec{} + 6755399441055744.0;         // 1.5 * 2^52
  dvec n = (t * 1.4426950408889634074 + magic) - magic;
  n = n == n ? n : dvec{};
  const dvec r = (t - n * 0.6931471803691238164902) - n * 1.9082149292705877000220e-10;
  constexpr double c[14] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
                            1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0};
  dvec p = dvec{} + c[13];
#pragma GCC unroll 13
  for (int i = 12; i >= 0; --i) p = p * r + c[i];
  const lvec ni = __builtin_convertvector(n, lvec);
  const lvec n1 = ni >> 1, n2 = ni - n1;
  const dvec y = (p * (dvec)((n1 + 1023) << 52)) * (dvec)((n2 + 1023) << 52);
  return x == x ? y : x;
}

// the first m <= kW scaled elements, zeros after them (as load_tail; also where exp(c) = inf)
template <typename scalar_t>
GG_TARGET GG_INLINE dvec load_scaled(const scalar_t* p, const scalar_t* v, scale_t<scalar_t> a, scale_t<scalar_t> c,
                                     int64_t m) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    dvec x = {}, w = {};
    for (int64_t l = 0; l < m; ++l) {
      x[l] = p[l];
      w[l] = v[l];
    }
    dvec y = x * vexp(w * a + c);
    for (int64_t l = m; l < kW; ++l) y[l] = 0;
    return y;
  } else {
    fvec x = {}, w = {};
    for (int64_t l = 0; l < m; ++l) {
      x[l] = static_cast<float>(p[l]);
      w[l] = static_cast<float>(v[l]);
    }
    fvec y = x * vexp(w * a + c);
    for (int64_t l = m; l < kW; ++l) y[l] = 0;
    return __builtin_convertvector(y, dvec);
  }
}

// operand k's block at e (m elements): scaled where S and its mask bit say so
template <bool S, typename scalar_t>
GG_TARGET GG_INLINE dvec load_operand(const scalar_t* row, const RowScale<scalar_t>& rs, int k, int64_t e, int64_t m) {
  if constexpr (S) {
    if (rs.mask >> k & 1u) return load_scaled(row + e, rs.v + e, rs.a[k], rs.c[k], m);
  }
  return m == kW ? load_block(row + e) : load_tail(row + e, m);
}

GG_TARGET GG_INLINE double fold(dvec v) {  // lanes added in a fixed order
  double s = v[0];
  for (int l = 1; l < kW; ++l) s += v[l];
  return s;
}

// ---------------------------------------------------------------------------------------
// reduce: partial Gram (upper triangle, row-major i <= j) and sums of K rows over [begin, end)

template <int K>
GG_TARGET GG_INLINE void gram_block(const dvec (&x)[K], dvec (&acc)[K * (K + 1) / 2], dvec (&sum)[K]) {
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) sum[k] += x[k];
  int p = 0;
#pragma GCC unroll 8
  for (int i = 0; i < K; ++i)
#pragma GCC unroll 8
    for (int j = i; j < K; ++j, ++p) acc[p] += x[i] * x[j];  // exact: fp32 x fp32 fits a double
}

template <int K, typename scalar_t, bool S>
GG_TARGET void reduce_span(const scalar_t* const* rows, const RowScale<scalar_t>& rs, int64_t begin, int64_t end,
                           double* gram_out, double* sums_out) {
  constexpr int P = K * (K + 1) / 2;
  dvec acc[P], sum[K];
#pragma GCC unroll 64
  for (int p = 0; p < P; ++p) acc[p] = dvec{};
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) sum[k] = dvec{};
  int64_t e = begin;
  for (; e + kW <= end; e += kW) {
    dvec x[K];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) x[k] = load_operand<S>(rows[k], rs, k, e, kW);
    gram_block<K>(x, acc, sum);
  }
  if (e < end) {
    dvec x[K];
    for (int k = 0; k < K; ++k) x[k] = load_operand<S>(rows[k], rs, k, e, end - e);
    gram_block<K>(x, acc, sum);
  }
  for (int p = 0; p < P; ++p) gram_out[p] = fold(acc[p]);
  for (int k = 0; k < K; ++k) sums_out[k] = fold(sum[k]);
}

// The same sums (lane l adds the elements begin + l, begin + l + 8, ... in order, zero padding
// at the end, lanes folded in order) for instruction sets with too few registers to hold
// K(K+1)/2 + K accumulators of 8 doubles (AVX2: 16 registers of 4 doubles; SSE2/NEON): a tile
// of each operand is converted to float64 in L1, then each product runs over the tile with
// only its own 8 lanes live. Bit-identical to reduce_span.
template <int K, typename scalar_t, bool S>
GG_TARGET void reduce_span_tiled(const scalar_t* const* rows, const RowScale<scalar_t>& rs, int64_t begin,
                                 int64_t end, double* gram_out, double* sums_out) {
  constexpr int P = K * (K + 1) / 2;
  constexpr int64_t kTile = 256;  // K tiles of 2 KiB: L1-resident for K = 8
  alignas(64) double acc[P][kW] = {}, sum[K][kW] = {};
  alignas(64) double tile[K][kTile];
  for (int64_t start = begin; start < end; start += kTile) {
    const int64_t n = std::min(kTile, end - start);
    const int64_t padded = (n + kW - 1) / kW * kW;
    for (int k = 0; k < K; ++k) {
      const scalar_t* src = rows[k] + start;
      bool scaled = false;
      if constexpr (S) scaled = rs.mask >> k & 1u;
      if (scaled) {
        const scalar_t* v = rs.v + start;
        for (int64_t e = 0; e < n; e += kW) {
          const int64_t m = std::min<int64_t>(kW, n - e);
          const dvec x = load_scaled(src + e, v + e, rs.a[k], rs.c[k], m);
          for (int64_t l = 0; l < m; ++l) tile[k][e + l] = x[l];
        }
      } else {
        for (int64_t e = 0; e < n; ++e) tile[k][e] = static_cast<double>(src[e]);
      }
      for (int64_t e = n; e < padded; ++e) tile[k][e] = 0;
    }
    for (int k = 0; k < K; ++k)
      for (int64_t e = 0; e < padded; e += kW)
        for (int l = 0; l < kW; ++l) sum[k][l] += tile[k][e + l];
    int p = 0;
    for (int i = 0; i < K; ++i)
      for (int j = i; j < K; ++j, ++p)
        for (int64_t e = 0; e < padded; e += kW)
          for (int l = 0; l < kW; ++l) acc[p][l] += tile[i][e + l] * tile[j][e + l];
  }
  for (int p = 0; p < P; ++p) {
    double s = acc[p][0];
    for (int l = 1; l < kW; ++l) s += acc[p][l];
    gram_out[p] = s;
  }
  for (int k = 0; k < K; ++k) {
    double s = sum[k][0];
    for (int l = 1; l < kW; ++l) s += sum[k][l];
    sums_out[k] = s;
  }
}

// ---------------------------------------------------------------------------------------
// combine: dst[e] = clamp(sum_k w[k] * rows[k][e]) over [begin, end), in float64.
// Every operand is multiplied, even by a zero weight: 0 * inf = NaN, as the reference.
// Comparisons are false for NaN, so the clamp keeps NaN (torch.clamp does the same).

template <int K, typename scalar_t, bool S>
GG_TARGET GG_INLINE dvec combine_block(const dvec (&w)[K], const scalar_t* const* rows, const RowScale<scalar_t>& rs,
                                       int64_t e, int64_t m, bool has_low, dvec low, bool has_high, dvec high) {
  dvec acc = w[0] * load_operand<S>(rows[0], rs, 0, e, m);
#pragma GCC unroll 8
  for (int k = 1; k < K; ++k) acc += w[k] * load_operand<S>(rows[k], rs, k, e, m);
  if (has_low) acc = acc < low ? low : acc;
  if (has_high) acc = acc > high ? high : acc;
  return acc;
}

template <int K, typename scalar_t, bool S>
GG_TARGET void combine_span(const scalar_t* const* rows, const RowScale<scalar_t>& rs, const double* weights,
                            int64_t begin, int64_t end, bool has_low, double low_d, bool has_high, double high_d,
                            scalar_t* dst) {
  dvec w[K];
  for (int k = 0; k < K; ++k) w[k] = dvec{} + weights[k];
  const dvec low = dvec{} + low_d, high = dvec{} + high_d;
  int64_t e = begin;
  for (; e + kW <= end; e += kW)
    store_block(dst + e, combine_block<K, scalar_t, S>(w, rows, rs, e, kW, has_low, low, has_high, high));
  if (e < end)
    store_tail(dst + e, combine_block<K, scalar_t, S>(w, rows, rs, e, end - e, has_low, low, has_high, high),
               end - e);
}

// ---------------------------------------------------------------------------------------
// clip_shift: p = sum_k wp[k] x_k, s = sum_k ws[k] x_k; clipped = clamp(p),
// shift = s where neither p nor p + s clips, else clamp(p + s) - clamp(p)

template <int K, typename scalar_t>
GG_TARGET GG_INLINE void clip_shift_block(const dvec (&wp)[K], const dvec (&ws)[K], const scalar_t* const* rows,
                                          int64_t e, int64_t m, dvec low, dvec high, dvec& clipped, dvec& shift) {
  dvec p = {}, s = {};
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    const dvec v = m == kW ? load_block(rows[k] + e) : load_tail(rows[k] + e, m);
    p += wp[k] * v;
    s += ws[k] * v;
  }
  const dvec q = p + s;
  const dvec pc = p < low ? low : (p > high ? high : p);
  const dvec qc = q < low ? low : (q > high ? high : q);
  clipped = pc;
  shift = ((p > low) & (p < high) & (q > low) & (q < high)) ? s : qc - pc;
}

template <int K, typename scalar_t>
GG_TARGET void clip_shift_span(const scalar_t* const* rows, const double* wp_in, const double* ws_in, int64_t begin,
                               int64_t end, double low_d, double high_d, scalar_t* out_c, scalar_t* out_s) {
  dvec wp[K], ws[K];
  for (int k = 0; k < K; ++k) {
    wp[k] = dvec{} + wp_in[k];
    ws[k] = dvec{} + ws_in[k];
  }
  const dvec low = dvec{} + low_d, high = dvec{} + high_d;
  dvec c, s;
  int64_t e = begin;
  for (; e + kW <= end; e += kW) {
    clip_shift_block<K>(wp, ws, rows, e, kW, low, high, c, s);
    store_block(out_c + e, c);
    store_block(out_s + e, s);
  }
  if (e < end) {
    clip_shift_block<K>(wp, ws, rows, e, end - e, low, high, c, s);
    store_tail(out_c + e, c, end - e);
    store_tail(out_s + e, s, end - e);
  }
}

#undef GG_INLINE

}  // namespace GG_ISA
