// The link-emulation layer (see link_emulator.h).
#include "comm/link_emulator.h"

#include <algorithm>

namespace diloco {

void LinkEmulator::set(const LinkModel& link) {
  link.validate();
  link_ = link;
}

LinkEmulator::Slot LinkEmulator::reserve(Collective c, std::uint64_t payload_bytes, int world_size,
                                         int root, Clock::time_point issued) {
  Slot slot;
  if (world_size <= 1 || !link_.enabled()) return slot;
  // The collective starts on the link once the directions it uses have finished transmitting
  // what was issued before it; its latency overlaps with the next one's transmission.
  const auto to_duration = [](double seconds) {
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  };
  const bool up = c != Collective::kRecv;
  const bool down = c != Collective::kSend;
  auto on_link = issued;
  if (up) on_link = std::max(on_link, uplink_free_);
  if (down) on_link = std::max(on_link, downlink_free_);
  const auto transmitted =
      on_link + to_duration(link_transmission_seconds(c, payload_bytes, world_size, root, link_));
  if (up) uplink_free_ = transmitted;
  if (down) downlink_free_ = transmitted;
  slot.seconds = link_seconds(c, payload_bytes, world_size, root, link_);
  slot.done = on_link + to_duration(slot.seconds);
  return slot;
}

}  // namespace diloco
