// The link-emulation layer (see link_emulator.h).
#include "comm/link_emulator.h"

#include <algorithm>

namespace diloco {
namespace {

LinkEmulator::Clock::duration to_duration(double seconds) {
  return std::chrono::duration_cast<LinkEmulator::Clock::duration>(
      std::chrono::duration<double>(seconds));
}

}  // namespace

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
  std::lock_guard<std::mutex> lock(mutex_);
  slot.up = c != Collective::kRecv;
  slot.down = c != Collective::kSend;
  slot.on_link = issued;
  if (slot.up) slot.on_link = std::max(slot.on_link, uplink_free_);
  if (slot.down) slot.on_link = std::max(slot.on_link, downlink_free_);
  slot.transmission = link_transmission_seconds(c, payload_bytes, world_size, root, link_);
  const auto transmitted = slot.on_link + to_duration(slot.transmission);
  if (slot.up) uplink_free_ = transmitted;
  if (slot.down) downlink_free_ = transmitted;
  slot.seconds = link_seconds(c, payload_bytes, world_size, root, link_);
  slot.done = slot.on_link + to_duration(slot.seconds);
  return slot;
}

void LinkEmulator::settle(Slot& slot, Clock::time_point link_start) {
  if (slot.seconds <= 0.0 || link_start <= slot.on_link) return;
  std::lock_guard<std::mutex> lock(mutex_);
  slot.done += link_start - slot.on_link;
  slot.on_link = link_start;
  const auto transmitted = slot.on_link + to_duration(slot.transmission);
  if (slot.up) uplink_free_ = std::max(uplink_free_, transmitted);
  if (slot.down) downlink_free_ = std::max(downlink_free_, transmitted);
}

}  // namespace diloco
