// Row-wise teacher-student divergence on a chunk of fp32 logits, fused into one OpenMP kernel.
//
// Input: xs, xt [C, V] raw fp32 logits of student and teacher (after the head GEMMs and biases).
// Per row:  z = softcap(x) / T;  lp = z - lse(z);  p = exp(lp)
//   fkl = sum p_t (lp_t - lp_s)                      dL/dz_s = p_s - p_t
//   rkl = sum p_s (lp_s - lp_t)                      dL/dz_s = p_s ((lp_s - lp_t) - rkl)
//   jsd = b KL(t||m) + (1-b) KL(s||m), m = b p_t + (1-b) p_s
//                                                    dL/dz_s = (1-b) p_s ((lp_s - log m) - KL(s||m))
//   loss = soft_w * div + hard_w * (lse_s - z_s[y]);  hard term adds hard_w (p_s - onehot(y)).
// With a hard-label temperature of its own (hard_ratio r = T / T_hard != 1) the CE is of z_h = r z_s, whose
// max is r max_s: two extra passes (its normalizer, then its gradient term r hw p_h into the scratch row
// while z_s is still at hand) and one more add in the gradient pass; the r = 1 path is unchanged.
// Output: loss [C], stats [C, 5] = (lse_s, lse_t, lp_s[y], lp_t[y], entropy(p_s)), and, with
// compute_grad, dL/dx_s written over xs (chain rule through temperature and softcap included).
// xt is scratch. Ignored rows (label == ignore_index) get loss 0, stats 0, gradient 0.
//
// rkl is accumulated relative to lp_s - lp_t at the student's top token (the pivot; see pass 2), so that the
// gradient of a dominant token is not a difference of two numbers of size rkl.
// Memory traffic per row: 4 streaming passes over the two rows (max, sum-exp, loss/prob, gradient);
// a row of 32k fp32 logits per model is 128 KiB, so passes after the first hit L2.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace fastopd {
namespace {

enum Divergence : int64_t { kFKL = 0, kRKL = 1, kJSD = 2 };

struct RowOptions {
  float beta;
  float one_minus_beta;  // 1 - beta formed in double: 1 - float(beta) would be 1.3% off at beta = 1 - 1e-6
  float temperature;
  float inv_temperature;
  float softcap;  // <= 0: none
  float soft_weight;
  float hard_weight;
  float hard_ratio;  // T / T_hard; 1: the CE is of z_s itself
  bool compute_grad;
};

// Inlined into each ISA variant below, so every clone gets its own vector code.
template <int64_t DIV, bool SOFTCAP>
__attribute__((always_inline)) inline void divergence_row(float* __restrict xs, float* __restrict xt,
                                                          float* __restrict es, float* __restrict et,
                                                          float* __restrict eh, int64_t V, int64_t y,
                                                          const RowOptions& o, float* loss_out, float* stats) {
  const float inv_t = o.inv_temperature;
  const float cap = o.softcap;
  const float inv_cap = SOFTCAP ? 1.0f / cap : 0.0f;
  const float ninf = -std::numeric_limits<float>::infinity();

  // Pass 0: z = softcap(x) / T, in place.
  if (SOFTCAP || inv_t != 1.0f) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      float a = xs[v], b = xt[v];
      if (SOFTCAP) {
        a = cap * vmath::tanh(a * inv_cap);
        b = cap * vmath::tanh(b * inv_cap);
      }
      xs[v] = a * inv_t;
      xt[v] = b * inv_t;
    }
  }
  const float zs_y = y >= 0 ? xs[y] : 0.0f;
  const float zt_y = y >= 0 ? xt[y] : 0.0f;

  // Pass 1: row maxima.
  float ms = ninf, mt = ninf;
#pragma omp simd reduction(max : ms, mt)
  for (int64_t v = 0; v < V; ++v) {
    ms = xs[v] > ms ? xs[v] : ms;
    mt = xt[v] > mt ? xt[v] : mt;
  }
  ms = ms == ninf ? 0.0f : ms;
  mt = mt == ninf ? 0.0f : mt;

  // Pass 2: normalizers; the exponentials are kept in the thread's scratch rows (L2-resident) so that
  // pass 3 forms probabilities with a multiply instead of a second exp. rkl: also the teacher's z at the
  // student's top token (the pivot of pass 3).
  double ss = 0.0, st = 0.0;
  float top_t = ninf;
#pragma omp simd reduction(+ : ss, st) reduction(max : top_t)
  for (int64_t v = 0; v < V; ++v) {
    const float a = vmath::exp(xs[v] - ms), b = vmath::exp(xt[v] - mt);
    es[v] = a;
    et[v] = b;
    ss += static_cast<double>(a);
    st += static_cast<double>(b);
    if (DIV == kRKL) {
      const float cand = xs[v] == ms ? xt[v] : ninf;
      top_t = cand > top_t ? cand : top_t;
    }
  }
  // log p = (z - max) - log(sum): subtracting the max first keeps log-probs near 0 exact, where
  // z - lse would lose everything below the spacing of fp32 at |lse| (4e-6 at 50).
  const double log_ss = std::log(ss), log_st = std::log(st);
  const float lss = static_cast<float>(log_ss), lst = static_cast<float>(log_st);
  const double lse_s_d = static_cast<double>(ms) + log_ss;
  const double lse_t_d = static_cast<double>(mt) + log_st;
  const float inv_ss = static_cast<float>(1.0 / ss), inv_st = static_cast<float>(1.0 / st);

  // Hard-label CE at its own temperature: z_h = r z_s, max r ms. eh holds hw r p_h times the chain rule's
  // factor (added to the gradient at the end), formed here while xs still holds z_s.
  const bool hard_t = o.hard_ratio != 1.0f && o.hard_weight != 0.0f && y >= 0;
  const float hr = o.hard_ratio;
  double log_sh = 0.0;
  if (hard_t) {
    double sh = 0.0;
#pragma omp simd reduction(+ : sh)
    for (int64_t v = 0; v < V; ++v) {
      const float a = vmath::exp((xs[v] - ms) * hr);
      eh[v] = a;
      sh += static_cast<double>(a);
    }
    log_sh = std::log(sh);
    if (o.compute_grad) {
      const float scale = static_cast<float>(static_cast<double>(o.hard_weight) * hr / sh);
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) {
        float chain = inv_t;
        if (SOFTCAP) {
          const float c = xs[v] * o.temperature * inv_cap;
          chain = inv_t * (1.0f - c * c);
        }
        eh[v] *= scale * chain;
      }
    }
  }
  // rkl: d = lp_s - lp_t is taken relative to its value c at the student's top token. The gradient
  // p_s (d - rkl) of a dominant token is a difference of two numbers of size |rkl| (~27 at logit scale 140),
  // where every fp32 rounding would land; with rkl = c + sum p_s (d - c) only small numbers cancel.
  float pivot = 0.0f;
  if (DIV == kRKL) {
    pivot = (0.0f - lss) - ((top_t - mt) - lst);
    if (!std::isfinite(pivot)) pivot = 0.0f;  // teacher -inf at the student's top token: the loss is inf anyway
  }

  // Pass 3: divergence terms and entropy; stores what the gradient pass needs.
  const float b = o.beta, omb = o.one_minus_beta;
  constexpr float kTinyProb = 1e-30f;
  const float sw = o.soft_weight;
  const float hw = hard_t ? 0.0f : o.hard_weight;  // in the passes below: the CE at the divergence's temperature
  const bool grad = o.compute_grad;
  double acc_a = 0.0, acc_b = 0.0, ent = 0.0;
#pragma omp simd reduction(+ : acc_a, acc_b, ent)
  for (int64_t v = 0; v < V; ++v) {
    const float zs = xs[v], zt = xt[v];
    const float lps = (zs - ms) - lss, lpt = (zt - mt) - lst;
    const float ps = es[v] * inv_ss, pt = et[v] * inv_st;
    ent += ps != 0.0f ? static_cast<double>(ps * lps) : 0.0;
    float chain = inv_t;
    if (SOFTCAP) {
      const float c = zs * o.temperature * inv_cap;
      chain = inv_t * (1.0f - c * c);
    }
    if (DIV == kFKL) {
      acc_a += pt != 0.0f ? static_cast<double>(pt * (lpt - lps)) : 0.0;
      if (grad) {
        // p_s - p_t, exact also where both are near 1 (a dominant token): p_t * expm1(lp_s - lp_t) there, as
        // the Triton and CUDA kernels take it. Only |d| < 0.1 needs it (further apart, p_s - p_t does not
        // cancel), so the series alone serves, and the loop gets no exp per element.
        const float d = lps - lpt;
        const bool near = pt > 0.0f && lpt > -1.0f && d < 0.1f && d > -0.1f;
        const float diff = near ? pt * vmath::expm1_small(d) : ps - pt;
        xs[v] = chain * (sw * diff + hw * ps);
      }
    } else if (DIV == kRKL) {
      const float r = ps != 0.0f ? (lps - lpt) - pivot : 0.0f;
      acc_a += static_cast<double>(ps * r);
      if (grad) {
        xs[v] = r;
        xt[v] = chain * ps;
      }
    } else {
      // m = b p_t + (1-b) p_s directly (one log, no extra exp). Terms of probability below 1e-30 are
      // dropped (they change the loss by < 1e-28 each): then m > 0 and log m is finite wherever it is used.
      const float lm = vmath::log(b * pt + omb * ps);
      const float tt = pt > kTinyProb ? pt * (lpt - lm) : 0.0f;
      const float ts = ps > kTinyProb ? ps * (lps - lm) : 0.0f;
      acc_a += static_cast<double>(tt);
      acc_b += static_cast<double>(ts);
      if (grad) {
        xs[v] = chain * ts;
        xt[v] = chain * ps;
      }
    }
  }

  double soft;
  if (DIV == kJSD) {
    soft = static_cast<double>(b) * acc_a + static_cast<double>(omb) * acc_b;
  } else if (DIV == kRKL) {
    soft = static_cast<double>(pivot) + acc_a;
  } else {
    soft = acc_a;
  }

  // Pass 4 (rkl, jsd): dL/dz_s = coef * p_s (r - K). rkl: r = (lp_s - lp_t) - pivot and K = rkl - pivot, with r
  // and chain*p_s stored; jsd: r = lp_s - log m and K = KL(s||m), with chain*p_s*r and chain*p_s stored.
  if (grad && DIV == kRKL) {
    const float k = static_cast<float>(acc_a);
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      xs[v] = sw * xt[v] * (xs[v] - k) + hw * xt[v];
    }
  } else if (grad && DIV == kJSD) {
    const float k = static_cast<float>(acc_b);
    const float coef = sw * omb;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      xs[v] = coef * (xs[v] - xt[v] * k) + hw * xt[v];
    }
  }

  if (grad && hard_t) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) xs[v] += eh[v];
  }
  double hard = 0.0;
  const float hw_all = o.hard_weight;
  if (y >= 0) {
    hard = hard_t ? log_sh - (static_cast<double>(zs_y) - static_cast<double>(ms)) * hr
                  : log_ss - (static_cast<double>(zs_y) - static_cast<double>(ms));
    if (grad && hw_all != 0.0f) {
      float chain_y = inv_t;
      if (SOFTCAP) {
        const float c = zs_y * o.temperature * inv_cap;
        chain_y = inv_t * (1.0f - c * c);
      }
      xs[y] -= hw_all * (hard_t ? hr : 1.0f) * chain_y;
    }
  }
  *loss_out = static_cast<float>(static_cast<double>(sw) * soft +
                                 (hw_all != 0.0f ? static_cast<double>(hw_all) * hard : 0.0));
  stats[0] = static_cast<float>(lse_s_d);
  stats[1] = static_cast<float>(lse_t_d);
  stats[2] = y >= 0 ? static_cast<float>((static_cast<double>(zs_y) - ms) - log_ss) : 0.0f;
  stats[3] = y >= 0 ? static_cast<float>((static_cast<double>(zt_y) - mt) - log_st) : 0.0f;
  stats[4] = static_cast<float>(-ent);
}

// The row kernels compiled three times, for AVX-512, AVX2+FMA and baseline x86-64; the divergence_row
// template is always_inline, so each variant gets its own vector code. The variant is picked at run time
// by CPU feature (not CPU model), so a wheel built anywhere runs everywhere at the best width available.
#define FASTOPD_ROW_VARIANT(NAME)                                                                                     \
  void NAME(int64_t div, bool softcap, float* xs, float* xt, float* es, float* et, float* eh, int64_t V,              \
            int64_t y, const RowOptions& o, float* loss_out, float* stats) {                                          \
    if (softcap) {                                                                                                    \
      if (div == kFKL) return divergence_row<kFKL, true>(xs, xt, es, et, eh, V, y, o, loss_out, stats);               \
      if (div == kRKL) return divergence_row<kRKL, true>(xs, xt, es, et, eh, V, y, o, loss_out, stats);               \
      return divergence_row<kJSD, true>(xs, xt, es, et, eh, V, y, o, loss_out, stats);                                \
    }                                                                                                                 \
    if (div == kFKL) return divergence_row<kFKL, false>(xs, xt, es, et, eh, V, y, o, loss_out, stats);                \
    if (div == kRKL) return divergence_row<kRKL, false>(xs, xt, es, et, eh, V, y, o, loss_out, stats);                \
    return divergence_row<kJSD, false>(xs, xt, es, et, eh, V, y, o, loss_out, stats);                                 \
  }

using RowFn = void (*)(int64_t, bool, float*, float*, float*, float*, float*, int64_t, int64_t, const RowOptions&,
                       float*, float*);

FASTOPD_ROW_VARIANT(divergence_row_baseline)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2")))
FASTOPD_ROW_VARIANT(divergence_row_avx512)
__attribute__((target("avx2,fma,f16c,bmi2")))
FASTOPD_ROW_VARIANT(divergence_row_avx2)

RowFn pick_row_variant() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return &divergence_row_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &divergence_row_avx2;
  return &divergence_row_baseline;
}
#else
RowFn pick_row_variant() { return &divergence_row_baseline; }
#endif

void divergence_chunk_cpu(at::Tensor& xs, at::Tensor& xt, const std::optional<at::Tensor>& labels, at::Tensor& loss,
                          at::Tensor& stats, int64_t divergence, double beta, double temperature, double softcap,
                          double soft_weight, double hard_weight, int64_t ignore_index, bool compute_grad,
                          double hard_ratio) {
  TORCH_CHECK(xs.dim() == 2 && xt.sizes() == xs.sizes(), "divergence_chunk_: xs and xt must be [C, V] of one shape, got ",
              xs.sizes(), " and ", xt.sizes());
  TORCH_CHECK(xs.scalar_type() == at::kFloat && xt.scalar_type() == at::kFloat, "divergence_chunk_: logits must be float32");
  TORCH_CHECK(xs.is_contiguous() && xt.is_contiguous(), "divergence_chunk_: logits must be contiguous");
  TORCH_CHECK(divergence >= 0 && divergence <= 2, "divergence_chunk_: unknown divergence ", divergence);
  const int64_t C = xs.size(0), V = xs.size(1);
  TORCH_CHECK(loss.numel() == C && loss.scalar_type() == at::kFloat && loss.is_contiguous(), "divergence_chunk_: loss must be float32 [C]");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == C && stats.size(1) == 5 && stats.scalar_type() == at::kFloat &&
                  stats.is_contiguous(),
              "divergence_chunk_: stats must be float32 [C, 5]");
  const int64_t* lab = nullptr;
  if (labels.has_value() && labels->defined()) {
    TORCH_CHECK(labels->numel() == C && labels->scalar_type() == at::kLong && labels->is_contiguous(),
                "divergence_chunk_: labels must be int64 [C]");
    lab = labels->data_ptr<int64_t>();
  }
  TORCH_CHECK(temperature > 0.0, "divergence_chunk_: temperature must be positive");
  TORCH_CHECK(hard_ratio > 0.0 && std::isfinite(hard_ratio), "divergence_chunk_: hard_ratio must be positive, got ",
              hard_ratio);

  RowOptions o{static_cast<float>(beta),        static_cast<float>(1.0 - beta),
               static_cast<float>(temperature), static_cast<float>(1.0 / temperature),
               static_cast<float>(softcap),     static_cast<float>(soft_weight),
               lab != nullptr ? static_cast<float>(hard_weight) : 0.0f,  // no labels, no hard term (as the reference)
               static_cast<float>(hard_ratio),  compute_grad};
  const bool use_cap = softcap > 0.0;
  static const RowFn row_fn = pick_row_variant();

  float* ps = xs.data_ptr<float>();
  float* pt = xt.data_ptr<float>();
  float* pl = loss.data_ptr<float>();
  float* pst = stats.data_ptr<float>();
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    // per task: exp rows of student and teacher, and (hard-label temperature only) the CE's gradient term
    std::vector<float> scratch(static_cast<size_t>((hard_ratio != 1.0 && hard_weight != 0.0 ? 3 : 2) * V));
    for (int64_t r = begin; r < end; ++r) {
      int64_t y = -1;
      if (lab != nullptr) {
        y = lab[r];
        if (y == ignore_index) {
          pl[r] = 0.0f;
          for (int k = 0; k < 5; ++k) pst[r * 5 + k] = 0.0f;
          if (compute_grad) std::fill(ps + r * V, ps + (r + 1) * V, 0.0f);
          continue;
        }
        TORCH_CHECK(y >= 0 && y < V, "divergence_chunk_: label ", y, " out of range for vocabulary of ", V);
      }
      row_fn(divergence, use_cap, ps + r * V, pt + r * V, scratch.data(), scratch.data() + V,
             scratch.size() > static_cast<size_t>(2 * V) ? scratch.data() + 2 * V : nullptr, V, y, o, pl + r,
             pst + r * 5);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopd, CPU, m) { m.impl("divergence_chunk_", &divergence_chunk_cpu); }

}  // namespace fastopd
