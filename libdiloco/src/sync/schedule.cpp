// Streaming DiLoCo's schedule and default fragments (see schedule.h).
#include "diloco/sync/schedule.h"

#include <algorithm>
#include <cctype>
#include <limits>
#include <set>

#include "diloco/errors.h"

namespace diloco {

StreamingSchedule::StreamingSchedule(std::int64_t inner_steps, std::int64_t fragments,
                                     std::int64_t overlap_steps)
    : h_(inner_steps), p_(fragments), tau_(overlap_steps) {
  if (h_ < 1) throw OptionError("[DiLoCo] inner_steps (H) must be >= 1, got " + std::to_string(h_));
  if (p_ < 1 || p_ > h_) {
    throw OptionError("[DiLoCo] fragments (P) must be in [1, inner_steps = " + std::to_string(h_) +
                      "], got " + std::to_string(p_));
  }
  std::int64_t gap = std::numeric_limits<std::int64_t>::max();
  for (std::int64_t p = 0; p < p_; ++p) {
    const std::int64_t next = p + 1 < p_ ? offset(p + 1) : offset(0) + h_;
    gap = std::min(gap, next - offset(p));
  }
  if (tau_ < 0 || tau_ >= gap) {
    throw OptionError("[DiLoCo] overlap_steps (tau) must be in [0, " + std::to_string(gap) +
                      ") for H = " + std::to_string(h_) + " and P = " + std::to_string(p_) +
                      " (below the steps between two fragments' starts), got " +
                      std::to_string(tau_));
  }
}

std::int64_t StreamingSchedule::offset(std::int64_t fragment) const {
  return (fragment + 1) * h_ / p_;
}

std::int64_t StreamingSchedule::starts_after(std::int64_t step) const {
  if (step < 1) return kNone;
  const std::int64_t phase = (step - 1) % h_ + 1;  // 1..H within the current period
  for (std::int64_t p = 0; p < p_; ++p) {
    if (offset(p) == phase) return p;
  }
  return kNone;
}

std::int64_t StreamingSchedule::finishes_after(std::int64_t step) const {
  return starts_after(step - tau_);
}

namespace {

// The first all-digit component of a qualified name ("blocks.3.attn.weight" -> 3), or -1.
std::int64_t block_index(const std::string& name) {
  std::size_t start = 0;
  while (start <= name.size()) {
    const std::size_t dot = std::min(name.find('.', start), name.size());
    const std::string part = name.substr(start, dot - start);
    const bool digits = !part.empty() && part.size() <= 9 &&
                        std::all_of(part.begin(), part.end(),
                                    [](unsigned char c) { return std::isdigit(c) != 0; });
    if (digits) return std::stoll(part);
    start = dot + 1;
  }
  return -1;
}

}  // namespace

std::vector<std::int64_t> strided_fragments(const std::vector<std::string>& names,
                                            std::int64_t fragments) {
  std::vector<std::int64_t> out(names.size());
  std::int64_t rest = 0;
  for (std::size_t i = 0; i < names.size(); ++i) {
    const std::int64_t block = block_index(names[i]);
    out[i] = block >= 0 ? block % fragments : rest++ % fragments;
  }
  return out;
}

std::vector<std::int64_t> balanced_fragments(const std::vector<std::int64_t>& numels,
                                             std::int64_t fragments) {
  std::vector<std::size_t> order(numels.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return numels[a] > numels[b]; });
  std::vector<std::int64_t> load(static_cast<std::size_t>(fragments), 0);
  std::vector<std::int64_t> out(numels.size(), 0);
  for (std::size_t i : order) {
    const auto lightest = std::min_element(load.begin(), load.end()) - load.begin();
    out[i] = lightest;
    load[static_cast<std::size_t>(lightest)] += numels[i];
  }
  return out;
}

std::vector<std::int64_t> default_fragments(const std::vector<std::string>& names,
                                            const std::vector<std::int64_t>& numels,
                                            std::int64_t fragments) {
  std::set<std::int64_t> blocks;
  for (const auto& name : names) {
    const std::int64_t block = block_index(name);
    if (block >= 0) blocks.insert(block);
  }
  if (static_cast<std::int64_t>(blocks.size()) >= fragments) {
    return strided_fragments(names, fragments);
  }
  return balanced_fragments(numels, fragments);
}

}  // namespace diloco
