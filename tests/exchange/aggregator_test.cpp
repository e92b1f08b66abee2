// Aggregators (diloco/exchange/aggregator.h) against their formulas, written here coordinate by
// coordinate; the gathered exchange's screening over real Gloo ranks: a contribution that does not
// decode, is not finite or is far above the others is refused and its sender named, identically
// on every rank; robust aggregators through every exchange kind's codec.
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <random>

#include "diloco/compress/registry.h"
#include "diloco/errors.h"
#include "diloco/exchange/aggregator.h"
#include "diloco/exchange/exchange.h"
#include "support/catch.h"
#include "support/codec_helpers.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;

namespace {

std::vector<at::Tensor> random_contributions(int n, std::int64_t size, std::uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<at::Tensor> out;
  for (int i = 0; i < n; ++i) out.push_back(at::randn({size}, gen).mul_(1.0 + i));
  return out;
}

// Coordinate j of every contribution, sorted.
std::vector<double> column(const std::vector<at::Tensor>& c, std::int64_t j) {
  std::vector<double> v;
  for (const auto& t : c) v.push_back(t[j].item<double>());
  std::sort(v.begin(), v.end());
  return v;
}

}  // namespace

TEST_CASE("aggregator specs parse, spell back, and name what is wrong", "[aggregator]") {
  CHECK(diloco::Aggregator::parse("mean").spec() == "mean");
  CHECK_FALSE(diloco::Aggregator::parse("mean").robust());
  CHECK(diloco::Aggregator::parse("median").spec() == "median");
  CHECK(diloco::Aggregator::parse("trimmed_mean").spec() == "trimmed_mean(trim=1)");
  CHECK(diloco::Aggregator::parse(" trimmed_mean( trim = 2 ) ").spec() == "trimmed_mean(trim=2)");
  CHECK(diloco::Aggregator::parse("norm_clip").spec() == "norm_clip(k=1)");
  CHECK(diloco::Aggregator::parse("norm_clip(k=1.5)").spec() == "norm_clip(k=1.5)");
  CHECK_THROWS_WITH(diloco::Aggregator::parse("avg"),
                    Contains("aggregator must be one of mean, trimmed_mean(trim=K), median, "
                             "norm_clip(k=C), got 'avg'"));
  CHECK_THROWS_WITH(diloco::Aggregator::parse("trimmed_mean(trim=0)"),
                    Contains("aggregator 'trimmed_mean(trim=0)': trim must be an integer in [1,"));
  CHECK_THROWS_WITH(diloco::Aggregator::parse("norm_clip(k=0.5)"),
                    Contains("k must be a number in [1, 1e+06], got '0.5'"));
  CHECK_THROWS_WITH(diloco::Aggregator::parse("median(trim=1)"), Contains("unknown parameter trim"));
  CHECK_THROWS_WITH(diloco::Aggregator::parse("median(trim"), Contains("is malformed"));
  CHECK_THROWS_WITH(diloco::Aggregator::parse("trimmed_mean(trim=2)").check_islands(4),
                    Contains("needs more than 4 islands, the group has 4 (trim must be in [1, 1])"));
  CHECK_NOTHROW(diloco::Aggregator::parse("trimmed_mean(trim=2)").check_islands(5));
}

TEST_CASE("aggregators compute their formulas coordinate by coordinate", "[aggregator]") {
  const int n = GENERATE(1, 2, 3, 4, 5);
  INFO(n << " contributions");
  const std::int64_t size = 257;
  const auto c = random_contributions(n, size, 7);
  at::Tensor out = at::empty({size});

  diloco::Aggregator::parse("median").combine(c, out);
  for (std::int64_t j = 0; j < size; ++j) {
    const auto v = column(c, j);
    const double median = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
    REQUIRE(out[j].item<double>() == Approx(median).margin(1e-6));
  }

  diloco::Aggregator::parse("trimmed_mean(trim=1)").combine(c, out);
  const int k = std::min(1, (n - 1) / 2);  // fewer than 3: nothing is trimmed
  for (std::int64_t j = 0; j < size; ++j) {
    const auto v = column(c, j);
    double sum = 0.0;
    for (int i = k; i < n - k; ++i) sum += v[i];
    REQUIRE(out[j].item<double>() == Approx(sum / (n - 2 * k)).margin(1e-6));
  }

  diloco::Aggregator::parse("norm_clip(k=1.2)").combine(c, out);
  std::vector<double> norms;
  for (const auto& t : c) {
    double s = 0.0;
    for (std::int64_t j = 0; j < size; ++j) s += t[j].item<double>() * t[j].item<double>();
    norms.push_back(std::sqrt(s));
  }
  auto sorted = norms;
  std::sort(sorted.begin(), sorted.end());
  const double median_norm = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  for (std::int64_t j = 0; j < size; ++j) {
    double sum = 0.0;
    for (int i = 0; i < n; ++i) {
      sum += c[i][j].item<double>() * std::min(1.0, 1.2 * median_norm / norms[i]);
    }
    REQUIRE(out[j].item<double>() == Approx(sum / n).margin(1e-6));
  }
  if (n >= 3) {  // contributions are scaled 1..n: the largest are clipped
    CHECK(norms.back() > 1.2 * median_norm);
  }

  diloco::Aggregator::parse("mean").combine(c, out);
  for (std::int64_t j = 0; j < size; ++j) {
    double sum = 0.0;
    for (int i = 0; i < n; ++i) sum += c[i][j].item<double>();
    REQUIRE(out[j].item<double>() == Approx(sum / n).margin(1e-6));
  }
}

namespace {

struct Outcome {
  at::Tensor result;
  diloco::ContributionScreen screen;
  at::Tensor input;
};

// One exchange of a random tensor over 4 ranks; rank 3 runs `rank3_codec` (registered) in place
// of `codec`.
std::vector<Outcome> exchange4(const std::string& codec, const std::string& rank3_codec,
                               const std::string& aggregator, double factor) {
  const int world = 4;
  std::vector<Outcome> out(world);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> g) {
    auto exchange = diloco::Exchange::from_spec(rank == 3 ? rank3_codec : codec, aggregator);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(rank + 11);
    at::Tensor flat = at::randn({3000}, gen);
    out[rank].input = flat.clone();
    diloco::CommThread inline_thread(false);
    diloco::ExchangeRequest request;
    request.flat = flat;
    request.views = {flat.narrow(0, 0, 1000).view({10, 100}), flat.narrow(0, 1000, 2000)};
    request.label = "outer_sync";
    request.screen = std::make_shared<diloco::ContributionScreen>();
    request.screen->factor = factor;
    auto screen = request.screen;
    auto pending = exchange->start(*g, std::move(request), inline_thread);
    out[rank].result = exchange->finish(pending).clone();
    out[rank].screen = *screen;
  });
  return out;
}

at::Tensor round_trip(const std::string& codec, const at::Tensor& x) {
  // What x decodes to through this codec, view by view as the exchange sends it.
  auto c = diloco::make_codec(codec);
  at::Tensor out = at::empty_like(x);
  for (auto [from, len] : {std::pair<std::int64_t, std::int64_t>{0, 1000}, {1000, 2000}}) {
    at::Tensor v = x.narrow(0, from, len).contiguous();
    std::vector<std::uint8_t> payload(static_cast<std::size_t>(c->payload_bytes(v.sizes())));
    c->encode(v, payload.data());
    at::Tensor d = out.narrow(0, from, len);
    c->decode(payload.data(), static_cast<std::int64_t>(payload.size()), d);
  }
  return out;
}

}  // namespace

TEST_CASE("the gathered exchange refuses a payload that does not decode or is far too large, "
          "names its sender on every rank, and sums the others", "[aggregator][gloo]") {
  diloco_test::register_tampering_codec("nan_sign", "sign", [](std::uint8_t* p, std::int64_t) {
    const float nan = std::nanf("");  // the scale
    std::memcpy(p, &nan, sizeof nan);
  });
  diloco_test::register_tampering_codec("huge_sign", "sign", [](std::uint8_t* p, std::int64_t) {
    const float huge = 1e30f;
    std::memcpy(p, &huge, sizeof huge);
  });
  for (const std::string bad : {"nan_sign", "huge_sign"}) {
    INFO("rank 3 runs " << bad);
    const auto out = exchange4("sign", bad, "mean", 100.0);
    at::Tensor expected = at::zeros({3000});
    for (int r = 0; r < 3; ++r) expected += round_trip("sign", out[r].input);
    for (int r = 0; r < 4; ++r) {
      INFO("rank " << r << ": " << out[r].screen.reasons);
      CHECK(out[r].screen.refused == std::vector<int>{3});
      CHECK(out[r].screen.contributors == 3);
      CHECK_FALSE(out[r].screen.averaged);
      CHECK_THAT(out[r].screen.reasons,
                 Contains(bad == "nan_sign" ? "rank 3 (a malformed payload: [gathered 'outer_sync'] "
                                              "rank " + std::to_string(r) +
                                                  " of 4: malformed payload from rank 3"
                                            : "rank 3 (norm "));
      CHECK(at::equal(out[r].result, out[0].result));
    }
    CHECK(at::allclose(out[0].result, expected, 1e-5, 1e-5));
  }
  // Screening off: a malformed payload is an Error naming its sender, as without screening.
  CHECK_THROWS_WITH(exchange4("sign", "nan_sign", "mean", 0.0),
                    Contains("malformed payload from rank 3"));
}

TEST_CASE("robust aggregators run over any codec's payloads and return the combination of the "
          "contributions they decode", "[aggregator][gloo]") {
  diloco_test::register_tampering_codec("scaled_fp32", "fp32", [](std::uint8_t* p, std::int64_t n) {
    for (std::int64_t i = 0; i + 4 <= n; i += 4) {
      float v;
      std::memcpy(&v, p + i, 4);
      v *= 50.0f;
      std::memcpy(p + i, &v, 4);
    }
  });
  // "none" under a robust aggregator sends float32 payloads (the fp32 codec) and gathers them.
  const std::string aggregator = GENERATE("median", "trimmed_mean(trim=1)", "norm_clip(k=2)");
  INFO(aggregator);
  const auto out = exchange4("none", "scaled_fp32", aggregator, 100.0);  // 50x: not refused
  std::vector<at::Tensor> sent;
  for (int r = 0; r < 4; ++r) sent.push_back(r == 3 ? out[r].input * 50.0f : out[r].input);
  at::Tensor expected = at::empty({3000});
  diloco::Aggregator::parse(aggregator).combine(sent, expected);
  // The formula (median of 4: the mean of the middle two) bounds the hostile rank's pull.
  for (int r = 0; r < 4; ++r) {
    CHECK(out[r].screen.refused.empty());
    CHECK(out[r].screen.averaged);
    CHECK(at::equal(out[r].result, out[0].result));
  }
  CHECK(at::allclose(out[0].result, expected, 1e-6, 1e-6));
  at::Tensor honest_mean = (out[0].input + out[1].input + out[2].input) / 3;
  CHECK((out[0].result - honest_mean).norm().item<double>() <
        0.2 * (sent[3] / 4).norm().item<double>());
}

TEST_CASE("powersgd refuses a robust aggregator, naming both", "[aggregator]") {
  CHECK_THROWS_WITH(diloco::Exchange::from_spec("powersgd(rank=2)", "median"),
                    Contains("aggregator median needs each island's contribution, which PowerSGD "
                             "never has"));
  CHECK_NOTHROW(diloco::Exchange::from_spec("powersgd(rank=2)", "mean"));
  CHECK(diloco::Exchange::from_spec("int4", "median")->sees_contributions());
  CHECK(diloco::Exchange::from_spec("int4+ef", "norm_clip")->sees_contributions());
  CHECK_FALSE(diloco::Exchange::from_spec("int4", "mean")->sees_contributions());
  CHECK(diloco::Exchange::from_spec("topk(k=8)", "mean")->sees_contributions());
}
