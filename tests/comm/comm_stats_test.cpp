// Byte accounting: the formulas, and what a Group records for real Gloo collectives.
#include <ATen/ATen.h>

#include "diloco/comm/comm_stats.h"
#include "support/catch.h"
#include "support/ranks.h"

using diloco::Collective;
using diloco::collective_bytes;

TEST_CASE("collective_bytes follows the ring and tree formulas", "[comm]") {
  // ring all-reduce: 2(N-1)/N * n
  CHECK(collective_bytes(Collective::kAllReduce, 4000, 4, 0).sent == 6000);
  CHECK(collective_bytes(Collective::kAllReduce, 4000, 4, 3).received == 6000);
  CHECK(collective_bytes(Collective::kAllReduce, 4000, 1, 0).sent == 0);
  CHECK(collective_bytes(Collective::kAllReduce, 400, 2, 1).sent == 400);
  // all-gather: (N-1) * n
  CHECK(collective_bytes(Collective::kAllGather, 100, 3, 1).sent == 200);
  // broadcast: the root sends to every peer, the others receive once
  CHECK(collective_bytes(Collective::kBroadcast, 100, 4, 2, 2).sent == 300);
  CHECK(collective_bytes(Collective::kBroadcast, 100, 4, 1, 2).sent == 0);
  CHECK(collective_bytes(Collective::kBroadcast, 100, 4, 1, 2).received == 100);
}

TEST_CASE("a group accounts every collective by its algorithm's cost", "[comm][gloo]") {
  const int world = GENERATE(1, 2, 3, 4);
  const std::int64_t numel = GENERATE(1, 1000, 12345);
  std::vector<diloco::CommStats> stats(world);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> g) {
    at::Tensor t = at::full({numel}, static_cast<float>(rank + 1));
    g->allreduce_sum(t, "test");
    g->allreduce_sum(t, "test");
    at::Tensor b = at::full({numel}, static_cast<double>(rank), at::kDouble);
    g->broadcast(b, world - 1, "bcast");
    auto gathered = g->allgather(at::full({numel}, rank, at::kInt), "gather");
    // The values are right as well as the byte counts.
    const float expect = static_cast<float>(world * (world + 1) / 2) * world;
    if (t[0].item<float>() != expect || b[0].item<double>() != world - 1 ||
        gathered.back()[numel - 1].item<std::int32_t>() != world - 1) {
      throw std::runtime_error("wrong collective result");
    }
    stats[rank] = g->stats();
  });
  const std::uint64_t n32 = static_cast<std::uint64_t>(numel) * 4;
  const std::uint64_t n64 = static_cast<std::uint64_t>(numel) * 8;
  for (int r = 0; r < world; ++r) {
    INFO("world " << world << " rank " << r << " numel " << numel);
    const auto& ops = stats[r].ops;
    REQUIRE(ops.at("allreduce:test").calls == 2);
    CHECK(ops.at("allreduce:test").bytes_sent == 2 * (2 * (world - 1) * n32 / world));
    CHECK(ops.at("allreduce:test").bytes_received == 2 * (2 * (world - 1) * n32 / world));
    const bool root = r == world - 1;
    CHECK(ops.at("broadcast:bcast").bytes_sent == (root ? (world - 1) * n64 : 0));
    CHECK(ops.at("broadcast:bcast").bytes_received == (root || world == 1 ? 0 : n64));
    CHECK(ops.at("allgather:gather").bytes_sent == (world - 1) * n32);
    CHECK(stats[r].bytes_sent() == ops.at("allreduce:test").bytes_sent +
                                       ops.at("broadcast:bcast").bytes_sent +
                                       ops.at("allgather:gather").bytes_sent);
  }
}
