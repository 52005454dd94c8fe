// Makes the shared library importable as `fgd._C`: importing it runs the TORCH_LIBRARY
// registrations. The operators themselves are reached through torch.ops.fgd.*; the module itself
// only tells which copy of the vectorised CPU loops runs (fgd.cpu_capability()).
#include <Python.h>

#include "cpu/vec.h"

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fgd::isa_name(fgd::isa()));
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU code path of fgd's kernels: 'avx512', 'avx2' or 'default'."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
