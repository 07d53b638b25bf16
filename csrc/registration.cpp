// The one place where every moe_fast op schema is declared. Implementations register per device
// in csrc/bindings/*_bindings.cpp; fake (meta) kernels live in moe_fast/kernels/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "moe_fast/kernels.h"

namespace {

// moe_fast._C.route_cpu_capability() -> "default" | "avx2": the CPU level the route kernel runs
// at (kernels.h, CpuLevel; MOE_FAST_CPU_CAPABILITY / ATEN_CPU_CAPABILITY lower it).
PyObject* route_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(moe_fast::cpu::cpu_level_name(moe_fast::cpu::route_cpu_level()));
}

PyMethodDef module_methods[] = {
    {"route_cpu_capability", route_cpu_capability, METH_NOARGS, "CPU level of the route kernel: default or avx2"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import moe_fast._C` only has to load this library: the static registrations below run then.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(moe_fast, m) {
  // logits [T, E] f32/bf16/f16; beta: one value for every slot, or k - 1 values for slots
  // 1..k-1, each in [0, 1]; keep [E] bool (True = may be chosen). The routing descriptor
  // (docs/ROUTING.md): scoring "softmax" | "sigmoid" | "softmax_topk"; selection_bias [E] f32
  // and groups (n_group, topk_group) with sigmoid only; scaling > 0 multiplies the weights.
  // -> weights [T, k] f32, ids [T, k] i32, counts [E] i32, offsets [E + 1] i32, perm [T * k] i32
  m.def(
      "route(Tensor logits, int k, bool renormalize=True, float[]? beta=None, Tensor? keep=None, "
      "str scoring=\"softmax\", Tensor? selection_bias=None, int n_group=1, int topk_group=1, float scaling=1.0) "
      "-> (Tensor weights, Tensor ids, Tensor counts, Tensor offsets, Tensor perm)");
  // outputs [T, M, H], target [T, H] (same dtype) ->
  // gram [T, M(M+1)/2] f32, cross [T, M] f32 (or [T, 0]), target_sq [T] f32 (or [0])
  m.def("expert_gram(Tensor outputs, Tensor? target=None) -> (Tensor gram, Tensor cross, Tensor target_sq)");
  // gram [T, P] f32, ids [T, M] i32, logits [T, E] f32, keep [C, E] bool, group [T] i64,
  // target_weights [T, M] f32 (layer-wise) xor cross [T, M] f32 + target_sq [T] f32 (progressive)
  // The routing descriptor as route takes it, without groups (topk_group < n_group is rejected);
  // ids are ranked by the spec's selection score (logits, or biased sigmoid scores).
  // -> [C, G] f64
  m.def(
      "subset_loss(Tensor gram, Tensor ids, Tensor logits, Tensor keep, Tensor group, int num_groups, "
      "int k, bool renormalize=True, Tensor? target_weights=None, Tensor? cross=None, "
      "Tensor? target_sq=None, str scoring=\"softmax\", Tensor? selection_bias=None, int n_group=1, "
      "int topk_group=1, float scaling=1.0) -> Tensor");
}

// No op is differentiable (they serve inference and the pruning search): the autograd layer is
// skipped, so outputs never claim requires_grad, even for inputs that require it.
TORCH_LIBRARY_IMPL(moe_fast, Autograd, m) {
  m.impl("route", torch::CppFunction::makeFallthrough());
  m.impl("expert_gram", torch::CppFunction::makeFallthrough());
  m.impl("subset_loss", torch::CppFunction::makeFallthrough());
}
