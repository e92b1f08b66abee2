// The outer optimizer against torch.optim.SGD's documented update, computed here by hand in
// double precision:  b <- mu*b + g;  g' = g + mu*b (nesterov) or b;  p <- p - lr*g'.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "diloco/errors.h"
#include "diloco/outer/outer_sgd.h"
#include "support/catch.h"

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

TEST_CASE("the step's visitor sees the new weights and momentum block by block, in the same "
          "order on the fused and the ATen path",
          "[outer]") {
  diloco::OuterSGD sgd;
  const std::int64_t n = 5000;  // two full blocks of 2048 and a partial one
  const at::Tensor start = at::linspace(-1.0, 1.0, n);
  const at::Tensor delta = at::sin(at::arange(n, at::kFloat));
  std::vector<std::vector<float>> seen(2);
  std::vector<std::vector<std::int64_t>> sizes(2);
  for (int path = 0; path < 2; ++path) {
    at::Tensor global = start.clone();
    at::Tensor momentum = sgd.make_state(global);
    // A float64 write-back takes the ATen path; a float32 one the fused loop.
    at::Tensor write_back = at::empty({n}, path == 0 ? at::kFloat : at::kDouble);
    const diloco::OuterSGD::BlockVisitor visit = [&](const float* data, std::int64_t count) {
      seen[path].insert(seen[path].end(), data, data + count);
      sizes[path].push_back(count);
    };
    for (int step = 0; step < 2; ++step) {
      seen[path].clear();
      sizes[path].clear();
      sgd.step(global, momentum, delta, 0.5, write_back, &visit);
    }
    // Weights then momentum of each block, in order.
    std::vector<float> expected;
    for (std::int64_t i = 0; i < n; i += 2048) {
      const std::int64_t len = std::min<std::int64_t>(2048, n - i);
      for (const at::Tensor* t : {&global, &momentum}) {
        const at::Tensor block = t->narrow(0, i, len).contiguous();
        expected.insert(expected.end(), block.data_ptr<float>(), block.data_ptr<float>() + len);
      }
    }
    CHECK(seen[path] == expected);
  }
  CHECK(sizes[0] == std::vector<std::int64_t>{2048, 2048, 2048, 2048, 904, 904});
  CHECK(sizes[1] == sizes[0]);
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
