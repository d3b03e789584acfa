// CUDA kernel of the row-wise teacher-student divergence on a chunk of fp32 logits (op
// fastopd::divergence_chunk_, schema in csrc/ops.cpp). Same contract and math as csrc/cpu/divergence.cpp and
// the Triton kernel in kernels/divergence.py:
//
//   z = softcap(x) / T;  lp = z - lse(z);  p = exp(lp)
//   fkl = sum p_t (lp_t - lp_s)                      dL/dz_s = p_s - p_t
//   rkl = sum p_s (lp_s - lp_t)                      dL/dz_s = p_s ((lp_s - lp_t) - rkl)
//   jsd = b KL(t||m) + (1-b) KL(s||m), m = b p_t + (1-b) p_s
//                                                    dL/dz_s = (1-b) p_s ((lp_s - log m) - KL(s||m))
//   loss = soft_w * div + hard_w * (lse_s - z_s[y]);  the hard term adds hard_w (p_s - onehot(y)).
// With a hard-label temperature of its own (hard_t; r = hard_ratio = T / T_hard) the CE is of z_h = r z_s:
// pass 1 also keeps z_h's online max/sum, and the gradient term is hard_w r (p_h - onehot(y)).
//
// One thread block per row. Pass 1: per-thread online max / sum-exp of both models (sums in fp64 so that
// log-probs near 0 stay exact; log p = (z - max) - log(sum)), then a block reduction of the (max, sum)
// pairs (warp shuffles, then one value per warp through shared memory); the student's pair also carries the
// teacher's z at its max, rkl's pivot (rkl and lp_s - lp_t are taken relative to lp_s - lp_t there). Pass 2: the
// divergence sums and the entropy with exact log-probs; for fkl the gradient is stored in the same pass.
// Pass 3 (rkl, jsd with a gradient): the gradient, which needs the row's KL from pass 2. Loads are float4
// when the rows are 16-byte aligned (V a multiple of 4, as 128256 and 151936 are), scalar otherwise.
// Memory traffic per row: fkl 2 reads of both rows + 1 write, rkl/jsd 3 reads + 1 write; xt is only read.
// Ignored rows get loss 0, stats 0 and gradient 0; -inf logits give p = 0 and no NaN. No host sync: a label
// out of range trips a device assert, as PyTorch's own losses do.
// FASTOPD_CUDA_EMULATION: tests/kernels/cuda_emulation/ compiles the device code below with a host compiler,
// one OS thread per CUDA thread, to check the kernel's arithmetic on machines without a GPU.
#ifndef FASTOPD_CUDA_EMULATION
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>
#endif

#include <cmath>
#include <cstdint>

namespace fastopd {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr float kNegInf = -INFINITY;

enum Divergence : int { kFKL = 0, kRKL = 1, kJSD = 2 };

struct RowParams {
  float beta;
  float one_minus_beta;  // 1 - beta formed in double: 1 - float(beta) would be 1.3% off at beta = 1 - 1e-6
  float inv_temp;
  float temperature;
  float softcap;
  float inv_softcap;
  float soft_weight;
  float hard_weight;
  float hard_ratio;  // T / T_hard (used only when hard_t)
  int64_t ignore_index;
  bool hard_t;  // the hard-label CE at a temperature of its own (and a hard term at all)
};

// tanh(|x|) = -expm1(-2|x|) / (2 + expm1(-2|x|)): exact limits at +-inf, no NaN, and no cancellation for small
// |x| (a large softcap), where 1 - exp(-2|x|) would lose every digit.
__device__ __forceinline__ float tanh_exp(float x) {
  const float e = expm1f(-2.0f * fabsf(x));
  const float r = -e / (2.0f + e);
  return x < 0.0f ? -r : r;
}

// The products are rounded (__fmul_rn), never contracted into an FMA with what follows: every pass must form
// the same z, since the row max and the rkl pivot taken from z in pass 1 meet z again in z - max (an FFMA there
// would leave a rounding residual of |z| 2^-24 where the pivot identity needs an exact 0).
template <bool SOFTCAP>
__device__ __forceinline__ float scale(float x, const RowParams& p) {
  if (SOFTCAP) x = __fmul_rn(p.softcap, tanh_exp(__fmul_rn(x, p.inv_softcap)));
  return __fmul_rn(x, p.inv_temp);
}

// Online log-sum-exp state: running max m and sum s relative to m. The sum is fp64 so that log(s) resolves
// log-probs near 0 (s = 1 + tiny when one token dominates); in fp32 their error would be 6e-8, the spacing
// of 1.0. Only the accumulation is fp64; the exponentials stay fp32. `top` carries a value of the token at the
// max (for the student's state: the teacher's z there, rkl's pivot; the largest one among ties).
struct MaxSum {
  float m;
  double s;
  float top;
};

__device__ __forceinline__ void online_add(MaxSum& a, float z, float top) {
  if (z > a.m) {
    a.s = a.s * static_cast<double>(__expf(a.m - z)) + 1.0;  // a.m = -inf gives exp(-inf) = 0
    a.m = z;
    a.top = top;
  } else if (z != kNegInf) {
    a.s += static_cast<double>(__expf(z - a.m));
    if (z == a.m) a.top = fmaxf(a.top, top);
  }
}

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == kNegInf) return {kNegInf, 0.0, kNegInf};
  const float top = a.m > b.m ? a.top : (b.m > a.m ? b.top : fmaxf(a.top, b.top));
  return {m, a.s * static_cast<double>(__expf(a.m - m)) + b.s * static_cast<double>(__expf(b.m - m)), top};
}

// log(s) of a sum s >= 1 (the max contributes exp(0) = 1): log1pf of s - 1 taken in fp64 keeps it exact near
// 1; --use_fast_math turns logf into an approximation but leaves log1pf alone.
__device__ __forceinline__ float log_sum(double s) {
  return s < 2.0 ? log1pf(static_cast<float>(s - 1.0)) : logf(static_cast<float>(s));
}

// exp(x) - 1, accurate near 0: a series below |x| = 0.1 (the same as the Triton kernel's; branch-free, and
// ptxas keeps it in registers where expm1f's slow path made it spill).
__device__ __forceinline__ float expm1_acc(float x) {
  const float series =
      x * (1.0f + x * (0.5f + x * (1.0f / 6.0f + x * (1.0f / 24.0f + x * (1.0f / 120.0f + x * (1.0f / 720.0f))))));
  return fabsf(x) < 0.1f ? series : __expf(x) - 1.0f;
}

// p_s - p_t, exact also where both are near 1 (a dominant token): p_t * expm1(lp_s - lp_t) there.
__device__ __forceinline__ float p_diff(float ps, float pt, float lps, float lpt) {
  const float d = lps - lpt;
  return (pt > 0.0f && d < 30.0f && lpt > -1.0f) ? pt * expm1_acc(d) : ps - pt;
}

__device__ __forceinline__ MaxSum warp_reduce(MaxSum v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off),
             __shfl_xor_sync(0xffffffffu, v.top, off)};
    v = combine(v, o);
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Block-wide reductions; every thread gets the result. `smem` holds one entry per warp.
__device__ MaxSum block_reduce(MaxSum v, MaxSum* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v);
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  MaxSum r = lane < kWarps ? smem[lane] : MaxSum{kNegInf, 0.0, kNegInf};
  return warp_reduce(r);
}

template <int K>
__device__ void block_sum(float (&v)[K], float (*smem)[kWarps]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < kWarps ? smem[k][lane] : 0.0f);
}

// Calls f(index, xs[index], xt[index]) over the row, each thread a strided share; float4 loads when VEC.
template <bool VEC, typename F>
__device__ __forceinline__ void for_row(const float* xs, const float* xt, int64_t V, F&& f) {
  int64_t tail = 0;
  if (VEC) {
    const int64_t V4 = V / 4;
    const float4* s4 = reinterpret_cast<const float4*>(xs);
    const float4* t4 = reinterpret_cast<const float4*>(xt);
    for (int64_t i = threadIdx.x; i < V4; i += kThreads) {
      const float4 a = s4[i], b = t4[i];
      f(4 * i + 0, a.x, b.x);
      f(4 * i + 1, a.y, b.y);
      f(4 * i + 2, a.z, b.z);
      f(4 * i + 3, a.w, b.w);
    }
    tail = V4 * 4;
  }
  for (int64_t i = tail + threadIdx.x; i < V; i += kThreads) f(i, xs[i], xt[i]);
}

// Same walk, storing g = f(index, xs[index], xt[index]) over xs (float4 stores when VEC).
template <bool VEC, typename F>
__device__ __forceinline__ void map_row(float* xs, const float* xt, int64_t V, F&& f) {
  int64_t tail = 0;
  if (VEC) {
    const int64_t V4 = V / 4;
    float4* s4 = reinterpret_cast<float4*>(xs);
    const float4* t4 = reinterpret_cast<const float4*>(xt);
    for (int64_t i = threadIdx.x; i < V4; i += kThreads) {
      const float4 a = s4[i], b = t4[i];
      float4 g;
      g.x = f(4 * i + 0, a.x, b.x);
      g.y = f(4 * i + 1, a.y, b.y);
      g.z = f(4 * i + 2, a.z, b.z);
      g.w = f(4 * i + 3, a.w, b.w);
      s4[i] = g;
    }
    tail = V4 * 4;
  }
  for (int64_t i = tail + threadIdx.x; i < V; i += kThreads) xs[i] = f(i, xs[i], xt[i]);
}

template <int DIV, bool SOFTCAP, bool GRAD, bool VEC>
__global__ void __launch_bounds__(kThreads) divergence_row_kernel(float* __restrict__ xs_all,
                                                                  const float* __restrict__ xt_all,
                                                                  const int64_t* __restrict__ labels,
                                                                  float* __restrict__ loss, float* __restrict__ stats,
                                                                  int64_t V, int64_t stride_s, int64_t stride_t,
                                                                  RowParams p, bool hard) {
  __shared__ MaxSum smem_ms[2][kWarps];
  __shared__ float smem_sum[3][kWarps];
  const int64_t row = blockIdx.x;
  float* xs = xs_all + row * stride_s;
  const float* xt = xt_all + row * stride_t;

  // Label and hard-term flags are uniform across the block: runtime branches, not template variants.
  const bool has_labels = labels != nullptr;
  int64_t y = -1;
  if (has_labels) {
    y = labels[row];
    if (y == p.ignore_index) {
      if (threadIdx.x == 0) loss[row] = 0.0f;
      if (threadIdx.x < 5) stats[row * 5 + threadIdx.x] = 0.0f;
      if (GRAD) map_row<VEC>(xs, xt, V, [](int64_t, float, float) { return 0.0f; });
      return;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y < V);
  }
  // The label's logits, read before any gradient overwrites xs.
  const float zs_y = has_labels ? scale<SOFTCAP>(xs[y], p) : 0.0f;
  const float zt_y = has_labels ? scale<SOFTCAP>(xt[y], p) : 0.0f;

  // Pass 1: normalizers.
  MaxSum as{kNegInf, 0.0, kNegInf}, at{kNegInf, 0.0, kNegInf};
  for_row<VEC>(xs, xt, V, [&](int64_t, float a, float b) {
    const float zt = scale<SOFTCAP>(b, p);
    online_add(as, scale<SOFTCAP>(a, p), zt);
    online_add(at, zt, zt);
  });
  as = block_reduce(as, smem_ms[0]);
  at = block_reduce(at, smem_ms[1]);
  // log p = (z - max) - log(sum): subtracting the max first keeps log-probs near 0 exact.
  const float ms = as.m == kNegInf ? 0.0f : as.m, mt = at.m == kNegInf ? 0.0f : at.m;
  const float log_s = log_sum(as.s), log_t = log_sum(at.s);
  // Pass 1b (hard-label CE at its own temperature, r = hard_ratio; hard_t is uniform across the block): the
  // normalizer of r z_s, whose max is r ms, as an fp64 sum (>= 1) relative to it. A pass of its own keeps pass
  // 1's registers as they are.
  const float hr = p.hard_ratio;
  const bool hard_t = hard && p.hard_t;
  float log_h = 0.0f;
  if (hard_t) {
    MaxSum ah{0.0f, 0.0, 0.0f};
    for_row<VEC>(xs, xt, V, [&](int64_t, float a, float) {
      ah.s += static_cast<double>(__expf((scale<SOFTCAP>(a, p) - ms) * hr));
    });
    log_h = log_sum(block_reduce(ah, smem_ms[0]).s);
  }
  // rkl: d = lp_s - lp_t is taken relative to its value at the student's top token (the pivot). The gradient
  // p_s (d - rkl) of a dominant token is a difference of two numbers of size |rkl| (~27 at logit scale 140),
  // where every fp32 rounding would land; with rkl = pivot + sum p_s (d - pivot) only small numbers cancel.
  float pivot = 0.0f;
  if (DIV == kRKL) {
    pivot = (0.0f - log_s) - ((as.top - mt) - log_t);
    if (!(fabsf(pivot) < INFINITY)) pivot = 0.0f;  // teacher -inf at the student's top token: loss inf anyway
  }
  constexpr float kTinyP = 1e-30f;  // JSD drops terms of smaller probability (< 1e-28 each), as the C++ kernel

  const float b = p.beta, omb = p.one_minus_beta, sw = p.soft_weight, hw = p.hard_weight;
  const float hw_g = hard_t ? hw * hr : hw;  // d/dz_s of the CE is hw_g (p_h - onehot(y))
  auto p_hard = [&](float zs, float ps) { return hard_t ? __expf((zs - ms) * hr - log_h) : ps; };
  auto chain = [&](float zs) {
    if (!SOFTCAP) return p.inv_temp;
    const float c = zs * (p.temperature * p.inv_softcap);
    return p.inv_temp * (1.0f - c * c);
  };

  // Pass 2: divergence sums (acc[0]: fkl / rkl - pivot / KL(t||m), acc[1]: KL(s||m)) and sum p_s lp_s (acc[2]).
  float acc[3] = {0.0f, 0.0f, 0.0f};
  auto terms = [&](float zs, float zt, float& ps_out, float& pt_out) {
    const float lps = (zs - ms) - log_s, lpt = (zt - mt) - log_t;
    const float ps = __expf(lps), pt = __expf(lpt);
    acc[2] += ps != 0.0f ? ps * lps : 0.0f;
    if (DIV == kFKL) {
      acc[0] += pt != 0.0f ? pt * (lpt - lps) : 0.0f;
    } else if (DIV == kRKL) {
      acc[0] += ps != 0.0f ? ps * ((lps - lpt) - pivot) : 0.0f;
    } else {
      const float lm = __logf(b * pt + omb * ps);
      acc[0] += pt > kTinyP ? pt * (lpt - lm) : 0.0f;
      acc[1] += ps > kTinyP ? ps * (lps - lm) : 0.0f;
    }
    ps_out = ps;
    pt_out = pt;
    return DIV == kFKL ? p_diff(ps, pt, lps, lpt) : 0.0f;
  };
  if (DIV == kFKL && GRAD) {
    map_row<VEC>(xs, xt, V, [&](int64_t i, float a, float bt) {
      const float zs = scale<SOFTCAP>(a, p);
      float ps, pt;
      const float diff = terms(zs, scale<SOFTCAP>(bt, p), ps, pt);
      float g = sw * diff;
      if (hard) g += hw_g * (p_hard(zs, ps) - (i == y ? 1.0f : 0.0f));
      return g * chain(zs);
    });
  } else {
    for_row<VEC>(xs, xt, V, [&](int64_t, float a, float bt) {
      float ps, pt;
      terms(scale<SOFTCAP>(a, p), scale<SOFTCAP>(bt, p), ps, pt);
    });
  }
  block_sum<3>(acc, smem_sum);

  // Pass 3 (rkl, jsd): dL/dz_s = coef * p_s ((lp_s - lp_ref) - K) + hard_w (p_s - onehot(y)); for rkl both
  // lp_s - lp_t and K = rkl are taken relative to the pivot.
  if (GRAD && DIV != kFKL) {
    const float k = DIV == kRKL ? acc[0] : acc[1];
    const float coef = DIV == kRKL ? sw : sw * omb;
    map_row<VEC>(xs, xt, V, [&](int64_t i, float a, float bt) {
      const float zs = scale<SOFTCAP>(a, p), zt = scale<SOFTCAP>(bt, p);
      const float lps = (zs - ms) - log_s, lpt = (zt - mt) - log_t;
      const float ps = __expf(lps);
      float g;
      if (DIV == kRKL) {
        g = ps != 0.0f ? coef * (ps * (((lps - lpt) - pivot) - k)) : 0.0f;
      } else {
        const float lm = __logf(b * __expf(lpt) + omb * ps);
        const float term = ps > kTinyP ? ps * (lps - lm) : 0.0f;
        g = coef * (term - ps * k);
      }
      if (hard) g += hw_g * (p_hard(zs, ps) - (i == y ? 1.0f : 0.0f));
      return g * chain(zs);
    });
  }

  if (threadIdx.x == 0) {
    const float soft = DIV == kJSD ? b * acc[0] + omb * acc[1] : (DIV == kRKL ? pivot + acc[0] : acc[0]);
    float row_loss = sw * soft;
    const float lps_y = (zs_y - ms) - log_s, lpt_y = (zt_y - mt) - log_t;
    if (hard) row_loss -= hw * (hard_t ? (zs_y - ms) * hr - log_h : lps_y);
    loss[row] = row_loss;
    float* st = stats + row * 5;
    st[0] = ms + log_s;
    st[1] = mt + log_t;
    st[2] = has_labels ? lps_y : 0.0f;
    st[3] = has_labels ? lpt_y : 0.0f;
    st[4] = -acc[2];
  }
}

#ifndef FASTOPD_CUDA_EMULATION
template <int DIV, bool SOFTCAP, bool GRAD>
void launch_vec(bool vec, int64_t C, cudaStream_t stream, float* xs, const float* xt, const int64_t* labels,
                float* loss, float* stats, int64_t V, int64_t ss, int64_t st, const RowParams& p, bool hard) {
  const dim3 grid(static_cast<unsigned>(C));
  if (vec) {
    divergence_row_kernel<DIV, SOFTCAP, GRAD, true><<<grid, kThreads, 0, stream>>>(xs, xt, labels, loss, stats, V, ss,
                                                                                   st, p, hard);
  } else {
    divergence_row_kernel<DIV, SOFTCAP, GRAD, false><<<grid, kThreads, 0, stream>>>(xs, xt, labels, loss, stats, V,
                                                                                    ss, st, p, hard);
  }
}

template <int DIV>
void launch_div(bool softcap, bool grad, bool vec, int64_t C, cudaStream_t stream, float* xs, const float* xt,
                const int64_t* labels, float* loss, float* stats, int64_t V, int64_t ss, int64_t st, const RowParams& p,
                bool hard) {
  if (softcap && grad) launch_vec<DIV, true, true>(vec, C, stream, xs, xt, labels, loss, stats, V, ss, st, p, hard);
  else if (softcap) launch_vec<DIV, true, false>(vec, C, stream, xs, xt, labels, loss, stats, V, ss, st, p, hard);
  else if (grad) launch_vec<DIV, false, true>(vec, C, stream, xs, xt, labels, loss, stats, V, ss, st, p, hard);
  else launch_vec<DIV, false, false>(vec, C, stream, xs, xt, labels, loss, stats, V, ss, st, p, hard);
}

void divergence_chunk_cuda(at::Tensor& xs, at::Tensor& xt, const std::optional<at::Tensor>& labels, at::Tensor& loss,
                           at::Tensor& stats, int64_t divergence, double beta, double temperature, double softcap,
                           double soft_weight, double hard_weight, int64_t ignore_index, bool compute_grad,
                           double hard_ratio) {
  TORCH_CHECK(xs.is_cuda() && xt.is_cuda() && loss.is_cuda() && stats.is_cuda(),
              "divergence_chunk_ (CUDA): all tensors must be CUDA tensors");
  TORCH_CHECK(xs.dim() == 2 && xt.sizes() == xs.sizes(), "divergence_chunk_: xs and xt must be [C, V] of one shape, got ",
              xs.sizes(), " and ", xt.sizes());
  TORCH_CHECK(xs.scalar_type() == at::kFloat && xt.scalar_type() == at::kFloat, "divergence_chunk_: logits must be float32");
  TORCH_CHECK((xs.size(1) <= 1 || xs.stride(1) == 1) && (xt.size(1) <= 1 || xt.stride(1) == 1),
              "divergence_chunk_: logit rows must be contiguous, got strides ", xs.strides(), " and ", xt.strides());
  TORCH_CHECK(divergence >= kFKL && divergence <= kJSD, "divergence_chunk_: unknown divergence ", divergence);
  TORCH_CHECK(temperature > 0.0, "divergence_chunk_: temperature must be positive");
  TORCH_CHECK(hard_ratio > 0.0 && std::isfinite(hard_ratio), "divergence_chunk_: hard_ratio must be positive, got ",
              hard_ratio);
  const int64_t C = xs.size(0), V = xs.size(1);
  TORCH_CHECK(loss.numel() == C && loss.scalar_type() == at::kFloat && loss.is_contiguous(),
              "divergence_chunk_: loss must be float32 [C]");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == C && stats.size(1) == 5 && stats.scalar_type() == at::kFloat &&
                  stats.is_contiguous(),
              "divergence_chunk_: stats must be float32 [C, 5]");
  TORCH_CHECK(xt.device() == xs.device() && loss.device() == xs.device() && stats.device() == xs.device(),
              "divergence_chunk_: all tensors must be on one device");
  const int64_t* lab = nullptr;
  if (labels.has_value() && labels->defined()) {
    TORCH_CHECK(labels->numel() == C && labels->scalar_type() == at::kLong && labels->is_contiguous() &&
                    labels->device() == xs.device(),
                "divergence_chunk_: labels must be int64 [C] on the logits' device");
    lab = labels->data_ptr<int64_t>();
  }
  TORCH_CHECK(C <= static_cast<int64_t>(INT32_MAX), "divergence_chunk_: too many rows for one launch: ", C);
  if (C == 0) return;

  const c10::cuda::CUDAGuard guard(xs.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool use_cap = softcap > 0.0;
  RowParams p{static_cast<float>(beta),
              static_cast<float>(1.0 - beta),
              static_cast<float>(1.0 / temperature),
              static_cast<float>(temperature),
              static_cast<float>(softcap),
              use_cap ? static_cast<float>(1.0 / softcap) : 0.0f,
              static_cast<float>(soft_weight),
              static_cast<float>(hard_weight),
              static_cast<float>(hard_ratio),
              ignore_index,
              static_cast<float>(hard_ratio) != 1.0f};
  float* ps = xs.data_ptr<float>();
  const float* pt = xt.data_ptr<float>();
  const int64_t ss = xs.stride(0), st = xt.stride(0);
  const bool vec = V % 4 == 0 && ss % 4 == 0 && st % 4 == 0 && reinterpret_cast<uintptr_t>(ps) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(pt) % 16 == 0;
  const bool hard = lab != nullptr && hard_weight != 0.0;
  float* pl = loss.data_ptr<float>();
  float* pst = stats.data_ptr<float>();
  switch (divergence) {
    case kFKL:
      launch_div<kFKL>(use_cap, compute_grad, vec, C, stream, ps, pt, lab, pl, pst, V, ss, st, p, hard);
      break;
    case kRKL:
      launch_div<kRKL>(use_cap, compute_grad, vec, C, stream, ps, pt, lab, pl, pst, V, ss, st, p, hard);
      break;
    default:
      launch_div<kJSD>(use_cap, compute_grad, vec, C, stream, ps, pt, lab, pl, pst, V, ss, st, p, hard);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif  // FASTOPD_CUDA_EMULATION
}  // namespace

#ifndef FASTOPD_CUDA_EMULATION
TORCH_LIBRARY_IMPL(fastopd, CUDA, m) { m.impl("divergence_chunk_", &divergence_chunk_cuda); }
#endif

}  // namespace fastopd
