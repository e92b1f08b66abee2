// The extension module diloco._C: the library's Group, Membership, DiLoCo, DataParallel,
// compressor registry and statistics for Python. The Python package diloco/ wraps it with
// PyTorch-style constructors; import `diloco`, not `diloco._C` (torch must be imported first, and
// diloco/__init__.py does it).
#include <diloco/errors.h>
#include <diloco/version.h>

#include "bindings.h"

namespace diloco_python {
namespace {

// Python exception types, created once when the module is imported. Owned by the module (which
// holds a reference as an attribute) for the life of the interpreter.
PyObject* g_error = nullptr;
PyObject* g_option_error = nullptr;
PyObject* g_peer_lost_error = nullptr;
PyObject* g_removed_error = nullptr;
PyObject* g_too_few_islands_error = nullptr;
PyObject* g_run_finished_error = nullptr;

PyObject* new_exception(const char* name, const char* doc, PyObject* bases) {
  PyObject* type = PyErr_NewExceptionWithDoc(name, doc, bases, nullptr);
  if (type == nullptr) throw py::error_already_set();
  return type;
}

}  // namespace

void bind_errors(py::module_& m) {
  g_error = new_exception(
      "diloco.Error",
      "An error raised by libdiloco (diloco::Error): an invariant or input check failed. The "
      "message starts with the operation in brackets, e.g. \"[DiLoCo] rank 2: ...\".",
      PyExc_RuntimeError);
  PyObject* option_bases = PyTuple_Pack(2, g_error, PyExc_ValueError);
  g_option_error = new_exception(
      "diloco.OptionError",
      "An option outside its allowed range (diloco::OptionError). The message names the option "
      "and the range. A subclass of both diloco.Error and ValueError.",
      option_bases);
  Py_DECREF(option_bases);
  g_peer_lost_error = new_exception(
      "diloco.PeerLostError",
      "A peer left the group (process exited, connection closed, or a collective timed out; "
      "diloco::PeerLostError). The group is unusable afterwards; build a new one to continue.",
      g_error);
  g_removed_error = new_exception(
      "diloco.RemovedError",
      "Elastic runs: this island was left out of the run's membership (it was stopped past the "
      "heartbeat timeout, registered too late for the new epoch, or the epoch it was admitted to "
      "was abandoned; diloco::RemovedError). Its state is stale: start the process again to "
      "rejoin (examples/python/train_lm.py exits with code 3, and diloco-run --max-restarts "
      "restarts it).",
      g_error);
  g_too_few_islands_error = new_exception(
      "diloco.TooFewIslandsError",
      "Elastic runs: fewer islands remain than min_islands (diloco::TooFewIslandsError); the run "
      "stops on every survivor.",
      g_error);
  m.add_object("Error", py::handle(g_error));
  m.add_object("OptionError", py::handle(g_option_error));
  m.add_object("PeerLostError", py::handle(g_peer_lost_error));
  m.add_object("RemovedError", py::handle(g_removed_error));
  g_run_finished_error = new_exception(
      "diloco.RunFinishedError",
      "Elastic runs: an island that came to join found the run over (every member of its newest "
      "epoch left when done; diloco::RunFinishedError). Nothing is wrong: there is nothing left "
      "to do (examples/python/train_lm.py exits with code 0).",
      g_error);
  m.add_object("TooFewIslandsError", py::handle(g_too_few_islands_error));
  m.add_object("RunFinishedError", py::handle(g_run_finished_error));

  py::register_exception_translator([](std::exception_ptr thrown) {
    try {
      if (thrown) std::rethrow_exception(thrown);
    } catch (const diloco::PeerLostError& e) {
      PyErr_SetString(g_peer_lost_error, e.what());
    } catch (const diloco::OptionError& e) {
      PyErr_SetString(g_option_error, e.what());
    } catch (const diloco::RemovedError& e) {
      PyErr_SetString(g_removed_error, e.what());
    } catch (const diloco::TooFewIslandsError& e) {
      PyErr_SetString(g_too_few_islands_error, e.what());
    } catch (const diloco::RunFinishedError& e) {
      PyErr_SetString(g_run_finished_error, e.what());
    } catch (const diloco::Error& e) {
      PyErr_SetString(g_error, e.what());
    } catch (const c10::Error& e) {
      // TORCH_CHECK inside the library: the message without LibTorch's C++ backtrace.
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
}

}  // namespace diloco_python

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "libdiloco's C++ core (import the package `diloco`, which wraps this module).";
  m.attr("__version__") = DILOCO_VERSION;
  diloco_python::bind_errors(m);
  diloco_python::bind_comm(m);
  diloco_python::bind_elastic(m);
  diloco_python::bind_compress(m);
  diloco_python::bind_sync(m);
  diloco_python::bind_optim(m);
}
