// Replay audits (diloco/audit/audit.h): the commitment format, the selection's statistics, the
// bit-exact state bytes the replays compare, and DiLoCo islands (threads over Gloo on loopback)
// that audit each other: honest rounds pass, a lazy or scaling island is caught, named on every
// rank and left out of later outer steps.
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include <torch/csrc/distributed/c10d/Store.hpp>

#include "comm/c10d_compat.h"

#include "diloco/diloco.h"
#include "support/catch.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;

namespace {

struct TinyNet : torch::nn::Module {
  TinyNet() {
    fc1 = register_module("fc1", torch::nn::Linear(8, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 1));
  }
  torch::Tensor forward(torch::Tensor x) { return fc2->forward(torch::tanh(fc1->forward(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

// Inner step `t` (0-based) of island `island`: its own regression batch.
void inner_step(TinyNet& net, torch::optim::Optimizer& opt, std::int64_t island, std::int64_t t) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 * island + t);
  at::Tensor x = at::randn({16, 8}, gen);
  at::Tensor y = x.sum(1, true).sin();
  opt.zero_grad();
  torch::mse_loss(net.forward(x), y).backward();
  opt.step();
}

torch::optim::AdamWOptions adamw() {
  return torch::optim::AdamWOptions(0.01).weight_decay(0.1);
}

struct Outcome {
  diloco::AuditStats audits;
  double max_weight = 0.0;
  at::Tensor global;
};

// `world` islands, `rounds` outer steps of H = 3 with audit_rate 1; `cheat` on rank 2: "lazy"
// skips its first inner step, "scale" doubles its first round's update; from round 2 on, the
// cheater also adds 1e3 to its weights before each outer step (screening off), so that whether
// its contribution is still averaged shows in the global weights.
std::vector<Outcome> run_audited(int world, int rounds, const std::string& cheat,
                                 double tolerance = 0.0) {
  std::vector<Outcome> out(static_cast<std::size_t>(world));
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> group) {
    torch::manual_seed(0);
    TinyNet net, replica;
    torch::optim::AdamW opt(net.parameters(), adamw());
    torch::optim::AdamW replica_opt(replica.parameters(), adamw());
    diloco::DiLoCoOptions o;
    o.inner_steps = 3;
    o.audit_rate = 1.0;
    o.audit_tolerance = tolerance;
    o.screen_factor = 0.0;
    diloco::DiLoCo sync(net, opt, group, o);
    sync.enable_audits(diloco::make_audit_hooks(
        {&opt}, replica, {&replica_opt},
        [&](std::int64_t island, std::int64_t t) { inner_step(replica, replica_opt, island, t); },
        7));
    const bool cheater = rank == 2 && !cheat.empty();
    for (int t = 0; t < 3 * rounds; ++t) {
      if (!(cheater && cheat == "lazy" && t == 0)) inner_step(net, opt, rank, t);
      if (cheater && t % 3 == 2) {
        at::NoGradGuard no_grad;
        const auto& g = sync.global_weights().front();
        at::Tensor local = sync.parameters().buckets().front().flat;
        if (cheat == "scale" && t == 2) local.copy_(g - 2.0 * (g - local));
        if (t > 2) local.add_(1e3);
      }
      sync.step();
    }
    auto& mine = out[static_cast<std::size_t>(rank)];
    mine.audits = sync.audits();
    mine.global = sync.global_weights().front().clone();
    mine.max_weight = mine.global.abs().max().item<double>();
  });
  return out;
}

}  // namespace

TEST_CASE("SHA-256 and commitments round-trip; a malformed one names its sender", "[audit]") {
  const std::string abc = "abc";
  CHECK(diloco::to_hex(diloco::sha256(abc.data(), abc.size())) ==
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");  // FIPS 180-2
  diloco::Commitment c;
  c.outer_step = 3;
  c.island = 2;
  c.first_step = 100;
  c.steps = 50;
  c.data_seed = -5;
  c.start_state = diloco::sha256("a", 1);
  c.end_state = diloco::sha256("b", 1);
  c.pseudo_gradient = diloco::sha256("c", 1);
  c.nonce = diloco::sha256("d", 1);
  const std::string bytes = c.serialize();
  REQUIRE(bytes.size() == diloco::Commitment::kBytes);
  const auto back = diloco::Commitment::parse(bytes, 2);
  CHECK(back.serialize() == bytes);
  CHECK(back.data_seed == -5);
  CHECK_THAT(back.describe(), Contains("inner steps [100, 150)"));
  CHECK_THROWS_WITH(diloco::Commitment::parse(bytes.substr(1), 2),
                    Contains("rank 2 sent a commitment of 167 bytes"));
}

TEST_CASE(
    "each island is audited with probability audit_rate, by another island still taking "
    "part",
    "[audit]") {
  const int n = 4;
  const int draws = 20000;
  std::vector<bool> none(n, false), one_out(n, false);
  one_out[1] = true;
  int audited = 0;
  std::vector<int> by(n * n, 0);
  for (int s = 0; s < draws; ++s) {
    const std::string text = std::to_string(s);
    const auto seed = diloco::sha256(text.data(), text.size());
    const auto all = diloco::select_audits(seed, n, 0.25, none);
    REQUIRE(all == diloco::select_audits(seed, n, 0.25, none));  // deterministic
    for (int i = 0; i < n; ++i) {
      REQUIRE(all[i] != i);
      if (all[i] >= 0) {
        ++audited;
        ++by[i * n + all[i]];
      }
    }
    const auto some = diloco::select_audits(seed, n, 0.25, one_out);
    REQUIRE(some[1] == -1);
    for (int i = 0; i < n; ++i) REQUIRE(some[i] != 1);
  }
  const double rate = double(audited) / (double(draws) * n);
  CHECK(std::abs(rate - 0.25) < 0.01);
  // The auditor is uniform over the other three islands.
  for (int i = 0; i < n; ++i) {
    for (int a = 0; a < n; ++a) {
      if (a != i) CHECK(std::abs(by[i * n + a] / (draws * 0.25) - 1.0 / 3.0) < 0.03);
    }
  }
  const auto seed = diloco::sha256("x", 1);
  for (int a : diloco::select_audits(seed, n, 0.0, none)) CHECK(a == -1);
  for (int a : diloco::select_audits(seed, n, 1.0, none)) CHECK(a >= 0);
  // One island alone has nobody to audit it.
  CHECK(diloco::select_audits(seed, 1, 1.0, {false}) == std::vector<int>{-1});
}

TEST_CASE(
    "within 20 outer steps at audit_rate 0.25, a given island is audited with probability "
    "above 99%",
    "[audit]") {
  // 1 - 0.75^20 = 0.9968: measured over 4000 runs of the library's own selection.
  int caught = 0;
  const int runs = 4000;
  for (int run = 0; run < runs; ++run) {
    for (int step = 1; step <= 20; ++step) {
      const std::string text = std::to_string(run) + "/" + std::to_string(step);
      const auto who = diloco::select_audits(diloco::sha256(text.data(), text.size()), 4, 0.25,
                                             std::vector<bool>(4, false));
      if (who[1] >= 0) {
        ++caught;
        break;
      }
    }
  }
  CHECK(double(caught) / runs > 0.99);
}

TEST_CASE(
    "an optimizer's state digest is by content: equal after a round trip into another "
    "optimizer, and after the same steps",
    "[audit]") {
  torch::manual_seed(1);
  TinyNet a, b;
  torch::optim::AdamW oa(a.parameters(), adamw());
  torch::optim::AdamW ob(b.parameters(), adamw());
  for (int t = 0; t < 3; ++t) inner_step(a, oa, 0, t);
  const auto before = diloco::optimizer_state_digest({&oa});
  CHECK(before != diloco::optimizer_state_digest({&ob}));  // b has no state yet
  diloco::load_optimizer_state_bytes({&ob}, diloco::optimizer_state_bytes({&oa}));
  CHECK(diloco::optimizer_state_digest({&ob}) == before);
  {
    at::NoGradGuard no_grad;
    auto pa = a.parameters(), pb = b.parameters();
    for (std::size_t i = 0; i < pa.size(); ++i) pb[i].copy_(pa[i]);
  }
  inner_step(a, oa, 0, 3);
  inner_step(b, ob, 0, 3);
  CHECK(diloco::optimizer_state_digest({&oa}) != before);
  CHECK(diloco::optimizer_state_digest({&ob}) == diloco::optimizer_state_digest({&oa}));
  CHECK_THROWS_WITH(diloco::load_optimizer_state_bytes({&ob}, "not an archive"),
                    Contains("does not load"));
}

TEST_CASE("Muon's state digests by content too", "[audit]") {
  torch::manual_seed(2);
  TinyNet a, b;
  diloco::Muon ma({a.fc1->weight}, diloco::MuonOptions(0.02));
  diloco::Muon mb({b.fc1->weight}, diloco::MuonOptions(0.02));
  for (int t = 0; t < 2; ++t) inner_step(a, ma, 0, t);
  diloco::load_optimizer_state_bytes({&mb}, diloco::optimizer_state_bytes({&ma}));
  CHECK(diloco::optimizer_state_digest({&mb}) == diloco::optimizer_state_digest({&ma}));
  inner_step(a, ma, 0, 2);
  CHECK(diloco::optimizer_state_digest({&mb}) != diloco::optimizer_state_digest({&ma}));
}

TEST_CASE("honest islands pass every audit, bit for bit", "[audit][gloo]") {
  const auto out = run_audited(3, 3, "");
  std::int64_t replayed = 0;
  for (int r = 0; r < 3; ++r) {
    INFO("rank " << r << ": " << out[r].audits.last_failure);
    CHECK(out[r].audits.audits == 9);  // every island, every outer step
    CHECK(out[r].audits.failed == 0);
    CHECK(out[r].audits.excluded.empty());
    CHECK(at::equal(out[r].global, out[0].global));
    replayed += out[r].audits.replayed_steps;
  }
  // The auditors are drawn at random: together they replayed the 9 audited rounds of 3 steps.
  CHECK(replayed == 9 * 3);
}

TEST_CASE("with a tolerance, honest replays pass too", "[audit][gloo]") {
  const auto out = run_audited(3, 2, "", 1e-6);
  for (int r = 0; r < 3; ++r) {
    INFO("rank " << r << ": " << out[r].audits.last_failure);
    CHECK(out[r].audits.failed == 0);
  }
}

TEST_CASE(
    "a lazy or scaling island fails its audit, is named on every rank and left out of "
    "later outer steps",
    "[audit][gloo]") {
  const std::string cheat = GENERATE(std::string("lazy"), std::string("scale"));
  const auto out = run_audited(3, 3, cheat);
  for (int r = 0; r < 3; ++r) {
    INFO(cheat << ", rank " << r << ": " << out[r].audits.last_failure);
    CHECK(out[r].audits.excluded == std::vector<int>{2});
    CHECK(out[r].audits.excluded_at == std::vector<std::int64_t>{1});
    CHECK_THAT(out[r].audits.last_failure,
               Contains("rank 2 failed its audit by rank") &&
                   Contains("replayed pseudo-gradient") &&
                   Contains("commitment: outer step 1, rank 2, inner steps [0, 3)"));
    // Its later +1e3 never reached the global weights.
    CHECK(out[r].max_weight < 10.0);
    CHECK(at::equal(out[r].global, out[0].global));
  }
}

TEST_CASE("audit options are validated by name", "[audit][gloo]") {
  diloco::DiLoCoOptions o;
  o.audit_rate = 1.5;
  CHECK_THROWS_WITH(o.validate(), Contains("audit_rate must be in [0, 1]"));
  o.audit_rate = 0.5;
  o.audit_tolerance = -1;
  CHECK_THROWS_WITH(o.validate(), Contains("audit_tolerance must be in [0, 1]"));
  o.audit_tolerance = 0;
  o.fragments = 2;
  CHECK_THROWS_WITH(o.validate(), Contains("audits (audit_rate > 0) replay plain DiLoCo"));
  o.fragments = 1;
  o.compression = "powersgd(rank=2)";
  CHECK_THROWS_WITH(o.validate(), Contains("audits (audit_rate > 0) need each island's"));
  const auto errors = diloco_test::run_ranks_collect(2, [&](int, std::shared_ptr<diloco::Group> g) {
    torch::manual_seed(0);
    TinyNet net;
    torch::optim::AdamW opt(net.parameters(), adamw());
    diloco::DiLoCoOptions off;
    off.inner_steps = 1;
    diloco::DiLoCo plain(net, opt, g, off);
    try {
      plain.enable_audits({});
    } catch (const diloco::OptionError& e) {
      if (std::string(e.what()).find("audits are off") == std::string::npos) throw;
    }
    diloco::DiLoCoOptions on = off;
    on.audit_rate = 1.0;
    diloco::DiLoCo audited(net, opt, g, on);
    inner_step(net, opt, 0, 0);
    audited.step();  // no hooks: an OptionError on every rank
  });
  for (const auto& e : errors) CHECK_THAT(e, Contains("call enable_audits()"));
}

TEST_CASE("elastic runs: islands that fail their audits are removed, each told its own failure; "
          "the others go on in a new epoch and keep auditing each other",
          "[audit][elastic]") {
  using namespace std::chrono_literals;
  const int port = diloco_test::free_port();
  auto server = diloco::compat::make_tcp_store("127.0.0.1", static_cast<std::uint16_t>(port),
                                               /*is_server=*/true, 20000ms);
  const int world = 4;
  const int rounds = 4;
  // An island's data stream from its name "<slot>.<incarnation>".
  const auto stream_of = [](const std::string& island) -> std::int64_t {
    return std::stoll(island.substr(0, island.find('.'))) * 10 +
           std::stoll(island.substr(island.find('.') + 1));
  };
  struct Result {
    std::string error, sha;
    diloco::AuditStats audits;
    int world = 0;
  };
  std::vector<Result> results(world);
  std::vector<std::thread> threads;
  for (int slot = 0; slot < world; ++slot) {
    threads.emplace_back([&, slot] {
      Result& out = results[static_cast<std::size_t>(slot)];
      try {
        diloco::ElasticOptions e = diloco_test::fast_elastic_options(port, slot, world);
        e.timeout = 10000ms;  // replays run inside the audits' collectives
        auto membership = diloco::Membership::join(e);
        torch::manual_seed(0);
        TinyNet net, replica;
        torch::optim::AdamW opt(net.parameters(), adamw());
        torch::optim::AdamW replica_opt(replica.parameters(), adamw());
        diloco::DiLoCoOptions o;
        o.inner_steps = 3;
        o.audit_rate = 1.0;
        auto tensors = diloco::ModelTensors::of(net);
        diloco::DiLoCo sync(std::move(tensors), membership, o);
        auto hooks = diloco::make_audit_hooks(
            {&opt}, replica, {&replica_opt},
            [&](std::int64_t stream, std::int64_t t) {
              inner_step(replica, replica_opt, stream, t);
            },
            7);
        CHECK_THROWS_WITH(sync.enable_audits(hooks), Contains("needs AuditHooks::stream_of"));
        hooks.stream_of = stream_of;
        sync.enable_audits(hooks);
        const std::int64_t mine = stream_of(membership->island());
        for (int t = 0; t < 3 * rounds; ++t) {
          // The cheaters (slots 2 and 3) skip one inner step of their second round and claim
          // it.
          if (!(slot >= 2 && t == 4)) inner_step(net, opt, mine, t);
          sync.step();
        }
        out.audits = sync.audits();
        out.sha = sync.state().sha256();
        out.world = membership->group()->world_size();
        membership->leave();
      } catch (const diloco::RemovedError& x) {
        out.error = std::string("removed: ") + x.what();
      } catch (const std::exception& x) {
        out.error = x.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  INFO("0: " << results[0].error << "\n1: " << results[1].error << "\n2: " << results[2].error
               << "\n3: " << results[3].error);
  CHECK(results[0].error.empty());
  CHECK(results[1].error.empty());
  // Each cheater is told its own failed audit, not the other's.
  for (int slot : {2, 3}) {
    const std::string mine = "(island " + std::to_string(slot) + ".0) failed its audit";
    const std::string other = "(island " + std::to_string(5 - slot) + ".0) failed its audit";
    CHECK_THAT(results[static_cast<std::size_t>(slot)].error,
               Contains("removed: ") && Contains(mine) && Contains("leaves the run") &&
                   !Contains(other));
  }
  CHECK(results[0].sha == results[1].sha);
  CHECK(results[0].world == 2);
  for (int r : {0, 1}) {
    const auto& a = results[static_cast<std::size_t>(r)].audits;
    // Only the cheaters failed, at outer step 2; the two survivors audited each other in the
    // new epoch through outer steps 3 and 4 (their chains of states followed them there).
    CHECK(a.failed == 2);
    REQUIRE(a.excluded_names.size() == 2);
    CHECK(a.excluded_names == std::vector<std::string>{"2.0", "3.0"});
    CHECK(a.excluded_at == std::vector<std::int64_t>{2, 2});
    REQUIRE(a.excluded_reasons.size() == 2);
    CHECK_THAT(a.excluded_reasons[0], Contains("(island 2.0) failed its audit"));
    CHECK_THAT(a.excluded_reasons[1], Contains("(island 3.0) failed its audit"));
    CHECK(a.audits == 4 + 4 + 2 + 2);
  }
}
