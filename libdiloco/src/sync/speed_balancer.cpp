// The batch controller for islands of different speeds (see speed_balancer.h).
#include "diloco/sync/speed_balancer.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "diloco/errors.h"

namespace diloco {

namespace {

void check_range(const char* name, double value, double low, double high, bool low_open) {
  const bool ok = std::isfinite(value) && (low_open ? value > low : value >= low) && value <= high;
  if (!ok) {
    std::ostringstream m;
    m << "[SpeedBalancer] " << name << " must be in " << (low_open ? "(" : "[") << low << ", "
      << high << "], got " << value;
    throw OptionError(m.str());
  }
}

}  // namespace

SpeedBalancer::SpeedBalancer(std::int64_t base_batch, SpeedBalancerOptions options)
    : base_(base_batch), options_(options) {
  if (base_ < 1) {
    throw OptionError("[SpeedBalancer] base_batch must be >= 1, got " + std::to_string(base_));
  }
  check_range("target_wait", options_.target_wait, 0.0, 1.0, false);
  if (options_.memory < 1 || options_.memory > 1000) {
    throw OptionError("[SpeedBalancer] memory must be in [1, 1000], got " +
                      std::to_string(options_.memory));
  }
  check_range("shrink", options_.shrink, 0.0, 0.5, false);
  check_range("max_factor", options_.max_factor, 1.0, 1024.0, false);
  check_range("gain", options_.gain, 0.0, 1.0, true);
}

std::int64_t SpeedBalancer::memory_for(std::int64_t islands) {
  if (islands < 1) {
    throw OptionError("[SpeedBalancer] islands must be >= 1, got " + std::to_string(islands));
  }
  return std::max<std::int64_t>(4, 3 * (islands - 1));
}

std::int64_t SpeedBalancer::next_batch() {
  const double wanted = static_cast<double>(base_) * factor_ + carry_;
  const auto batch = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::floor(wanted)));
  carry_ = wanted - static_cast<double>(batch);
  return batch;
}

void SpeedBalancer::observe(double compute_seconds, double wait_seconds) {
  if (!(compute_seconds > 0.0) || !std::isfinite(compute_seconds) || !std::isfinite(wait_seconds)) {
    return;
  }
  waits_.push_back(std::max(0.0, wait_seconds) / compute_seconds);
  if (static_cast<std::int64_t>(waits_.size()) > options_.memory) waits_.pop_front();
  const auto [least, most] = std::minmax_element(waits_.begin(), waits_.end());
  const bool slowest = static_cast<std::int64_t>(waits_.size()) == options_.memory &&
                       *most <= options_.target_wait;
  const double change = slowest ? 1.0 - options_.shrink
                                : std::pow((1.0 + *least) / (1.0 + options_.target_wait),
                                           options_.gain);
  factor_ = std::clamp(factor_ * change, 1.0, options_.max_factor);
}

}  // namespace diloco
