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

#include <cmath>
#include <optional>

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

constexpr int64_t kGrain = 1 << 14;

// sqrtf vectorizes only without errno; the attribute keeps the rest of the translation unit's math untouched.
template <typename scalar_t, typename index_t, bool HAS_INDEX, bool HAS_MASTER, bool COUNT, bool DECAY>
__attribute__((optimize("no-math-errno"))) void adamw_range(scalar_t* __restrict param,
                                                            const scalar_t* __restrict grad,
                                                            const index_t* __restrict idx, float* __restrict m,
                                                            float* __restrict v, float* __restrict master,
                                                            const AdamCoeffs c, int64_t begin, int64_t end,
                                                            int64_t* count) {
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
  if (COUNT) {
#pragma omp atomic
    *count += swallowed;
  }
}

template <typename scalar_t, typename index_t, bool HAS_INDEX, bool HAS_MASTER, bool COUNT>
void adamw_tensor(scalar_t* param, const scalar_t* grad, const index_t* idx, float* m, float* v, float* master,
                  const AdamCoeffs& c, bool decay, int64_t k, int64_t* count) {
  at::parallel_for(0, k, kGrain, [&](int64_t begin, int64_t end) {
    if (decay) {
      adamw_range<scalar_t, index_t, HAS_INDEX, HAS_MASTER, COUNT, true>(param, grad, idx, m, v, master, c, begin,
                                                                          end, count);
    } else {
      adamw_range<scalar_t, index_t, HAS_INDEX, HAS_MASTER, COUNT, false>(param, grad, idx, m, v, master, c, begin,
                                                                           end, count);
    }
  });
}

template <typename scalar_t, typename index_t>
void dispatch_flags(scalar_t* param, const scalar_t* grad, const index_t* idx, float* m, float* v, float* master,
                    const AdamCoeffs& c, bool decay, int64_t k, int64_t* count) {
  const bool has_index = idx != nullptr, has_master = master != nullptr, counting = count != nullptr;
#define FASTOPD_ADAMW_CASE(I, M, C)                                                                 \
  if (has_index == I && has_master == M && counting == C) {                                        \
    adamw_tensor<scalar_t, index_t, I, M, C>(param, grad, idx, m, v, master, c, decay, k, count); \
    return;                                                                                        \
  }
  FASTOPD_ADAMW_CASE(true, true, true)
  FASTOPD_ADAMW_CASE(true, true, false)
  FASTOPD_ADAMW_CASE(true, false, true)
  FASTOPD_ADAMW_CASE(true, false, false)
  FASTOPD_ADAMW_CASE(false, true, true)
  FASTOPD_ADAMW_CASE(false, true, false)
  FASTOPD_ADAMW_CASE(false, false, true)
  FASTOPD_ADAMW_CASE(false, false, false)
#undef FASTOPD_ADAMW_CASE
}

template <typename scalar_t>
void step_one(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& indices,
              const at::Tensor& m, const at::Tensor& v, const std::optional<at::Tensor>& master,
              const std::optional<at::Tensor>& swallowed, const AdamCoeffs& c, bool decay, int64_t k) {
  scalar_t* p = param.data_ptr<scalar_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  float* pm = m.data_ptr<float>();
  float* pv = v.data_ptr<float>();
  float* pw = master.has_value() ? master->data_ptr<float>() : nullptr;
  int64_t* cnt = swallowed.has_value() ? swallowed->data_ptr<int64_t>() : nullptr;
  if (!indices.has_value()) {
    dispatch_flags<scalar_t, int32_t>(p, g, nullptr, pm, pv, pw, c, decay, k, cnt);
  } else if (indices->scalar_type() == at::kInt) {
    dispatch_flags<scalar_t, int32_t>(p, g, indices->data_ptr<int32_t>(), pm, pv, pw, c, decay, k, cnt);
  } else {
    dispatch_flags<scalar_t, int64_t>(p, g, indices->data_ptr<int64_t>(), pm, pv, pw, c, decay, k, cnt);
  }
}

std::optional<at::Tensor> defined_or_none(const c10::List<std::optional<at::Tensor>>& list, size_t i) {
  std::optional<at::Tensor> t = list.get(i);
  if (t.has_value() && !t->defined()) return std::nullopt;
  return t;
}

void sparse_adamw_step_cpu(at::TensorList params, at::TensorList grads,
                           const c10::List<std::optional<at::Tensor>>& indices, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, const c10::List<std::optional<at::Tensor>>& masters,
                           const c10::List<std::optional<at::Tensor>>& swallowed, at::ArrayRef<double> step_sizes,
                           at::ArrayRef<double> bias_correction2_sqrts, double lr, double beta1, double beta2,
                           double eps, double weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && indices.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  masters.size() == n && swallowed.size() == n && step_sizes.size() == n &&
                  bias_correction2_sqrts.size() == n,
              "sparse_adamw_step_: every list must have one entry per parameter (", n, ")");
  const float w = static_cast<float>(1.0 - beta1);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    const at::Tensor& grad = grads[i];
    const std::optional<at::Tensor> idx = defined_or_none(indices, i);
    const std::optional<at::Tensor> master = defined_or_none(masters, i);
    const std::optional<at::Tensor> counter = defined_or_none(swallowed, i);
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
    AdamCoeffs c{static_cast<float>(1.0 - lr * weight_decay),
                 w,
                 std::abs(w) < 0.5f,
                 static_cast<float>(beta2),
                 static_cast<float>(1.0 - beta2),
                 static_cast<float>(bias_correction2_sqrts[i]),
                 static_cast<float>(eps),
                 static_cast<float>(-step_sizes[i])};
    const bool decay = weight_decay != 0.0;
    switch (param.scalar_type()) {
      case at::kFloat:
        step_one<float>(param, grad, idx, m, v, master, counter, c, decay, k);
        break;
      case at::kBFloat16:
        step_one<c10::BFloat16>(param, grad, idx, m, v, master, counter, c, decay, k);
        break;
      case at::kHalf:
        step_one<c10::Half>(param, grad, idx, m, v, master, counter, c, decay, k);
        break;
      default:
        TORCH_CHECK(false, "sparse_adamw_step_: unsupported parameter dtype ", param.scalar_type());
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopd, CPU, m) { m.impl("sparse_adamw_step_", &sparse_adamw_step_cpu); }

}  // namespace fastopd
