// Bindings of diloco/optim: the Muon update for one tensor and the Newton-Schulz iteration. The
// optimizer object itself is Python's (diloco.Muon in _optim.py, a torch.optim.Optimizer, so that
// learning-rate schedulers and state_dict() work as with any other); each step calls muon_update
// here, the library's one implementation.
#include <diloco/errors.h>
#include <diloco/optim/muon.h>

#include "bindings.h"

namespace diloco_python {

void bind_optim(py::module_& m) {
  m.def(
      "muon_update",
      [](at::Tensor param, const at::Tensor& grad, at::Tensor buffer, double lr, double momentum,
         bool nesterov, double weight_decay, std::int64_t ns_steps, const std::string& scale) {
        diloco::MuonOptions o(lr);
        o.momentum(momentum).nesterov(nesterov).weight_decay(weight_decay).ns_steps(ns_steps)
            .scale(scale);
        o.validate();
        if (param.dim() < 2) {
          throw diloco::OptionError("[Muon] a parameter with " + std::to_string(param.dim()) +
                                    " dimension(s); Muon takes matrices: give biases, norms "
                                    "(and usually embeddings and the output head) to AdamW");
        }
        diloco::muon_update(param, grad, buffer, o);
      },
      py::arg("param"), py::arg("grad"), py::arg("buffer"), py::arg("lr"), py::arg("momentum"),
      py::arg("nesterov"), py::arg("weight_decay"), py::arg("ns_steps"), py::arg("scale"),
      py::call_guard<py::gil_scoped_release>(),
      "One Muon step of `param` in place, updating its momentum `buffer` (zeros at first). "
      "See diloco.Muon.");
  m.def("newton_schulz_orthogonalize", &diloco::newton_schulz_orthogonalize, py::arg("matrix"),
        py::arg("steps") = 5, py::call_guard<py::gil_scoped_release>(),
        "The quintic Newton-Schulz iteration Muon applies to its update (float32).");
}

}  // namespace diloco_python
