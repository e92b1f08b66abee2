// Muon (optim/muon.h) against the update written out here in float64 from Jordan et al.'s
// definition, the Newton-Schulz iteration against the exact polar factor from an SVD, and its
// option checks.
#include <ATen/ATen.h>

#include <cmath>

#include "diloco/errors.h"
#include "diloco/optim/muon.h"
#include "support/catch.h"

using Catch::Matchers::Contains;

namespace {

// The reference: one Muon step in float64, nothing shared with the library.
at::Tensor reference_ns(at::Tensor x, int steps) {
  const bool tall = x.size(0) > x.size(1);
  if (tall) x = x.t();
  x = x / (x.norm() + 1e-7);
  for (int k = 0; k < steps; ++k) {
    at::Tensor a = x.mm(x.t());
    x = 3.4445 * x + (-4.7750 * a + 2.0315 * a.mm(a)).mm(x);
  }
  return tall ? x.t() : x;
}

}  // namespace

TEST_CASE("Muon's steps match the update written out in float64", "[optim][muon]") {
  for (const bool nesterov : {true, false}) {
    for (const char* scale : {"spectral", "match_adamw"}) {
      INFO("nesterov " << nesterov << ", scale " << scale);
      auto gen = at::detail::createCPUGenerator(11);
      at::Tensor w = at::randn({48, 20}, gen).set_requires_grad(true);
      at::Tensor w_ref = w.detach().to(at::kDouble);
      at::Tensor buf = at::zeros_like(w_ref);
      diloco::MuonOptions o(0.05);
      o.momentum(0.9).nesterov(nesterov).weight_decay(0.1).scale(scale);
      diloco::Muon muon({w}, o);
      const double s = std::string(scale) == "spectral" ? std::sqrt(48.0 / 20.0)
                                                         : 0.2 * std::sqrt(48.0);
      double diff = 0;
      for (int step = 0; step < 4; ++step) {
        at::Tensor g = at::randn({48, 20}, gen);
        w.mutable_grad() = g.clone();
        muon.step();
        at::Tensor gd = g.to(at::kDouble);
        buf = 0.9 * buf + gd;
        at::Tensor u = nesterov ? gd + 0.9 * buf : buf;
        w_ref = w_ref * (1 - 0.05 * 0.1) - 0.05 * s * reference_ns(u, 5);
        diff = std::max(diff, (w.detach().to(at::kDouble) - w_ref).abs().max().item<double>());
      }
      INFO("max |Muon - reference| over 4 steps = " << diff);
      CHECK(diff < 1e-5);
    }
  }
}

TEST_CASE("Newton-Schulz lands near the polar factor U V^T", "[optim][muon]") {
  auto gen = at::detail::createCPUGenerator(5);
  for (const auto& shape : std::vector<std::vector<std::int64_t>>{{64, 32}, {32, 64}, {16, 8, 3, 3}}) {
    at::Tensor m = at::randn(shape, gen);
    at::Tensor o = diloco::newton_schulz_orthogonalize(m, 5).reshape({shape[0], -1});
    at::Tensor flat = m.reshape({shape[0], -1});
    auto [u, sv, vh] = at::linalg_svd(flat, /*full_matrices=*/false);
    at::Tensor polar = u.mm(vh);
    at::Tensor osv = at::linalg_svdvals(o);
    const double cosine = (o * polar).sum().item<double>() / (o.norm() * polar.norm()).item<double>();
    INFO("singular values of NS(M) in [" << osv.min().item<double>() << ", "
         << osv.max().item<double>() << "], cosine to U V^T " << cosine);
    // The quintic's coefficients trade exactness for speed: singular values land in about
    // [0.7, 1.2] rather than at 1 (Jordan et al.), and the direction is the polar factor's.
    CHECK(osv.min().item<double>() > 0.5);
    CHECK(osv.max().item<double>() < 1.3);
    CHECK(cosine > 0.95);
  }
}

TEST_CASE("Muon refuses vectors and bad options by name", "[optim][muon]") {
  at::Tensor bias = at::zeros({8}).set_requires_grad(true);
  CHECK_THROWS_WITH(diloco::Muon({bias}), Contains("fewer than 2 dimensions") && Contains("AdamW"));
  at::Tensor w = at::zeros({4, 4}).set_requires_grad(true);
  CHECK_THROWS_WITH(diloco::Muon({w}, diloco::MuonOptions(0.0)), Contains("lr") && Contains("> 0"));
  CHECK_THROWS_WITH(diloco::Muon({w}, diloco::MuonOptions(0.02).momentum(1.0)),
                    Contains("momentum") && Contains("[0, 1)"));
  CHECK_THROWS_WITH(diloco::Muon({w}, diloco::MuonOptions(0.02).scale("big")),
                    Contains("scale") && Contains("match_adamw"));
  CHECK_THROWS_AS(diloco::Muon({w}, diloco::MuonOptions(0.02).ns_steps(0)), diloco::OptionError);
}
