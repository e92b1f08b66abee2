// One suite over every built-in codec: round trip within the documented bound, exact payload
// size, the spec round trip, and malformed payloads that must raise diloco::Error.
#include <ATen/ATen.h>

#include <cstring>

#include "diloco/compress/registry.h"
#include "diloco/errors.h"
#include "support/catch.h"
#include "support/codec_helpers.h"

using Catch::Matchers::Contains;

namespace {

const char* const kSpecs[] = {"fp32", "fp16", "int8", "int8(block=64,rounding=stochastic)", "int4",
                              "int3", "int2", "int2(clip=1.25)", "int8_normal", "fp4", "topk",
                              "topk(k=16,values=2bit)", "dct", "randomk(fraction=0.25)", "sign"};

std::vector<std::int64_t> shape_of(int i) {
  static const std::vector<std::vector<std::int64_t>> shapes = {
      {}, {1}, {7}, {4096}, {5000}, {64, 64}, {100, 70}, {3, 5, 7}};
  return shapes.at(i);
}

}  // namespace

TEST_CASE("every codec round-trips within its bound, with exactly its payload size", "[compress]") {
  const std::string spec = GENERATE(from_range(std::begin(kSpecs), std::end(kSpecs)));
  const auto shape = shape_of(GENERATE(range(0, 8)));
  INFO("codec " << spec << " shape " << at::IntArrayRef(shape));
  auto codec = diloco::make_codec(spec);
  at::manual_seed(3);
  at::Tensor x = at::randn(shape);
  const std::int64_t bytes = codec->payload_bytes(x.sizes());
  REQUIRE(bytes >= 0);
  // Guarded: an encoder that writes past its declared size fails here.
  const auto buf = diloco_test::encode_payload(*codec, x);
  at::Tensor y = diloco_test::decode_payload(*codec, buf, x.sizes());
  const double err = x.numel() ? (y - x).abs().max().item<double>() : 0.0;
  const double bound = codec->error_bound(x);
  INFO("max error " << err << " bound " << bound);
  CHECK(err <= bound * (1 + 1e-6) + 1e-7);
  CHECK(at::isfinite(y).all().item<bool>());
  // The spec a codec reports builds an equal codec.
  auto again = diloco::make_codec(codec->spec());
  CHECK(again->spec() == codec->spec());
  CHECK(again->payload_bytes(x.sizes()) == bytes);
}

TEST_CASE("every codec rejects a truncated or overlong payload", "[compress]") {
  const std::string spec = GENERATE(from_range(std::begin(kSpecs), std::end(kSpecs)));
  INFO("codec " << spec);
  auto codec = diloco::make_codec(spec);
  at::Tensor x = at::randn({300});
  const std::int64_t bytes = codec->payload_bytes(x.sizes());
  std::vector<std::uint8_t> buf(static_cast<std::size_t>(bytes) + 1);
  codec->encode(x, buf.data());
  at::Tensor y = at::empty_like(x);
  CHECK_THROWS_AS(codec->decode(buf.data(), bytes - 1, y), diloco::Error);
  CHECK_THROWS_AS(codec->decode(buf.data(), bytes + 1, y), diloco::Error);
}

TEST_CASE("random bytes decode to finite values or raise diloco::Error", "[compress]") {
  const std::string spec = GENERATE(from_range(std::begin(kSpecs), std::end(kSpecs)));
  INFO("codec " << spec);
  auto codec = diloco::make_codec(spec);
  at::Tensor y = at::empty({64, 64});
  const std::int64_t bytes = codec->payload_bytes(y.sizes());
  std::mt19937 rng(11);
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<std::uint8_t> junk(static_cast<std::size_t>(bytes));
    for (auto& b : junk) b = static_cast<std::uint8_t>(rng());
    try {
      codec->decode(junk.data(), bytes, y);
      CHECK(at::isfinite(y).all().item<bool>());
    } catch (const diloco::Error&) {
      // a clear error is the other acceptable outcome
    }
  }
}

TEST_CASE("bad specs name the problem and list the codecs", "[compress]") {
  CHECK_THROWS_WITH(diloco::make_codec("int9"), Contains("unknown codec 'int9'") && Contains("topk"));
  CHECK_THROWS_WITH(diloco::make_codec("int8(block=100)"), Contains("block") && Contains("power of two"));
  CHECK_THROWS_WITH(diloco::make_codec("int8(blok=256)"), Contains("unknown parameter") && Contains("blok"));
  CHECK_THROWS_WITH(diloco::make_codec("topk(k=64"), Contains("missing ')'"));
  CHECK_THROWS_WITH(diloco::make_codec("topk(k)"), Contains("not key=value"));
  CHECK_THROWS_AS(diloco::make_codec(""), diloco::OptionError);
  CHECK(diloco::make_codec("none")->spec().rfind("fp32", 0) == 0);
  CHECK(diloco::codec_help().size() >= 11);
}
