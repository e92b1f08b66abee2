// Helpers shared by the codec tests (see codec_helpers.h).
#include "support/codec_helpers.h"

#include <ATen/ATen.h>

#include <cstring>

#include "diloco/compress/registry.h"
#include "support/catch.h"

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

namespace {

class TamperingCodec final : public diloco::Codec {
 public:
  using Tamper = std::function<void(std::uint8_t*, std::int64_t)>;
  TamperingCodec(std::unique_ptr<diloco::Codec> inner, Tamper tamper)
      : inner_(std::move(inner)), tamper_(std::move(tamper)) {}
  std::string spec() const override { return inner_->spec(); }
  diloco::Aggregation aggregation() const override { return inner_->aggregation(); }
  at::ScalarType payload_dtype() const override { return inner_->payload_dtype(); }
  std::int64_t payload_bytes(c10::IntArrayRef s) const override { return inner_->payload_bytes(s); }
  void encode(const at::Tensor& x, std::uint8_t* out) override {
    inner_->encode(x, out);
    tamper_(out, inner_->payload_bytes(x.sizes()));
  }
  void decode(const std::uint8_t* p, std::int64_t b, at::Tensor& out) const override {
    inner_->decode(p, b, out);
  }
  double error_bound(const at::Tensor& x) const override { return inner_->error_bound(x); }

 private:
  std::unique_ptr<diloco::Codec> inner_;
  Tamper tamper_;
};

}  // namespace

void register_tampering_codec(const std::string& name, const std::string& inner,
                              std::function<void(std::uint8_t*, std::int64_t)> tamper) {
  diloco::register_codec(name, name + ": test codec, " + inner + " with tampered payloads",
                         [inner, tamper](diloco::CodecParams&) {
                           return std::make_unique<TamperingCodec>(diloco::make_codec(inner),
                                                                   tamper);
                         });
}

}  // namespace diloco_test
