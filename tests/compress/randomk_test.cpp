// Random-k with a shared seed: islands agree on the positions call after call, a sum of payloads
// decodes to the sum of the decodes, rescaling is unbiased, payload bytes, bad parameters.
#include "compress/randomk.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "diloco/compress/registry.h"
#include "diloco/errors.h"
#include "support/catch.h"
#include "support/codec_helpers.h"

using Catch::Matchers::Contains;
using diloco_test::codec_shapes;
using diloco_test::decode_floats;
using diloco_test::encode_floats;
using diloco_test::make_codec_with;

TEST_CASE("randomk round-trips its kept values and sizes its payload as 4k",
          "[compress][randomk]") {
  const auto shape = GENERATE(from_range(codec_shapes()));
  const double fraction = GENERATE(0.01, 0.25, 1.0);
  INFO("fraction " << fraction << " shape " << at::IntArrayRef(shape));
  auto codec = make_codec_with("randomk", {{"fraction", std::to_string(fraction)}});
  CHECK(codec->aggregation() == diloco::Aggregation::kSummable);
  CHECK(codec->payload_dtype() == at::kFloat);
  at::Tensor x = at::arange(1, 1 + at::zeros(shape).numel(), at::kFloat).view(shape);
  const std::int64_t d = x.numel();
  const std::int64_t k = std::min(d, std::max<std::int64_t>(1, std::llround(fraction * d)));
  CHECK(codec->payload_bytes(shape) == 4 * k);
  const auto buf = encode_floats(*codec, x);
  // x = 1..d, so the payload lists the positions + 1: distinct and ascending.
  for (std::size_t j = 1; j < buf.size(); ++j) CHECK(buf[j - 1] < buf[j]);
  at::Tensor y = decode_floats(*codec, buf, shape);
  CHECK(((y == 0) | (y == x)).all().item<bool>());
  CHECK((y != 0).sum().item<std::int64_t>() == k);
  CHECK((y - x).abs().max().item<double>() <= codec->error_bound(x));
}

TEST_CASE("randomk payload sizes", "[compress][randomk]") {
  auto codec = make_codec_with("randomk");
  CHECK(codec->payload_bytes(std::vector<std::int64_t>{}) == 4);
  CHECK(codec->payload_bytes({7}) == 4);
  CHECK(codec->payload_bytes({5000}) == 200);
  CHECK(codec->payload_bytes({64, 64}) == 164);
  CHECK(codec->payload_bytes({100, 70}) == 280);
  CHECK(codec->payload_bytes({3, 5, 7}) == 4);
  CHECK(codec->payload_bytes({1024, 1024}) == 41944);
  CHECK(codec->payload_bytes({0}) == 0);
}

TEST_CASE("randomk islands with the same seed keep the same positions call after call",
          "[compress][randomk]") {
  auto a = make_codec_with("randomk", {{"seed", "42"}, {"fraction", "0.01"}});
  auto b = make_codec_with("randomk", {{"seed", "42"}, {"fraction", "0.01"}});
  auto other = make_codec_with("randomk", {{"seed", "43"}, {"fraction", "0.01"}});
  std::set<std::vector<float>> seen;
  for (int call = 0; call < 20; ++call) {
    // Different tensor sizes along the way: the counter advances on every encode regardless.
    const std::int64_t d = call % 3 == 0 ? 5000 : 1000;
    at::Tensor x = at::arange(1, d + 1, at::kFloat);
    const auto pa = encode_floats(*a, x), pb = encode_floats(*b, x), po = encode_floats(*other, x);
    CHECK(pa == pb);
    CHECK(pa != po);
    seen.insert(pa);
  }
  CHECK(seen.size() == 20);  // a fresh draw every call
  auto* ra = dynamic_cast<diloco::RandomkCodec*>(a.get());
  REQUIRE(ra != nullptr);
  CHECK(ra->calls() == 20);
  const auto pos = ra->positions(19, 1000);
  CHECK(pos.size() == 10);
  CHECK(std::set<std::int64_t>(pos.begin(), pos.end()).size() == 10);
}

TEST_CASE("randomk: the sum of the islands' payloads decodes to the sum of their decodes",
          "[compress][randomk]") {
  const auto shape = GENERATE(from_range(codec_shapes()));
  INFO("shape " << at::IntArrayRef(shape));
  const std::string rescale = GENERATE("false", "true");
  INFO("rescale " << rescale);
  auto a = make_codec_with("randomk", {{"fraction", "0.1"}, {"seed", "9"}, {"rescale", rescale}});
  auto b = make_codec_with("randomk", {{"fraction", "0.1"}, {"seed", "9"}, {"rescale", rescale}});
  at::manual_seed(1);
  at::Tensor x1 = at::randn(shape), x2 = at::randn(shape);
  const auto pa = encode_floats(*a, x1), pb = encode_floats(*b, x2);
  std::vector<float> sum(pa.size());
  for (std::size_t j = 0; j < pa.size(); ++j) sum[j] = pa[j] + pb[j];
  at::Tensor ya = decode_floats(*a, pa, shape), yb = decode_floats(*b, pb, shape);
  at::Tensor ys = decode_floats(*a, sum, shape);
  if (rescale == "false") {
    CHECK(at::equal(ys, ya + yb));
  } else {
    // d/k (a + b) and d/k a + d/k b differ by float rounding only.
    CHECK(at::allclose(ys, ya + yb, 1e-5, 1e-6));
  }
  CHECK(at::equal(decode_floats(*b, sum, shape), ys));
}

TEST_CASE("randomk decodes each payload with the positions of the encode that wrote it",
          "[compress][randomk]") {
  // The compressor encodes every tensor, then decodes each from where it was encoded.
  auto codec = make_codec_with("randomk", {{"fraction", "0.05"}});
  at::manual_seed(4);
  at::Tensor x1 = at::randn({40, 50}), x2 = at::randn({1500});
  const auto p1 = encode_floats(*codec, x1), p2 = encode_floats(*codec, x2);
  auto* r = dynamic_cast<diloco::RandomkCodec*>(codec.get());
  for (int pass = 0; pass < 2; ++pass) {
    for (const auto& [p, x, call] : {std::make_tuple(&p1, x1, 0), std::make_tuple(&p2, x2, 1)}) {
      at::Tensor y = decode_floats(*codec, *p, x.sizes());
      at::Tensor mask = at::zeros({x.numel()}, at::kBool);
      for (auto i : r->positions(call, x.numel())) mask[i] = true;
      CHECK(at::equal(y, at::where(mask.view(x.sizes()), x, at::zeros_like(x))));
    }
  }
  // A decode ends the round: the next encode forgets the previous ones.
  const auto p3 = encode_floats(*codec, x1);
  at::Tensor stale = at::empty({1500});
  CHECK_THROWS_WITH(codec->decode(reinterpret_cast<const std::uint8_t*>(p2.data()), 300, stale),
                    Contains("[codec randomk]") && Contains("no matching encode"));
  (void)p3;
}

TEST_CASE("randomk with rescale is unbiased", "[compress][randomk]") {
  auto scaled =
      make_codec_with("randomk", {{"fraction", "0.2"}, {"rescale", "true"}, {"seed", "5"}});
  auto plain = make_codec_with("randomk", {{"fraction", "0.2"}, {"seed", "5"}});
  at::manual_seed(8);
  at::Tensor x = at::rand({50}) + 0.5;  // away from 0: the check is relative
  at::Tensor mean_scaled = at::zeros_like(x), mean_plain = at::zeros_like(x);
  const int calls = 4000;
  for (int c = 0; c < calls; ++c) {
    mean_scaled += decode_floats(*scaled, encode_floats(*scaled, x), x.sizes());
    mean_plain += decode_floats(*plain, encode_floats(*plain, x), x.sizes());
  }
  mean_scaled /= calls;
  mean_plain /= calls;
  // Per element the standard deviation of the mean is |x| sqrt(d/k - 1) / sqrt(calls) = 0.032|x|.
  const double worst = ((mean_scaled - x).abs() / x.abs()).max().item<double>();
  INFO("worst relative deviation " << worst);
  CHECK(worst < 0.2);
  // Without rescaling the expectation is (k/d) x.
  CHECK(((mean_plain - 0.2 * x).abs() / x.abs()).max().item<double>() < 0.2 * 0.2);
  CHECK((decode_floats(*scaled, encode_floats(*scaled, x), x.sizes()) - x)
            .abs()
            .max()
            .item<double>() <= scaled->error_bound(x));
}

TEST_CASE("randomk rejects malformed payloads", "[compress][randomk]") {
  auto codec = make_codec_with("randomk", {{"fraction", "0.5"}});
  at::Tensor x = at::randn({10});
  at::Tensor y = at::empty({10});
  std::vector<float> never(5);
  CHECK_THROWS_WITH(codec->decode(reinterpret_cast<const std::uint8_t*>(never.data()), 20, y),
                    Contains("no matching encode"));
  auto buf = encode_floats(*codec, x);
  CHECK_THROWS_WITH(codec->decode(reinterpret_cast<const std::uint8_t*>(buf.data()), 19, y),
                    Contains("expected 20"));
  buf[2] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(decode_floats(*codec, buf, x.sizes()),
                    Contains("malformed") && Contains("inf"));
  x[0] = std::numeric_limits<float>::quiet_NaN();
  auto all = make_codec_with("randomk", {{"fraction", "1"}});
  std::vector<float> out(10);
  CHECK_THROWS_WITH(all->encode(x, reinterpret_cast<std::uint8_t*>(out.data())),
                    Contains("non-finite"));
}

TEST_CASE("randomk spec and bad parameters", "[compress][randomk]") {
  CHECK(make_codec_with("randomk")->spec() == "randomk(fraction=0.01,seed=0,rescale=false)");
  auto codec =
      make_codec_with("randomk", {{"fraction", "0.3"}, {"seed", "17"}, {"rescale", "true"}});
  CHECK(codec->spec() == "randomk(fraction=0.3,seed=17,rescale=true)");
  CHECK(make_codec_with("randomk", {{"fraction", "0.3"}, {"seed", "17"}, {"rescale", "true"}})
            ->spec() == codec->spec());
  CHECK_THROWS_WITH(make_codec_with("randomk", {{"fraction", "0"}}),
                    Contains("fraction") && Contains("(0, 1]"));
  CHECK_THROWS_WITH(make_codec_with("randomk", {{"fraction", "1.5"}}),
                    Contains("fraction") && Contains("1]"));
  CHECK_THROWS_WITH(make_codec_with("randomk", {{"seed", "-1"}}), Contains("seed"));
  CHECK_THROWS_WITH(make_codec_with("randomk", {{"rescale", "yes"}}),
                    Contains("rescale") && Contains("false|true"));
  CHECK_THROWS_WITH(make_codec_with("randomk", {{"k", "5"}}),
                    Contains("unknown parameter") && Contains("k"));
}
