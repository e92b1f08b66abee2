// What a synchronizer (DiLoCo, DataParallel) reports about its own work.
#pragma once

#include <cstdint>

namespace diloco {

class Group;

struct SyncStats {
  std::int64_t inner_steps = 0;  // step() calls so far
  std::int64_t outer_steps = 0;  // completed outer steps
  double sync_seconds = 0.0;     // wall time inside outer steps (compute + communication)
  // Of sync_seconds, the time blocked waiting for exchanges and screening collectives to
  // complete: the link and the other islands (streaming hides what arrives before it is due).
  double wait_seconds = 0.0;
  std::uint64_t bytes_sent = 0;  // by this rank, all collectives of its group
  std::uint64_t bytes_received = 0;
};

// The counters a synchronizer keeps, with the bytes its group has counted so far.
SyncStats make_sync_stats(const Group& group, std::int64_t inner_steps, std::int64_t outer_steps,
                          double sync_seconds, double wait_seconds = 0.0);

}  // namespace diloco
