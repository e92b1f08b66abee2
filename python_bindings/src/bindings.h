// Shared declarations of the extension module diloco._C: one function per library folder adds
// that folder's classes and functions to the module (module.cpp calls them in order).
//
// Conventions of every binding: Python names equal the C++ names (snake_case); collectives and
// anything that may wait on a peer release the GIL; C++ exceptions become diloco.Error,
// diloco.OptionError (also a ValueError) and diloco.PeerLostError with the same message.
#pragma once

#include <torch/python.h>

namespace diloco_python {

namespace py = pybind11;

void bind_errors(py::module_& m);
void bind_comm(py::module_& m);
void bind_compress(py::module_& m);
void bind_sync(py::module_& m);
void bind_optim(py::module_& m);

}  // namespace diloco_python
