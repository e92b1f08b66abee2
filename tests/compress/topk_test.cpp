// SparseLoCo per-chunk top-k: the kept set against at::topk per chunk, the payload size formula
// to the byte, the 2-bit and fp16 values within their bounds, malformed payloads and parameters.
#include "compress/topk.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <random>

#include "diloco/compress/registry.h"
#include "diloco/errors.h"
#include "support/catch.h"
#include "support/codec_helpers.h"

using Catch::Matchers::Contains;
using diloco_test::codec_shapes;
using diloco_test::decode_payload;
using diloco_test::encode_payload;

namespace {

struct Tiling {
  at::Tensor x2d;
  std::int64_t tile_rows, tile_cols;
};

Tiling tiling(const at::Tensor& x, std::int64_t chunk, std::int64_t vector_chunk) {
  if (x.dim() >= 2) return {x.reshape({x.size(0), -1}), chunk, chunk};
  return {x.reshape({1, x.numel()}), 1, vector_chunk};
}

// The plain ATen reference: at::topk of |x| per chunk, everything else zero.
at::Tensor reference_topk(const at::Tensor& x, std::int64_t k, std::int64_t chunk,
                          std::int64_t vector_chunk) {
  const Tiling t = tiling(x, chunk, vector_chunk);
  at::Tensor ref = at::zeros_like(t.x2d);
  for (std::int64_t r0 = 0; r0 < t.x2d.size(0); r0 += t.tile_rows) {
    for (std::int64_t c0 = 0; c0 < t.x2d.size(1); c0 += t.tile_cols) {
      const std::int64_t r1 = std::min(t.x2d.size(0), r0 + t.tile_rows);
      const std::int64_t c1 = std::min(t.x2d.size(1), c0 + t.tile_cols);
      at::Tensor tile = t.x2d.slice(0, r0, r1).slice(1, c0, c1).reshape({-1});
      const std::int64_t kc = std::min(k, tile.numel());
      at::Tensor idx = std::get<1>(at::topk(tile.abs(), kc));
      at::Tensor kept = at::zeros_like(tile);
      kept.index_put_({idx}, tile.index({idx}));
      ref.slice(0, r0, r1).slice(1, c0, c1).copy_(kept.view({r1 - r0, c1 - c0}));
    }
  }
  return ref.view(x.sizes());
}

// The payload size written out from the class comment, chunk by chunk.
std::int64_t formula_bytes(c10::IntArrayRef shape, std::int64_t k, std::int64_t chunk,
                           std::int64_t vector_chunk, const std::string& values) {
  at::Tensor x = at::zeros(shape);
  const Tiling t = tiling(x, chunk, vector_chunk);
  std::int64_t bits = 0, kept = 0, chunks = 0;
  for (std::int64_t r0 = 0; r0 < t.x2d.size(0); r0 += t.tile_rows) {
    for (std::int64_t c0 = 0; c0 < t.x2d.size(1); c0 += t.tile_cols) {
      const std::int64_t n = (std::min(t.x2d.size(0), r0 + t.tile_rows) - r0) *
                             (std::min(t.x2d.size(1), c0 + t.tile_cols) - c0);
      const std::int64_t kc = std::min(k, n);
      const auto b = static_cast<std::int64_t>(std::ceil(std::log2(static_cast<double>(n))));
      bits += kc * b;
      kept += kc;
      ++chunks;
    }
  }
  const std::int64_t index_bytes = (bits + 7) / 8;
  if (values == "fp16") return index_bytes + 2 * kept;
  if (values == "2bit") return index_bytes + 4 * chunks + (2 * kept + 7) / 8;
  return index_bytes + 4 * kept;
}

// Overwrites `bits` bits at bit offset `pos` of a little-endian bit stream.
void set_bits(std::vector<std::uint8_t>& buf, std::int64_t pos, int bits, std::uint32_t v) {
  for (int b = 0; b < bits; ++b, ++pos) {
    const auto byte = static_cast<std::size_t>(pos / 8);
    const int shift = static_cast<int>(pos % 8);
    buf[byte] =
        static_cast<std::uint8_t>((buf[byte] & ~(1u << shift)) | (((v >> b) & 1u) << shift));
  }
}

}  // namespace

TEST_CASE("topk keeps exactly the top-k of every chunk (fp32 values)", "[compress][topk]") {
  const auto shape = GENERATE(from_range(codec_shapes()));
  const auto params = GENERATE(std::make_tuple(64, 64, 4096), std::make_tuple(5, 8, 64),
                               std::make_tuple(1, 16, 64), std::make_tuple(4096, 64, 4096));
  const auto [k, chunk, vector_chunk] = params;
  const std::string spec = "topk(k=" + std::to_string(k) + ",chunk=" + std::to_string(chunk) +
                           ",vector_chunk=" + std::to_string(vector_chunk) + ",values=fp32)";
  INFO(spec << " shape " << at::IntArrayRef(shape));
  auto codec = diloco::make_codec(spec);
  CHECK(codec->spec() == spec);
  CHECK(diloco::make_codec(codec->spec())->spec() == spec);
  CHECK(codec->aggregation() == diloco::Aggregation::kGathered);
  CHECK(codec->payload_dtype() == at::kByte);
  at::manual_seed(7);
  at::Tensor x = at::randn(shape);
  const auto buf = encode_payload(*codec, x);
  CHECK(static_cast<std::int64_t>(buf.size()) ==
        formula_bytes(shape, k, chunk, vector_chunk, "fp32"));
  at::Tensor y = decode_payload(*codec, buf, x.sizes());
  at::Tensor ref = reference_topk(x, k, chunk, vector_chunk);
  INFO("max difference " << (x.numel() ? (y - ref).abs().max().item<double>() : 0.0));
  CHECK(at::equal(y, ref));
  const double err = x.numel() ? (y - x).abs().max().item<double>() : 0.0;
  CHECK(err <= codec->error_bound(x));
  // fp32 values: the bound is the largest dropped magnitude, which the reference attains.
  const double dropped = x.numel() ? (x - ref).abs().max().item<double>() : 0.0;
  CHECK(codec->error_bound(x) == Approx(dropped).margin(1e-12));
}

TEST_CASE("topk breaks ties toward the lower position", "[compress][topk]") {
  auto codec = diloco::make_codec("topk(k=3,vector_chunk=64)");
  at::Tensor x = at::tensor({1.0f, -2.0f, 2.0f, 0.5f, -2.0f, 2.0f, 1.0f});
  at::Tensor y = decode_payload(*codec, encode_payload(*codec, x), x.sizes());
  CHECK(at::equal(y, at::tensor({0.0f, -2.0f, 2.0f, 0.0f, -2.0f, 0.0f, 0.0f})));
}

TEST_CASE("topk payload sizes follow the formula to the byte", "[compress][topk]") {
  const auto shape = GENERATE(from_range(codec_shapes()));
  const std::string values = GENERATE("fp32", "fp16", "2bit");
  auto codec = diloco::make_codec("topk(values=" + values + ")");
  CHECK(codec->payload_bytes(shape) == formula_bytes(shape, 64, 64, 4096, values));
  // The figures quoted in topk.h.
  auto fp32 = diloco::make_codec("topk"), two = diloco::make_codec("topk(values=2bit)"),
       half = diloco::make_codec("topk(values=fp16)");
  CHECK(fp32->payload_bytes({1024, 1024}) == 90112);
  CHECK(two->payload_bytes({1024, 1024}) == 29696);
  CHECK(half->payload_bytes({1024, 1024}) == 24576 + 32768);
  CHECK(fp32->payload_bytes({64, 64}) == 64 * 12 / 8 + 64 * 4);
  CHECK(fp32->payload_bytes({0}) == 0);
  CHECK(fp32->payload_bytes({0, 5}) == 0);
}

TEST_CASE("topk fp16 and 2-bit values stay within the documented bound", "[compress][topk]") {
  const auto shape = GENERATE(from_range(codec_shapes()));
  const std::string values = GENERATE("fp16", "2bit");
  const auto params = GENERATE(std::make_tuple(64, 64, 4096), std::make_tuple(5, 8, 64));
  const auto [k, chunk, vector_chunk] = params;
  const std::string spec = "topk(k=" + std::to_string(k) + ",chunk=" + std::to_string(chunk) +
                           ",vector_chunk=" + std::to_string(vector_chunk) + ",values=" + values +
                           ")";
  INFO(spec << " shape " << at::IntArrayRef(shape));
  auto codec = diloco::make_codec(spec);
  CHECK(diloco::make_codec(codec->spec())->spec() == spec);
  at::manual_seed(11);
  at::Tensor x = at::randn(shape) * 3;
  const auto buf = encode_payload(*codec, x);
  CHECK(static_cast<std::int64_t>(buf.size()) ==
        formula_bytes(shape, k, chunk, vector_chunk, values));
  at::Tensor y = decode_payload(*codec, buf, x.sizes());
  CHECK(at::isfinite(y).all().item<bool>());
  if (x.numel() == 0) return;
  const double err = (y - x).abs().max().item<double>();
  INFO("max error " << err << " bound " << codec->error_bound(x));
  CHECK(err <= codec->error_bound(x));
  at::Tensor ref = reference_topk(x, k, chunk, vector_chunk);
  // Same support as the exact top-k, same signs.
  CHECK(at::equal(y != 0, ref != 0));
  CHECK(at::equal(y.sign(), ref.sign()));
  if (values == "fp16") {
    CHECK(((y - ref).abs() <= ref.abs() * std::ldexp(1.0, -11) + std::ldexp(1.0, -25))
              .all()
              .item<bool>());
  } else {
    // The 2-bit scale keeps every chunk's L1 mass, hence the tensor's.
    CHECK(y.abs().sum().item<double>() == Approx(ref.abs().sum().item<double>()).epsilon(1e-5));
  }
}

TEST_CASE("topk 2-bit levels are (2/3)s and (4/3)s around the mean magnitude", "[compress][topk]") {
  auto codec = diloco::make_codec("topk(k=4,vector_chunk=64,values=2bit)");
  // Kept: 4, -3, 2, -1 (mean 2.5): high 4 and -3, low 2 and -1; s = 10 / (2 * 2/3 + 2 * 4/3) = 2.5.
  at::Tensor x = at::tensor({4.0f, 0.5f, -3.0f, 2.0f, -1.0f, 0.25f});
  at::Tensor y = decode_payload(*codec, encode_payload(*codec, x), x.sizes());
  const float lo = static_cast<float>(2.0 / 3.0 * 2.5), hi = static_cast<float>(4.0 / 3.0 * 2.5);
  CHECK(at::equal(y, at::tensor({hi, 0.0f, -hi, lo, -lo, 0.0f})));
  // Zeros among the kept values: the scale is 0 and everything decodes to 0.
  at::Tensor z = at::zeros({5});
  CHECK(at::equal(decode_payload(*codec, encode_payload(*codec, z), z.sizes()), z));
}

TEST_CASE("topk fp16 values saturate instead of overflowing", "[compress][topk]") {
  auto codec = diloco::make_codec("topk(k=2,vector_chunk=64,values=fp16)");
  at::Tensor x = at::tensor({1e6f, -7e4f, 1.0f});
  at::Tensor y = decode_payload(*codec, encode_payload(*codec, x), x.sizes());
  CHECK(at::equal(y, at::tensor({65504.0f, -65504.0f, 0.0f})));
  CHECK((y - x).abs().max().item<double>() <= codec->error_bound(x));
}

TEST_CASE("topk rejects malformed payloads with a diloco::Error naming the chunk",
          "[compress][topk]") {
  at::manual_seed(5);
  SECTION("wrong size") {
    auto codec = diloco::make_codec("topk");
    at::Tensor x = at::randn({100, 70});
    auto buf = encode_payload(*codec, x);
    at::Tensor y = at::empty_like(x);
    CHECK_THROWS_AS(codec->decode(buf.data(), static_cast<std::int64_t>(buf.size()) - 1, y),
                    diloco::Error);
    buf.push_back(0);
    CHECK_THROWS_WITH(codec->decode(buf.data(), static_cast<std::int64_t>(buf.size()), y),
                      Contains("[codec topk]") && Contains("bytes"));
  }
  SECTION("index out of the chunk") {
    // [100, 70]: chunk 1 is the 64x6 tile (384 elements, 9-bit indices) after 64 12-bit indices.
    auto codec = diloco::make_codec("topk");
    at::Tensor x = at::randn({100, 70});
    auto buf = encode_payload(*codec, x);
    set_bits(buf, 64 * 12, 9, 400);
    at::Tensor y = at::empty_like(x);
    CHECK_THROWS_WITH(
        decode_payload(*codec, buf, x.sizes()),
        Contains("[codec topk]") && Contains("chunk 1 of 4") && Contains("400") && Contains("384"));
  }
  SECTION("index out of a vector chunk") {
    auto codec = diloco::make_codec("topk");
    at::Tensor x = at::randn({7});
    auto buf = encode_payload(*codec, x);
    set_bits(buf, 0, 3, 7);
    CHECK_THROWS_WITH(decode_payload(*codec, buf, x.sizes()),
                      Contains("chunk 0") && Contains("index 7"));
  }
  SECTION("duplicate index") {
    auto codec = diloco::make_codec("topk");
    at::Tensor x = at::randn({64, 64});
    auto buf = encode_payload(*codec, x);
    std::uint32_t first = buf[0] | ((buf[1] & 0xF) << 8);
    set_bits(buf, 12, 12, first);
    CHECK_THROWS_WITH(decode_payload(*codec, buf, x.sizes()),
                      Contains("[codec topk]") && Contains("chunk 0") && Contains("twice"));
  }
  SECTION("non-finite value") {
    auto codec = diloco::make_codec("topk");
    at::Tensor x = at::randn({64, 64});
    auto buf = encode_payload(*codec, x);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(buf.data() + 96 + 4 * 10, &nan, 4);
    CHECK_THROWS_WITH(decode_payload(*codec, buf, x.sizes()),
                      Contains("chunk 0") && Contains("not finite"));
    auto half = diloco::make_codec("topk(values=fp16)");
    buf = encode_payload(*half, x);
    buf[96 + 2 * 3] = 0x00;
    buf[96 + 2 * 3 + 1] = 0x7C;  // fp16 +inf
    CHECK_THROWS_AS(decode_payload(*half, buf, x.sizes()), diloco::Error);
  }
  SECTION("bad 2-bit scale") {
    auto codec = diloco::make_codec("topk(values=2bit)");
    at::Tensor x = at::randn({100, 70});
    auto buf = encode_payload(*codec, x);
    // Index bytes: 64*12 + 64*9 + 64*12 + 64*8 bits (36x64 tile: 2304 elements, 12 bits; 36x6:
    // 216 elements, 8 bits) = 2624 bits = 328 bytes; chunk 2's scale follows at 328 + 8.
    const float bad[] = {-1.0f, std::numeric_limits<float>::infinity(), std::nanf("")};
    for (float v : bad) {
      auto copy = buf;
      std::memcpy(copy.data() + 328 + 8, &v, 4);
      CHECK_THROWS_WITH(decode_payload(*codec, copy, x.sizes()),
                        Contains("chunk 2 of 4") && Contains("scale"));
    }
  }
  SECTION("non-finite input is refused at encode") {
    auto codec = diloco::make_codec("topk");
    at::Tensor x = at::randn({10});
    x[3] = std::numeric_limits<float>::infinity();
    std::vector<std::uint8_t> buf(static_cast<std::size_t>(codec->payload_bytes(x.sizes())));
    CHECK_THROWS_WITH(codec->encode(x, buf.data()), Contains("non-finite") && Contains("col 3"));
  }
}

TEST_CASE("topk decodes random bytes to finite values or raises diloco::Error",
          "[compress][topk]") {
  const std::string spec = GENERATE("topk", "topk(values=fp16)", "topk(values=2bit)",
                                    "topk(k=5,chunk=8,vector_chunk=64)");
  const auto shape = GENERATE(from_range(codec_shapes()));
  INFO(spec << " shape " << at::IntArrayRef(shape));
  auto codec = diloco::make_codec(spec);
  const std::int64_t bytes = codec->payload_bytes(shape);
  std::mt19937 rng(3);
  int decoded = 0;
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<std::uint8_t> junk(static_cast<std::size_t>(bytes));
    for (auto& b : junk) b = static_cast<std::uint8_t>(rng());
    at::Tensor y = at::empty(shape);
    try {
      codec->decode(junk.data(), bytes, y);
      CHECK(at::isfinite(y).all().item<bool>());
      ++decoded;
    } catch (const diloco::Error&) {
    }
  }
  INFO(decoded << " of 50 decoded");
  SUCCEED();
}

TEST_CASE("topk rejects bad parameters naming them and their range", "[compress][topk]") {
  CHECK_THROWS_WITH(diloco::make_codec("topk(k=0)"), Contains("k must") && Contains("[1, 4096]"));
  CHECK_THROWS_WITH(diloco::make_codec("topk(k=5000)"), Contains("[1, 4096]"));
  CHECK_THROWS_WITH(diloco::make_codec("topk(chunk=100)"),
                    Contains("chunk") && Contains("power of two") && Contains("[8, 256]"));
  CHECK_THROWS_WITH(diloco::make_codec("topk(chunk=512)"),
                    Contains("chunk") && Contains("[8, 256]"));
  CHECK_THROWS_WITH(diloco::make_codec("topk(vector_chunk=32)"),
                    Contains("vector_chunk") && Contains("[64, 65536]"));
  CHECK_THROWS_WITH(diloco::make_codec("topk(values=3bit)"),
                    Contains("values") && Contains("fp32|fp16|2bit"));
  CHECK_THROWS_WITH(diloco::make_codec("topk(kk=3)"),
                    Contains("unknown parameter") && Contains("kk"));
  CHECK_THROWS_AS(diloco::make_codec("topk(k=0)"), diloco::OptionError);
  CHECK(diloco::make_codec("topk")->spec() == "topk(k=64,chunk=64,vector_chunk=4096,values=fp32)");
}
