// Typed, validated codec parameters (see codec_params.h).
#include "diloco/compress/codec_params.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "diloco/errors.h"

namespace diloco {
namespace {

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string out;
  for (std::size_t i = 0; i < v.size(); ++i) out += (i ? sep : "") + v[i];
  return out;
}

}  // namespace

CodecParams::CodecParams(std::string codec, std::map<std::string, std::string> values)
    : codec_(std::move(codec)), values_(std::move(values)) {}

std::int64_t CodecParams::get_int(const std::string& key, std::int64_t fallback, std::int64_t lo,
                                  std::int64_t hi) {
  used_.insert(key);
  auto it = values_.find(key);
  if (it == values_.end()) return fallback;
  const std::string& s = it->second;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno != 0 || end == s.c_str() || *end != '\0' || v < lo || v > hi) {
    throw OptionError("[codec '" + codec_ + "'] " + key + " must be an integer in [" +
                      std::to_string(lo) + ", " + std::to_string(hi) + "], got '" + s + "'");
  }
  return v;
}

double CodecParams::get_double(const std::string& key, double fallback, double lo, double hi) {
  return read_double(key, fallback, lo, hi, false);
}

double CodecParams::get_double_or_off(const std::string& key, double lo, double hi) {
  return read_double(key, 0.0, lo, hi, true);
}

double CodecParams::read_double(const std::string& key, double fallback, double lo, double hi,
                                bool zero_is_off) {
  used_.insert(key);
  auto it = values_.find(key);
  if (it == values_.end()) return fallback;
  const std::string& s = it->second;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s.c_str(), &end);
  const bool in_range = (v >= lo && v <= hi) || (zero_is_off && v == 0.0);
  if (errno != 0 || end == s.c_str() || *end != '\0' || !std::isfinite(v) || !in_range) {
    std::ostringstream m;
    m << "[codec '" << codec_ << "'] " << key << " must be " << (zero_is_off ? "0 (off) or " : "")
      << "a number in [" << lo << ", " << hi << "], got '" << s << "'";
    throw OptionError(m.str());
  }
  return v;
}

std::string CodecParams::get_choice(const std::string& key, const std::string& fallback,
                                    const std::vector<std::string>& choices) {
  used_.insert(key);
  auto it = values_.find(key);
  if (it == values_.end()) return fallback;
  for (const auto& c : choices) {
    if (c == it->second) return c;
  }
  throw OptionError("[codec '" + codec_ + "'] " + key + " must be one of " + join(choices, "|") +
                    ", got '" + it->second + "'");
}

std::int64_t CodecParams::get_power_of_two(const std::string& key, std::int64_t fallback,
                                           std::int64_t lo, std::int64_t hi) {
  auto it = values_.find(key);
  const std::int64_t v = get_int(key, fallback, lo, hi);
  if (v <= 0 || (v & (v - 1)) != 0) {
    throw OptionError("[codec '" + codec_ + "'] " + key + " must be a power of two in [" +
                      std::to_string(lo) + ", " + std::to_string(hi) + "], got '" +
                      (it == values_.end() ? std::to_string(v) : it->second) + "'");
  }
  return v;
}

void CodecParams::reject_unknown() const {
  std::vector<std::string> unknown, known(used_.begin(), used_.end());
  for (const auto& [k, v] : values_) {
    if (used_.count(k) == 0) unknown.push_back(k);
  }
  if (!unknown.empty()) {
    throw OptionError("[codec '" + codec_ + "'] unknown parameter" +
                      (unknown.size() > 1 ? "s " : " ") + join(unknown, ", ") +
                      "; valid: " + (known.empty() ? "none" : join(known, ", ")));
  }
}

std::string exact_decimal(double v) {
  char buf[40];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

}  // namespace diloco
