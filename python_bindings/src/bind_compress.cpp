// Bindings of diloco/compress: the codec registry (names, help) and the payload accounting of a
// compressor spec, so that Python code can predict and check what a sync sends.
#include <diloco/exchange/exchange.h>
#include <diloco/compress/registry.h>
#include <pybind11/stl.h>

#include <vector>

#include "bindings.h"

namespace diloco_python {
namespace {

// "int8(block=256, rounding=...): blockwise int8 ..." -> "int8".
std::string name_of_help_line(const std::string& line) {
  const auto end = line.find_first_of("(: ");
  return line.substr(0, end);
}

}  // namespace

void bind_compress(py::module_& m) {
  m.def("codec_help", &diloco::codec_help,
        "One line per codec: its name, parameters with their defaults, and what it does.");
  m.def(
      "codec_names",
      [] {
        std::vector<std::string> names;
        for (const auto& line : diloco::codec_help()) names.push_back(name_of_help_line(line));
        return names;
      },
      "The names of every codec a compression spec may use (\"none\" means \"fp32\").");
  m.def(
      "compressor_spec",
      [](const std::string& spec) { return diloco::Exchange::from_spec(spec)->spec(); },
      py::arg("spec"),
      "The spec with every parameter spelled out, e.g. 'topk+ef' -> "
      "'topk(k=64,values=fp32)+ef(beta=1)'. Raises OptionError listing every codec for a bad "
      "spec.");
  m.def(
      "aggregation",
      [](const std::string& spec) {
        const auto compressor = diloco::Exchange::from_spec(spec);
        // Multi-round compressors (PowerSGD) have no single codec.
        if (compressor->codec() == nullptr) return std::string("multi-round");
        return std::string(diloco::aggregation_name(compressor->codec()->aggregation()));
      },
      py::arg("spec"),
      "How a spec's payloads are combined across ranks: 'summable' (one all-reduce, "
      "2(N-1)/N*n bytes sent per rank), 'ring-requantized' (ring reduce-scatter and all-gather "
      "of encoded chunks, about 2(N-1)/N*n), 'gathered' (one all-gather, (N-1)*n) or "
      "'multi-round' (PowerSGD: all-reduces of its factors, 2(N-1)/N*n over all of them).");
  m.def(
      "payload_bytes",
      [](const std::string& spec, const std::vector<at::Tensor>& tensors) {
        return diloco::Exchange::from_spec(spec)->payload_bytes(tensors);
      },
      py::arg("spec"), py::arg("tensors"),
      "Bytes one rank's payload takes for these tensors under `spec` (only their shapes "
      "matter): the n of the exchange formulas.");
}

}  // namespace diloco_python
