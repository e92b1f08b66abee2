// Everything of a DiLoCo run that lives across outer steps, in one place: the global weights, the
// outer momentum, each bucket's exchange state (error-feedback residuals, PowerSGD's warm-start
// factors, the position of a codec's random stream) and the step counters. It is what a
// checkpoint writes, what a joining island must receive, and what islands compare to know they
// agree; nothing else carries over from one outer step to the next (the inner optimizer's state
// stays with the island).
//
// save()/load() go through LibTorch's serialization (torch::serialize archives, the format of
// torch::save); a round trip is bit-exact. load() checks that the saved state fits this one
// (number of buckets, each tensor's shape and dtype, each exchange's spec) and throws OptionError
// naming the first field that differs, leaving the weights, momentum and counters unchanged.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "diloco/exchange/exchange.h"

namespace diloco {

struct OuterState {
  // Per parameter bucket (sync/parameters.h), in bucket order.
  std::vector<at::Tensor> global;    // theta: float32, on the outer device
  std::vector<at::Tensor> momentum;  // the outer optimizer's buffer (undefined when mu = 0)
  std::vector<std::unique_ptr<Exchange>> exchanges;
  std::int64_t inner_step = 0;  // inner steps taken (DiLoCo::step() calls)
  std::int64_t outer_step = 0;  // rounds completed: every fragment applied once more

  void save(torch::serialize::OutputArchive& archive) const;
  void load(torch::serialize::InputArchive& archive);
  // Hex SHA-256 of the global weights and outer momentum (their bytes, in bucket order) and the
  // step counters: equal on islands that agree, after every outer step.
  std::string sha256() const;
  // The same to and from a file (torch::serialize's format; not atomic).
  void save(const std::string& path) const;
  void load(const std::string& path);
};

}  // namespace diloco
