// The one place where fastopd's C++/CUDA operator schemas are declared. Kernels register their
// implementations per dispatch key next to their code (csrc/cpu/*.cpp, csrc/cuda/*.cu); fake
// (meta) implementations for torch.compile live in fastopd/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace fastopd {
std::string decode_linear_isa();  // csrc/cpu/decode_linear.cpp
}

TORCH_LIBRARY(fastopd, m) {
  // Row-wise divergence over a chunk of fp32 logits; see csrc/cpu/divergence.cpp for the math.
  // Mutates xs (gradient written in place when compute_grad), xt (scratch), loss [C] and stats [C, 5].
  // hard_ratio = temperature / hard-label temperature: the hard-label CE is taken of z * hard_ratio.
  m.def(
      "divergence_chunk_(Tensor(a!) xs, Tensor(b!) xt, Tensor? labels, Tensor(c!) loss, Tensor(d!) stats, "
      "int divergence, float beta, float temperature, float softcap, float soft_weight, float hard_weight, "
      "int ignore_index, bool compute_grad, float hard_ratio=1.0) -> ()");
  // Sparse-masked AdamW step over all tensors of a parameter group; see csrc/cpu/sparse_adamw.cpp and
  // fastopd/optim/reference.py. Mutates params (at the selected coordinates), moments, masters and counters;
  // an empty tensor in masters/swallowed means "none" (optional mutable lists do not functionalize).
  m.def(
      "sparse_adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor?[] indices, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] masters, Tensor(e!)[] swallowed, float[] step_sizes, "
      "float[] bias_correction2_sqrts, float lr, float beta1, float beta2, float eps, float weight_decay) -> ()");
  // Small-batch fp32 linear of a CPU decode step, over a weight packed in 48-column panels [ceil(N/48), K, 48];
  // see csrc/cpu/decode_linear.cpp and fastopd/models/decode_linear.py. Mutates out [M, N]:
  // out = (accumulate ? out : 0) + x @ W + bias.
  m.def("decode_linear_(Tensor(a!) out, Tensor x, Tensor panels, Tensor? bias, bool accumulate) -> ()");
  // The register tile decode_linear_ runs on this CPU: "avx512", "avx2" or "baseline".
  m.def("decode_linear_isa() -> str", &fastopd::decode_linear_isa);
}

// `import fastopd._C` loads this library (and with it the registrations above); it exposes no Python API.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastopd C++/CUDA operators (torch.ops.fastopd)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
