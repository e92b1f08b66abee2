// Elastic runs in one process: islands are threads, each with its own Membership (store clients,
// heartbeat thread, Gloo groups on loopback) against a TCPStore this test serves. The fault
// scenarios with real processes (kill -9, SIGSTOP, restarts) are in tests/examples/elastic_test.sh.
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "comm/c10d_compat.h"
#include "diloco/comm/group.h"
#include "diloco/elastic/membership.h"
#include "diloco/errors.h"
#include "diloco/sync/diloco.h"
#include "support/catch.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;

namespace {

using namespace std::chrono_literals;

// One parameter of 10 elements, the same on every island.
diloco::ModelTensors model_of(at::Tensor& w) {
  diloco::ModelTensors m;
  m.parameters.push_back({"w", w});
  return m;
}

// The outer step of DiLoCo (Alg. 1) with Nesterov momentum mu from a zero buffer:
// delta = mean of the pseudo-gradients; b = delta; theta -= lr * (delta + mu * b).
at::Tensor first_outer_step(const at::Tensor& theta, const std::vector<at::Tensor>& locals,
                            double lr, double mu) {
  at::Tensor delta = at::zeros_like(theta);
  for (const auto& l : locals) delta += theta - l;
  delta /= static_cast<double>(locals.size());
  return theta - lr * (delta + mu * delta);
}

}  // namespace

TEST_CASE("ElasticOptions: every option is validated, naming it and its range", "[elastic]") {
  const auto bad = [](auto change, const std::string& names) {
    diloco::ElasticOptions o = diloco_test::fast_elastic_options(29500, 0, 4);
    change(o);
    CHECK_THROWS_WITH(o.validate(), Contains(names));
  };
  bad([](auto& o) { o.world_size = 0; }, "world_size (WORLD_SIZE");
  bad([](auto& o) { o.slot = -1; }, "slot (RANK) must be >= 0");
  bad([](auto& o) { o.min_islands = 5; }, "min_islands must be in [1, world_size = 4]");
  bad([](auto& o) { o.store_port = 70000; }, "store_port (MASTER_PORT) must be in [1, 65535]");
  bad([](auto& o) { o.heartbeat_timeout = 60ms; }, "heartbeat_timeout must be >= 2 x heartbeat_interval");
  bad([](auto& o) { o.timeout = 400ms; }, "timeout (the collective timeout) must be above heartbeat_timeout");
  bad([](auto& o) { o.rendezvous_timeout = 1000ms; }, "rendezvous_timeout must be >= timeout");
  // A slot beyond WORLD_SIZE joins.
  diloco::ElasticOptions fine = diloco_test::fast_elastic_options(29500, 7, 4);
  CHECK_NOTHROW(fine.validate());
}

TEST_CASE("Interrupt: a raised interrupt ends a collective's wait at once and refuses new ones",
          "[elastic][group]") {
  const auto errors = diloco_test::run_ranks_collect(2, [](int rank, std::shared_ptr<diloco::Group> g) {
    if (rank == 1) {
      // Late: rank 0 gives up before this; the all-reduce then completes its abandoned one.
      std::this_thread::sleep_for(1500ms);
      at::Tensor t = at::ones({4});
      g->allreduce_sum(t, "late");
      return;
    }
    auto interrupt = std::make_shared<diloco::Interrupt>();
    g->set_interrupt(interrupt);
    at::Tensor t = at::ones({4});
    auto pending = g->allreduce_sum_async(t, "waits");
    std::thread raiser([&] {
      std::this_thread::sleep_for(200ms);
      interrupt->raise("island 1.0 sent no heartbeat");
    });
    const auto start = std::chrono::steady_clock::now();
    std::string what;
    try {
      pending.wait();
    } catch (const diloco::PeerLostError& e) {
      what = e.what();
    }
    raiser.join();
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (what.find("given up: island 1.0 sent no heartbeat") == std::string::npos) {
      throw std::runtime_error("the wait did not end with the interrupt's reason: '" + what + "'");
    }
    if (waited > 1.0) throw std::runtime_error("the wait took " + std::to_string(waited) + " s");
    bool refused = false;
    try {
      at::Tensor u = at::ones({4});
      g->allreduce_sum(u, "after");
    } catch (const diloco::PeerLostError& e) {
      refused = std::string(e.what()).find("not started") != std::string::npos;
    }
    if (!refused) throw std::runtime_error("a collective after the interrupt was not refused");
  });
  CHECK(errors[0] == "");
  CHECK(errors[1] == "");
}

TEST_CASE("Interrupt: point-to-point transfers under an interrupt complete, and a raised one "
          "ends their wait",
          "[elastic][group]") {
  // Gloo completes a send or a recv only inside its own wait: polling them would never end.
  const auto errors = diloco_test::run_ranks_collect(2, [](int rank, std::shared_ptr<diloco::Group> g) {
    auto interrupt = std::make_shared<diloco::Interrupt>();
    g->set_interrupt(interrupt);
    at::Tensor t = rank == 0 ? at::arange(1000, at::kFloat) : at::zeros({1000});
    if (rank == 0) {
      g->send_async(t, 1, 7, "p2p").wait();
    } else {
      g->recv_async(t, 0, 7, "p2p").wait();
      if (!at::equal(t, at::arange(1000, at::kFloat))) throw std::runtime_error("wrong bytes");
    }
    if (rank == 0) std::this_thread::sleep_for(1500ms);  // alive while rank 1 waits
    if (rank == 1) {
      // Nobody sends this one: the interrupt ends the wait.
      at::Tensor u = at::zeros({4});
      auto pending = g->recv_async(u, 0, 8, "never sent");
      std::thread raiser([&] {
        std::this_thread::sleep_for(200ms);
        interrupt->raise("island 0.0 sent no heartbeat");
      });
      std::string what;
      try {
        pending.wait();
      } catch (const diloco::PeerLostError& e) {
        what = e.what();
      }
      raiser.join();
      if (what.find("given up: island 0.0 sent no heartbeat") == std::string::npos) {
        throw std::runtime_error("the recv's wait did not end with the interrupt: '" + what + "'");
      }
    }
  });
  CHECK(errors[0] == "");
  CHECK(errors[1] == "");
}

TEST_CASE("Elastic DiLoCo: an island that exits mid-round is dropped, the survivors redo the outer "
          "step with their own pseudo-gradients, and a restarted island joins bit-identical",
          "[elastic]") {
  const int port = diloco_test::free_port();
  auto server = diloco::compat::make_tcp_store("127.0.0.1", static_cast<std::uint16_t>(port),
                                               /*is_server=*/true, 20000ms);
  auto watcher = diloco::compat::make_tcp_store("127.0.0.1", static_cast<std::uint16_t>(port),
                                                /*is_server=*/false, 20000ms);
  const std::int64_t H = 2;
  const double lr = 0.7, mu = 0.9;
  diloco::DiLoCoOptions options;
  options.inner_steps = H;
  options.outer.lr = lr;
  options.outer.momentum = mu;
  const at::Tensor theta0 = at::linspace(-1.0, 1.0, 10);
  // Island r's inner steps: w -= (r + 1) * 0.01 * (t + 1) at its inner step t (deterministic).
  const auto inner_step = [](at::Tensor& w, int slot, std::int64_t t) {
    at::NoGradGuard no_grad;
    w.sub_(0.01 * (slot + 1) * static_cast<double>(t + 1));
  };

  struct Result {
    std::string error;
    at::Tensor after_first;  // global weights after outer step 1
    std::string sha;
    std::int64_t world = 0;
  };
  std::vector<Result> results(4);
  std::atomic<bool> joiner_waiting{false};
  auto island = [&](int index, int slot) {
    Result& out = results[static_cast<std::size_t>(index)];
    try {
      at::Tensor w = theta0.clone();
      auto membership = diloco::Membership::join(diloco_test::fast_elastic_options(port, slot, 3));
      diloco::DiLoCo outer(model_of(w), membership, options);
      for (std::int64_t t = outer.state().inner_step; t < 4 * H; ++t) {
        inner_step(w, slot, t);
        if (slot == 2 && index == 2 && t == H - 1) return;  // exits before its first outer step
        // The survivors wait for the restarted island to register before their second outer step,
        // so that it is admitted there.
        if (index < 2 && t == 2 * H - 1) {
          while (!joiner_waiting.load()) std::this_thread::sleep_for(10ms);
        }
        const bool outer_step = outer.step();
        if (outer_step && outer.state().outer_step == 1) out.after_first = outer.global_weights()[0].clone();
      }
      out.sha = outer.state().sha256();
      out.world = membership->group()->world_size();
      membership->leave();
    } catch (const std::exception& e) {
      out.error = e.what();
    }
  };
  std::vector<std::thread> threads;
  for (int s = 0; s < 3; ++s) threads.emplace_back(island, s, s);
  // Slot 2 again (incarnation 1), once the survivors have formed their epoch without it.
  threads.emplace_back([&] {
    while (!watcher->check({"diloco-elastic/e/1/members"})) std::this_thread::sleep_for(10ms);
    std::thread([&] {
      while (!watcher->check({"diloco-elastic/join/list/0"})) std::this_thread::sleep_for(5ms);
      joiner_waiting = true;
    }).detach();
    island(3, 2);
  });
  for (auto& t : threads) t.join();
  for (int i : {0, 1, 3}) {
    INFO("island " << i << ": " << results[static_cast<std::size_t>(i)].error);
    CHECK(results[static_cast<std::size_t>(i)].error.empty());
  }
  REQUIRE(results[0].after_first.defined());
  // Outer step 1 averaged the two survivors' pseudo-gradients (their H inner steps kept).
  std::vector<at::Tensor> locals;
  for (int slot : {0, 1}) {
    at::Tensor w = theta0.clone();
    for (std::int64_t t = 0; t < H; ++t) inner_step(w, slot, t);
    locals.push_back(w);
  }
  const at::Tensor expected = first_outer_step(theta0, locals, lr, mu);
  CHECK(at::allclose(results[0].after_first, expected, 1e-6, 1e-6));
  CHECK(at::equal(results[0].after_first, results[1].after_first));
  // The joiner took part from its admission on and ends bit-identical, in a group of 3 again.
  CHECK(results[0].sha == results[1].sha);
  CHECK(results[3].sha == results[0].sha);
  CHECK(results[0].world == 3);
  CHECK(results[3].world == 3);
}

TEST_CASE("Elastic DiLoCo: an island whose global state differs from the majority's is removed, "
          "and the others go on",
          "[elastic]") {
  const int port = diloco_test::free_port();
  auto server = diloco::compat::make_tcp_store("127.0.0.1", static_cast<std::uint16_t>(port),
                                               /*is_server=*/true, 20000ms);
  diloco::DiLoCoOptions options;
  options.inner_steps = 2;
  std::vector<std::string> errors(3);
  std::vector<std::string> shas(3);
  std::vector<int> worlds(3, 0);
  std::vector<std::thread> threads;
  for (int slot = 0; slot < 3; ++slot) {
    threads.emplace_back([&, slot] {
      try {
        at::Tensor w = at::linspace(-1.0, 1.0, 10);
        auto membership = diloco::Membership::join(diloco_test::fast_elastic_options(port, slot, 3));
        diloco::DiLoCo outer(model_of(w), membership, options);
        for (std::int64_t t = 0; t < 8; ++t) {
          {
            at::NoGradGuard no_grad;
            w.sub_(0.01 * (slot + 1));
          }
          outer.step();
          if (slot == 2 && t == 1) {
            at::NoGradGuard no_grad;
            outer.global_weights()[0][4] += 1e-3f;  // corrupted after outer step 1
          }
        }
        shas[static_cast<std::size_t>(slot)] = outer.state().sha256();
        worlds[static_cast<std::size_t>(slot)] = membership->group()->world_size();
        membership->leave();
      } catch (const diloco::RemovedError& e) {
        errors[static_cast<std::size_t>(slot)] = std::string("removed: ") + e.what();
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(slot)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  INFO("0: " << errors[0] << "\n1: " << errors[1] << "\n2: " << errors[2]);
  CHECK(errors[0].empty());
  CHECK(errors[1].empty());
  CHECK_THAT(errors[2], Contains("removed: ") && Contains("rank(s) 2 disagree with the majority"));
  CHECK(shas[0] == shas[1]);
  CHECK(worlds[0] == 2);
}

TEST_CASE("Elastic DiLoCo with a run key: the store's values and the groups' payloads are "
          "authenticated, a keyed joiner is admitted, and processes without the key cannot join",
          "[elastic][auth]") {
  const int port = diloco_test::free_port();
  auto server = diloco::compat::make_tcp_store("127.0.0.1", static_cast<std::uint16_t>(port),
                                               /*is_server=*/true, 20000ms);
  auto raw = diloco::compat::make_tcp_store("127.0.0.1", static_cast<std::uint16_t>(port),
                                            /*is_server=*/false, 20000ms);
  const std::string key = "the run's key, 16+ bytes";
  const auto keyed = [&](int slot, const std::string& k) {
    auto o = diloco_test::fast_elastic_options(port, slot, 2);
    o.run_key = k;
    return o;
  };
  const std::int64_t H = 2;
  diloco::DiLoCoOptions options;
  options.inner_steps = H;
  const at::Tensor theta0 = at::linspace(-1.0, 1.0, 10);
  const auto inner_step = [](at::Tensor& w, int slot) {
    at::NoGradGuard no_grad;
    w.sub_(0.01 * (slot + 1));
  };
  struct Result {
    std::string error, sha, backend;
    at::Tensor after_first;
    int world = 0;
  };
  std::vector<Result> results(3);
  std::atomic<bool> joiner_waiting{false};
  auto island = [&](int slot) {
    Result& out = results[static_cast<std::size_t>(slot)];
    try {
      at::Tensor w = theta0.clone();
      auto membership = diloco::Membership::join(keyed(slot, key));
      diloco::DiLoCo outer(model_of(w), membership, options);
      for (std::int64_t t = outer.state().inner_step; t < 4 * H; ++t) {
        inner_step(w, slot);
        if (slot < 2 && t == 2 * H - 1) {
          while (!joiner_waiting.load()) std::this_thread::sleep_for(10ms);
        }
        if (outer.step() && outer.state().outer_step == 1) {
          out.after_first = outer.global_weights()[0].clone();
        }
      }
      out.sha = outer.state().sha256();
      out.world = membership->group()->world_size();
      out.backend = membership->group()->backend().name();
      membership->leave();
    } catch (const std::exception& e) {
      out.error = e.what();
    }
  };
  std::vector<std::thread> threads;
  for (int s = 0; s < 2; ++s) threads.emplace_back(island, s);
  while (!raw->check({"diloco-elastic/started"})) std::this_thread::sleep_for(10ms);
  // Processes without the key, or with another, fail on their own, before taking an incarnation.
  CHECK_THROWS_WITH(diloco::Membership::join(diloco_test::fast_elastic_options(port, 5, 2)),
                    Contains("requires a run key and this process has none"));
  CHECK_THROWS_WITH(diloco::Membership::join(keyed(6, "another key, 16+ bytes")),
                    Contains("run key does not match the run's"));
  CHECK_FALSE(raw->check({"diloco-elastic/inc/5", "diloco-elastic/inc/6"}));
  // A join request forged by a client that skipped the check is refused; the run goes on.
  const std::string forged = "9.0";
  raw->set("diloco-elastic/join/list/" + std::to_string(raw->add("diloco-elastic/join/seq", 1) - 1),
           std::vector<std::uint8_t>(forged.begin(), forged.end()));
  raw->add("diloco-elastic/join/count", 1);
  // A keyed joiner (slot 2): admitted at the next boundary, with the state published MACed.
  std::thread([&] {
    while (!raw->check({"diloco-elastic/join/list/1"})) std::this_thread::sleep_for(5ms);
    joiner_waiting = true;
  }).detach();
  threads.emplace_back(island, 2);
  for (auto& t : threads) t.join();
  for (int i = 0; i < 3; ++i) {
    INFO("island " << i << ": " << results[static_cast<std::size_t>(i)].error);
    CHECK(results[static_cast<std::size_t>(i)].error.empty());
  }
  // The sums are exact: outer step 1 is the formula's, from the two first islands.
  std::vector<at::Tensor> locals;
  for (int slot : {0, 1}) {
    at::Tensor w = theta0.clone();
    for (std::int64_t t = 0; t < H; ++t) inner_step(w, slot);
    locals.push_back(w);
  }
  REQUIRE(results[0].after_first.defined());
  CHECK(at::allclose(results[0].after_first, first_outer_step(theta0, locals, 0.7, 0.9), 1e-6,
                     1e-6));
  CHECK(results[0].sha == results[1].sha);
  CHECK(results[2].sha == results[0].sha);
  CHECK(results[0].world == 3);
  CHECK_THAT(results[0].backend, Contains("+mac"));
  // What the islands wrote carries a MAC (32 bytes after the value), the challenge included.
  CHECK(raw->get("diloco-elastic/e/0/members").size() == std::string("0.0 1.0").size() + 32);
  CHECK(raw->get("diloco-elastic/auth/run").size() == 32 + 32);
}

TEST_CASE("Elastic: an island that disagrees with the run on emulating a link is refused, naming "
          "the options", "[elastic]") {
  const int port = diloco_test::free_port();
  auto server = diloco::compat::make_tcp_store("127.0.0.1", static_cast<std::uint16_t>(port),
                                               /*is_server=*/true, 20000ms);
  auto raw = diloco::compat::make_tcp_store("127.0.0.1", static_cast<std::uint16_t>(port),
                                            /*is_server=*/false, 20000ms);
  // The run's first island emulated a link; this one does not.
  raw->set("diloco-elastic/link_emulated", std::vector<std::uint8_t>{'1'});
  CHECK_THROWS_AS(diloco::Membership::join(diloco_test::fast_elastic_options(port, 1, 2)),
                  diloco::OptionError);
  CHECK_THROWS_WITH(diloco::Membership::join(diloco_test::fast_elastic_options(port, 1, 2)),
                    Contains("link emulation (ElasticOptions::link, DILOCO_LINK_MBPS") &&
                        Contains("this island does not emulate a link and the run's islands do"));
  // The other way round.
  raw->set("diloco-elastic/link_emulated", std::vector<std::uint8_t>{'0'});
  auto with_link = diloco_test::fast_elastic_options(port, 1, 2);
  with_link.link.mbit_per_s = 100;
  CHECK_THROWS_WITH(diloco::Membership::join(with_link),
                    Contains("this island emulates a link and the run's islands do not"));
}
