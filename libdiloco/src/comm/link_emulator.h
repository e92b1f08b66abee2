// The link-emulation layer of a Group: when a collective would complete on an emulated wide-area
// link (comm_stats.h's LinkModel and link_seconds()), given what was issued before it.
//
// Each island's outgoing and incoming directions transmit one collective after another, in issue
// order; a collective's latency overlaps with the next one's transmission. A collective starts on
// the link no earlier than the last rank it needs has put it on its own link (settle()): a real
// link carries nothing before the peer sends it, so an island that issues early waits for the
// late one's transfer, not only for its own. The emulator only computes deadlines: Group sleeps until them
// after the backend's operation completes. It knows nothing of the backend, so its state survives
// a change of backend.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>

#include "diloco/comm/comm_stats.h"

namespace diloco {

class LinkEmulator {
 public:
  using Clock = std::chrono::steady_clock;

  // When a collective is done on the emulated link, and the time it is charged.
  struct Slot {
    double seconds = 0.0;         // link_seconds(): 0 without a link or with one rank
    Clock::time_point done{};     // no earlier than this; meaningful when seconds > 0
    Clock::time_point on_link{};  // when it starts on the link: done - seconds
    double transmission = 0.0;    // link_transmission_seconds(): how long it holds the directions
    bool up = false, down = false;  // the directions it uses
  };

  // Throws OptionError (LinkModel::validate).
  void set(const LinkModel& link);
  const LinkModel& model() const { return link_; }

  // Books the link for a collective issued at `issued` over `world_size` ranks.
  Slot reserve(Collective c, std::uint64_t payload_bytes, int world_size, int root,
               Clock::time_point issued);
  // Once the peers' link starts are known: the collective starts on the link no earlier than
  // `link_start` (when the last rank it waits for put it on its own link: its issue time plus
  // its queue's hold). Moves the slot, and this island's directions behind it, later if so;
  // never earlier.
  void settle(Slot& slot, Clock::time_point link_start);

 private:
  LinkModel link_;
  std::mutex mutex_;  // reserve() and settle() may run on different threads
  // When this island's outgoing and incoming directions finish what has been issued on them.
  Clock::time_point uplink_free_{};
  Clock::time_point downlink_free_{};
};

}  // namespace diloco
