// SyncStats from a synchronizer's counters and its group's byte accounting.
#include "diloco/sync/sync_stats.h"

#include "diloco/comm/group.h"

namespace diloco {

SyncStats make_sync_stats(const Group& group, std::int64_t inner_steps, std::int64_t outer_steps,
                          double sync_seconds, double wait_seconds) {
  SyncStats s;
  s.inner_steps = inner_steps;
  s.outer_steps = outer_steps;
  s.sync_seconds = sync_seconds;
  s.wait_seconds = wait_seconds;
  const CommStats c = group.stats();
  s.bytes_sent = c.bytes_sent();
  s.bytes_received = c.bytes_received();
  return s;
}

}  // namespace diloco
