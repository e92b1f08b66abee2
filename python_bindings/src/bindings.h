// Shared declarations of the extension module diloco._C: one function per library folder adds
// that folder's classes and functions to the module (module.cpp calls them in order).
//
// Conventions of every binding: Python names equal the C++ names (snake_case); collectives and
// anything that may wait on a peer release the GIL; C++ exceptions become diloco.Error,
// diloco.OptionError (also a ValueError), diloco.PeerLostError, diloco.RemovedError and
// diloco.TooFewIslandsError with the same message.
#pragma once

#include <torch/python.h>

#include <memory>
#include <utility>

namespace diloco {
class Group;
class Membership;
}  // namespace diloco

namespace diloco_python {

namespace py = pybind11;

// The last reference to a library object may be dropped while this thread holds the GIL (the
// Python object is collected). Destroying a Group joins c10d's Gloo worker threads, which may
// themselves need the GIL to release tensors that Python objects own, and destroying a Membership
// joins its heartbeat thread (which may be in a store call): so they are destroyed with the GIL
// released. The returned pointer shares `owned`'s object.
template <typename T>
std::shared_ptr<T> destroyed_without_gil(std::shared_ptr<T> owned) {
  T* raw = owned.get();
  return std::shared_ptr<T>(raw, [owner = std::move(owned)](T*) mutable {
    if (PyGILState_Check()) {
      py::gil_scoped_release release;
      owner.reset();
    } else {
      owner.reset();
    }
  });
}

// diloco.Membership (bind_elastic.cpp): the library's Membership, and the Python object of its
// group, created once, so that `membership.group` is the same diloco.Group every time (DiLoCo
// built over the membership reports that very object too). Owned by Python only: destroyed with
// the GIL held (the group's Python handle needs it); the C++ objects themselves go without it.
struct PyMembership {
  std::shared_ptr<diloco::Membership> impl;  // destroyed_without_gil
  std::shared_ptr<diloco::Group> group;      // impl->group(), destroyed_without_gil
  py::object group_object;                   // the diloco.Group wrapping `group`
};

void bind_errors(py::module_& m);
void bind_comm(py::module_& m);
void bind_elastic(py::module_& m);
void bind_compress(py::module_& m);
void bind_sync(py::module_& m);
void bind_optim(py::module_& m);

}  // namespace diloco_python
