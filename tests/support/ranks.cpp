// Thread-per-rank harness (see ranks.h).
#include "support/ranks.h"

#include "comm/net.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <stdexcept>
#include <thread>

namespace diloco_test {

std::vector<std::string> run_ranks_collect(int world_size, const RankFn& fn,
                                           std::chrono::milliseconds timeout) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::string> errors(world_size);
  std::vector<std::thread> threads;
  for (int r = 0; r < world_size; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto group = std::make_shared<diloco::Group>(store, r, world_size, timeout);
        fn(r, group);
      } catch (const std::exception& e) {
        errors[r] = e.what();
        if (errors[r].empty()) errors[r] = "(exception without message)";
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

void run_ranks(int world_size, const RankFn& fn, std::chrono::milliseconds timeout) {
  const auto errors = run_ranks_collect(world_size, fn, timeout);
  for (int r = 0; r < world_size; ++r) {
    if (!errors[r].empty()) throw std::runtime_error("rank " + std::to_string(r) + ": " + errors[r]);
  }
}

void seed_parameters(const std::vector<at::Tensor>& params, std::uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (const auto& p : params) {
    at::Tensor v = at::randn(p.sizes(), gen).mul_(0.3);
    at::Tensor(p).copy_(v);
  }
}

int free_port() { return diloco::net::free_local_port(); }

std::vector<std::string> create_ranks_collect(int world_size, const ConfigureFn& configure,
                                              const CreatedFn& fn) {
  const int port = free_port();
  std::vector<std::string> errors(static_cast<std::size_t>(world_size));
  std::vector<std::thread> threads;
  for (int r = 0; r < world_size; ++r) {
    threads.emplace_back([&, r] {
      try {
        diloco::GroupOptions o;
        o.master_port = port;
        o.rank = r;
        o.world_size = world_size;
        o.timeout = std::chrono::milliseconds(10000);
        if (configure) configure(r, o);
        auto g = diloco::Group::create(o);
        if (fn) fn(r, *g);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

Listener::Listener() : fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::listen(fd, 16) != 0 || ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    throw std::runtime_error("Listener: cannot listen on 127.0.0.1");
  }
  port = ntohs(addr.sin_port);
}

Listener::~Listener() {
  if (fd >= 0) ::close(fd);
}

diloco::ElasticOptions fast_elastic_options(int port, int slot, int world_size) {
  diloco::ElasticOptions o;
  o.store_port = port;
  o.slot = slot;
  o.world_size = world_size;
  o.hostname = "127.0.0.1";
  o.heartbeat_interval = std::chrono::milliseconds(50);
  o.heartbeat_timeout = std::chrono::milliseconds(500);
  o.timeout = std::chrono::milliseconds(5000);
  o.rendezvous_timeout = std::chrono::milliseconds(20000);
  return o;
}

}  // namespace diloco_test
