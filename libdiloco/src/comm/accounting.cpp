// The accounting layer (see accounting.h).
#include "comm/accounting.h"

namespace diloco {

void Accounting::record(Collective c, const std::string& label, std::uint64_t payload_bytes,
                        int world_size, int rank, int root, double seconds, double link_seconds) {
  const ByteCount b = collective_bytes(c, payload_bytes, world_size, rank, root);
  std::lock_guard<std::mutex> lock(mutex_);
  OpStats& op = stats_.ops[std::string(collective_name(c)) + ":" + label];
  op.calls += 1;
  op.bytes_sent += b.sent;
  op.bytes_received += b.received;
  op.seconds += seconds;
  op.link_seconds += link_seconds;
}

CommStats Accounting::snapshot() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void Accounting::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_ = CommStats{};
}

}  // namespace diloco
