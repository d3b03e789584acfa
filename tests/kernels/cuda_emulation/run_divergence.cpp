// Runs csrc/cuda/divergence.cu's row kernel under the host emulation (cuda_emulation.h).
// stdin: one header line "C V div softcap_on grad vec hard has_labels beta temperature softcap soft_w hard_w
// ignore_index hard_ratio", then C*V float32 xs, C*V float32 xt and, with labels, C int64 labels (raw little-endian).
// stdout: C*V float32 xs (the gradient when grad), C float32 loss, C*5 float32 stats (raw).
#define FASTOPD_CUDA_EMULATION
#include "cuda_emulation.h"
// clang-format off
#include "../../../csrc/cuda/divergence.cu"
// clang-format on

#include <cstdio>
#include <iostream>
#include <string>

namespace {
using fastopd::RowParams;

template <int DIV, bool CAP, bool GRAD, bool VEC>
void run(int64_t C, float* xs, const float* xt, const int64_t* labels, float* loss, float* stats, int64_t V,
         const RowParams& p, bool hard) {
  emu::launch(static_cast<unsigned>(C), fastopd::kThreads, [=] {
    fastopd::divergence_row_kernel<DIV, CAP, GRAD, VEC>(xs, xt, labels, loss, stats, V, V, V, p, hard);
  });
}

template <int DIV>
void dispatch(bool cap, bool grad, bool vec, int64_t C, float* xs, const float* xt, const int64_t* labels,
              float* loss, float* stats, int64_t V, const RowParams& p, bool hard) {
  const int key = (cap ? 4 : 0) | (grad ? 2 : 0) | (vec ? 1 : 0);
  switch (key) {
    case 0: return run<DIV, false, false, false>(C, xs, xt, labels, loss, stats, V, p, hard);
    case 1: return run<DIV, false, false, true>(C, xs, xt, labels, loss, stats, V, p, hard);
    case 2: return run<DIV, false, true, false>(C, xs, xt, labels, loss, stats, V, p, hard);
    case 3: return run<DIV, false, true, true>(C, xs, xt, labels, loss, stats, V, p, hard);
    case 4: return run<DIV, true, false, false>(C, xs, xt, labels, loss, stats, V, p, hard);
    case 5: return run<DIV, true, false, true>(C, xs, xt, labels, loss, stats, V, p, hard);
    case 6: return run<DIV, true, true, false>(C, xs, xt, labels, loss, stats, V, p, hard);
    default: return run<DIV, true, true, true>(C, xs, xt, labels, loss, stats, V, p, hard);
  }
}
}  // namespace

int main() {
  int64_t C, V, ignore;
  int div, cap, grad, vec, hard, has_labels;
  double beta, temperature, softcap, sw, hw, hr;
  if (!(std::cin >> C >> V >> div >> cap >> grad >> vec >> hard >> has_labels >> beta >> temperature >> softcap >> sw >>
        hw >> ignore >> hr)) {
    std::fprintf(stderr, "bad header\n");
    return 2;
  }
  std::string rest;
  std::getline(std::cin, rest);
  std::vector<float> xs(C * V), xt(C * V), loss(C), stats(C * 5);
  std::vector<int64_t> labels(has_labels ? C : 0);
  std::cin.read(reinterpret_cast<char*>(xs.data()), static_cast<std::streamsize>(xs.size() * sizeof(float)));
  std::cin.read(reinterpret_cast<char*>(xt.data()), static_cast<std::streamsize>(xt.size() * sizeof(float)));
  if (has_labels) std::cin.read(reinterpret_cast<char*>(labels.data()), static_cast<std::streamsize>(C * 8));
  if (!std::cin) {
    std::fprintf(stderr, "short input\n");
    return 2;
  }
  RowParams p{static_cast<float>(beta),    static_cast<float>(1.0 - beta), static_cast<float>(1.0 / temperature),
              static_cast<float>(temperature), static_cast<float>(softcap),
              cap ? static_cast<float>(1.0 / softcap) : 0.0f, static_cast<float>(sw),
              static_cast<float>(hw),      static_cast<float>(hr),
              ignore,                      static_cast<float>(hr) != 1.0f};
  const int64_t* lab = has_labels ? labels.data() : nullptr;
  switch (div) {
    case 0: dispatch<0>(cap, grad, vec, C, xs.data(), xt.data(), lab, loss.data(), stats.data(), V, p, hard); break;
    case 1: dispatch<1>(cap, grad, vec, C, xs.data(), xt.data(), lab, loss.data(), stats.data(), V, p, hard); break;
    default: dispatch<2>(cap, grad, vec, C, xs.data(), xt.data(), lab, loss.data(), stats.data(), V, p, hard);
  }
  std::fwrite(xs.data(), sizeof(float), xs.size(), stdout);
  std::fwrite(loss.data(), sizeof(float), loss.size(), stdout);
  std::fwrite(stats.data(), sizeof(float), stats.size(), stdout);
  return 0;
}
