// int8_normal (see normal_int8.h): one pass for the statistics, one fused pass that bins, and a
// 256-entry table of bin centres for decoding.
#include "compress/normal_int8.h"

#include <ATen/Tensor.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "compress/codec_checks.h"
#include "diloco/errors.h"

namespace diloco {

const char* const kInt8NormalHelp =
    "int8_normal: INTELLECT-1's int8, 256 uniform bins over mean +- 6 std of the whole tensor "
    "(8 bits/param + 8 bytes)";

namespace {

constexpr const char* kName = "int8_normal";
constexpr std::int64_t kHeader = 8;
constexpr int kDegenerateCode = 128;

// The quantities encode and decode derive from the header, in one place so that both agree.
struct Bins {
  double lo = 0, w = 0;  // exact in double from the float mu, sigma
  float lo_f = 0, inv_w_f = 0;
  bool degenerate = true;  // 1/w does not fit a float: every code is kDegenerateCode

  Bins(float mu, float sigma) {
    lo = static_cast<double>(mu) - 6.0 * static_cast<double>(sigma);
    w = static_cast<double>(sigma) * (12.0 / 256.0);
    lo_f = static_cast<float>(lo);
    if (w > 0.0) {
      inv_w_f = static_cast<float>(1.0 / w);
      degenerate = !std::isfinite(inv_w_f);
    }
  }
};

struct Stats {
  float mu = 0, sigma = 0;
  bool finite = true;
};

// Adds the shifted sums of x[begin, end) in double: the exact path.
void add_sums_double(const float* x, std::int64_t begin, std::int64_t end, double x0, double& sum,
                     double& sq) {
  for (std::int64_t i = begin; i < end; ++i) {
    const double d = static_cast<double>(x[i]) - x0;
    sum += d;
    sq += d * d;
  }
}

// Mean and population standard deviation in one pass of sums shifted by the first element.
// Chunks of 256 elements are summed in float over eight independent lanes (32 terms each, so a
// relative error of about 2^-19), which GCC vectorizes, unlike a double accumulation of floats;
// the chunk sums are added in double. A chunk whose float sums overflow (|x| > ~1e18) is summed
// again in double.
Stats compute_stats(const float* x, std::int64_t n) {
  Stats st;
  if (n == 0) return st;
  constexpr int kLanes = 8;
  constexpr std::int64_t kChunk = 256;
  const float x0 = x[0];
  double sum = 0, sq = 0;
  std::int64_t i = 0;
  for (; i + kChunk <= n; i += kChunk) {
    float s1[kLanes] = {}, s2[kLanes] = {};
    for (std::int64_t j = i; j < i + kChunk; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float d = x[j + l] - x0;
        s1[l] += d;
        s2[l] += d * d;
      }
    }
    float c1 = 0.f, c2 = 0.f;
    for (int l = 0; l < kLanes; ++l) {
      c1 += s1[l];
      c2 += s2[l];
    }
    if (std::isfinite(c1) && std::isfinite(c2)) {
      sum += c1;
      sq += c2;
    } else {
      add_sums_double(x, i, i + kChunk, x0, sum, sq);
    }
  }
  add_sums_double(x, i, n, x0, sum, sq);
  // Sums of finite floats cannot overflow a double, so a non-finite sum means a non-finite input.
  if (!std::isfinite(sum) || !std::isfinite(sq)) {
    st.finite = false;
    return st;
  }
  const double mean_d = sum / static_cast<double>(n);
  const double var = std::max(0.0, sq / static_cast<double>(n) - mean_d * mean_d);
  const double mu = x0 + mean_d;
  st.mu = static_cast<float>(mu);
  // Cap sigma so that mu +- 6 sigma stays a finite float; round the cap down so it still holds.
  const double cap = (static_cast<double>(FLT_MAX) - std::fabs(static_cast<double>(st.mu))) / 6.0;
  const double sigma = std::min(std::sqrt(var), cap);
  st.sigma = static_cast<float>(sigma);
  if (static_cast<double>(st.sigma) > cap) st.sigma = std::nextafter(st.sigma, 0.f);
  return st;
}

}  // namespace

std::int64_t NormalInt8Codec::payload_bytes(c10::IntArrayRef shape) const {
  return kHeader + c10::multiply_integers(shape);
}

void NormalInt8Codec::encode(const at::Tensor& x, std::uint8_t* out) {
  check_cpu_float(kName, x, "input");
  const std::int64_t n = x.numel();
  const float* in = x.data_ptr<float>();
  const Stats st = compute_stats(in, n);
  if (!st.finite) {
    const std::int64_t i = std::find_if(in, in + n, [](float v) { return !std::isfinite(v); }) - in;
    throw Error(std::string("[codec '") + kName + "'] cannot encode a non-finite input (element " +
                std::to_string(i) + ")");
  }
  std::memcpy(out, &st.mu, 4);
  std::memcpy(out + 4, &st.sigma, 4);
  std::uint8_t* codes = out + kHeader;
  const Bins bins(st.mu, st.sigma);
  if (bins.degenerate) {
    std::memset(codes, kDegenerateCode, static_cast<std::size_t>(n));
    return;
  }
  const float lo = bins.lo_f, inv_w = bins.inv_w_f;
  for (std::int64_t i = 0; i < n; ++i) {
    float t = (in[i] - lo) * inv_w;
    // t >= 0 after the clamp, so truncation is floor; the comparisons send a NaN to bin 0.
    t = t > 0.f ? t : 0.f;
    t = t < 255.f ? t : 255.f;
    codes[i] = static_cast<std::uint8_t>(static_cast<std::int32_t>(t));
  }
}

void NormalInt8Codec::decode(const std::uint8_t* payload, std::int64_t bytes,
                             at::Tensor& out) const {
  check_cpu_float(kName, out, "output");
  const std::int64_t n = out.numel();
  if (bytes != kHeader + n) {
    throw Error(std::string("[codec '") + kName + "'] malformed payload: " +
                std::to_string(bytes) + " bytes, expected " + std::to_string(kHeader + n) +
                " for " + std::to_string(n) + " elements");
  }
  float mu, sigma;
  std::memcpy(&mu, payload, 4);
  std::memcpy(&sigma, payload + 4, 4);
  const auto bad_header = [&](const std::string& what) {
    return Error(std::string("[codec '") + kName + "'] malformed payload: header mean " +
                 std::to_string(mu) + ", std " + std::to_string(sigma) + ": " + what);
  };
  if (!std::isfinite(mu) || !std::isfinite(sigma)) throw bad_header("not finite");
  if (std::signbit(sigma)) throw bad_header("negative std");
  if (std::fabs(static_cast<double>(mu)) + 6.0 * static_cast<double>(sigma) >
      static_cast<double>(FLT_MAX)) {
    throw bad_header("mean +- 6 std overflows float32");
  }
  const Bins bins(mu, sigma);
  std::array<float, 256> centre;
  for (int c = 0; c < 256; ++c) centre[c] = static_cast<float>(bins.lo + (c + 0.5) * bins.w);
  const std::uint8_t* codes = payload + kHeader;
  float* y = out.data_ptr<float>();
  for (std::int64_t i = 0; i < n; ++i) y[i] = centre[codes[i]];
}

double NormalInt8Codec::error_bound(const at::Tensor& x) const {
  check_cpu_float(kName, x, "input");
  const std::int64_t n = x.numel();
  if (n == 0) return 0.0;
  const float* in = x.data_ptr<float>();
  const Stats st = compute_stats(in, n);
  if (!st.finite) return std::numeric_limits<double>::infinity();
  const Bins bins(st.mu, st.sigma);
  const auto [mn, mx] = std::minmax_element(in, in + n);
  const double hi = bins.lo + 256.0 * bins.w;
  const double excess = std::max({0.0, *mx - hi, bins.lo - *mn});
  const double amax = std::max(std::fabs(*mn), std::fabs(*mx));
  const double sigma = st.sigma;
  const double slack = std::ldexp(std::fabs(static_cast<double>(st.mu)) + 6.0 * sigma + amax, -21);
  return bins.w / 2 + excess + slack + (bins.degenerate ? 6.0 * sigma : 0.0);
}

std::unique_ptr<Codec> make_int8_normal_codec(CodecParams& params) {
  params.reject_unknown();
  return std::make_unique<NormalInt8Codec>();
}

}  // namespace diloco
