// Branch-free float exp/log/tanh that gcc and clang auto-vectorize inside `#pragma omp simd` loops.
// The libm versions do not vectorize without -ffast-math, and -ffast-math would break the -inf and
// NaN handling the divergence kernels rely on (masked vocabulary entries are -inf logits).
// Accuracy: exp and log within 2 ulp over their ranges (Cephes polynomials); exp(-inf) == 0 exactly,
// log(0) == -inf exactly.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastopd {
namespace vmath {

__attribute__((always_inline)) static inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

__attribute__((always_inline)) static inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// exp(x). Results below FLT_MIN flush to 0 (inputs under -87.33), large inputs saturate at exp(88).
__attribute__((always_inline)) static inline float exp(float x) {
  const float lo = -87.3365478515625f;
  float xc = x < lo ? lo : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float n = ((xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  return x < lo ? 0.0f : y * scale;
}

// log(x) for x >= 0: log(0) = -inf, log(inf) = inf, log(NaN) = NaN, denormals handled by prescaling.
__attribute__((always_inline)) static inline float log(float x) {
  const bool denorm = x < 1.17549435e-38f;
  float xs = denorm ? x * 8388608.0f : x;  // 2^23
  const int32_t bits = float_to_bits(xs);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // m in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float y = p * m * z;
  const float fe = static_cast<float>(e) - (denorm ? 23.0f : 0.0f);
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  float res = m + y + fe * 0.693359375f;
  res = x == 0.0f ? -__builtin_inff() : res;
  return (x == __builtin_inff() || x != x) ? x : res;  // the bit manipulation above turns a NaN into a number
}

// exp(x) - 1 for |x| < 0.1, by its Taylor series (truncation below 2e-10 relative; six FMAs, no exp). Callers
// take exp(x) - 1 directly above 0.1, where no cancellation is left.
__attribute__((always_inline)) static inline float expm1_small(float x) {
  return x * (1.0f + x * (0.5f + x * (1.0f / 6.0f + x * (1.0f / 24.0f + x * (1.0f / 120.0f + x * (1.0f / 720.0f))))));
}

// tanh(x) through exp(-2|x|), odd-symmetric; exact 0 at 0 and +-1 in the tails. Below |x| = 0.2, where
// 1 - exp(-2|x|) would cancel (all digits lost as x -> 0: a large softcap), its odd Taylor polynomial to x^9
// (truncation below 2e-10 relative); both branches are computed and selected, so the loop stays vectorized.
__attribute__((always_inline)) static inline float tanh(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float t = exp(-2.0f * ax);
  const float r = (1.0f - t) / (1.0f + t);
  const float x2 = x * x;
  const float series =
      x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f + x2 * (62.0f / 2835.0f)))));
  return ax < 0.2f ? series : (x < 0.0f ? -r : r);
}

}  // namespace vmath
}  // namespace fastopd
