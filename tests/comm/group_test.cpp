// Group construction: options, environment variables, rendezvous failures, lost peers.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <ATen/ATen.h>

#include <chrono>
#include <cstdlib>
#include <optional>
#include <thread>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "diloco/comm/group.h"
#include "diloco/errors.h"
#include "support/catch.h"
#include "support/env_guard.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;

namespace {

using diloco_test::EnvGuard;

diloco::GroupOptions valid() {
  diloco::GroupOptions o;
  o.rank = 0;
  o.world_size = 2;
  return o;
}

}  // namespace

TEST_CASE("group options are validated with the option's name and range", "[comm]") {
  auto o = valid();
  o.world_size = 0;
  CHECK_THROWS_WITH(o.validate(), Contains("world_size") && Contains(">= 1"));
  o = valid();
  o.rank = 2;
  CHECK_THROWS_WITH(o.validate(), Contains("rank") && Contains("[0, 1]"));
  o = valid();
  o.master_port = 70000;
  CHECK_THROWS_WITH(o.validate(), Contains("master_port") && Contains("[1, 65535]"));
  o = valid();
  o.timeout = std::chrono::milliseconds(0);
  CHECK_THROWS_WITH(o.validate(), Contains("timeout"));
  CHECK_THROWS_AS(o.validate(), diloco::OptionError);
}

TEST_CASE("group options come from torchrun's environment variables", "[comm]") {
  {
    EnvGuard env({{"MASTER_ADDR", "10.1.2.3"}, {"MASTER_PORT", "29555"}, {"RANK", "3"},
                  {"WORLD_SIZE", "4"}, {"DILOCO_TIMEOUT_S", "7"}});
    auto o = diloco::GroupOptions::from_env();
    CHECK(o.master_addr == "10.1.2.3");
    CHECK(o.master_port == 29555);
    CHECK(o.rank == 3);
    CHECK(o.world_size == 4);
    CHECK(o.timeout == std::chrono::seconds(7));
    CHECK_FALSE(o.join_existing_store);
  }
  {
    // Under torchrun the agent serves the store: rank 0 joins it like the others.
    EnvGuard env({{"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29555"}, {"RANK", "0"},
                  {"WORLD_SIZE", "2"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"}});
    CHECK(diloco::GroupOptions::from_env().join_existing_store);
  }
  {
    EnvGuard env({{"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29555"}, {"RANK", nullptr},
                  {"WORLD_SIZE", "4"}});
    CHECK_THROWS_WITH(diloco::GroupOptions::from_env(), Contains("RANK") && Contains("not set"));
  }
  {
    EnvGuard env({{"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "abc"}, {"RANK", "0"},
                  {"WORLD_SIZE", "4"}});
    CHECK_THROWS_WITH(diloco::GroupOptions::from_env(), Contains("MASTER_PORT") && Contains("integer"));
  }
  {
    EnvGuard env({{"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29555"}, {"RANK", "0"},
                  {"WORLD_SIZE", "0"}});
    CHECK_THROWS_WITH(diloco::GroupOptions::from_env(), Contains("WORLD_SIZE") && Contains(">= 1"));
  }
}

TEST_CASE("a port in use is reported as such", "[comm]") {
  diloco_test::Listener in_use;
  auto o = valid();
  o.world_size = 1;
  o.master_port = in_use.port;
  o.timeout = std::chrono::milliseconds(3000);
  CHECK_THROWS_WITH(diloco::Group::create(o), Contains("in use") && Contains(std::to_string(o.master_port)));
}

TEST_CASE("a rendezvous whose peers never come fails within the timeout", "[comm]") {
  auto o = valid();
  o.master_port = diloco_test::free_port();
  o.timeout = std::chrono::milliseconds(1500);
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_AS(diloco::Group::create(o), diloco::Error);
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(15));
}

TEST_CASE("a TCPStore group of real ranks connects and all-reduces", "[comm][gloo]") {
  const int world = 3;
  std::vector<float> results(world);
  const auto errors = diloco_test::create_ranks_collect(world, {}, [&](int r, diloco::Group& g) {
    at::Tensor t = at::ones({5});
    g.allreduce_sum(t, "x");
    results[r] = t[4].item<float>();
  });
  for (int r = 0; r < world; ++r) {
    INFO(errors[r]);
    CHECK(errors[r].empty());
    CHECK(results[r] == 3.0f);
  }
}

TEST_CASE("a peer that leaves makes the others' next collective raise PeerLostError", "[comm][gloo]") {
  const auto errors = diloco_test::run_ranks_collect(
      3,
      [](int rank, std::shared_ptr<diloco::Group> g) {
        at::Tensor t = at::ones({100});
        g->allreduce_sum(t, "warmup");
        if (rank == 1) return;  // leaves: its Group (and its connections) is destroyed
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        g->allreduce_sum(t, "after_loss");
      },
      std::chrono::milliseconds(5000));
  CHECK(errors[1].empty());
  for (int r : {0, 2}) {
    INFO(errors[r]);
    CHECK_THAT(errors[r], Contains("allreduce 'after_loss'") && Contains("rank " + std::to_string(r)) &&
                              Contains("lost a peer"));
  }
}

TEST_CASE("a rank started with another world size is told so, naming both", "[comm][gloo]") {
  const auto errors = diloco_test::create_ranks_collect(2, [](int r, diloco::GroupOptions& o) {
    o.world_size = r == 0 ? 2 : 3;  // rank 1 believes in three ranks
    o.timeout = std::chrono::milliseconds(3000);
  });
  CHECK_THAT(errors[1], Contains("WORLD_SIZE") && Contains("rank 1 has 3") && Contains("rank 0 has 2"));
  CHECK_FALSE(errors[0].empty());  // rank 0's peer never connects: it fails within its timeout
}

TEST_CASE("ranks join a store that is already served (torchrun's agent)", "[comm][gloo]") {
  const int port = diloco_test::free_port();
  // The agent's store: a TCPStore server that is not one of the ranks.
  c10d::TCPStoreOptions so;
  so.port = static_cast<std::uint16_t>(port);
  so.isServer = true;
  so.waitWorkers = false;
  auto agent = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", so);
  std::vector<float> results(2);
  const auto errors = diloco_test::create_ranks_collect(
      2,
      [&](int, diloco::GroupOptions& o) {
        o.master_port = port;
        o.join_existing_store = true;
      },
      [&](int r, diloco::Group& g) {
        at::Tensor t = at::ones({3});
        g.allreduce_sum(t, "x");
        results[r] = t[0].item<float>();
      });
  for (int r = 0; r < 2; ++r) {
    INFO(errors[r]);
    CHECK(errors[r].empty());
    CHECK(results[r] == 2.0f);
  }
}
