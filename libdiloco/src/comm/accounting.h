// The accounting layer of a Group: bytes and time per operation label, by the formulas of
// comm_stats.h (collective_bytes()), for whatever backend carried the collective.
//
// The rank and world size are those of the collective, passed with each record, so counts stay
// exact when the backend under a Group changes (a new epoch of another size). Records come from
// the thread that issues collectives; snapshots may be taken from any thread.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>

#include "diloco/comm/comm_stats.h"

namespace diloco {

class Accounting {
 public:
  void record(Collective c, const std::string& label, std::uint64_t payload_bytes, int world_size,
              int rank, int root, double seconds, double link_seconds);
  CommStats snapshot() const;
  void reset();

 private:
  mutable std::mutex mutex_;
  CommStats stats_;
};

}  // namespace diloco
