// Aggregators (see diloco/exchange/aggregator.h).
#include "diloco/exchange/aggregator.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cctype>
#include <cmath>

#include "diloco/compress/codec_params.h"
#include "diloco/errors.h"

namespace diloco {
namespace {

const char* kValid = "mean, trimmed_mean(trim=K), median, norm_clip(k=C)";

std::string strip(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (!std::isspace(static_cast<unsigned char>(c))) out += c;
  }
  return out;
}

}  // namespace

double l2_norm(const at::Tensor& t) {
  return at::linalg_vector_norm(t, 2, c10::nullopt, false, at::kDouble).item<double>();
}

Aggregator Aggregator::parse(const std::string& text) {
  const std::string spec = strip(text);
  std::string name = spec;
  std::map<std::string, std::string> values;
  const auto open = spec.find('(');
  if (open != std::string::npos) {
    if (spec.back() != ')') {
      throw OptionError("[DiLoCo] aggregator '" + text + "' is malformed; valid: " + kValid);
    }
    name = spec.substr(0, open);
    const std::string inner = spec.substr(open + 1, spec.size() - open - 2);
    std::size_t from = 0;
    while (from < inner.size()) {
      auto comma = inner.find(',', from);
      if (comma == std::string::npos) comma = inner.size();
      const std::string item = inner.substr(from, comma - from);
      const auto eq = item.find('=');
      if (eq == std::string::npos || eq == 0) {
        throw OptionError("[DiLoCo] aggregator '" + text + "': expected key=value, got '" + item +
                          "'");
      }
      values[item.substr(0, eq)] = item.substr(eq + 1);
      from = comma + 1;
    }
  }
  Aggregator a;
  CodecParams params(name, values);
  try {
    a.read(name, params, text);
  } catch (const OptionError& e) {
    if (name != "mean" && name != "trimmed_mean" && name != "median" && name != "norm_clip") throw;
    std::string why = e.what();  // "[codec 'NAME'] trim must be ..."
    const auto close = why.find("] ");
    if (why.rfind("[codec", 0) == 0 && close != std::string::npos) why = why.substr(close + 2);
    throw OptionError("[DiLoCo] aggregator '" + text + "': " + why);
  }
  return a;
}

void Aggregator::read(const std::string& name, CodecParams& params, const std::string& text) {
  Aggregator& a = *this;
  if (name == "mean") {
    a.kind_ = Kind::kMean;
  } else if (name == "trimmed_mean") {
    a.kind_ = Kind::kTrimmedMean;
    a.trim_ = static_cast<int>(params.get_int("trim", 1, 1, 1 << 20));
  } else if (name == "median") {
    a.kind_ = Kind::kMedian;
  } else if (name == "norm_clip") {
    a.kind_ = Kind::kNormClip;
    a.clip_ = params.get_double("k", 1.0, 1.0, 1e6);
  } else {
    throw OptionError("[DiLoCo] aggregator must be one of " + std::string(kValid) + ", got '" +
                      text + "'");
  }
  params.reject_unknown();
}

std::string Aggregator::spec() const {
  switch (kind_) {
    case Kind::kMean: return "mean";
    case Kind::kTrimmedMean: return "trimmed_mean(trim=" + std::to_string(trim_) + ")";
    case Kind::kMedian: return "median";
    case Kind::kNormClip: return "norm_clip(k=" + exact_decimal(clip_) + ")";
  }
  return "?";
}

void Aggregator::check_islands(int islands) const {
  if (kind_ == Kind::kTrimmedMean && 2 * trim_ >= islands) {
    throw OptionError("[DiLoCo] aggregator trimmed_mean(trim=" + std::to_string(trim_) +
                      ") drops " + std::to_string(2 * trim_) + " values per coordinate: it needs " +
                      "more than " + std::to_string(2 * trim_) + " islands, the group has " +
                      std::to_string(islands) + " (trim must be in [1, " +
                      std::to_string(std::max(0, (islands - 1) / 2)) + "])");
  }
}

void Aggregator::combine(const std::vector<at::Tensor>& contributions, at::Tensor& out) const {
  at::NoGradGuard no_grad;
  TORCH_CHECK(!contributions.empty(), "[aggregator] nothing to combine");
  const auto n = static_cast<std::int64_t>(contributions.size());
  switch (kind_) {
    case Kind::kMean: {
      out.copy_(contributions[0]);
      for (std::int64_t i = 1; i < n; ++i) out.add_(contributions[static_cast<std::size_t>(i)]);
      out.div_(static_cast<double>(n));
      return;
    }
    case Kind::kNormClip: {
      std::vector<double> norms;
      for (const auto& c : contributions) norms.push_back(l2_norm(c));
      std::vector<double> sorted = norms;
      std::sort(sorted.begin(), sorted.end());
      const double median = n % 2 == 1 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
      const double bound = clip_ * median;
      out.zero_();
      for (std::int64_t i = 0; i < n; ++i) {
        const double norm = norms[static_cast<std::size_t>(i)];
        const double scale = norm > bound ? bound / norm : 1.0;
        out.add_(contributions[static_cast<std::size_t>(i)], scale);
      }
      out.div_(static_cast<double>(n));
      return;
    }
    case Kind::kMedian:
    case Kind::kTrimmedMean: {
      const at::Tensor sorted = std::get<0>(at::stack(contributions).sort(0));
      if (kind_ == Kind::kMedian) {
        if (n % 2 == 1) {
          out.copy_(sorted[n / 2].view_as(out));
        } else {
          out.copy_(sorted[n / 2 - 1].view_as(out)).add_(sorted[n / 2].view_as(out)).mul_(0.5);
        }
        return;
      }
      // With too few contributions left (some refused), trim what leaves one in the middle.
      const std::int64_t k = std::min<std::int64_t>(trim_, (n - 1) / 2);
      out.copy_(sorted.narrow(0, k, n - 2 * k).sum(0).view_as(out))
          .div_(static_cast<double>(n - 2 * k));
      return;
    }
  }
}

}  // namespace diloco
