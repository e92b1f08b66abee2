// Random-k with a shared seed (see randomk.h).
#include "compress/randomk.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>

#include "compress/codec_checks.h"
#include "diloco/compress/codec_params.h"
#include "diloco/errors.h"

namespace diloco {

const char* const kRandomkHelp =
    "randomk(fraction=0.01, seed=0, rescale=false|true): keep the same random fraction of the "
    "elements on every island (shared seed), all-reduced";

namespace {

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in [0, bound) by rejection: std::uniform_int_distribution is implementation-defined, and
// islands built with different standard libraries must still draw the same positions.
std::uint64_t uniform_below(std::mt19937_64& rng, std::uint64_t bound) {
  const std::uint64_t threshold = (0 - bound) % bound;  // 2^64 mod bound
  for (;;) {
    const std::uint64_t r = rng();
    if (r >= threshold) return r % bound;
  }
}

}  // namespace

RandomkCodec::RandomkCodec(double fraction, std::int64_t seed, bool rescale)
    : fraction_(fraction), seed_(seed), rescale_(rescale) {}

std::string RandomkCodec::spec() const {
  return "randomk(fraction=" + exact_decimal(fraction_) + ",seed=" + std::to_string(seed_) +
         ",rescale=" + (rescale_ ? "true" : "false") + ")";
}

std::int64_t RandomkCodec::kept(std::int64_t d) const {
  if (d <= 0) return 0;
  const auto k = static_cast<std::int64_t>(std::llround(fraction_ * static_cast<double>(d)));
  return std::min(d, std::max<std::int64_t>(1, k));
}

std::int64_t RandomkCodec::payload_bytes(c10::IntArrayRef shape) const {
  std::int64_t d = 1;
  for (auto s : shape) d *= s;
  return 4 * kept(d);
}

std::vector<std::int64_t> RandomkCodec::positions(std::int64_t call, std::int64_t d) const {
  const std::int64_t k = kept(d);
  std::mt19937_64 rng(
      splitmix64(splitmix64(static_cast<std::uint64_t>(seed_)) + static_cast<std::uint64_t>(call)));
  // Floyd's algorithm: k draws for k distinct positions, whatever k/d.
  std::vector<std::uint64_t> taken(static_cast<std::size_t>((d + 63) / 64), 0);
  auto test_and_set = [&](std::uint64_t p) {
    const std::uint64_t bit = std::uint64_t{1} << (p & 63);
    const bool was = taken[p >> 6] & bit;
    taken[p >> 6] |= bit;
    return was;
  };
  for (std::int64_t j = d - k; j < d; ++j) {
    const std::uint64_t t = uniform_below(rng, static_cast<std::uint64_t>(j) + 1);
    if (test_and_set(t)) test_and_set(static_cast<std::uint64_t>(j));
  }
  // Reading the bit set back gives the positions in ascending order.
  std::vector<std::int64_t> out;
  out.reserve(static_cast<std::size_t>(k));
  for (std::size_t w = 0; w < taken.size(); ++w) {
    for (std::uint64_t bits = taken[w]; bits; bits &= bits - 1) {
      out.push_back(static_cast<std::int64_t>(w * 64) + __builtin_ctzll(bits));
    }
  }
  return out;
}

void RandomkCodec::encode(const at::Tensor& x, std::uint8_t* out) {
  check_cpu_float("randomk", x, "encode input");
  if (decoded_) {
    draws_.clear();
    decoded_ = false;
  }
  const std::int64_t d = x.numel();
  Draw draw{out, d, positions(calls_++, d)};
  const float* p = x.data_ptr<float>();
  for (std::size_t j = 0; j < draw.positions.size(); ++j) {
    const float v = p[draw.positions[j]];
    if (!std::isfinite(v)) {
      std::ostringstream s;
      s << "[codec randomk] non-finite input " << v << " at element " << draw.positions[j]
        << " of a tensor of shape " << x.sizes();
      throw Error(s.str());
    }
    std::memcpy(out + 4 * j, &v, 4);
  }
  draws_.erase(std::remove_if(draws_.begin(), draws_.end(),
                              [out](const Draw& dr) { return dr.payload == out; }),
               draws_.end());
  draws_.push_back(std::move(draw));
}

void RandomkCodec::decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const {
  check_cpu_float("randomk", out, "decode output");
  const std::int64_t d = out.numel(), k = kept(d);
  if (bytes != 4 * k) {
    std::ostringstream s;
    s << "[codec randomk] payload of " << bytes << " bytes for shape " << out.sizes()
      << ", expected " << 4 * k;
    throw Error(s.str());
  }
  const Draw* draw = nullptr;
  for (auto it = draws_.rbegin(); it != draws_.rend() && !draw; ++it) {
    if (it->payload == payload && it->numel == d) draw = &*it;
  }
  for (auto it = draws_.rbegin(); it != draws_.rend() && !draw; ++it) {
    if (it->numel == d) draw = &*it;
  }
  if (!draw) {
    std::ostringstream s;
    s << "[codec randomk] decode of a tensor of shape " << out.sizes()
      << " with no matching encode since the last round: the positions are not in the payload, "
         "so decode must follow this instance's encode of the same tensor";
    throw Error(s.str());
  }
  decoded_ = true;
  const float factor = rescale_ ? static_cast<float>(static_cast<double>(d) / k) : 1.0f;
  float* o = out.data_ptr<float>();
  std::fill(o, o + d, 0.0f);
  for (std::int64_t j = 0; j < k; ++j) {
    float v;
    std::memcpy(&v, payload + 4 * j, 4);
    v *= factor;
    if (!std::isfinite(v)) {
      std::ostringstream s;
      s << "[codec randomk] malformed payload: value " << j << " (element " << draw->positions[j]
        << ") decodes to " << v;
      throw Error(s.str());
    }
    o[draw->positions[j]] = v;
  }
}

double RandomkCodec::error_bound(const at::Tensor& x) const {
  check_cpu_float("randomk", x, "error_bound input");
  const float* p = x.data_ptr<float>();
  const std::int64_t d = x.numel();
  double max_abs = 0;
  for (std::int64_t i = 0; i < d; ++i)
    max_abs = std::max(max_abs, static_cast<double>(std::fabs(p[i])));
  if (!rescale_ || d == 0) return max_abs;
  return max_abs * std::max(1.0, static_cast<double>(d) / kept(d) - 1.0);
}

std::unique_ptr<Codec> make_randomk_codec(CodecParams& params) {
  const double fraction = params.get_double("fraction", 0.01, 0.0, 1.0);
  if (!(fraction > 0)) {
    throw OptionError("[codec '" + params.codec() +
                      "'] fraction must be a number in (0, 1], got '" + exact_decimal(fraction) + "'");
  }
  const std::int64_t seed = params.get_int("seed", 0, 0, std::numeric_limits<std::int64_t>::max());
  const bool rescale = params.get_choice("rescale", "false", {"false", "true"}) == "true";
  params.reject_unknown();
  return std::make_unique<RandomkCodec>(fraction, seed, rescale);
}

}  // namespace diloco
