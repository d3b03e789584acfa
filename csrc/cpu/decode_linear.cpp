// Small-batch fp32 linear layer for CPU decoding: out[M, N] (=, or +=) x[M, K] @ W[K, N] + bias[N], for the
// M = batch-size rows of a one-token decode step (M is a few to a few dozen; K, N are a model's widths).
//
// Why not BLAS: at these shapes a GEMM is a stream over the weight with M-fold reuse, and MKL's sgemm reaches
// a fraction of a core's FMA throughput there on AMD processors (measured on a 2-core AMD EPYC: the
// [8, 256] x [256, 8192] head of the rollout benchmark at ~26 GFLOP/s; this kernel ~90 GFLOP/s, see
// docs/rollout.md). The weight is packed once (fastopd/models/decode_linear.py, kept between decode calls)
// into panels of kPanel = 48 columns, [P = ceil(N / 48), K, 48], zero-padded, so each panel is one contiguous
// stream. A register tile of R <= 8 rows x 48 columns (24 zmm accumulators; AVX2: 4 rows x 24 columns, 12 ymm)
// takes one weight row per k and one broadcast of x per row. Sums run over K in blocks of kKBlock, each block
// summed in registers and added to a per-tile total, which keeps the rounding error near a blocked BLAS's
// (a single running sum over K = 4096 would not). Columns past N (the padding) are computed and dropped.
//
// Threads: at::parallel_for over panels, with a grain that keeps small layers on one thread.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTOPD_X86 1
#endif

namespace fastopd {
namespace {

constexpr int64_t kPanel = 48;
constexpr int64_t kKBlock = 64;
constexpr int kMaxRows = 8;

// tile[r * kPanel + j] += sum_k x[r, k] * panel[k, j] over one row group, any ISA (the compiler vectorizes j).
template <int R>
void panel_tile_baseline(const float* x, int64_t ldx, int64_t K, const float* panel, float* tile) {
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t k1 = std::min(K, k0 + kKBlock);
    float acc[R][kPanel] = {};
    for (int64_t k = k0; k < k1; ++k) {
      const float* w = panel + k * kPanel;
      for (int r = 0; r < R; ++r) {
        const float b = x[r * ldx + k];
        for (int64_t j = 0; j < kPanel; ++j) acc[r][j] += b * w[j];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < kPanel; ++j) tile[r * kPanel + j] += acc[r][j];
  }
}

#ifdef FASTOPD_X86
template <int R>
__attribute__((target("avx512f,fma"))) void panel_tile_avx512(const float* x, int64_t ldx, int64_t K,
                                                              const float* panel, float* tile) {
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t k1 = std::min(K, k0 + kKBlock);
    __m512 acc[R][3];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 3; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      const float* w = panel + k * kPanel;
      _mm_prefetch(reinterpret_cast<const char*>(w + 8 * kPanel), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + 8 * kPanel + 16), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + 8 * kPanel + 32), _MM_HINT_T0);
      const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32);
      for (int r = 0; r < R; ++r) {
        const __m512 b = _mm512_set1_ps(x[r * ldx + k]);
        acc[r][0] = _mm512_fmadd_ps(b, w0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(b, w1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(b, w2, acc[r][2]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 3; ++c) {
        float* t = tile + r * kPanel + 16 * c;
        _mm512_storeu_ps(t, _mm512_add_ps(_mm512_loadu_ps(t), acc[r][c]));
      }
  }
}

// AVX2 has 16 ymm registers: 4 rows x 24 columns (12 accumulators, 3 weight loads, 1 broadcast), each panel
// in two halves; R <= 4 here (the caller splits 8-row groups).
template <int R>
__attribute__((target("avx2,fma"))) void half_panel_tile_avx2(const float* x, int64_t ldx, int64_t K,
                                                              const float* panel, float* tile) {
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t k1 = std::min(K, k0 + kKBlock);
    __m256 acc[R][3];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 3; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      const float* w = panel + k * kPanel;
      const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8), w2 = _mm256_loadu_ps(w + 16);
      for (int r = 0; r < R; ++r) {
        const __m256 b = _mm256_broadcast_ss(x + r * ldx + k);
        acc[r][0] = _mm256_fmadd_ps(b, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(b, w1, acc[r][1]);
        acc[r][2] = _mm256_fmadd_ps(b, w2, acc[r][2]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 3; ++c) {
        float* t = tile + r * kPanel + 8 * c;
        _mm256_storeu_ps(t, _mm256_add_ps(_mm256_loadu_ps(t), acc[r][c]));
      }
  }
}

template <int R>
__attribute__((target("avx2,fma"))) void panel_tile_avx2(const float* x, int64_t ldx, int64_t K,
                                                         const float* panel, float* tile) {
  if constexpr (R > 4) {
    panel_tile_avx2<4>(x, ldx, K, panel, tile);
    panel_tile_avx2<R - 4>(x + 4 * ldx, ldx, K, panel, tile + 4 * kPanel);
  } else {
    half_panel_tile_avx2<R>(x, ldx, K, panel, tile);
    half_panel_tile_avx2<R>(x, ldx, K, panel + kPanel / 2, tile + kPanel / 2);
  }
}
#endif

using TileFn = void (*)(const float*, int64_t, int64_t, const float*, float*);

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The best tile this CPU runs, capped by FASTOPD_DECODE_ISA ("avx2" or "baseline"; read once per process), which
// lets tests and benchmarks run the narrower variants on a wider CPU.
Isa detect_isa() {
  Isa isa = Isa::kBaseline;
#ifdef FASTOPD_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) {
    isa = Isa::kAvx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    isa = Isa::kAvx2;
  }
#endif
  const char* cap = std::getenv("FASTOPD_DECODE_ISA");
  if (cap != nullptr && std::strcmp(cap, "baseline") == 0) return Isa::kBaseline;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && isa == Isa::kAvx512) return Isa::kAvx2;
  return isa;
}

Isa current_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

#define FASTOPD_TILE_TABLE(fn) {&fn<1>, &fn<2>, &fn<3>, &fn<4>, &fn<5>, &fn<6>, &fn<7>, &fn<8>}

const TileFn* tile_table(Isa isa) {
  static const TileFn baseline[kMaxRows] = FASTOPD_TILE_TABLE(panel_tile_baseline);
#ifdef FASTOPD_X86
  static const TileFn avx512[kMaxRows] = FASTOPD_TILE_TABLE(panel_tile_avx512);
  static const TileFn avx2[kMaxRows] = FASTOPD_TILE_TABLE(panel_tile_avx2);
  if (isa == Isa::kAvx512) return avx512;
  if (isa == Isa::kAvx2) return avx2;
#endif
  return baseline;
}

bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  const char* a0 = static_cast<const char*>(a.data_ptr());
  const char* b0 = static_cast<const char*>(b.data_ptr());
  const char* a1 = a0 + ((a.size(0) - 1) * a.stride(0) + a.size(1)) * a.element_size();
  const char* b1 = b0 + ((b.size(0) - 1) * b.stride(0) + b.size(1)) * b.element_size();
  return a0 < b1 && b0 < a1;
}

void decode_linear_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& panels,
                       const std::optional<at::Tensor>& bias, bool accumulate) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && panels.dim() == 3,
              "decode_linear_: want out [M, N], x [M, K], panels [P, K, 48]; got ", out.sizes(), ", ", x.sizes(),
              ", ", panels.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
                  panels.scalar_type() == at::kFloat,
              "decode_linear_: tensors must be float32");
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), P = panels.size(0);
  TORCH_CHECK(out.size(0) == M, "decode_linear_: out has ", out.size(0), " rows, x ", M);
  TORCH_CHECK(panels.size(1) == K && panels.size(2) == kPanel && panels.is_contiguous(),
              "decode_linear_: panels must be contiguous [ceil(N / 48), K = ", K, ", 48], got ", panels.sizes());
  TORCH_CHECK(P == (N + kPanel - 1) / kPanel, "decode_linear_: ", P, " panels cannot hold N = ", N, " columns");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "decode_linear_: x and out need unit column stride");
  TORCH_CHECK(M == 0 || !overlaps(out, x), "decode_linear_: out must not overlap x");
  const float* pb = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
                "decode_linear_: bias must be contiguous float32 [N = ", N, "]");
    pb = bias->data_ptr<float>();
  }
  if (M == 0 || N == 0) return;
  static const TileFn* table = tile_table(current_isa());
  const float* px = x.data_ptr<float>();
  const float* pw = panels.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  // ~1 MFLOP per task at least: a 256 x 1376 layer at M = 8 stays on one thread, an 8192-column head splits.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, 2 * M * K * kPanel));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    alignas(64) float tile[kMaxRows * kPanel];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, width = std::min(kPanel, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
        std::memset(tile, 0, sizeof(tile));
        table[rows - 1](px + m0 * ldx, ldx, K, pw + p * K * kPanel, tile);
        for (int r = 0; r < rows; ++r) {
          float* o = po + (m0 + r) * ldo + n0;
          const float* t = tile + r * kPanel;
          if (accumulate && pb != nullptr) {
            for (int64_t j = 0; j < width; ++j) o[j] = o[j] + t[j] + pb[n0 + j];
          } else if (accumulate) {
            for (int64_t j = 0; j < width; ++j) o[j] = o[j] + t[j];
          } else if (pb != nullptr) {
            for (int64_t j = 0; j < width; ++j) o[j] = t[j] + pb[n0 + j];
          } else {
            std::memcpy(o, t, static_cast<size_t>(width) * sizeof(float));
          }
        }
      }
    }
  });
}

}  // namespace

// Which register tile decode_linear_ runs here: "avx512", "avx2" or "baseline".
std::string decode_linear_isa() {
  switch (current_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

TORCH_LIBRARY_IMPL(fastopd, CPU, m) { m.impl("decode_linear_", &decode_linear_cpu); }

}  // namespace fastopd
