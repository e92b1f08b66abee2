// The outer optimizer against torch.optim.SGD's documented update, computed here by hand in
// double precision:  b <- mu*b + g;  g' = g + mu*b (nesterov) or b;  p <- p - lr*g'.
#include <ATen/ATen.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "diloco/errors.h"
#include "diloco/outer/outer_sgd.h"

using Catch::Matchers::Contains;

namespace {

struct Reference {
  double lr, mu;
  bool nesterov;
  std::vector<double> p, b;
  void step(const std::vector<double>& g) {
    for (std::size_t i = 0; i < p.size(); ++i) {
      double d = g[i];
      if (mu != 0) {
        b[i] = mu * b[i] + d;
        d = nesterov ? d + mu * b[i] : b[i];
      }
      p[i] -= lr * d;
    }
  }
};

}  // namespace

TEST_CASE("OuterSGD matches torch.optim.SGD's update over several steps", "[outer]") {
  const double lr = GENERATE(0.7, 1.0, 0.1);
  const double mu = GENERATE(0.0, 0.9, 0.5);
  const bool nesterov = GENERATE(true, false);
  const bool fused = GENERATE(true, false);  // float32 CPU loop, or the ATen fallback (float64)
  const std::int64_t n = 5000;  // not a multiple of the kernel's block
  const int world = 4;
  diloco::OuterSGDOptions o;
  o.lr = lr;
  o.momentum = mu;
  o.nesterov = nesterov;
  diloco::OuterSGD sgd(o);
  at::manual_seed(7);
  const auto dtype = fused ? at::kFloat : at::kDouble;
  at::Tensor global = at::randn({n}, at::kDouble).to(dtype);
  at::Tensor momentum = mu == 0 ? at::Tensor() : at::zeros({n}, dtype);
  Reference ref{lr, mu, nesterov, std::vector<double>(n), std::vector<double>(n, 0.0)};
  auto to_vector = [](const at::Tensor& t) {
    at::Tensor d = t.to(at::kDouble).contiguous();
    return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
  };
  ref.p = to_vector(global);
  double max_diff = 0;
  for (int step = 0; step < 5; ++step) {
    at::Tensor delta_sum = at::randn({n}, at::kDouble).to(dtype);
    std::vector<double> mean = to_vector(delta_sum);
    for (double& v : mean) v *= 1.0 / world;
    ref.step(mean);
    at::Tensor write_back = at::empty({n}, at::kFloat);
    sgd.step(global, momentum, delta_sum, 1.0 / world, write_back);
    const std::vector<double> got = to_vector(global);
    for (std::int64_t i = 0; i < n; ++i) max_diff = std::max(max_diff, std::abs(got[i] - ref.p[i]));
    REQUIRE(at::equal(write_back, global.to(at::kFloat)));
  }
  INFO("lr " << lr << " momentum " << mu << " nesterov " << nesterov << " fused " << fused
             << " max |diff| " << max_diff);
  CHECK(max_diff < (fused ? 2e-5 : 1e-12));
}

TEST_CASE("the fused step may write the new weights over its input", "[outer]") {
  diloco::OuterSGD sgd;
  at::Tensor global = at::ones({3000});
  at::Tensor momentum = sgd.make_state(global);
  at::Tensor delta = at::full({3000}, 2.0f);
  sgd.step(global, momentum, delta, 0.5, delta);  // delta aliases write_back
  // d = 1; b = 1; g' = 1 + 0.9 = 1.9; p = 1 - 0.7 * 1.9
  CHECK(global[2999].item<float>() == Approx(1.0 - 0.7 * 1.9));
  CHECK(at::equal(delta, global));
}

TEST_CASE("outer options outside their range are rejected by name", "[outer]") {
  diloco::OuterSGDOptions o;
  o.lr = 0;
  CHECK_THROWS_WITH(o.validate(), Contains("outer lr") && Contains("> 0"));
  o.lr = -1;
  CHECK_THROWS_AS(diloco::OuterSGD(o), diloco::OptionError);
  o = {};
  o.momentum = 1.0;
  CHECK_THROWS_WITH(o.validate(), Contains("outer momentum") && Contains("[0, 1)"));
  o.momentum = -0.1;
  CHECK_THROWS_WITH(o.validate(), Contains("outer momentum"));
  CHECK(diloco::OuterSGDOptions::averaging().lr == 1.0);
  CHECK(diloco::OuterSGDOptions::averaging().momentum == 0.0);
}
