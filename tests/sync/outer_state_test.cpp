// The outer state: a save/load round trip is bit-exact (global weights, outer momentum, error
// feedback residuals, PowerSGD's factors, codec streams, counters); a run resumed from a saved
// state continues bit-identically to the run that saved it; a state that does not fit this run is
// an OptionError naming the field; saving while an exchange is in flight is refused.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "diloco/diloco.h"
#include "diloco/exchange/error_feedback.h"
#include "diloco/exchange/powersgd.h"
#include "support/catch.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;

namespace {

std::vector<std::vector<std::int64_t>> kShapes{{24, 16}, {16}, {8, 12}};

diloco::ModelTensors make_model(std::vector<at::Tensor>& params,
                                const std::vector<std::vector<std::int64_t>>& shapes = kShapes) {
  diloco::ModelTensors model;
  params.clear();
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(300 + i);
    params.push_back(at::randn(shapes[i], gen));
    model.parameters.push_back({"p" + std::to_string(i), params.back()});
  }
  return model;
}

// Inner step s of `rank`: SGD toward a target of its own, so islands drift apart.
void inner_step(std::vector<at::Tensor>& params, int rank, int s) {
  at::NoGradGuard no_grad;
  for (std::size_t i = 0; i < params.size(); ++i) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(7000 * rank + 31 * s + i);
    params[i].sub_(params[i] - at::randn(params[i].sizes(), gen), 0.2);
  }
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("diloco_outer_state_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

bool same(const at::Tensor& a, const at::Tensor& b) {
  if (a.defined() != b.defined()) return false;
  return !a.defined() || at::equal(a, b);
}

// The first difference between two states, bit for bit ("" if none). Ranks are threads: they
// return what they found, and the test thread asserts.
std::string difference(const diloco::OuterState& a, const diloco::OuterState& b) {
  if (a.global.size() != b.global.size()) return "bucket count";
  if (a.inner_step != b.inner_step) return "inner_step";
  if (a.outer_step != b.outer_step) return "outer_step";
  for (std::size_t i = 0; i < a.global.size(); ++i) {
    const std::string at_bucket = " of bucket " + std::to_string(i);
    if (!same(a.global[i], b.global[i])) return "global weights" + at_bucket;
    if (!same(a.momentum[i], b.momentum[i])) return "momentum" + at_bucket;
    const auto& ra = a.exchanges[i]->residuals();
    const auto& rb = b.exchanges[i]->residuals();
    if (ra.size() != rb.size()) return "residual count" + at_bucket;
    for (std::size_t j = 0; j < ra.size(); ++j) {
      if (!same(ra[j], rb[j])) return "residual " + std::to_string(j) + at_bucket;
    }
    if (a.exchanges[i]->codec() &&
        a.exchanges[i]->codec()->stream_position() != b.exchanges[i]->codec()->stream_position()) {
      return "codec stream position" + at_bucket;
    }
    const auto* pa = dynamic_cast<const diloco::PowerSGD*>(a.exchanges[i].get());
    const auto* ef = dynamic_cast<const diloco::ErrorFeedback*>(a.exchanges[i].get());
    if (ef) pa = dynamic_cast<const diloco::PowerSGD*>(&ef->inner());
    if (pa) {
      const auto* efb = dynamic_cast<const diloco::ErrorFeedback*>(b.exchanges[i].get());
      const auto* pb = dynamic_cast<const diloco::PowerSGD*>(efb ? &efb->inner()
                                                                 : b.exchanges[i].get());
      for (std::size_t j = 0; j < a.exchanges[i]->residuals().size(); ++j) {
        if (!same(pa->q(j), pb->q(j))) return "powersgd Q " + std::to_string(j) + at_bucket;
      }
    }
  }
  return "";
}

diloco::DiLoCoOptions options_for(const std::string& compression) {
  diloco::DiLoCoOptions o;
  o.inner_steps = 2;
  o.compression = compression;
  o.outer.lr = 0.8;
  o.outer.momentum = 0.6;
  return o;
}

}  // namespace

TEST_CASE("a saved outer state loads bit for bit, and the run resumed from it continues "
          "identically",
          "[outer_state][diloco][gloo]") {
  // Each spec keeps state of another kind across outer steps: momentum only; EF residuals and
  // a stochastic-rounding stream; EF residuals and PowerSGD's warm-start factors; random-k's
  // stream of positions.
  const std::string spec = GENERATE("none", "int4(rounding=stochastic)+ef",
                                    "powersgd(rank=2)+ef(beta=0.9)", "randomk(fraction=0.3)+ef");
  INFO("compression " << spec);
  constexpr int kWorld = 2;
  std::vector<std::vector<at::Tensor>> continued(kWorld), resumed(kWorld);
  std::vector<std::string> at_load(kWorld), at_end(kWorld);
  std::vector<std::int64_t> residuals(kWorld);
  diloco_test::run_ranks(kWorld, [&](int rank, std::shared_ptr<diloco::Group> group) {
    const std::string path = temp_path(std::to_string(rank) + ".pt");
    std::vector<at::Tensor> params, params_b;
    diloco::DiLoCo a(make_model(params), group, options_for(spec));
    for (int s = 1; s <= 6; ++s) {  // three outer steps
      inner_step(params, rank, s);
      a.step();
    }
    a.save_state(path);
    // A fresh run of the same configuration, loaded from the file, is where `a` is.
    diloco::DiLoCo b(make_model(params_b), group, options_for(spec));
    b.load_state(path);
    at_load[rank] = difference(a.state(), b.state());
    residuals[rank] = static_cast<std::int64_t>(b.state().exchanges[0]->residuals().size());
    // Both go on with the same inner steps (the model was set to the global weights, where
    // `a`'s is with tau = 0 and alpha = 0), taking their outer steps in turn.
    for (int s = 7; s <= 10; ++s) {
      inner_step(params, rank, s);
      inner_step(params_b, rank, s);
      a.step();
      b.step();
    }
    at_end[rank] = difference(a.state(), b.state());
    std::remove(path.c_str());
  });
  for (int r = 0; r < kWorld; ++r) {
    INFO("rank " << r);
    CHECK(at_load[r] == "");
    CHECK(at_end[r] == "");
    CHECK(residuals[r] == (spec == "none" ? 0 : 3));  // the state held residuals to compare
  }
}

TEST_CASE("the resumed run needs the exchange state: without it the runs part",
          "[outer_state][diloco][gloo]") {
  // The same continuation with only the global weights and momentum copied over (residuals and
  // factors lost) ends elsewhere: the test above would see a state that is not saved.
  const std::string spec = "powersgd(rank=2)+ef(beta=0.9)";
  constexpr int kWorld = 2;
  std::vector<bool> differs(kWorld);
  diloco_test::run_ranks(kWorld, [&](int rank, std::shared_ptr<diloco::Group> group) {
    std::vector<at::Tensor> params, params_b;
    diloco::DiLoCo a(make_model(params), group, options_for(spec));
    diloco::DiLoCo b(make_model(params_b), group, options_for(spec));
    for (int s = 1; s <= 6; ++s) {
      inner_step(params, rank, s);
      a.step();
    }
    at::NoGradGuard no_grad;
    for (std::size_t i = 0; i < a.state().global.size(); ++i) {
      const_cast<at::Tensor&>(b.state().global[i]).copy_(a.state().global[i]);
      const_cast<at::Tensor&>(b.state().momentum[i]).copy_(a.state().momentum[i]);
    }
    for (std::size_t i = 0; i < params.size(); ++i) params_b[i].copy_(params[i]);
    for (int s = 7; s <= 8; ++s) {
      inner_step(params, rank, s);
      inner_step(params_b, rank, s);
      a.step();
      b.step();
    }
    differs[rank] = !at::equal(a.global_weights()[0], b.global_weights()[0]);
  });
  for (int r = 0; r < kWorld; ++r) CHECK(differs[r]);
}

TEST_CASE("a saved state that does not fit the run is an option error naming the field",
          "[outer_state][diloco][gloo]") {
  std::vector<std::string> errors(4);
  diloco_test::run_ranks(1, [&](int, std::shared_ptr<diloco::Group> group) {
    const std::string path = temp_path("mismatch.pt");
    std::vector<at::Tensor> params;
    diloco::DiLoCo a(make_model(params), group, options_for("int8+ef"));
    for (int s = 1; s <= 2; ++s) a.step();
    a.save_state(path);
    auto error_of = [&](diloco::DiLoCo& other) {
      try {
        other.load_state(path);
      } catch (const diloco::OptionError& e) {
        return std::string(e.what());
      }
      return std::string("no OptionError");
    };
    std::vector<at::Tensor> p1, p2, p3;
    diloco::DiLoCo shapes(make_model(p1, {{24, 16}, {17}, {8, 12}}), group, options_for("int8+ef"));
    errors[0] = error_of(shapes);
    diloco::DiLoCo spec(make_model(p2), group, options_for("int4+ef"));
    errors[1] = error_of(spec);
    auto no_momentum = options_for("int8+ef");
    no_momentum.outer.momentum = 0.0;
    diloco::DiLoCo momentum(make_model(p3), group, no_momentum);
    errors[2] = error_of(momentum);
    // A truncated file: an Error naming it.
    {
      std::ifstream in(path, std::ios::binary);
      std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
    }
    try {
      a.load_state(path);
      errors[3] = "no error";
    } catch (const diloco::Error& e) {
      errors[3] = e.what();
    }
    std::remove(path.c_str());
  });
  CHECK_THAT(errors[0], Contains("global weights of bucket 0") && Contains("[496]"));
  CHECK_THAT(errors[1], Contains("int8") && Contains("int4"));
  CHECK_THAT(errors[2], Contains("outer momentum"));
  CHECK_THAT(errors[3], Contains("cannot read") && Contains("mismatch.pt"));
}

TEST_CASE("the outer state is not saved while a fragment's exchange is in flight",
          "[outer_state][streaming][gloo]") {
  std::string error;
  bool saved_after = false;
  diloco_test::run_ranks(2, [&](int rank, std::shared_ptr<diloco::Group> group) {
    const std::string path = temp_path("inflight" + std::to_string(rank) + ".pt");
    std::vector<at::Tensor> params;
    auto o = options_for("none");
    o.inner_steps = 4;
    o.fragments = 2;
    o.overlap_steps = 1;
    diloco::DiLoCo sync(make_model(params), group, o);
    bool refused = false;
    for (int s = 1; s <= 5; ++s) {
      const bool round_done = sync.step();
      if (sync.state().inner_step == 2) {  // fragment 0 started after step 2 (offset H/P)
        try {
          sync.save_state(path);
        } catch (const diloco::Error& e) {
          refused = true;
          if (rank == 0) error = e.what();
        }
      }
      if (round_done && rank == 0) {
        sync.save_state(path);
        saved_after = true;
      }
    }
    REQUIRE(refused);
    std::remove(path.c_str());
  });
  CHECK_THAT(error, Contains("in flight"));
  CHECK(saved_after);
}
