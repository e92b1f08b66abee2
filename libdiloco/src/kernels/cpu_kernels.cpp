// Fused CPU loops (see cpu_kernels.h).
#include "kernels/cpu_kernels.h"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>

namespace diloco {
namespace kernels {
namespace {

using Array = Eigen::Map<Eigen::ArrayXf>;
using ConstArray = Eigen::Map<const Eigen::ArrayXf>;

}  // namespace

bool pseudo_gradient_inplace(float* local, const float* global, std::int64_t n) {
  // x * 0 is 0 for finite x and NaN for NaN or infinity, so one sum says whether all were finite.
  float poison = 0.f;
  for (std::int64_t i = 0; i < n; i += kBlock) {
    const std::int64_t len = std::min(kBlock, n - i);
    Array l(local + i, len);
    l = ConstArray(global + i, len) - l;
    poison += (l * 0.f).sum();
  }
  return poison == 0.f;
}

std::int64_t first_nonfinite(const float* x, std::int64_t n) {
  for (std::int64_t i = 0; i < n; i += kBlock) {
    const std::int64_t len = std::min(kBlock, n - i);
    if ((ConstArray(x + i, len) * 0.f).sum() == 0.f) continue;
    for (std::int64_t j = i; j < i + len; ++j) {
      if (!std::isfinite(x[j])) return j;
    }
  }
  return -1;
}

std::int64_t outer_sgd(float* global, float* momentum, const float* delta_sum, float* write_back,
                       std::int64_t n, float scale, float lr, float mu, bool nesterov,
                       const BlockVisitor* visit) {
  Eigen::ArrayXf d(kBlock);
  std::int64_t first_bad = -1;
  for (std::int64_t i = 0; i < n; i += kBlock) {
    const std::int64_t len = std::min(kBlock, n - i);
    Array g(global + i, len);
    auto dv = d.head(len);
    dv = ConstArray(delta_sum + i, len) * scale;
    if ((dv * 0.f).sum() != 0.f) {  // not finite: keep this block's state, restore the model
      // The scaled values decide (delta_sum may be finite and only overflow when scaled).
      if (first_bad < 0) first_bad = i + first_nonfinite(d.data(), len);
    } else if (mu == 0.f) {
      g -= lr * dv;
    } else {
      Array m(momentum + i, len);
      m = m * mu + dv;  // torch: buf.mul_(momentum).add_(grad)
      if (nesterov) {
        g -= lr * (dv + m * mu);  // torch: grad.add(buf, alpha=momentum)
      } else {
        g -= lr * m;
      }
    }
    Array(write_back + i, len) = g;
    if (visit != nullptr) {
      (*visit)(global + i, len);
      if (mu != 0.f) (*visit)(momentum + i, len);
    }
  }
  return first_bad;
}

}  // namespace kernels
}  // namespace diloco
