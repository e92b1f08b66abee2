// Test harness: run N ranks as threads of this process, each with its own diloco::Group over a
// shared c10d::HashStore and real Gloo connections on loopback.
//
// run_ranks() joins every thread and rethrows the first failure (by rank order), so a failed
// REQUIRE inside a rank fails the test. Catch2's assertions are not thread-safe: ranks return or
// throw, and the test thread asserts on what they returned.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/Tensor.h>

#include "diloco/comm/group.h"
#include "diloco/elastic/membership.h"

namespace diloco_test {

using RankFn = std::function<void(int rank, std::shared_ptr<diloco::Group> group)>;

// Runs fn on world_size threads. Each thread's exception (or "") is returned by rank.
std::vector<std::string> run_ranks_collect(int world_size, const RankFn& fn,
                                           std::chrono::milliseconds timeout =
                                               std::chrono::milliseconds(20000));
// The same, rethrowing the first failure as std::runtime_error("rank R: ...").
void run_ranks(int world_size, const RankFn& fn,
               std::chrono::milliseconds timeout = std::chrono::milliseconds(20000));

// Group::create on world_size threads, against a rendezvous on a free port of 127.0.0.1: each
// rank's options (the port, its rank, world_size and a 10 s timeout) go through `configure`
// first, then `fn` runs on its group. Each thread's exception text (or "") is returned by rank.
using ConfigureFn = std::function<void(int rank, diloco::GroupOptions& options)>;
using CreatedFn = std::function<void(int rank, diloco::Group& group)>;
std::vector<std::string> create_ranks_collect(int world_size, const ConfigureFn& configure,
                                              const CreatedFn& fn = {});

// Fills `params` from a generator of its own, seeded with `seed`: the same values in every thread
// whatever the others do (the global torch generator is shared by the threads of a test).
void seed_parameters(const std::vector<at::Tensor>& params, std::uint64_t seed);

// A free TCP port on 127.0.0.1 (bound to port 0 and released).
int free_port();

// Elastic islands as threads of a test, against a store served on 127.0.0.1:port: heartbeats
// every 50 ms, lost after 500 ms of silence, collectives 5 s, rendezvous 20 s.
diloco::ElasticOptions fast_elastic_options(int port, int slot, int world_size);

// A socket listening on 127.0.0.1 that never accepts (the kernel still completes connections):
// a port in use, or another program on MASTER_PORT. Closes on destruction.
struct Listener {
  Listener();
  ~Listener();
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  int fd = -1;
  int port = 0;
};

}  // namespace diloco_test
