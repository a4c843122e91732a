// gradguide native ops: the per-row coefficient programs of the built-in policies, shared by
// the CPU op (gradguide_ops.cpp) and the CUDA op (gradguide_ops_cuda.cu), so the CPU tests
// exercise the very code a GPU runs. Plain C++ with GG_HD = __host__ __device__ under nvcc:
// no std:: containers or functions, float64 throughout.
//
// A row is a sample (or a sample x group); its program maps the policy's coefficient vectors
// (LinCombs over the K operands) and scalars to the K weights of the combine, taking inner
// products from the row's float64 Gram matrix. A twin of gradguide/ops/policies.py::PROGRAMS
// (the plain-torch truth, where each formula is defined): tests/test_kernels.py holds this table
// to the Python one (names, arities) and every program to it on random inputs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define GG_HD __host__ __device__
#else
#define GG_HD
#endif

namespace gradguide {

constexpr int kMaxK = 8;

enum Policy { kLinear, kCfg, kPxpA, kPxpB, kPxpC, kApg, kLookahead, kTcfg, kMambo };

struct PolicyInfo {
  const char* name;
  Policy id;
  int n_vectors, n_scalars;
  bool needs_gram;
};

// vectors and scalars, in the order of gradguide/ops/policies.py::POLICIES
constexpr PolicyInfo kPolicies[] = {
    {"linear", kLinear, 1, 0, false}, {"cfg", kCfg, 3, 1, false},  {"pxp-a", kPxpA, 4, 1, true},
    {"pxp-b", kPxpB, 4, 1, true},     {"pxp-c", kPxpC, 3, 4, true}, {"apg", kApg, 3, 4, true},
    {"lookahead", kLookahead, 4, 8, true}, {"tcfg", kTcfg, 3, 3, true}, {"mambo", kMambo, 3, 4, true}};
constexpr int kMaxVectors = 4, kMaxScalars = 8;
constexpr const char* kPolicyNames = "linear, cfg, pxp-a, pxp-b, pxp-c, apg, lookahead, tcfg or mambo";

// host only: the table entry named `name`, or nullptr
inline const PolicyInfo* find_policy(const char* name, size_t len) {
  for (const auto& p : kPolicies)
    if (std::strlen(p.name) == len && std::strncmp(p.name, name, len) == 0) return &p;
  return nullptr;
}

struct Vec {
  double v[kMaxK];
  GG_HD double& operator[](int i) { return v[i]; }
  GG_HD const double& operator[](int i) const { return v[i]; }
};

GG_HD inline Vec zero_vec() {
  Vec r;
  for (int i = 0; i < kMaxK; ++i) r[i] = 0.0;
  return r;
}
// std::min / std::max's exact rules (NaN handling included), usable on the device
GG_HD inline double min_d(double a, double b) { return b < a ? b : a; }
GG_HD inline double max_d(double a, double b) { return a < b ? b : a; }
// num / den, 0 where den == 0 (a zero-norm partner), as policies.py's _safe_div: a NaN den
// divides (NaN), it is not a zero
GG_HD inline double safe_div(double num, double den) { return den != 0.0 ? num / den : 0.0; }
GG_HD inline bool finite_d(double x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}
GG_HD inline double nan_d() {
#if defined(__CUDA_ARCH__)
  return nan("");
#else
  return std::numeric_limits<double>::quiet_NaN();
#endif
}

struct RowProgram {
  const double* gram;  // [Kg, Kg] of this row (nullptr without a Gram)
  int kg, k;
  GG_HD double dot(const Vec& u, const Vec& v) const {  // u^T G v over the first Kg entries
    double total = 0;
    for (int i = 0; i < kg; ++i) {
      double gv = 0;
      for (int j = 0; j < kg; ++j) gv += gram[i * kg + j] * v[j];
      total += u[i] * gv;
    }
    return total;
  }
  GG_HD Vec axpy(const Vec& a, double f, const Vec& b) const {  // a + f b
    Vec r = zero_vec();
    for (int i = 0; i < k; ++i) r[i] = a[i] + f * b[i];
    return r;
  }
  // PC_delta(a|b) = a - delta min(0, <a,b>)/|b|^2 b  (a where |b| = 0)
  GG_HD Vec pc(const Vec& a, const Vec& b, double delta) const {
    const double f = safe_div(min_d(dot(a, b), 0.0), max_d(dot(b, b), 0.0));
    return axpy(a, -f * delta, b);
  }
};

// C = policy(vectors v, scalars s) for one row
GG_HD inline Vec coefficients(Policy policy, const RowProgram& p, const Vec* v, const double* s) {
  const int k = p.k;
  Vec c = zero_vec();
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
      Vec delta = zero_vec();
      for (int i = 0; i < k; ++i) delta[i] = (v[1][i] - v[2][i]) * (s[0] - 1.0);
      const Vec a = p.pc(v[1], delta, s[1]), b = p.pc(delta, v[1], s[2]);
      for (int i = 0; i < k; ++i) c[i] = v[0][i] + s[3] * (a[i] + b[i]);
      return c;
    }
    case kApg: {  // base, d_cond, d_uncond; scale, eta, norm_threshold, post
      const Vec& dc = v[1];
      Vec delta = zero_vec();
      for (int i = 0; i < k; ++i) delta[i] = dc[i] - v[2][i];
      const double r = s[2];
      const double norm = sqrt(max_d(p.dot(delta, delta), 0.0));
      const double clip = norm > 0 ? min_d(safe_div(r, norm), 1.0) : 1.0;
      if (r > 0)
        for (int i = 0; i < k; ++i) delta[i] *= clip;
      const double f = safe_div(p.dot(delta, dc), max_d(p.dot(dc, dc), 0.0));
      for (int i = 0; i < k; ++i) {
        const double par = dc[i] * f;
        c[i] = v[0][i] + s[3] * (dc[i] + (delta[i] - par + par * s[1]) * (s[0] - 1.0));
      }
      return c;
    }
    case kTcfg: {  // base, cond, uncond; scale, original, post (u' from the 2 x 2 Gram of cond, uncond)
      const Vec &cv = v[1], &uv = v[2];
      const double a = max_d(p.dot(cv, cv), 0.0), d = max_d(p.dot(uv, uv), 0.0), b = p.dot(cv, uv);
      const double r = sqrt((a - d) * (a - d) + 4.0 * b * b);
      const double cos2 = r > 0 ? safe_div(a - d, r) : -1.0, sin2 = r > 0 ? safe_div(2.0 * b, r) : 0.0;
      for (int i = 0; i < k; ++i) {
        const double u1 = cv[i] * (0.5 * sin2) + uv[i] * (0.5 * (1.0 - cos2));
        const double anchor = s[1] != 0.0 ? cv[i] : u1;
        c[i] = v[0][i] + s[2] * (anchor + s[0] * (cv[i] - u1));
      }
      return c;
    }
    case kMambo: {  // base, cond, uncond; scale, alpha, original, post
      const Vec &cv = v[1], &uv = v[2];
      Vec diff = zero_vec();
      for (int i = 0; i < k; ++i) diff[i] = cv[i] - uv[i];
      const double norm_u = sqrt(max_d(p.dot(uv, uv), 0.0));
      double decay = exp(-s[1] * safe_div(sqrt(max_d(p.dot(diff, diff), 0.0)), norm_u));
      if (!(norm_u > 0) && s[1] > 0) decay = 0.0;
      const bool original = s[2] != 0.0;
      const double weight = original ? s[0] * decay : 1.0 + (s[0] - 1.0) * decay;
      for (int i = 0; i < k; ++i) c[i] = v[0][i] + s[3] * ((original ? cv[i] : uv[i]) + weight * diff[i]);
      return c;
    }
    case kLookahead: {  // base, x0, vjp, reward; a, h, sigma, target, multiplier, beta, beta_per_sample, post
      const double a2 = s[0] * s[0];
      const double per_sample = (a2 / 2) / (a2 * s[2] * s[2] + s[1] * max_d(p.dot(v[2], v[2]), 0.0));
      const double beta = s[6] != 0.0 ? per_sample : s[5];
      const double residual = 2 * s[4] * (s[3] - p.dot(v[3], v[1]));
      for (int i = 0; i < k; ++i) c[i] = v[0][i] + v[2][i] * (s[7] * residual * beta);
      return c;
    }
  }
  return c;
}

// One coefficient vector ([1 or B, 1 or G, K]) or scalar (1 or B elements) as the program
// reads it: float32 or float64 data, strides in elements, 0 along a broadcast dimension.
struct ArgView {
  const void* data;
  int64_t s0, s1, s2;
  bool is_double;
  GG_HD double at(int64_t offset) const {
    return is_double ? static_cast<const double*>(data)[offset]
                     : static_cast<double>(static_cast<const float*>(data)[offset]);
  }
};

// Everything a row's program reads (built and checked on the host: gradguide_fused_args.h).
struct ProgramArgs {
  Policy policy;
  int k, kg;              // operands; Gram size (0 without a Gram)
  int64_t groups;         // rows = B x groups
  const double* gram;     // [B, G, Kg, Kg] contiguous float64, or nullptr
  int n_vectors, n_scalars;
  ArgView vectors[kMaxVectors], scalars[kMaxScalars];
};

// The K combine weights of row `row` (= sample b x groups + group g), in float64.
// The non-finite rule of every backend (gradguide/ops/policies.py): a NaN or inf among the
// row's program inputs (its Gram block, its coefficient vectors, the sample's scalars), or a
// non-finite weight computed from them, makes all K weights NaN, so the whole row is NaN.
// (Comparisons and the zero-norm branch would otherwise let some NaNs through and not others.)
GG_HD inline void row_coefficients(const ProgramArgs& a, int64_t row, double* weights) {
  const int64_t b = row / a.groups, g = row % a.groups;
  Vec v[kMaxVectors];
  double s[kMaxScalars];
  bool finite = true;
  for (int j = 0; j < kMaxVectors; ++j) v[j] = zero_vec();
  for (int j = 0; j < kMaxScalars; ++j) s[j] = 0.0;
  for (int j = 0; j < a.n_vectors; ++j) {
    const ArgView& t = a.vectors[j];
    for (int i = 0; i < a.k; ++i) {
      v[j][i] = t.at(b * t.s0 + g * t.s1 + i * t.s2);
      finite = finite && finite_d(v[j][i]);
    }
  }
  for (int j = 0; j < a.n_scalars; ++j) {
    s[j] = a.scalars[j].at(b * a.scalars[j].s0);
    finite = finite && finite_d(s[j]);
  }
  const double* gram = a.gram ? a.gram + row * a.kg * a.kg : nullptr;
  if (gram)
    for (int i = 0; i < a.kg * a.kg; ++i) finite = finite && finite_d(gram[i]);
  const RowProgram prog{gram, a.kg, a.k};
  const Vec c = coefficients(a.policy, prog, v, s);
  for (int i = 0; i < a.k; ++i) finite = finite && finite_d(c[i]);
  for (int i = 0; i < a.k; ++i) weights[i] = finite ? c[i] : nan_d();
}

}  // namespace gradguide
