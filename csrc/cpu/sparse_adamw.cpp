// Sparse-masked AdamW step on CPU tensors: gather -> update -> scatter in one pass, one call per group.
//
// Per parameter i with selected flat indices idx [k] (or all coordinates when idx is absent), for j < k:
//   g = grad[idx[j]]; p = master[j] if masters else float(param[idx[j]])
//   p = p * (1 - lr*wd)                                   (when wd != 0; decoupled weight decay)
//   m = lerp(m, g, 1-b1)  = fma(w, g-m, m) for w < 0.5 else fma(w-1, g-m, g)     (torch's CPU lerp)
//   v = fma((1-b2)*g, g, v*b2)                            (torch's mul_ then addcmul_)
//   p = p + (-step_size * m) / (sqrt(v) / sqrt(1-b2^t) + eps)
//   master[j] = p; param[idx[j]] = round(p)
// Every scalar is rounded to float from the double the host computed, as torch.optim.AdamW's kernels do, and
// the only fused multiply-adds are the explicit fmaf calls (torch's vectorized lerp/addcmul use FMA too), so the
// moments are bitwise torch's. torch takes sqrt from MKL VML (not correctly rounded); this kernel uses the
// correctly rounded sqrt, so the parameter can differ from torch's by an ulp of the update on some coordinates.
// Coordinates outside idx are never read or written.
//
// Memory traffic per selected coordinate: idx 4 B, grad and param (gather) + param (scatter), m and v read and
// written 16 B, master 8 B when present. Index order is sorted, so gathers stream through memory.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace fastopd {
namespace {

struct AdamCoeffs {
  float decay;          // 1 - lr*wd
  float w;              // 1 - beta1 (lerp weight)
  bool w_small;         // |w| < 0.5
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;       // sqrt(1 - beta2^t)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^t)
};

// Work is split into chunks of kChunk selected coordinates across all tensors of the group, and one parallel
// region runs them all (one fork/join per step, not one per tensor). Within a chunk, blocks of kBlock
// coordinates are updated by a SIMD loop while the parameter/gradient lines kAhead coordinates further are
// prefetched: at low density every gathered coordinate is its own cache line, so the loop is latency-bound
// without it.
constexpr int64_t kChunk = 1 << 15;
constexpr int64_t kBlock = 64;
constexpr int64_t kAhead = 256;

struct TensorArgs {
  void* param;
  const void* grad;
  const void* idx;
  float* m;
  float* v;
  float* master;
  int64_t* count;
  AdamCoeffs c;
};

using RangeFn = void (*)(const TensorArgs&, int64_t, int64_t);

// sqrtf vectorizes only without errno; the attribute keeps the rest of the translation unit's math untouched.
template <typename scalar_t, typename index_t, bool HAS_INDEX, bool HAS_MASTER, bool COUNT, bool DECAY>
__attribute__((optimize("no-math-errno"))) int64_t adamw_block(scalar_t* __restrict param,
                                                               const scalar_t* __restrict grad,
                                                               const index_t* __restrict idx,
                                                               float* __restrict m, float* __restrict v,
                                                               float* __restrict master, const AdamCoeffs& c,
                                                               int64_t begin, int64_t end) {
  int64_t swallowed = 0;
#pragma omp simd reduction(+ : swallowed)
  for (int64_t j = begin; j < end; ++j) {
    const int64_t i = HAS_INDEX ? static_cast<int64_t>(idx[j]) : j;
    const float g = static_cast<float>(grad[i]);
    const float stored = static_cast<float>(param[i]);
    const float old = HAS_MASTER ? master[j] : stored;
    float p = old;
    if (DECAY) p = p * c.decay;
    const float mj = m[j];
    const float diff = g - mj;
    const float m_new = c.w_small ? std::fmaf(c.w, diff, mj) : std::fmaf(c.w - 1.0f, diff, g);
    const float v_scaled = v[j] * c.beta2;
    const float v_new = std::fmaf(c.one_minus_beta2 * g, g, v_scaled);
    const float denom = std::sqrt(v_new) / c.bc2_sqrt + c.eps;
    p = p + (c.neg_step_size * m_new) / denom;
    m[j] = m_new;
    v[j] = v_new;
    if (HAS_MASTER) master[j] = p;
    if (COUNT) {
      // Would this step's change, applied to the stored low-precision value, have rounded away?
      const float moved = static_cast<float>(static_cast<scalar_t>(stored + (p - old)));
      swallowed += (p != old && moved == stored) ? 1 : 0;
    }
    param[i] = static_cast<scalar_t>(p);
  }
  return swallowed;
}

template <typename scalar_t, typename index_t, bool HAS_INDEX, bool HAS_MASTER, bool COUNT, bool DECAY>
void adamw_range(const TensorArgs& a, int64_t begin, int64_t end) {
  auto* param = static_cast<scalar_t*>(a.param);
  const auto* grad = static_cast<const scalar_t*>(a.grad);
  const auto* idx = static_cast<const index_t*>(a.idx);
  int64_t swallowed = 0;
  for (int64_t j0 = begin; j0 < end; j0 += kBlock) {
    const int64_t j1 = std::min(j0 + kBlock, end);
    if (HAS_INDEX) {
      const int64_t p_end = std::min(j1 + kAhead, end);
      for (int64_t q = std::min(j0 + kAhead, end); q < p_end; ++q) {
        __builtin_prefetch(param + idx[q], 1);
        __builtin_prefetch(grad + idx[q], 0);
      }
    }
    swallowed += adamw_block<scalar_t, index_t, HAS_INDEX, HAS_MASTER, COUNT, DECAY>(param, grad, idx, a.m, a.v,
                                                                                      a.master, a.c, j0, j1);
  }
  if (COUNT) {
#pragma omp atomic
    *a.count += swallowed;
  }
}

template <typename scalar_t, typename index_t>
RangeFn pick_range(bool has_index, bool has_master, bool counting, bool decay) {
#define FASTOPD_ADAMW_CASE(I, M, C, D) \
  if (has_index == I && has_master == M && counting == C && decay == D) return &adamw_range<scalar_t, index_t, I, M, C, D>;
  FASTOPD_ADAMW_CASE(true, true, true, true)
  FASTOPD_ADAMW_CASE(true, true, true, false)
  FASTOPD_ADAMW_CASE(true, true, false, true)
  FASTOPD_ADAMW_CASE(true, true, false, false)
  FASTOPD_ADAMW_CASE(true, false, true, true)
  FASTOPD_ADAMW_CASE(true, false, true, false)
  FASTOPD_ADAMW_CASE(true, false, false, true)
  FASTOPD_ADAMW_CASE(true, false, false, false)
  FASTOPD_ADAMW_CASE(false, true, true, true)
  FASTOPD_ADAMW_CASE(false, true, true, false)
  FASTOPD_ADAMW_CASE(false, true, false, true)
  FASTOPD_ADAMW_CASE(false, true, false, false)
  FASTOPD_ADAMW_CASE(false, false, true, true)
  FASTOPD_ADAMW_CASE(false, false, true, false)
  FASTOPD_ADAMW_CASE(false, false, false, true)
  FASTOPD_ADAMW_CASE(false, false, false, false)
#undef FASTOPD_ADAMW_CASE
  return nullptr;
}

template <typename scalar_t>
RangeFn pick_for_index(const std::optional<at::Tensor>& indices, bool has_master, bool counting, bool decay) {
  if (indices.has_value() && indices->scalar_type() == at::kLong) {
    return pick_range<scalar_t, int64_t>(true, has_master, counting, decay);
  }
  return pick_range<scalar_t, int32_t>(indices.has_value(), has_master, counting, decay);
}

std::optional<at::Tensor> defined_or_none(const c10::List<std::optional<at::Tensor>>& list, size_t i) {
  std::optional<at::Tensor> t = list.get(i);
  if (t.has_value() && !t->defined()) return std::nullopt;
  return t;
}

// masters/swallowed entries: an empty tensor stands for "none".
std::optional<at::Tensor> nonempty_or_none(at::TensorList list, size_t i) {
  if (!list[i].defined() || list[i].numel() == 0) return std::nullopt;
  return list[i];
}

void sparse_adamw_step_cpu(at::TensorList params, at::TensorList grads,
                           const c10::List<std::optional<at::Tensor>>& indices, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList masters, at::TensorList swallowed,
                           at::ArrayRef<double> step_sizes,
                           at::ArrayRef<double> bias_correction2_sqrts, double lr, double beta1, double beta2,
                           double eps, double weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && indices.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  masters.size() == n && swallowed.size() == n && step_sizes.size() == n &&
                  bias_correction2_sqrts.size() == n,
              "sparse_adamw_step_: every list must have one entry per parameter (", n, ")");
  const float w = static_cast<float>(1.0 - beta1);
  struct Chunk {
    size_t tensor;
    int64_t begin, end;
  };
  std::vector<TensorArgs> args;
  std::vector<RangeFn> fns;
  std::vector<Chunk> chunks;
  args.reserve(n);
  fns.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    const at::Tensor& grad = grads[i];
    const std::optional<at::Tensor> idx = defined_or_none(indices, i);
    const std::optional<at::Tensor> master = nonempty_or_none(masters, i);
    const std::optional<at::Tensor> counter = nonempty_or_none(swallowed, i);
    const at::Tensor& m = exp_avgs[i];
    const at::Tensor& v = exp_avg_sqs[i];
    TORCH_CHECK(param.device().is_cpu() && param.is_contiguous(), "sparse_adamw_step_: parameter ", i,
                " must be a contiguous CPU tensor");
    TORCH_CHECK(grad.scalar_type() == param.scalar_type() && grad.numel() == param.numel() && grad.is_contiguous(),
                "sparse_adamw_step_: gradient ", i, " must be contiguous with the parameter's dtype and numel");
    const int64_t k = idx.has_value() ? idx->numel() : param.numel();
    if (idx.has_value()) {
      TORCH_CHECK(idx->dim() == 1 && idx->is_contiguous() &&
                      (idx->scalar_type() == at::kInt || idx->scalar_type() == at::kLong),
                  "sparse_adamw_step_: indices ", i, " must be contiguous int32/int64 [k]");
    }
    for (const at::Tensor* s : {&m, &v}) {
      TORCH_CHECK(s->scalar_type() == at::kFloat && s->numel() == k && s->is_contiguous(),
                  "sparse_adamw_step_: moments of parameter ", i, " must be contiguous float32 [", k, "]");
    }
    if (master.has_value()) {
      TORCH_CHECK(master->scalar_type() == at::kFloat && master->numel() == k && master->is_contiguous(),
                  "sparse_adamw_step_: master values of parameter ", i, " must be contiguous float32 [", k, "]");
    }
    if (counter.has_value()) {
      TORCH_CHECK(counter->scalar_type() == at::kLong && counter->numel() == 1,
                  "sparse_adamw_step_: swallowed counter ", i, " must be one int64");
    }
    if (k == 0) continue;
    TensorArgs a{param.data_ptr(),
                 grad.data_ptr(),
                 idx.has_value() ? idx->data_ptr() : nullptr,
                 m.data_ptr<float>(),
                 v.data_ptr<float>(),
                 master.has_value() ? master->data_ptr<float>() : nullptr,
                 counter.has_value() ? counter->data_ptr<int64_t>() : nullptr,
                 AdamCoeffs{static_cast<float>(1.0 - lr * weight_decay), w, std::abs(w) < 0.5f,
                            static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                            static_cast<float>(bias_correction2_sqrts[i]), static_cast<float>(eps),
                            static_cast<float>(-step_sizes[i])}};
    const bool decay = weight_decay != 0.0;
    RangeFn fn = nullptr;
    switch (param.scalar_type()) {
      case at::kFloat:
        fn = pick_for_index<float>(idx, master.has_value(), counter.has_value(), decay);
        break;
      case at::kBFloat16:
        fn = pick_for_index<c10::BFloat16>(idx, master.has_value(), counter.has_value(), decay);
        break;
      case at::kHalf:
        fn = pick_for_index<c10::Half>(idx, master.has_value(), counter.has_value(), decay);
        break;
      default:
        TORCH_CHECK(false, "sparse_adamw_step_: unsupported parameter dtype ", param.scalar_type());
    }
    const size_t t = args.size();
    args.push_back(a);
    fns.push_back(fn);
    for (int64_t b = 0; b < k; b += kChunk) chunks.push_back(Chunk{t, b, std::min(b + kChunk, k)});
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const Chunk& ch = chunks[q];
      fns[ch.tensor](args[ch.tensor], ch.begin, ch.end);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopd, CPU, m) { m.impl("sparse_adamw_step_", &sparse_adamw_step_cpu); }

}  // namespace fastopd
