// The hash the islands compare after every outer step (DiLoCoOptions::compare_states): XXH3-128
// of the outer step and fragment, then of the new global weights and outer momentum block by
// block, fed by the outer step itself as it writes them (OuterSGD::step's visitor), while each
// block is still in cache.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>

#include "diloco/outer/outer_sgd.h"

namespace diloco {

class StateHasher {
 public:
  StateHasher(std::int64_t outer_step, std::int64_t fragment);
  ~StateHasher();
  StateHasher(const StateHasher&) = delete;
  StateHasher& operator=(const StateHasher&) = delete;

  // For OuterSGD::step: each call hashes one block.
  const OuterSGD::BlockVisitor* visitor() const { return &visit_; }
  // The 128-bit hash of what was visited so far: (high, low).
  std::pair<std::uint64_t, std::uint64_t> digest() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
  OuterSGD::BlockVisitor visit_;
};

}  // namespace diloco
