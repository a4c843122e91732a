// gradguide native ops (CUDA): the same two passes as gradguide_ops.cpp, registered for the
// CUDA dispatch key of the schemas defined there (built into the same extension).
//
// reduce: stage 1 grid = rows x splits blocks of kThreads threads; each thread accumulates
// K(K+1)/2 products and K sums (fp32; fp64 for fp64) over a grid-strided slice of its split,
// a shared-memory tree reduces the block to one partial; stage 2 (one thread per row and
// entry) adds the partials in split order (deterministic; no atomics).
// combine: one thread per element (grid-stride), weights of its row from global memory,
// every operand multiplied (0 * inf = NaN, as the reference), NaN-preserving clamp.
// fused_combine: grid = rows x blocks_per_row; thread 0 of each block runs its row's
// coefficient program in float64 (gradguide_policies.h: the same code as the CPU op, so the
// CPU tests check its math) into shared memory, then the block streams its part of the row
// with 16-byte loads (4 fp32, 2 fp64, 8 fp16/bf16) where the operands, the output and the
// row length allow, else element by element. One launch per step: no coefficient tensors.
// fused_combine_out: the same into an existing `out` (a sampling loop's recycled buffer).
// clip_shift: the same grid and loads, two outputs (see gradguide_ops.cpp).
// Accumulation: float32 for fp32/fp16/bf16 (float64 for fp64), as the Triton kernels; the
// CPU op accumulates combine in float64 (reference.py says why each).
// Row-strided and Σ-scaled operands (reduce, fused_combine): rows start at p + b * stride(0) + g * n
// (16-byte loads where every row start is aligned), op * exp(slope * v + offset) formed as it
// loads (float for fp16/bf16/fp32 data; double for fp64): gradguide_fused_args.h, ScaleArgs.
// Limits: K <= 8 operands of one dtype on one device (checked); per-step scalars
// are read from device tensors (no host sync). Status: compiled for sm_80 / sm_90 by the
// compile gates (gradguide/bench/compile_gates.py); not run on a GPU in this repository's CI.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "gradguide_fused_args.h"
#include "gradguide_policies.h"

namespace gradguide {

constexpr int kMaxKCuda = kMaxK;
constexpr int kThreads = 256;

static int64_t multiprocessors(const at::Device& device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()));
  return std::max(count, 1);
}

template <typename scalar_t>
struct Ptrs {
  const scalar_t* p[kMaxKCuda];
};

// Row-strided operands (reduce, fused_combine): row r = (b, g) of operand k starts at
// p[k] + b * s0[k] + g * n (contiguous operands: s0 = G * n); see gradguide_fused_args.h.
template <typename scalar_t>
struct RowPtrs {
  const scalar_t* p[kMaxKCuda];
  int64_t s0[kMaxKCuda];
  int64_t groups;
};

template <typename scalar_t>
static RowPtrs<scalar_t> row_ptrs(const std::vector<at::Tensor>& ops, int64_t groups) {
  RowPtrs<scalar_t> r{};
  for (size_t k = 0; k < ops.size(); ++k) {
    r.p[k] = ops[k].const_data_ptr<scalar_t>();
    r.s0[k] = batch_stride(ops[k]);
  }
  r.groups = groups;
  return r;
}

// Σ-scaled operands: op * exp(slope * v + offset), formed in float for fp16/bf16/fp32 data and in
// double for fp64 (gradguide/ops/reference.py, Scaling), then used as the operand's value.
template <typename T>
struct ScaleOf { using type = float; };
template <>
struct ScaleOf<double> { using type = double; };

// float exp as the CPU kernels compute it (gradguide_cpu_kernels.h, vexp: range reduction by
// ln 2, Taylor degree 7, 2^n in two exponent-field factors), not expf: the build's
// --use_fast_math makes expf the approximate __expf, whose error grows with |x|. FMAs here (the
// CPU variant has none), so the bits may differ from the CPU's by an ulp; subnormal results
// flush to zero under fast math. NaN stays NaN, inf -> inf, -inf -> 0.
__device__ __forceinline__ float scale_exp(float x) {
  const float t = fminf(fmaxf(x, -104.0f), 89.0f);   // (a NaN x is returned below)
  const float n = rintf(t * 1.44269502162933349609f);
  const float r = fmaf(n, 2.12194441701285541058e-4f, fmaf(n, -0.693359375f, t));
  float p = 1.0f / 5040.0f;
  p = fmaf(p, r, 1.0f / 720.0f);
  p = fmaf(p, r, 1.0f / 120.0f);
  p = fmaf(p, r, 1.0f / 24.0f);
  p = fmaf(p, r, 1.0f / 6.0f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  const int ni = __float2int_rn(n), n1 = ni >> 1, n2 = ni - n1;
  const float y = (p * __int_as_float((n1 + 127) << 23)) * __int_as_float((n2 + 127) << 23);
  return x != x ? x : y;
}
__device__ __forceinline__ double scale_exp(double x) { return exp(x); }   // fast math leaves double alone

// accumulation: double for float and double data (small combinations of large operands cancel:
// gradguide/kernels/reduce.py's header, docs/architecture.md#precision; per element a few FMAs, far under the memory bound even
// at consumer GPUs' fp64 rate), float for half/bfloat16 (their products are exact in float)
template <typename T>
struct AccOf { using type = float; };
template <>
struct AccOf<float> { using type = double; };
template <>
struct AccOf<double> { using type = double; };

static at::ScalarType acc_type(at::ScalarType data) {
  return data == at::kHalf || data == at::kBFloat16 ? at::kFloat : at::kDouble;
}

// `row_strided`: samples contiguous with any batch stride (reduce, fused_combine); otherwise contiguous.
static void check_cuda_operands(const std::vector<at::Tensor>& ops, const char* op, bool row_strided = false) {
  TORCH_CHECK_VALUE(!ops.empty() && ops.size() <= kMaxKCuda, op, ": operands: expected 1 to ", kMaxKCuda,
              " tensors, got ", ops.size());
  const auto& first = ops[0];
  TORCH_CHECK_VALUE(first.is_cuda(), op, ": operands: expected CUDA tensors, got ", first.device());
  TORCH_CHECK_VALUE(first.dim() >= 1 && first.size(0) >= 1, op, ": operands: expected [B, ...] with B >= 1, got ",
              first.sizes());
  for (size_t k = 0; k < ops.size(); ++k) {
    TORCH_CHECK_TYPE(ops[k].scalar_type() == first.scalar_type(), op, ": operands[", k, "]: dtype ",
                     ops[k].scalar_type(), " differs from operands[0]'s ", first.scalar_type());
    TORCH_CHECK_VALUE(ops[k].sizes() == first.sizes() && ops[k].scalar_type() == first.scalar_type() &&
                    ops[k].device() == first.device(),
                op, ": operands[", k, "]: shape, dtype and device must match operands[0]");
    if (row_strided) {
      TORCH_CHECK_VALUE(samples_contiguous(ops[k]), op, ": operands[", k,
                        "]: expected contiguous samples (any batch stride), got strides ", ops[k].strides());
    } else {
      TORCH_CHECK_VALUE(ops[k].is_contiguous(), op, ": operands[", k, "]: expected a contiguous tensor");
    }
  }
}

template <int K, typename scalar_t, typename acc_t, bool S>
__global__ void reduce_partials_kernel(RowPtrs<scalar_t> ptrs, ScaleArgs scale, int64_t n, int64_t split_len,
                                       int64_t splits, acc_t* part) {
  using T = typename ScaleOf<scalar_t>::type;
  constexpr int P = K * (K + 1) / 2 + K;
  __shared__ acc_t shared[kThreads];
  const int64_t item = blockIdx.x;
  const int64_t row = item / splits, split = item % splits;
  const int64_t b = row / ptrs.groups, g = row % ptrs.groups;
  const int64_t lo = split * split_len, hi = min(n, lo + split_len);
  T a[K], c[K];
  const scalar_t* v_row = nullptr;
  if constexpr (S) {
    v_row = static_cast<const scalar_t*>(scale.v) + b * scale.v_s0 + g * n;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      a[k] = static_cast<T>(scale.slope[b * scale.slope_s0 + k * scale.slope_s1]);
      c[k] = static_cast<T>(scale.offset[b * scale.offset_s0 + k * scale.offset_s1]);
    }
  }
  acc_t acc[P];
#pragma unroll
  for (int p = 0; p < P; ++p) acc[p] = 0;
  for (int64_t e = lo + threadIdx.x; e < hi; e += blockDim.x) {
    acc_t x[K];
    T v = 0;
    if constexpr (S) v = static_cast<T>(v_row[e]);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const scalar_t raw = ptrs.p[k][b * ptrs.s0[k] + g * n + e];
      if (S && (scale.mask >> k & 1u))
        x[k] = static_cast<acc_t>(static_cast<T>(raw) * scale_exp(v * a[k] + c[k]));
      else
        x[k] = static_cast<acc_t>(raw);
    }
    int p = 0;
#pragma unroll
    for (int i = 0; i < K; ++i)
#pragma unroll
      for (int j = i; j < K; ++j) acc[p++] += x[i] * x[j];
#pragma unroll
    for (int k = 0; k < K; ++k) acc[p++] += x[k];
  }
  for (int p = 0; p < P; ++p) {  // block tree reduction, one entry at a time
    shared[threadIdx.x] = acc[p];
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) part[item * P + p] = shared[0];
    __syncthreads();
  }
}

template <int K, typename acc_t>
__global__ void reduce_finish_kernel(const acc_t* part, int64_t rows, int64_t splits, acc_t* gram, acc_t* sums) {
  constexpr int P = K * (K + 1) / 2 + K;
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= rows * P) return;
  const int64_t row = idx / P;
  const int p = idx % P;
  acc_t total = 0;
  for (int64_t s = 0; s < splits; ++s) total += part[(row * splits + s) * P + p];
  if (p < K * (K + 1) / 2) {
    int i = 0, q = p;
    while (q >= K - i) { q -= K - i; ++i; }
    const int j = i + q;
    gram[(row * K + i) * K + j] = total;
    gram[(row * K + j) * K + i] = total;
  } else {
    sums[row * K + (p - K * (K + 1) / 2)] = total;
  }
}

template <int K, typename scalar_t>
static void reduce_launch(const std::vector<at::Tensor>& ops, int64_t rows, int64_t groups, int64_t n,
                          const ScaleArgs& scale, at::Tensor& gram, at::Tensor& sums) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int P = K * (K + 1) / 2 + K;
  const RowPtrs<scalar_t> ptrs = row_ptrs<scalar_t>(ops, groups);
  const int64_t target = 4 * multiprocessors(ops[0].device());
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>({1024, (target + rows - 1) / rows,
                                                          (n + kThreads - 1) / kThreads}));
  const int64_t split_len = (n + splits - 1) / splits;
  splits = (n + split_len - 1) / split_len;
  auto part = at::empty({rows * splits * P}, gram.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (scale.mask)
    reduce_partials_kernel<K, scalar_t, acc_t, true><<<rows * splits, kThreads, 0, stream>>>(
        ptrs, scale, n, split_len, splits, part.data_ptr<acc_t>());
  else
    reduce_partials_kernel<K, scalar_t, acc_t, false><<<rows * splits, kThreads, 0, stream>>>(
        ptrs, scale, n, split_len, splits, part.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = rows * P;
  reduce_finish_kernel<K, acc_t><<<(total + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      part.data_ptr<acc_t>(), rows, splits, gram.data_ptr<acc_t>(), sums.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> reduce_cuda(at::TensorList operands, int64_t groups,
                                               const std::optional<at::Tensor>& log_scale,
                                               const std::optional<at::Tensor>& slope,
                                               const std::optional<at::Tensor>& offset, int64_t scaled) {
  std::vector<at::Tensor> ops(operands.begin(), operands.end());
  check_cuda_operands(ops, "gradguide::reduce", /*row_strided=*/true);
  const auto& first = ops[0];
  c10::cuda::CUDAGuard guard(first.device());
  const int64_t b = first.size(0), k = static_cast<int64_t>(ops.size());
  const int64_t per_sample = first.numel() / b;
  TORCH_CHECK_VALUE(groups >= 1 && per_sample % groups == 0,
              "gradguide::reduce: groups: expected a positive divisor of the per-sample size ", per_sample,
              ", got ", groups);
  const int64_t n = per_sample / groups;
  const ScaleArgs sc = scale_args("gradguide::reduce", first, k, log_scale, slope, offset, scaled);
  auto acc = acc_type(first.scalar_type());
  at::Tensor gram = at::empty({b, groups, k, k}, first.options().dtype(acc));
  at::Tensor sums = at::empty({b, groups, k}, first.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_reduce_cuda", [&] {
    switch (k) {
      case 1: reduce_launch<1, scalar_t>(ops, b * groups, groups, n, sc, gram, sums); break;
      case 2: reduce_launch<2, scalar_t>(ops, b * groups, groups, n, sc, gram, sums); break;
      case 3: reduce_launch<3, scalar_t>(ops, b * groups, groups, n, sc, gram, sums); break;
      case 4: reduce_launch<4, scalar_t>(ops, b * groups, groups, n, sc, gram, sums); break;
      case 5: reduce_launch<5, scalar_t>(ops, b * groups, groups, n, sc, gram, sums); break;
      case 6: reduce_launch<6, scalar_t>(ops, b * groups, groups, n, sc, gram, sums); break;
      case 7: reduce_launch<7, scalar_t>(ops, b * groups, groups, n, sc, gram, sums); break;
      case 8: reduce_launch<8, scalar_t>(ops, b * groups, groups, n, sc, gram, sums); break;
    }
  });
  return {gram, sums};
}

template <int K, typename scalar_t, typename acc_t>
__global__ void combine_kernel(Ptrs<scalar_t> ptrs, const acc_t* coef, int64_t rows, int64_t n, bool has_low,
                               acc_t low, bool has_high, acc_t high, scalar_t* out) {
  const int64_t total = rows * n;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = idx / n;
    acc_t v = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) v += coef[row * K + k] * static_cast<acc_t>(ptrs.p[k][idx]);
    if (has_low) v = v < low ? low : v;  // NaN compares false: stays NaN
    if (has_high) v = v > high ? high : v;
    out[idx] = static_cast<scalar_t>(v);
  }
}

template <int K, typename scalar_t>
static void combine_launch(const std::vector<at::Tensor>& ops, const at::Tensor& coef, int64_t rows, int64_t n,
                           std::optional<double> low, std::optional<double> high, at::Tensor& out) {
  using acc_t = typename AccOf<scalar_t>::type;
  Ptrs<scalar_t> ptrs{};
  for (int k = 0; k < K; ++k) ptrs.p[k] = ops[k].data_ptr<scalar_t>();
  const int64_t total = rows * n;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads,
                                           32 * multiprocessors(ops[0].device()));
  combine_kernel<K, scalar_t, acc_t><<<std::max<int64_t>(blocks, 1), kThreads, 0,
                                       c10::cuda::getCurrentCUDAStream()>>>(
      ptrs, coef.data_ptr<acc_t>(), rows, n, low.has_value(), static_cast<acc_t>(low.value_or(0.0)),
      high.has_value(), static_cast<acc_t>(high.value_or(0.0)), out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void combine_out_cuda(const at::Tensor& coef_in, at::TensorList operands, std::optional<double> low,
                      std::optional<double> high, at::Tensor& out) {
  std::vector<at::Tensor> ops(operands.begin(), operands.end());
  check_cuda_operands(ops, "gradguide::combine");
  const auto& first = ops[0];
  c10::cuda::CUDAGuard guard(first.device());
  const int64_t b = first.size(0), k = static_cast<int64_t>(ops.size());
  TORCH_CHECK_VALUE(coef_in.dim() == 3 && coef_in.size(0) == b && coef_in.size(2) == k,
              "gradguide::combine: coef: expected shape [B=", b, ", G, K=", k, "], got ", coef_in.sizes());
  TORCH_CHECK_VALUE(coef_in.device() == first.device(), "gradguide::combine: coef: on ", coef_in.device(),
              ", operands on ", first.device());
  const int64_t groups = coef_in.size(1), per_sample = first.numel() / b;
  TORCH_CHECK_VALUE(per_sample % groups == 0, "gradguide::combine: coef: ", groups,
              " groups do not divide the per-sample size ", per_sample);
  TORCH_CHECK_VALUE(out.sizes() == first.sizes() && out.scalar_type() == first.scalar_type() &&
                  out.device() == first.device() && out.is_contiguous(),
              "gradguide::combine: out: expected a contiguous tensor like operands[0]");
  auto acc = acc_type(first.scalar_type());
  at::Tensor coef = coef_in.to(acc).contiguous();
  const int64_t n = per_sample / groups;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_combine_cuda", [&] {
    switch (k) {
      case 1: combine_launch<1, scalar_t>(ops, coef, b * groups, n, low, high, out); break;
      case 2: combine_launch<2, scalar_t>(ops, coef, b * groups, n, low, high, out); break;
      case 3: combine_launch<3, scalar_t>(ops, coef, b * groups, n, low, high, out); break;
      case 4: combine_launch<4, scalar_t>(ops, coef, b * groups, n, low, high, out); break;
      case 5: combine_launch<5, scalar_t>(ops, coef, b * groups, n, low, high, out); break;
      case 6: combine_launch<6, scalar_t>(ops, coef, b * groups, n, low, high, out); break;
      case 7: combine_launch<7, scalar_t>(ops, coef, b * groups, n, low, high, out); break;
      case 8: combine_launch<8, scalar_t>(ops, coef, b * groups, n, low, high, out); break;
    }
  });
}

at::Tensor combine_cuda(const at::Tensor& coef, at::TensorList operands, std::optional<double> low,
                        std::optional<double> high) {
  TORCH_CHECK_VALUE(!operands.empty(), "gradguide::combine: operands: expected a non-empty list of tensors");
  at::Tensor out = at::empty_like(operands[0], at::MemoryFormat::Contiguous);
  combine_out_cuda(coef, operands, low, high, out);
  return out;
}

// ---------------------------------------------------------------------------------------
// fused_combine and clip_shift: rows x blocks_per_row blocks, 16-byte loads

// V elements of 16 bytes, loaded and stored as one
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// elements per 16-byte pack when every row start is 16-byte aligned (pointers, batch strides
// and row length: rows are whole packs), else 1
template <typename scalar_t>
static int pack_width(const std::vector<at::Tensor>& tensors, int64_t n) {
  constexpr int v = 16 / sizeof(scalar_t);
  if (n % v) return 1;
  for (const auto& t : tensors)
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 || batch_stride(t) % v) return 1;
  return v;
}

static int64_t blocks_per_row(const at::Device& device, int64_t rows, int64_t packs) {
  const int64_t target = 4 * multiprocessors(device);  // enough blocks to fill the GPU
  const int64_t per_row = std::max<int64_t>(1, (target + rows - 1) / rows);
  return std::max<int64_t>(1, std::min<int64_t>(per_row, (packs + kThreads - 1) / kThreads));
}

// operand k's value at lane l of a pack: scaled (S and its mask bit) as it loads
template <bool S, typename scalar_t, typename acc_t, typename T>
__device__ __forceinline__ acc_t operand_value(scalar_t x, T v, T a, T c, bool scaled) {
  if (S && scaled) return static_cast<acc_t>(static_cast<T>(x) * scale_exp(v * a + c));
  return static_cast<acc_t>(x);
}

template <int K, typename scalar_t, int V, bool S>
__global__ void fused_combine_kernel(RowPtrs<scalar_t> ptrs, ScaleArgs scale, ProgramArgs args, int64_t n,
                                     int64_t per_row, bool has_low, double low_d, bool has_high, double high_d,
                                     scalar_t* out) {
  using acc_t = typename AccOf<scalar_t>::type;
  using T = typename ScaleOf<scalar_t>::type;
  using pack_t = Pack<scalar_t, V>;
  __shared__ acc_t shared_w[K];
  __shared__ T shared_a[K], shared_c[K];
  const int64_t row = blockIdx.x / per_row, part = blockIdx.x % per_row;
  const int64_t b = row / ptrs.groups, g = row % ptrs.groups;
  if (threadIdx.x == 0) {  // the row's program, float64, once per block (a few hundred flops)
    double w[kMaxK];
    row_coefficients(args, row, w);
#pragma unroll
    for (int k = 0; k < K; ++k) shared_w[k] = static_cast<acc_t>(w[k]);
    if constexpr (S) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        shared_a[k] = static_cast<T>(scale.slope[b * scale.slope_s0 + k * scale.slope_s1]);
        shared_c[k] = static_cast<T>(scale.offset[b * scale.offset_s0 + k * scale.offset_s1]);
      }
    }
  }
  __syncthreads();
  acc_t w[K];
  T a[K], c[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    w[k] = shared_w[k];
    if constexpr (S) {
      a[k] = shared_a[k];
      c[k] = shared_c[k];
    } else {
      a[k] = c[k] = 0;
    }
  }
  const acc_t low = static_cast<acc_t>(low_d), high = static_cast<acc_t>(high_d);
  const int64_t packs = n / V, out_base = row * packs, off = g * n;
  const pack_t* v_row = nullptr;
  if constexpr (S) v_row = reinterpret_cast<const pack_t*>(static_cast<const scalar_t*>(scale.v) + b * scale.v_s0 + off);
  for (int64_t i = part * blockDim.x + threadIdx.x; i < packs; i += per_row * (int64_t)blockDim.x) {
    acc_t acc[V];
    pack_t vp;
    if constexpr (S) vp = v_row[i];
    const pack_t x0 = reinterpret_cast<const pack_t*>(ptrs.p[0] + b * ptrs.s0[0] + off)[i];
    const bool s0 = S && (scale.mask & 1u);
#pragma unroll
    for (int l = 0; l < V; ++l)
      acc[l] = w[0] * operand_value<S, scalar_t, acc_t>(x0.v[l], S ? static_cast<T>(vp.v[l]) : T(0), a[0], c[0], s0);
#pragma unroll
    for (int k = 1; k < K; ++k) {  // every operand, even with a zero weight: 0 * inf = NaN
      const pack_t x = reinterpret_cast<const pack_t*>(ptrs.p[k] + b * ptrs.s0[k] + off)[i];
      const bool sk = S && (scale.mask >> k & 1u);
#pragma unroll
      for (int l = 0; l < V; ++l)
        acc[l] += w[k] * operand_value<S, scalar_t, acc_t>(x.v[l], S ? static_cast<T>(vp.v[l]) : T(0), a[k], c[k], sk);
    }
    pack_t y;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      acc_t v = acc[l];
      if (has_low) v = v < low ? low : v;  // NaN compares false: stays NaN
      if (has_high) v = v > high ? high : v;
      y.v[l] = static_cast<scalar_t>(v);
    }
    reinterpret_cast<pack_t*>(out)[out_base + i] = y;
  }
}

template <int K, typename scalar_t>
static void fused_combine_launch(const std::vector<at::Tensor>& ops, const ProgramArgs& args, int64_t rows, int64_t n,
                                 const ScaleArgs& scale, const std::optional<at::Tensor>& log_scale,
                                 std::optional<double> low, std::optional<double> high, at::Tensor& out) {
  const RowPtrs<scalar_t> ptrs = row_ptrs<scalar_t>(ops, args.groups);
  std::vector<at::Tensor> all(ops);
  all.push_back(out);
  if (scale.mask) all.push_back(*log_scale);
  const int v = pack_width<scalar_t>(all, n);
  const int64_t per_row = blocks_per_row(ops[0].device(), rows, n / v);
  TORCH_CHECK_VALUE(rows * per_row < (int64_t(1) << 31), "gradguide::fused_combine: operands: too many rows (", rows, ")");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const double lo = low.value_or(0.0), hi = high.value_or(0.0);
  constexpr int kV = 16 / sizeof(scalar_t);
  scalar_t* dst = out.data_ptr<scalar_t>();
  const bool hl = low.has_value(), hh = high.has_value();
  const dim3 grid(static_cast<unsigned>(rows * per_row));
  if (scale.mask) {
    if (v == kV)
      fused_combine_kernel<K, scalar_t, kV, true><<<grid, kThreads, 0, stream>>>(ptrs, scale, args, n, per_row, hl, lo,
                                                                                 hh, hi, dst);
    else
      fused_combine_kernel<K, scalar_t, 1, true><<<grid, kThreads, 0, stream>>>(ptrs, scale, args, n, per_row, hl, lo,
                                                                                hh, hi, dst);
  } else if (v == kV) {
    fused_combine_kernel<K, scalar_t, kV, false><<<grid, kThreads, 0, stream>>>(ptrs, scale, args, n, per_row, hl, lo,
                                                                                hh, hi, dst);
  } else {
    fused_combine_kernel<K, scalar_t, 1, false><<<grid, kThreads, 0, stream>>>(ptrs, scale, args, n, per_row, hl, lo,
                                                                               hh, hi, dst);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The checks and the program's arguments, then one launch writing `out` (checked by the caller).
static void fused_combine_into(const char* op, c10::string_view policy_name, const std::vector<at::Tensor>& ops,
                               const std::optional<at::Tensor>& gram, at::TensorList vectors,
                               at::TensorList scalars, std::optional<double> low, std::optional<double> high,
                               const ScaleArgs& sc, const std::optional<at::Tensor>& log_scale, at::Tensor& out) {
  const auto& first = ops[0];
  TORCH_CHECK_VALUE(!(low.has_value() && std::isnan(*low)), op, ": low: NaN is not a bound");
  TORCH_CHECK_VALUE(!(high.has_value() && std::isnan(*high)), op, ": high: NaN is not a bound");
  const int64_t b = first.size(0), k = static_cast<int64_t>(ops.size());
  int64_t n = 0;
  const ProgramArgs args = fused_program_args(op, policy_name, first, k, gram, vectors, scalars, n);
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_fused_combine_cuda", [&] {
    switch (k) {
      case 1: fused_combine_launch<1, scalar_t>(ops, args, b * args.groups, n, sc, log_scale, low, high, out); break;
      case 2: fused_combine_launch<2, scalar_t>(ops, args, b * args.groups, n, sc, log_scale, low, high, out); break;
      case 3: fused_combine_launch<3, scalar_t>(ops, args, b * args.groups, n, sc, log_scale, low, high, out); break;
      case 4: fused_combine_launch<4, scalar_t>(ops, args, b * args.groups, n, sc, log_scale, low, high, out); break;
      case 5: fused_combine_launch<5, scalar_t>(ops, args, b * args.groups, n, sc, log_scale, low, high, out); break;
      case 6: fused_combine_launch<6, scalar_t>(ops, args, b * args.groups, n, sc, log_scale, low, high, out); break;
      case 7: fused_combine_launch<7, scalar_t>(ops, args, b * args.groups, n, sc, log_scale, low, high, out); break;
      case 8: fused_combine_launch<8, scalar_t>(ops, args, b * args.groups, n, sc, log_scale, low, high, out); break;
    }
  });
}

at::Tensor fused_combine_cuda(c10::string_view policy_name, at::TensorList operands,
                              const std::optional<at::Tensor>& gram, at::TensorList vectors, at::TensorList scalars,
                              std::optional<double> low, std::optional<double> high,
                              const std::optional<at::Tensor>& log_scale, const std::optional<at::Tensor>& slope,
                              const std::optional<at::Tensor>& offset, int64_t scaled) {
  const char* op = "gradguide::fused_combine";
  std::vector<at::Tensor> ops(operands.begin(), operands.end());
  check_cuda_operands(ops, op, /*row_strided=*/true);
  c10::cuda::CUDAGuard guard(ops[0].device());
  const ScaleArgs sc = scale_args(op, ops[0], static_cast<int64_t>(ops.size()), log_scale, slope, offset, scaled);
  at::Tensor out = at::empty_like(ops[0], at::MemoryFormat::Contiguous);
  fused_combine_into(op, policy_name, ops, gram, vectors, scalars, low, high, sc, log_scale, out);
  return out;
}

// Into an existing `out`; any overlap with the inputs other than exactly an operand goes
// through a temporary (gradguide_fused_args.h), copied on the current stream.
void fused_combine_out_cuda(c10::string_view policy_name, at::TensorList operands,
                            const std::optional<at::Tensor>& gram, at::TensorList vectors, at::TensorList scalars,
                            std::optional<double> low, std::optional<double> high, at::Tensor& out,
                            const std::optional<at::Tensor>& log_scale, const std::optional<at::Tensor>& slope,
                            const std::optional<at::Tensor>& offset, int64_t scaled) {
  const char* op = "gradguide::fused_combine_out";
  std::vector<at::Tensor> ops(operands.begin(), operands.end());
  check_cuda_operands(ops, op, /*row_strided=*/true);
  c10::cuda::CUDAGuard guard(ops[0].device());
  const ScaleArgs sc = scale_args(op, ops[0], static_cast<int64_t>(ops.size()), log_scale, slope, offset, scaled);
  check_fused_out(op, out, ops[0]);
  if (fused_out_needs_temporary(out, operands, gram, vectors, scalars, log_scale, slope, offset)) {
    at::Tensor tmp = at::empty_like(ops[0], at::MemoryFormat::Contiguous);
    fused_combine_into(op, policy_name, ops, gram, vectors, scalars, low, high, sc, log_scale, tmp);
    out.copy_(tmp);
    return;
  }
  fused_combine_into(op, policy_name, ops, gram, vectors, scalars, low, high, sc, log_scale, out);
}

// coef_p / coef_s: [1 or B, K] float32/float64, any strides (ArgView: s0 = 0 when shared)
template <int K, typename scalar_t, int V>
__global__ void clip_shift_kernel(Ptrs<scalar_t> ptrs, ArgView coef_p, ArgView coef_s, int64_t n, int64_t per_row,
                                  double low_d, double high_d, scalar_t* out_c, scalar_t* out_s) {
  using acc_t = typename AccOf<scalar_t>::type;
  using pack_t = Pack<scalar_t, V>;
  const int64_t row = blockIdx.x / per_row, part = blockIdx.x % per_row;
  acc_t wp[K], ws[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    wp[k] = static_cast<acc_t>(coef_p.at(row * coef_p.s0 + k * coef_p.s2));
    ws[k] = static_cast<acc_t>(coef_s.at(row * coef_s.s0 + k * coef_s.s2));
  }
  const acc_t low = static_cast<acc_t>(low_d), high = static_cast<acc_t>(high_d);
  const int64_t packs = n / V, base = row * packs;
  for (int64_t i = part * blockDim.x + threadIdx.x; i < packs; i += per_row * (int64_t)blockDim.x) {
    acc_t p[V], s[V];
#pragma unroll
    for (int l = 0; l < V; ++l) p[l] = s[l] = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const pack_t x = reinterpret_cast<const pack_t*>(ptrs.p[k])[base + i];
#pragma unroll
      for (int l = 0; l < V; ++l) {
        const acc_t v = static_cast<acc_t>(x.v[l]);
        p[l] += wp[k] * v;
        s[l] += ws[k] * v;
      }
    }
    pack_t yc, ys;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const acc_t q = p[l] + s[l];
      const acc_t pc = p[l] < low ? low : (p[l] > high ? high : p[l]);
      const acc_t qc = q < low ? low : (q > high ? high : q);
      const bool inside = p[l] > low && p[l] < high && q > low && q < high;
      yc.v[l] = static_cast<scalar_t>(pc);
      ys.v[l] = static_cast<scalar_t>(inside ? s[l] : qc - pc);
    }
    reinterpret_cast<pack_t*>(out_c)[base + i] = yc;
    reinterpret_cast<pack_t*>(out_s)[base + i] = ys;
  }
}

template <int K, typename scalar_t>
static void clip_shift_launch(const std::vector<at::Tensor>& ops, const ArgView& cp, const ArgView& cs, int64_t b,
                              int64_t n, double low, double high, at::Tensor& clipped, at::Tensor& shift) {
  Ptrs<scalar_t> ptrs{};
  for (int k = 0; k < K; ++k) ptrs.p[k] = ops[k].data_ptr<scalar_t>();
  std::vector<at::Tensor> all(ops);
  all.push_back(clipped);
  all.push_back(shift);
  const int v = pack_width<scalar_t>(all, n);
  const int64_t per_row = blocks_per_row(ops[0].device(), b, n / v);
  TORCH_CHECK_VALUE(b * per_row < (int64_t(1) << 31), "gradguide::clip_shift: operands: too many samples (", b, ")");
  auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kV = 16 / sizeof(scalar_t);
  if (v == kV)
    clip_shift_kernel<K, scalar_t, kV><<<b * per_row, kThreads, 0, stream>>>(
        ptrs, cp, cs, n, per_row, low, high, clipped.data_ptr<scalar_t>(),
        shift.data_ptr<scalar_t>());
  else
    clip_shift_kernel<K, scalar_t, 1><<<b * per_row, kThreads, 0, stream>>>(
        ptrs, cp, cs, n, per_row, low, high, clipped.data_ptr<scalar_t>(),
        shift.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> clip_shift_cuda(const at::Tensor& coef_p, const at::Tensor& coef_s,
                                                   at::TensorList operands, double low, double high) {
  const char* op = "gradguide::clip_shift";
  std::vector<at::Tensor> ops(operands.begin(), operands.end());
  check_cuda_operands(ops, op);
  const auto& first = ops[0];
  c10::cuda::CUDAGuard guard(first.device());
  const int64_t b = first.size(0), k = static_cast<int64_t>(ops.size());
  check_clip_shift_args(op, coef_p, coef_s, first, k, low, high);
  auto view = [](const at::Tensor& t) {
    return ArgView{t.const_data_ptr(), t.size(0) == 1 ? 0 : t.stride(0), 0, t.stride(1),
                   t.scalar_type() == at::kDouble};
  };
  const ArgView cp = view(coef_p), cs = view(coef_s);
  const int64_t n = first.numel() / b;
  at::Tensor clipped = at::empty_like(first, at::MemoryFormat::Contiguous);
  at::Tensor shift = at::empty_like(first, at::MemoryFormat::Contiguous);
  if (first.numel() == 0) return {clipped, shift};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_clip_shift_cuda", [&] {
    switch (k) {
      case 1: clip_shift_launch<1, scalar_t>(ops, cp, cs, b, n, low, high, clipped, shift); break;
      case 2: clip_shift_launch<2, scalar_t>(ops, cp, cs, b, n, low, high, clipped, shift); break;
      case 3: clip_shift_launch<3, scalar_t>(ops, cp, cs, b, n, low, high, clipped, shift); break;
      case 4: clip_shift_launch<4, scalar_t>(ops, cp, cs, b, n, low, high, clipped, shift); break;
      case 5: clip_shift_launch<5, scalar_t>(ops, cp, cs, b, n, low, high, clipped, shift); break;
      case 6: clip_shift_launch<6, scalar_t>(ops, cp, cs, b, n, low, high, clipped, shift); break;
      case 7: clip_shift_launch<7, scalar_t>(ops, cp, cs, b, n, low, high, clipped, shift); break;
      case 8: clip_shift_launch<8, scalar_t>(ops, cp, cs, b, n, low, high, clipped, shift); break;
    }
  });
  return {clipped, shift};
}

TORCH_LIBRARY_IMPL(gradguide, CUDA, m) {
  m.impl("reduce", &reduce_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("combine_out", &combine_out_cuda);
  m.impl("fused_combine", &fused_combine_cuda);
  m.impl("fused_combine_out", &fused_combine_out_cuda);
  m.impl("clip_shift", &clip_shift_cuda);
}

}  // namespace gradguide
