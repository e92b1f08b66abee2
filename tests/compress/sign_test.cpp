// Scaled sign: decode(encode(x)) equals the formula (|x|_1/d) sign(x) computed with ATen, exactly;
// payload bytes; sign(0) = +1; malformed payloads and parameters.
#include "compress/sign.h"

#include <ATen/ATen.h>

#include <cstring>
#include <limits>
#include <random>

#include "diloco/compress/registry.h"
#include "diloco/errors.h"
#include "support/catch.h"
#include "support/codec_helpers.h"

using Catch::Matchers::Contains;
using diloco_test::codec_shapes;
using diloco_test::decode_payload;
using diloco_test::encode_payload;
using diloco_test::make_codec_with;

TEST_CASE("sign decodes to (|x|_1/d) sign(x) exactly", "[compress][sign]") {
  const auto shape = GENERATE(from_range(codec_shapes()));
  INFO("shape " << at::IntArrayRef(shape));
  auto codec = make_codec_with("sign");
  CHECK(codec->spec() == "sign");
  CHECK(codec->aggregation() == diloco::Aggregation::kGathered);
  CHECK(codec->payload_dtype() == at::kByte);
  at::manual_seed(2);
  at::Tensor x = at::randn(shape);
  const auto buf = encode_payload(*codec, x);
  at::Tensor y = at::empty_like(x);
  codec->decode(buf.data(), static_cast<std::int64_t>(buf.size()), y);
  const double d = static_cast<double>(x.numel());
  const float scale = static_cast<float>(x.to(at::kDouble).abs().sum().item<double>() / d);
  at::Tensor ref = at::where(x < 0, at::full_like(x, -scale), at::full_like(x, scale));
  INFO("max difference " << (y - ref).abs().max().item<double>());
  CHECK(at::equal(y, ref));
  CHECK((y - x).abs().max().item<double>() <= codec->error_bound(x));
  float sent;
  std::memcpy(&sent, buf.data(), 4);
  CHECK(sent == scale);
}

TEST_CASE("sign payload is 4 + ceil(d/8) bytes", "[compress][sign]") {
  auto codec = make_codec_with("sign");
  CHECK(codec->payload_bytes(std::vector<std::int64_t>{}) == 5);
  CHECK(codec->payload_bytes({1}) == 5);
  CHECK(codec->payload_bytes({7}) == 5);
  CHECK(codec->payload_bytes({8}) == 5);
  CHECK(codec->payload_bytes({9}) == 6);
  CHECK(codec->payload_bytes({5000}) == 629);
  CHECK(codec->payload_bytes({64, 64}) == 516);
  CHECK(codec->payload_bytes({100, 70}) == 879);
  CHECK(codec->payload_bytes({3, 5, 7}) == 18);
  CHECK(codec->payload_bytes({1024, 1024}) == 131076);
  CHECK(codec->payload_bytes({0}) == 4);
}

TEST_CASE("sign sends zero as +1 and packs bits little-endian", "[compress][sign]") {
  auto codec = make_codec_with("sign");
  at::Tensor x = at::tensor({0.0f, -0.0f, -2.0f, 1.0f, -1.0f, 0.0f, 0.0f, 0.0f, -4.0f});
  const auto buf = encode_payload(*codec, x);
  REQUIRE(buf.size() == 6);
  CHECK(buf[4] == 0x14);  // elements 2 and 4 negative
  CHECK(buf[5] == 0x01);  // element 8 negative, padding zero
  at::Tensor y = at::empty_like(x);
  codec->decode(buf.data(), 6, y);
  const float s = 8.0f / 9.0f;
  CHECK(at::equal(y, at::tensor({s, s, -s, s, -s, s, s, s, -s})));
  // An empty tensor has scale 0 and no bits.
  at::Tensor e = at::empty({0});
  const auto none = encode_payload(*codec, e);
  CHECK(none.size() == 4);
  codec->decode(none.data(), 4, e);
}

TEST_CASE("sign rejects malformed payloads and inputs", "[compress][sign]") {
  auto codec = make_codec_with("sign");
  at::Tensor x = at::randn({100});
  auto buf = encode_payload(*codec, x);
  at::Tensor y = at::empty_like(x);
  CHECK_THROWS_WITH(codec->decode(buf.data(), static_cast<std::int64_t>(buf.size()) - 1, y),
                    Contains("[codec sign]") && Contains("expected 17"));
  const float bad[] = {-1.0f, std::numeric_limits<float>::infinity(),
                       std::numeric_limits<float>::quiet_NaN()};
  for (float v : bad) {
    auto copy = buf;
    std::memcpy(copy.data(), &v, 4);
    CHECK_THROWS_WITH(codec->decode(copy.data(), static_cast<std::int64_t>(copy.size()), y),
                      Contains("[codec sign]") && Contains("scale"));
  }
  x[5] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(codec->encode(x, buf.data()),
                    Contains("[codec sign]") && Contains("non-finite"));
  // Random bytes: finite or a clear error.
  std::mt19937 rng(5);
  for (int trial = 0; trial < 100; ++trial) {
    for (auto& b : buf) b = static_cast<std::uint8_t>(rng());
    try {
      codec->decode(buf.data(), static_cast<std::int64_t>(buf.size()), y);
      CHECK(at::isfinite(y).all().item<bool>());
    } catch (const diloco::Error&) {
    }
  }
}

TEST_CASE("sign takes no parameters", "[compress][sign]") {
  CHECK_THROWS_AS(make_codec_with("sign", {{"k", "3"}}), diloco::OptionError);
  CHECK_THROWS_WITH(make_codec_with("sign", {{"scale", "1"}}),
                    Contains("unknown parameter") && Contains("scale"));
}
