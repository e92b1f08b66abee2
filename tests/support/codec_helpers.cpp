// Helpers shared by the codec tests (see codec_helpers.h).
#include "support/codec_helpers.h"

#include <ATen/ATen.h>

#include <catch2/catch.hpp>
#include <cstring>

#include "diloco/compress/registry.h"

namespace diloco_test {
namespace {

// Bytes past the payload that an encoder must leave as they are.
constexpr std::size_t kGuardBytes = 16;
constexpr std::uint8_t kGuard = 0xA5;

}  // namespace

const std::vector<std::vector<std::int64_t>>& codec_shapes() {
  static const std::vector<std::vector<std::int64_t>> shapes = {
      {}, {1}, {7}, {5000}, {64, 64}, {100, 70}, {3, 5, 7}};
  return shapes;
}

std::unique_ptr<diloco::Codec> make_codec_with(const std::string& name,
                                               const std::map<std::string, std::string>& values) {
  std::string spec = name;
  if (!values.empty()) {
    const char* sep = "(";
    for (const auto& [key, value] : values) {
      spec += sep + key + "=" + value;
      sep = ",";
    }
    spec += ")";
  }
  return diloco::make_codec(spec);
}

std::vector<std::uint8_t> encode_payload(diloco::Codec& codec, const at::Tensor& x) {
  const auto bytes = static_cast<std::size_t>(codec.payload_bytes(x.sizes()));
  std::vector<std::uint8_t> buf(bytes + kGuardBytes, kGuard);
  codec.encode(x, buf.data());
  for (std::size_t i = bytes; i < buf.size(); ++i) REQUIRE(buf[i] == kGuard);
  buf.resize(bytes);
  return buf;
}

at::Tensor decode_payload(const diloco::Codec& codec, const std::vector<std::uint8_t>& payload,
                          c10::IntArrayRef shape) {
  at::Tensor y = at::empty(shape);
  codec.decode(payload.data(), static_cast<std::int64_t>(payload.size()), y);
  return y;
}

std::vector<float> encode_floats(diloco::Codec& codec, const at::Tensor& x) {
  const auto bytes = encode_payload(codec, x);
  REQUIRE(bytes.size() % sizeof(float) == 0);
  std::vector<float> out(bytes.size() / sizeof(float));
  if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

at::Tensor decode_floats(const diloco::Codec& codec, const std::vector<float>& payload,
                         c10::IntArrayRef shape) {
  at::Tensor y = at::empty(shape);
  codec.decode(reinterpret_cast<const std::uint8_t*>(payload.data()),
               static_cast<std::int64_t>(payload.size() * sizeof(float)), y);
  return y;
}

}  // namespace diloco_test
