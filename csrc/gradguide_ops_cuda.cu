// gradguide native ops (CUDA): the same two passes as gradguide_ops.cpp, registered for the
// CUDA dispatch key of the schemas defined there (built into the same extension).
//
// reduce: stage 1 grid = rows x splits blocks of kThreads threads; each thread accumulates
// K(K+1)/2 products and K sums (fp32; fp64 for fp64) over a grid-strided slice of its split,
// a shared-memory tree reduces the block to one partial; stage 2 (one thread per row and
// entry) adds the partials in split order (deterministic; no atomics).
// combine: one thread per element (grid-stride), weights of its row from global memory,
// every operand multiplied (0 * inf = NaN, as the reference), NaN-preserving clamp.
// Limits: K <= 8, contiguous operands of one dtype on one device (checked); per-step scalars
// are read from device tensors (no host sync). Status: compiled where nvcc and a CUDA torch
// exist; not run on a GPU in this repository's CI (see README).
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

namespace gradguide {

constexpr int kMaxKCuda = 8;
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

template <typename T>
struct AccOf { using type = float; };
template <>
struct AccOf<double> { using type = double; };

static void check_cuda_operands(const std::vector<at::Tensor>& ops, const char* op) {
  TORCH_CHECK(!ops.empty() && ops.size() <= kMaxKCuda, op, ": operands: expected 1 to ", kMaxKCuda,
              " tensors, got ", ops.size());
  const auto& first = ops[0];
  TORCH_CHECK(first.is_cuda(), op, ": operands: expected CUDA tensors, got ", first.device());
  TORCH_CHECK(first.dim() >= 1 && first.size(0) >= 1, op, ": operands: expected [B, ...] with B >= 1, got ",
              first.sizes());
  for (size_t k = 0; k < ops.size(); ++k) {
    TORCH_CHECK(ops[k].sizes() == first.sizes() && ops[k].scalar_type() == first.scalar_type() &&
                    ops[k].device() == first.device(),
                op, ": operands[", k, "]: shape, dtype and device must match operands[0]");
    TORCH_CHECK(ops[k].is_contiguous(), op, ": operands[", k, "]: expected a contiguous tensor");
  }
}

template <int K, typename scalar_t, typename acc_t>
__global__ void reduce_partials_kernel(Ptrs<scalar_t> ptrs, int64_t n, int64_t split_len, int64_t splits,
                                       acc_t* part) {
  constexpr int P = K * (K + 1) / 2 + K;
  __shared__ acc_t shared[kThreads];
  const int64_t item = blockIdx.x;
  const int64_t row = item / splits, split = item % splits;
  const int64_t lo = split * split_len, hi = min(n, lo + split_len);
  acc_t acc[P];
#pragma unroll
  for (int p = 0; p < P; ++p) acc[p] = 0;
  for (int64_t e = lo + threadIdx.x; e < hi; e += blockDim.x) {
    acc_t x[K];
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] = static_cast<acc_t>(ptrs.p[k][row * n + e]);
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
static void reduce_launch(const std::vector<at::Tensor>& ops, int64_t rows, int64_t n, at::Tensor& gram,
                          at::Tensor& sums) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int P = K * (K + 1) / 2 + K;
  Ptrs<scalar_t> ptrs{};
  for (int k = 0; k < K; ++k) ptrs.p[k] = ops[k].data_ptr<scalar_t>();
  const int64_t target = 4 * multiprocessors(ops[0].device());
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>({1024, (target + rows - 1) / rows,
                                                          (n + kThreads - 1) / kThreads}));
  const int64_t split_len = (n + splits - 1) / splits;
  splits = (n + split_len - 1) / split_len;
  auto part = at::empty({rows * splits * P}, gram.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  reduce_partials_kernel<K, scalar_t, acc_t><<<rows * splits, kThreads, 0, stream>>>(
      ptrs, n, split_len, splits, part.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = rows * P;
  reduce_finish_kernel<K, acc_t><<<(total + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      part.data_ptr<acc_t>(), rows, splits, gram.data_ptr<acc_t>(), sums.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> reduce_cuda(at::TensorList operands, int64_t groups) {
  std::vector<at::Tensor> ops(operands.begin(), operands.end());
  check_cuda_operands(ops, "gradguide::reduce");
  const auto& first = ops[0];
  c10::cuda::CUDAGuard guard(first.device());
  const int64_t b = first.size(0), k = static_cast<int64_t>(ops.size());
  const int64_t per_sample = first.numel() / b;
  TORCH_CHECK(groups >= 1 && per_sample % groups == 0,
              "gradguide::reduce: groups: expected a positive divisor of the per-sample size ", per_sample,
              ", got ", groups);
  const int64_t n = per_sample / groups;
  auto acc = first.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gram = at::empty({b, groups, k, k}, first.options().dtype(acc));
  at::Tensor sums = at::empty({b, groups, k}, first.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gradguide_reduce_cuda", [&] {
    switch (k) {
      case 1: reduce_launch<1, scalar_t>(ops, b * groups, n, gram, sums); break;
      case 2: reduce_launch<2, scalar_t>(ops, b * groups, n, gram, sums); break;
      case 3: reduce_launch<3, scalar_t>(ops, b * groups, n, gram, sums); break;
      case 4: reduce_launch<4, scalar_t>(ops, b * groups, n, gram, sums); break;
      case 5: reduce_launch<5, scalar_t>(ops, b * groups, n, gram, sums); break;
      case 6: reduce_launch<6, scalar_t>(ops, b * groups, n, gram, sums); break;
      case 7: reduce_launch<7, scalar_t>(ops, b * groups, n, gram, sums); break;
      case 8: reduce_launch<8, scalar_t>(ops, b * groups, n, gram, sums); break;
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
  TORCH_CHECK(coef_in.dim() == 3 && coef_in.size(0) == b && coef_in.size(2) == k,
              "gradguide::combine: coef: expected shape [B=", b, ", G, K=", k, "], got ", coef_in.sizes());
  TORCH_CHECK(coef_in.device() == first.device(), "gradguide::combine: coef: on ", coef_in.device(),
              ", operands on ", first.device());
  const int64_t groups = coef_in.size(1), per_sample = first.numel() / b;
  TORCH_CHECK(per_sample % groups == 0, "gradguide::combine: coef: ", groups,
              " groups do not divide the per-sample size ", per_sample);
  TORCH_CHECK(out.sizes() == first.sizes() && out.scalar_type() == first.scalar_type() &&
                  out.device() == first.device() && out.is_contiguous(),
              "gradguide::combine: out: expected a contiguous tensor like operands[0]");
  auto acc = first.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
  TORCH_CHECK(!operands.empty(), "gradguide::combine: operands: expected a non-empty list of tensors");
  at::Tensor out = at::empty_like(operands[0], at::MemoryFormat::Contiguous);
  combine_out_cuda(coef, operands, low, high, out);
  return out;
}

TORCH_LIBRARY_IMPL(gradguide, CUDA, m) {
  m.impl("reduce", &reduce_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("combine_out", &combine_out_cuda);
}

}  // namespace gradguide
