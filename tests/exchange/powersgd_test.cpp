// PowerSGD over real Gloo ranks, against references that do not use its code: exact recovery of
// a sum whose terms share an r-dimensional column space; convergence of the warm-started power
// iteration to the truncated SVD (at::linalg_svd) of a fixed sum; the error-feedback identity;
// bytes on the wire from the factor shapes; bit-identical results on every rank.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "diloco/compress/registry.h"
#include "diloco/diloco.h"
#include "diloco/exchange/exchange.h"
#include "diloco/exchange/powersgd.h"
#include "support/catch.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;

namespace {

at::Tensor randn(std::vector<std::int64_t> shape, std::uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen);
}

struct Layout {
  at::Tensor flat;
  std::vector<at::Tensor> views;
};

// One flat buffer holding a copy of each tensor, with views over it.
Layout pack(const std::vector<at::Tensor>& tensors) {
  std::int64_t n = 0;
  for (const auto& t : tensors) n += t.numel();
  Layout l{at::empty({n}), {}};
  std::int64_t off = 0;
  for (const auto& t : tensors) {
    l.views.push_back(l.flat.narrow(0, off, t.numel()).view(t.sizes()));
    l.views.back().copy_(t);
    off += t.numel();
  }
  return l;
}

}  // namespace

TEST_CASE("powersgd recovers a sum of rank-r terms exactly and bit-identically", "[compress][powersgd][gloo]") {
  const int world = GENERATE(1, 2, 3, 4);
  INFO(world << " ranks");
  // Matrices share the column space of A (rank 3), so P = sum M_i Q spans it; vectors and a
  // matrix too small to factor are sent as they are.
  const at::Tensor a = randn({40, 3}, 99);
  std::vector<std::vector<at::Tensor>> inputs(world);
  std::vector<at::Tensor> results(world);
  std::vector<std::uint64_t> sent(world);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> g) {
    auto c = diloco::Exchange::from_spec("powersgd(rank=3)");
    inputs[rank] = {at::mm(a, randn({3, 6 * 5}, rank + 1)).view({40, 6, 5}), randn({17}, rank + 10),
                    randn({3, 2}, rank + 20)};
    Layout l = pack(inputs[rank]);
    const auto before = g->stats().bytes_sent();
    c->sum(*g, l.flat, l.views, "test");
    sent[rank] = g->stats().bytes_sent() - before;
    results[rank] = l.flat.clone();
  });
  std::vector<at::Tensor> exact;
  for (std::size_t t = 0; t < inputs[0].size(); ++t) {
    at::Tensor s = at::zeros_like(inputs[0][t]);
    for (int r = 0; r < world; ++r) s += inputs[r][t];
    exact.push_back(s.reshape({-1}));
  }
  const at::Tensor want = at::cat(exact);
  const double err = (results[0] - want).abs().max().item<double>();
  INFO("max |sum - exact| " << err);
  CHECK(err < 1e-4 * want.abs().max().item<double>());
  for (int r = 1; r < world; ++r) CHECK(at::equal(results[r], results[0]));
  // Bytes: round 1 carries P (40 x 3) and the 17 + 6 unfactored elements, round 2 Q (30 x 3);
  // each is a ring all-reduce, 2(N-1)/N of the buffer per rank.
  const std::int64_t payload = 4 * (40 * 3 + 17 + 6 + 30 * 3);
  auto c = diloco::Exchange::from_spec("powersgd(rank=3)");
  CHECK(c->payload_bytes(pack(inputs[0]).views) == payload);
  const double ring = world == 1 ? 0.0 : 2.0 * (world - 1) / world;
  const double want_bytes = ring * 4 * (40 * 3 + 17 + 6) + ring * 4 * (30 * 3);
  for (int r = 0; r < world; ++r) CHECK(std::abs(static_cast<double>(sent[r]) - want_bytes) <= 2 * world);
}

TEST_CASE("powersgd's warm start converges to the truncated SVD of a fixed sum", "[compress][powersgd][gloo]") {
  // Repeating the same pseudo-gradients without error feedback runs subspace iteration on their
  // sum S: the result tends to U_r U_r^T S, the best rank-r approximation (Eckart-Young).
  const int world = 3, r = 2;
  // S = U diag(10, 6, 2, 1, 0.5) V^T: the gap 6 -> 2 makes the iteration converge like 3^-k.
  const at::Tensor u = std::get<0>(at::linalg_qr(randn({30, 5}, 1)));
  const at::Tensor v = std::get<0>(at::linalg_qr(randn({20, 5}, 2)));
  const at::Tensor s = at::mm(u * at::tensor({10.f, 6.f, 2.f, 1.f, 0.5f}), v.t());
  std::vector<at::Tensor> results(world);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> g) {
    auto c = diloco::Exchange::from_spec("powersgd(rank=2,seed=5)");
    // Island shares that sum to S: S/3 plus a different zero-sum perturbation on each.
    at::Tensor noise = randn({30, 20}, 7) * (rank == 0 ? 1.0 : rank == 1 ? -1.0 : 0.0);
    const at::Tensor mine = s / world + noise;
    for (int step = 0; step < 30; ++step) {
      Layout l = pack({mine});
      c->sum(*g, l.flat, l.views, "svd");
      results[rank] = l.views[0].clone();
    }
  });
  const auto svd = at::linalg_svd(s.to(at::kDouble), /*full_matrices=*/false);
  const at::Tensor ur = std::get<0>(svd).narrow(1, 0, r);
  const at::Tensor best = at::mm(ur, at::mm(ur.t(), s.to(at::kDouble)));
  const double err = (results[0].to(at::kDouble) - best).abs().max().item<double>();
  INFO("max |powersgd - truncated SVD| " << err);
  CHECK(err < 1e-4);
  CHECK(at::equal(results[1], results[0]));
  CHECK(at::equal(results[2], results[0]));
}

TEST_CASE("powersgd with error feedback: sent + residual = input + beta * old residual", "[compress][powersgd][gloo]") {
  const int world = 2;
  std::vector<std::string> errors(world);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> g) {
    auto c = diloco::Exchange::from_spec("powersgd(rank=1)+ef(beta=0.5)");
    at::Tensor old_residual = at::zeros({24, 16});
    for (int step = 0; step < 3; ++step) {
      const at::Tensor input = randn({24, 16}, 100 * rank + step);
      Layout l = pack({input, randn({5}, 50 + step)});
      // What this island sends is P^ P^^T M; the test recomputes it from the result: the sum is
      // rank 1 with column space P^, so P^ is its normalised left singular vector.
      c->sum(*g, l.flat, l.views, "ef");
      const at::Tensor m = input + 0.5 * old_residual;
      const at::Tensor sum_out = l.views[0];
      const at::Tensor p = std::get<0>(at::linalg_svd(sum_out, false)).narrow(1, 0, 1);
      const at::Tensor own = at::mm(p, at::mm(p.t(), m));
      const at::Tensor res = c->residuals()[0];
      const double diff = (own + res - m).abs().max().item<double>();
      if (diff > 1e-4) throw std::runtime_error("EF identity off by " + std::to_string(diff));
      if (c->residuals()[1].abs().max().item<float>() != 0.0f) {
        throw std::runtime_error("an unfactored vector left a residual");
      }
      old_residual = res.clone();
    }
  });
}

TEST_CASE("powersgd specs: parameters, ranges, and the codec listing", "[compress][powersgd]") {
  CHECK(diloco::Exchange::from_spec("powersgd")->spec() == "powersgd(rank=4,seed=0)");
  CHECK_THAT(diloco::Exchange::from_spec("powersgd(rank=8)+ef")->spec(),
             Contains("rank=8") && Contains("+ef(beta=1"));
  CHECK_THROWS_WITH(diloco::Exchange::from_spec("powersgd(rank=0)"),
                    Contains("rank") && Contains("[1, 1024]"));
  CHECK_THROWS_WITH(diloco::Exchange::from_spec("powersgd(rnak=2)"), Contains("rnak"));
  CHECK_THROWS_WITH(diloco::make_codec("powersgd"), Contains("two all-reduce rounds"));
  bool listed = false;
  for (const auto& line : diloco::codec_help()) listed = listed || line.rfind("powersgd", 0) == 0;
  CHECK(listed);
}

TEST_CASE("DiLoCo trains with powersgd and keeps every rank identical", "[compress][powersgd][diloco][gloo]") {
  std::vector<at::Tensor> weights(3);
  std::vector<double> losses(3);
  diloco_test::run_ranks(3, [&](int rank, std::shared_ptr<diloco::Group> g) {
    torch::nn::Sequential net(torch::nn::Linear(16, 32), torch::nn::Tanh(), torch::nn::Linear(32, 1));
    diloco_test::seed_parameters(net->parameters(), 3);
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05));
    diloco::DiLoCoOptions o;
    o.inner_steps = 5;
    o.compression = "powersgd(rank=2)+ef";
    diloco::DiLoCo sync(*net, opt, g, o);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(rank + 1);
    const at::Tensor w = randn({16, 1}, 42);
    double first = 0, last = 0;
    for (int s = 0; s < 60; ++s) {
      const at::Tensor x = at::randn({32, 16}, gen);
      opt.zero_grad();
      auto loss = (net->forward(x) - at::mm(x, w)).pow(2).mean();
      loss.backward();
      opt.step();
      sync.step();
      (s == 0 ? first : last) = loss.item<double>();
    }
    weights[rank] = sync.global_weights()[0].clone();
    losses[rank] = last / first;
  });
  CHECK(at::equal(weights[0], weights[1]));
  CHECK(at::equal(weights[0], weights[2]));
  CHECK(losses[0] < 0.5);
}
