// Makes the shared library importable as `fgd._C`: importing it runs the TORCH_LIBRARY
// registrations. The operators themselves are reached through torch.ops.fgd.*, not this module.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
