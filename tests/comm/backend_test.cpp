// The Backend seam under Group: a Group over any backend sees every call once, and its byte
// statistics and link survive a change of backend (a new membership epoch over a PrefixStore).
//
// Ranks are threads of this process over a shared c10d::HashStore, with real Gloo backends on
// loopback; the counting backend wraps a Gloo one rather than replacing it.
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <chrono>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "comm/gloo_backend.h"
#include "diloco/comm/backend.h"
#include "diloco/comm/comm_stats.h"
#include "diloco/comm/group.h"
#include "diloco/errors.h"
#include "support/catch.h"

using diloco::Collective;

namespace {

constexpr std::chrono::milliseconds kTimeout{20000};

// Runs fn(rank) on world_size threads; returns each thread's exception message ("" if none).
template <typename Fn>
std::vector<std::string> run_threads(int world_size, Fn fn) {
  std::vector<std::string> errors(world_size);
  std::vector<std::thread> threads;
  for (int r = 0; r < world_size; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (const std::exception& e) {
        errors[r] = e.what();
        if (errors[r].empty()) errors[r] = "(exception without message)";
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

void expect(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error(what);
}

// Delegates every call to another backend and counts it.
class CountingBackend : public diloco::Backend {
 public:
  using Counts = std::map<std::string, int>;
  CountingBackend(std::unique_ptr<diloco::Backend> inner, std::shared_ptr<Counts> counts)
      : inner_(std::move(inner)), counts_(std::move(counts)) {}

  int rank() const override { return inner_->rank(); }
  int world_size() const override { return inner_->world_size(); }
  std::string name() const override { return "counting " + inner_->name(); }
  c10::intrusive_ptr<c10d::Work> allreduce_sum(at::Tensor& t) override {
    ++(*counts_)["allreduce"];
    return inner_->allreduce_sum(t);
  }
  c10::intrusive_ptr<c10d::Work> broadcast(at::Tensor& t, int root) override {
    ++(*counts_)["broadcast"];
    return inner_->broadcast(t, root);
  }
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<at::Tensor>& out, at::Tensor& in) override {
    ++(*counts_)["allgather"];
    return inner_->allgather(out, in);
  }
  c10::intrusive_ptr<c10d::Work> barrier() override {
    ++(*counts_)["barrier"];
    return inner_->barrier();
  }
  c10::intrusive_ptr<c10d::Work> send(at::Tensor& t, int dst, int tag) override {
    ++(*counts_)["send"];
    return inner_->send(t, dst, tag);
  }
  c10::intrusive_ptr<c10d::Work> recv(at::Tensor& t, int src, int tag) override {
    ++(*counts_)["recv"];
    return inner_->recv(t, src, tag);
  }
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& operation) override {
    ++(*counts_)["wait"];
    inner_->wait(work, operation);
  }

 private:
  std::unique_ptr<diloco::Backend> inner_;
  std::shared_ptr<Counts> counts_;
};

diloco::LinkModel latency_link(double ms) {
  diloco::LinkModel l;
  l.latency_ms = ms;
  return l;
}

}  // namespace

TEST_CASE("a group keeps its statistics and link across a new backend of another size",
          "[comm][gloo][backend]") {
  // Epoch 0: three ranks. Epoch 1: old ranks 1 and 2 continue as ranks 0 and 1 of a new Gloo
  // group over PrefixStore("epoch/1") of the same store; old rank 0 leaves.
  auto store = c10::make_intrusive<c10d::HashStore>();
  const std::int64_t numel = 300;  // n = 1200 bytes of float32, divisible by both world sizes
  const std::uint64_t n = numel * 4;
  const std::uint64_t n64 = numel * 8;
  const diloco::LinkModel link = latency_link(2.0);
  std::vector<diloco::CommStats> before(3), after(3);
  std::vector<int> new_rank(3, -1), new_world(3, -1);
  std::vector<double> link_after(3, -1.0);
  const auto errors = run_threads(3, [&](int r) {
    diloco::Group g(diloco::make_gloo_backend(store, r, 3, kTimeout), kTimeout);
    g.set_link(link);
    at::Tensor t = at::full({numel}, static_cast<float>(r + 1));
    g.allreduce_sum(t, "sync");
    expect(t[numel - 1].item<float>() == 6.0f, "epoch 0 all-reduce: wrong sum");
    // One all-reduce still in flight when the backend is replaced completes on the old backend.
    at::Tensor inflight = at::full({numel}, 1.0f);
    auto pending = g.allreduce_sum_async(inflight, "inflight");
    before[r] = g.stats();
    if (r == 0) {
      pending.wait();
      // Keep this rank's Gloo connections open until the others' in-flight all-reduce is done.
      while (store->add("epoch0_done", 0) < 2) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      return;
    }
    g.replace_backend(diloco::make_gloo_backend(
        c10::make_intrusive<c10d::PrefixStore>("epoch/1", store), r - 1, 2, kTimeout));
    pending.wait();
    store->add("epoch0_done", 1);
    expect(inflight[0].item<float>() == 3.0f, "in-flight all-reduce: wrong sum");
    new_rank[r] = g.rank();
    new_world[r] = g.world_size();
    link_after[r] = g.link().latency_ms;
    at::Tensor u = at::full({numel}, static_cast<float>(r));
    g.allreduce_sum(u, "sync");
    expect(u[0].item<float>() == 3.0f, "epoch 1 all-reduce: wrong sum");
    at::Tensor b = at::full({numel}, static_cast<double>(r), at::kDouble);
    g.broadcast(b, 1, "bcast");  // new rank 1 is old rank 2
    expect(b[numel - 1].item<double>() == 2.0, "epoch 1 broadcast: wrong value");
    after[r] = g.stats();
  });
  for (int r = 0; r < 3; ++r) {
    INFO("rank " << r << ": " << errors[r]);
    REQUIRE(errors[r].empty());
  }
  // Epoch 0 all-reduce over 3 ranks: 2(3-1)/3 * 1200 = 1600 bytes each way.
  for (int r = 0; r < 3; ++r) {
    INFO("rank " << r);
    CHECK(before[r].ops.at("allreduce:sync").calls == 1);
    CHECK(before[r].ops.at("allreduce:sync").bytes_sent == 1600);
    CHECK(before[r].ops.count("allreduce:inflight") == 0);  // not waited yet
  }
  for (int r = 1; r < 3; ++r) {
    INFO("old rank " << r);
    CHECK(new_rank[r] == r - 1);
    CHECK(new_world[r] == 2);
    CHECK(link_after[r] == 2.0);
    const auto& ops = after[r].ops;
    // Epoch 0's 1600 bytes, then epoch 1's 2(2-1)/2 * 1200 = 1200.
    REQUIRE(ops.at("allreduce:sync").calls == 2);
    CHECK(ops.at("allreduce:sync").bytes_sent == 1600 + 1200);
    CHECK(ops.at("allreduce:sync").bytes_received == 1600 + 1200);
    CHECK(ops.at("allreduce:sync").bytes_sent ==
          diloco::collective_bytes(Collective::kAllReduce, n, 3, r).sent +
              diloco::collective_bytes(Collective::kAllReduce, n, 2, r - 1).sent);
    // The in-flight all-reduce is accounted as the 3-rank collective it was.
    CHECK(ops.at("allreduce:inflight").bytes_sent == 1600);
    // Broadcast from new rank 1: it sends (2-1) * n64, the other receives n64.
    const bool root = r == 2;
    CHECK(ops.at("broadcast:bcast").bytes_sent == (root ? n64 : 0));
    CHECK(ops.at("broadcast:bcast").bytes_received == (root ? 0 : n64));
    CHECK(after[r].bytes_sent() == 1600 + 1200 + 1600 + (root ? n64 : 0));
    // The link layer charges each collective by the world size it ran over.
    const double expected_link =
        2 * diloco::link_seconds(Collective::kAllReduce, n, 3, 0, link) +
        diloco::link_seconds(Collective::kAllReduce, n, 2, 0, link) +
        diloco::link_seconds(Collective::kBroadcast, n64, 2, 1, link);
    CHECK(after[r].link_seconds() == Approx(expected_link));
  }
  CHECK(before[0].ops.at("allreduce:sync").bytes_received == 1600);
}

TEST_CASE("a group over any backend issues and waits every operation on it once",
          "[comm][gloo][backend]") {
  const int world = GENERATE(2, 3);
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::shared_ptr<CountingBackend::Counts>> counts(world);
  std::vector<diloco::CommStats> stats(world);
  std::vector<std::string> names(world);
  const auto errors = run_threads(world, [&](int r) {
    counts[r] = std::make_shared<CountingBackend::Counts>();
    diloco::Group g(std::make_unique<CountingBackend>(
                        diloco::make_gloo_backend(store, r, world, kTimeout), counts[r]),
                    kTimeout);
    names[r] = g.backend().name();
    at::Tensor t = at::full({10}, 1.0f);
    g.allreduce_sum(t, "a");
    at::Tensor t2 = at::full({10}, 2.0f);
    auto p = g.allreduce_sum_async(t2, "a");
    p.wait();
    p.wait();  // idempotent: no second wait on the backend
    expect(t[0].item<float>() == world && t2[9].item<float>() == 2.0f * world, "wrong sums");
    at::Tensor b = at::full({4}, static_cast<float>(r));
    g.broadcast(b, world - 1, "b");
    expect(b[0].item<float>() == world - 1, "wrong broadcast");
    auto all = g.allgather_bytes(std::string(static_cast<std::size_t>(r + 1), 'x'), "g");
    expect(all.back().size() == static_cast<std::size_t>(world), "wrong all-gather");
    g.barrier("sync");
    at::Tensor out = at::full({3}, static_cast<float>(r));
    at::Tensor in = at::zeros({3});
    auto s = g.send_async(out, (r + 1) % world, 7, "ring");
    auto v = g.recv_async(in, (r + world - 1) % world, 7, "ring");
    s.wait();
    v.wait();
    expect(in[0].item<float>() == (r + world - 1) % world, "wrong message");
    stats[r] = g.stats();
  });
  for (int r = 0; r < world; ++r) {
    INFO("world " << world << " rank " << r << ": " << errors[r]);
    REQUIRE(errors[r].empty());
    auto& c = *counts[r];
    CHECK(names[r] == "counting gloo");
    CHECK(c["allreduce"] == 2);
    CHECK(c["broadcast"] == 1);
    CHECK(c["allgather"] == 2);  // allgather_bytes: lengths, then bytes
    CHECK(c["barrier"] == 1);
    CHECK(c["send"] == 1);
    CHECK(c["recv"] == 1);
    CHECK(c["wait"] == 8);
    // The accounting layer above saw the same operations, once each.
    CHECK(stats[r].calls() == 8);
    CHECK(stats[r].ops.at("allreduce:a").calls == 2);
    CHECK(stats[r].ops.at("send:ring").bytes_sent == 12);
    CHECK(stats[r].ops.at("recv:ring").bytes_received == 12);
  }
}

TEST_CASE("a group refuses a null backend", "[comm][backend]") {
  CHECK_THROWS_AS(diloco::Group(std::unique_ptr<diloco::Backend>(), kTimeout), diloco::OptionError);
  diloco::Group g(diloco::make_gloo_backend(c10::make_intrusive<c10d::HashStore>(), 0, 1, kTimeout),
                  kTimeout);
  CHECK_THROWS_AS(g.replace_backend(nullptr), diloco::OptionError);
  CHECK(g.backend().name() == "gloo");
  at::Tensor t = at::ones({2});
  g.allreduce_sum(t, "solo");  // one rank: accounted, nothing on the wire
  CHECK(g.stats().ops.at("allreduce:solo").calls == 1);
  CHECK(g.stats().bytes_sent() == 0);
}
