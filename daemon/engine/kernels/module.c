/* The Python module around the compiled kernels. It defines no functions: kernels.cpu loads this
 * file with ctypes, which calls the kernels with the GIL released (see cpu.py). The module exists
 * so that the build is a regular extension (built by pip install, found by importlib). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cpu", "CPU kernels of the engine, called through ctypes (see kernels/cpu.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&module); }
