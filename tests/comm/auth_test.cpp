// Run keys (diloco/comm/auth.h): HMAC against RFC 4231, the MACed store, the authenticated
// backend over real Gloo on loopback (ranks are threads), a tampered and a replayed payload, and
// the keyed rendezvous refusing a process with another key or none while the members carry on.

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <cstdio>
#include <fstream>
#include <functional>
#include <future>
#include <thread>

#include "diloco/comm/auth.h"
#include "diloco/comm/group.h"
#include "diloco/elastic/membership.h"
#include "diloco/errors.h"
#include "diloco/exchange/comm_thread.h"
#include "support/catch.h"
#include "support/env_guard.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;

namespace {

const std::string kKey = "0123456789abcdef-test-run-key";
const auto kTimeout = std::chrono::milliseconds(10000);

std::string hex(const diloco::MacTag& t) {
  std::string out;
  char b[3];
  for (auto v : t) {
    std::snprintf(b, sizeof b, "%02x", v);
    out += b;
  }
  return out;
}

// A test double between the authenticated layer and Gloo: it changes what goes on the wire.
class WireTamper : public diloco::Backend {
 public:
  enum class Mode { kFlipAllgather, kFlipSend, kReplaySend };
  WireTamper(std::unique_ptr<diloco::Backend> inner, Mode mode) : inner_(std::move(inner)), mode_(mode) {}
  int rank() const override { return inner_->rank(); }
  int world_size() const override { return inner_->world_size(); }
  std::string name() const override { return inner_->name(); }
  c10::intrusive_ptr<c10d::Work> allreduce_sum(at::Tensor& t) override { return inner_->allreduce_sum(t); }
  c10::intrusive_ptr<c10d::Work> broadcast(at::Tensor& t, int root) override {
    return inner_->broadcast(t, root);
  }
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<at::Tensor>& outputs,
                                           at::Tensor& input) override {
    if (mode_ == Mode::kFlipAllgather) input.data_ptr<std::uint8_t>()[0] ^= 1;
    return inner_->allgather(outputs, input);
  }
  c10::intrusive_ptr<c10d::Work> barrier() override { return inner_->barrier(); }
  c10::intrusive_ptr<c10d::Work> send(at::Tensor& t, int dst, int tag) override {
    if (mode_ == Mode::kFlipSend) t.data_ptr<std::uint8_t>()[1] ^= 0x80;
    if (mode_ == Mode::kReplaySend) {
      if (!first_.defined()) {
        first_ = t.clone();  // what went on the wire first, bytes and tag
      } else {
        t.copy_(first_);  // sent again in place of the second message
      }
    }
    return inner_->send(t, dst, tag);
  }
  c10::intrusive_ptr<c10d::Work> recv(at::Tensor& t, int src, int tag) override {
    return inner_->recv(t, src, tag);
  }
  void wait(const c10::intrusive_ptr<c10d::Work>& w, const std::string& op) override {
    inner_->wait(w, op);
  }

 private:
  std::unique_ptr<diloco::Backend> inner_;
  Mode mode_;
  at::Tensor first_;
};

using KeyedFn = std::function<void(int rank, diloco::Group& group)>;

// Runs `world` ranks as threads, each with a keyed Group over a shared HashStore (the key of
// rank r is keys[r]; `tamper_rank` gets a WireTamper under its authenticated layer). Returns each
// rank's error ("" if none).
std::vector<std::string> run_keyed(int world, const std::vector<std::string>& keys,
                                   const KeyedFn& fn, int tamper_rank = -1,
                                   WireTamper::Mode mode = WireTamper::Mode::kFlipSend) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::string> errors(static_cast<std::size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto gloo = diloco::make_gloo_backend(store, r, world, kTimeout);
        if (r == tamper_rank) gloo = std::make_unique<WireTamper>(std::move(gloo), mode);
        diloco::Group group(diloco::make_authenticated_backend(std::move(gloo), store,
                                                               diloco::RunKey(keys[r]), kTimeout),
                            kTimeout);
        fn(r, group);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

std::vector<std::string> same_key(int world) { return std::vector<std::string>(world, kKey); }

}  // namespace

TEST_CASE("hmac_sha256 matches RFC 4231 test cases 1 and 2", "[auth]") {
  const std::string key1(20, '\x0b');
  const std::string data1 = "Hi There";
  CHECK(hex(diloco::hmac_sha256(key1, data1.data(), data1.size())) ==
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  const std::string data2 = "what do ya want for nothing?";
  CHECK(hex(diloco::hmac_sha256("Jefe", data2.data(), data2.size())) ==
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  // RunKey::mac over parts is the MAC of their concatenation.
  const std::string key(kKey);
  const std::string whole = "what do ya want for nothing?";
  diloco::RunKey run_key(key);
  CHECK(run_key.mac({{whole.data(), 4}, {whole.data() + 4, whole.size() - 4}}) ==
        diloco::hmac_sha256(key, whole.data(), whole.size()));
}

TEST_CASE("RunKey::resolve validates and names the option", "[auth]") {
  CHECK_FALSE(diloco::RunKey::resolve("", "").has_value());
  CHECK_THROWS_WITH(diloco::RunKey::resolve("short", ""), Contains("run_key must be at least 16"));
  CHECK_THROWS_WITH(diloco::RunKey::resolve(kKey, "/some/file"), Contains("both set"));
  CHECK_THROWS_WITH(diloco::RunKey::resolve("", "/nonexistent/run.key"),
                    Contains("run_key_file '/nonexistent/run.key' cannot be read"));
  const std::string path = "/tmp/diloco_auth_test_" + std::to_string(::getpid()) + ".key";
  {
    std::ofstream(path) << kKey << "\n";
  }
  const auto from_file = diloco::RunKey::resolve("", path);
  REQUIRE(from_file.has_value());
  const diloco::RunKey direct(kKey);
  CHECK(from_file->mac({{"x", 1}}) == direct.mac({{"x", 1}}));  // the newline is dropped
  std::remove(path.c_str());
  diloco::GroupOptions o;
  o.rank = 0;
  o.world_size = 1;
  o.run_key = "too short";
  CHECK_THROWS_AS(o.validate(), diloco::OptionError);
  CHECK_THROWS_WITH(o.validate(), Contains("run_key (DILOCO_RUN_KEY)"));
}

TEST_CASE("The run key comes from the environment, for static and elastic runs", "[auth]") {
  diloco_test::EnvGuard env({{"DILOCO_RUN_KEY", kKey.c_str()}, {"DILOCO_RUN_KEY_FILE", nullptr}});
  CHECK(diloco::GroupOptions::read_env().run_key == kKey);
  CHECK(diloco::ElasticOptions::read_env().run_key == kKey);
  diloco::ElasticOptions o;
  o.slot = 0;
  o.world_size = 1;
  o.run_key = "too short";
  CHECK_THROWS_AS(o.validate(), diloco::OptionError);
  CHECK_THROWS_WITH(o.validate(), Contains("run_key (DILOCO_RUN_KEY) must be at least 16"));
}

TEST_CASE("The authenticated store refuses values written without the key", "[auth]") {
  auto raw = c10::make_intrusive<c10d::HashStore>();
  auto keyed = diloco::make_authenticated_store(raw, diloco::RunKey(kKey));
  keyed->set("world_size", {'3'});
  CHECK(keyed->get("world_size") == std::vector<std::uint8_t>{'3'});
  CHECK(raw->get("world_size").size() == 1 + 32);

  // A client without the key writes a value, or copies a valid one under another name.
  raw->set("rank_addr/1", {'1', '0', '.', '0'});
  CHECK_THROWS_AS(keyed->get("rank_addr/1"), diloco::AuthenticationError);
  CHECK_THROWS_WITH(keyed->get("rank_addr/1"), Contains("'rank_addr/1' is forged or was written "
                                                        "without this run key"));
  raw->set("world_size_copy", raw->get("world_size"));
  CHECK_THROWS_AS(keyed->get("world_size_copy"), diloco::AuthenticationError);
  // Another key cannot read it either.
  auto other = diloco::make_authenticated_store(raw, diloco::RunKey("another key, 16+ bytes"));
  CHECK_THROWS_AS(other->get("world_size"), diloco::AuthenticationError);
  // Counters pass through unMACed.
  CHECK(keyed->add("arrived", 2) == 2);
  CHECK(raw->add("arrived", 0) == 2);
}

TEST_CASE("A keyed group's collectives are bit-identical and match the unkeyed sum", "[auth]") {
  const int world = GENERATE(2, 3);
  const std::int64_t numel = 1001;  // not a multiple of the world size: uneven ring chunks
  auto input = [&](int r) {
    // Integers: sums exact in any order, so the keyed ring equals Gloo's all-reduce.
    return at::arange(numel, at::kFloat).remainder(97).add(static_cast<double>(r * 13));
  };
  std::vector<at::Tensor> keyed_sum(world), plain_sum(world), gathered(world), bcast(world),
      received(world);
  const auto errors = run_keyed(world, same_key(world), [&](int r, diloco::Group& g) {
    at::Tensor t = input(r);
    g.allreduce_sum(t, "outer_sync");
    keyed_sum[r] = t;
    // Any shape: chunks are ranges of the flattened tensor.
    at::Tensor rows = at::full({world, 3}, static_cast<double>(r + 1), at::kDouble);
    g.allreduce_sum(rows, "state_check");
    if (!at::equal(rows, at::full({world, 3}, world * (world + 1) / 2.0, at::kDouble))) {
      throw std::runtime_error("2-D all-reduce differs");
    }
    at::Tensor d = at::full({5}, static_cast<double>(r), at::kDouble);
    auto all = g.allgather(d, "norms");
    gathered[r] = at::stack(all);
    at::Tensor b = at::full({7}, r == 1 ? 42 : -1, at::kInt);
    g.broadcast(b, 1, "state");
    bcast[r] = b;
    auto strings = g.allgather_bytes(std::string(static_cast<std::size_t>(r + 1), 'a' + r), "bytes");
    if (strings[world - 1] != std::string(static_cast<std::size_t>(world), 'a' + world - 1)) {
      throw std::runtime_error("allgather_bytes differs");
    }
    // Point to point: rank 0 sends two messages to rank 1 on the same tag.
    if (r == 0) {
      at::Tensor m1 = at::full({3}, 1.0f), m2 = at::full({3}, 2.0f);
      g.send_async(m1, 1, 5, "p2p").wait();
      g.send_async(m2, 1, 5, "p2p").wait();
    } else if (r == 1) {
      at::Tensor a = at::empty({3}), b2 = at::empty({3});
      g.recv_async(a, 0, 5, "p2p").wait();
      g.recv_async(b2, 0, 5, "p2p").wait();
      received[r] = at::cat({a, b2});
    }
    g.barrier("done");
  });
  for (int r = 0; r < world; ++r) {
    INFO("rank " << r << ": " << errors[r]);
    REQUIRE(errors[r].empty());
  }
  diloco_test::run_ranks(world, [&](int r, std::shared_ptr<diloco::Group> g) {
    at::Tensor t = input(r);
    g->allreduce_sum(t, "outer_sync");
    plain_sum[r] = t;
  });
  for (int r = 0; r < world; ++r) {
    CHECK(at::equal(keyed_sum[r], keyed_sum[0]));  // bit-identical
    CHECK(at::equal(keyed_sum[r], plain_sum[r]));
    CHECK(at::equal(gathered[r], at::arange(world, at::kDouble).unsqueeze(1).expand({world, 5})));
    CHECK(at::equal(bcast[r], at::full({7}, 42, at::kInt)));
  }
  CHECK(at::equal(received[1], at::tensor({1.0f, 1.0f, 1.0f, 2.0f, 2.0f, 2.0f})));
}

TEST_CASE("A tampered payload is rejected, naming the sender", "[auth]") {
  SECTION("allgather") {
    const auto errors = run_keyed(
        3, same_key(3),
        [](int r, diloco::Group& g) { g.allgather(at::full({16}, float(r)), "outer_gather"); }, 2,
        WireTamper::Mode::kFlipAllgather);
    for (int r : {0, 1}) {
      INFO(errors[r]);
      CHECK_THAT(errors[r], Contains("[allgather 'outer_gather'] rank " + std::to_string(r)));
      CHECK_THAT(errors[r], Contains("the payload from rank 2"));
      CHECK_THAT(errors[r], Contains("failed authentication"));
    }
  }
  SECTION("ring all-reduce hop") {
    const auto errors = run_keyed(
        2, same_key(2),
        [](int r, diloco::Group& g) {
          at::Tensor t = at::full({64}, float(r));
          g.allreduce_sum(t, "outer_sync");
        },
        1, WireTamper::Mode::kFlipSend);
    INFO(errors[0]);
    CHECK_THAT(errors[0], Contains("[allreduce 'outer_sync'] rank 0 of 2"));
    CHECK_THAT(errors[0], Contains("the payload from rank 1 (ring reduce-scatter hop"));
  }
}

TEST_CASE("A replayed payload is rejected", "[auth]") {
  // Rank 0's second message to rank 1 is replaced on the wire by its first (a valid tag, once).
  const auto errors = run_keyed(
      2, same_key(2),
      [](int r, diloco::Group& g) {
        at::Tensor t = at::full({8}, 3.0f);
        if (r == 0) {
          g.send_async(t, 1, 0, "p2p").wait();
          g.send_async(t, 1, 0, "p2p").wait();
        } else {
          g.recv_async(t, 0, 0, "p2p").wait();
          g.recv_async(t, 0, 0, "p2p").wait();
        }
      },
      0, WireTamper::Mode::kReplaySend);
  CHECK(errors[0].empty());
  INFO(errors[1]);
  CHECK_THAT(errors[1], Contains("[recv 'p2p'] rank 1 of 2"));
  CHECK_THAT(errors[1], Contains("the payload from rank 0 (send #1, tag 0"));
}

TEST_CASE("A rank with another run key cannot join the group", "[auth]") {
  const auto errors = run_keyed(2, {kKey, "a different key of 16+ bytes"},
                                [](int, diloco::Group&) {});
  for (int r : {0, 1}) {
    INFO(errors[r]);
    CHECK_THAT(errors[r], Contains("was not made with this process's run key"));
  }
}

TEST_CASE("The keyed rendezvous refuses a process with another key or none", "[auth]") {
  const int port = diloco_test::free_port();
  auto options = [&](int rank, const std::string& key) {
    diloco::GroupOptions o;
    o.master_port = port;
    o.rank = rank;
    o.world_size = 2;
    o.timeout = std::chrono::milliseconds(15000);
    o.run_key = key;
    return o;
  };
  auto rank0 = std::async(std::launch::async, [&] {
    auto g = diloco::Group::create(options(0, kKey));
    at::Tensor t = at::full({10}, 1.0f);
    g->allreduce_sum(t, "check");
    return t;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  // Each fails on its own before claiming rank 1 ...
  CHECK_THROWS_WITH(diloco::Group::create(options(1, "a different key of 16+ bytes")),
                    Contains("run key does not match the run's"));
  CHECK_THROWS_WITH(diloco::Group::create(options(1, "")), Contains("requires a run key"));
  // ... so the rank is still free for the process with the key.
  auto g1 = diloco::Group::create(options(1, kKey));
  at::Tensor t = at::full({10}, 2.0f);
  g1->allreduce_sum(t, "check");
  CHECK(at::equal(t, at::full({10}, 3.0f)));
  CHECK(at::equal(rank0.get(), at::full({10}, 3.0f)));
  CHECK(g1->backend().name() == "gloo+mac");
}

TEST_CASE("A keyed process cannot join a run without a key", "[auth]") {
  const int port = diloco_test::free_port();
  auto options = [&](int rank, const std::string& key) {
    diloco::GroupOptions o;
    o.master_port = port;
    o.rank = rank;
    o.world_size = 2;
    o.timeout = std::chrono::milliseconds(15000);
    o.run_key = key;
    return o;
  };
  auto rank0 = std::async(std::launch::async, [&] { return diloco::Group::create(options(0, "")); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK_THROWS_WITH(diloco::Group::create(options(1, kKey)), Contains("the run at"));
  auto g1 = diloco::Group::create(options(1, ""));
  CHECK(g1->backend().name() == "gloo");
  CHECK(rank0.get()->backend().name() == "gloo");
}

TEST_CASE("A payload tagged for another outer step or fragment is rejected", "[auth]") {
  // The same sequence numbers on both ranks, but rank 1 issues under another outer step (or
  // fragment): what it sends does not verify where rank 0 expects this outer step's payload.
  for (const diloco::PayloadContext theirs :
       {diloco::PayloadContext{4, 0}, diloco::PayloadContext{3, 1}}) {
    const auto errors = run_keyed(2, same_key(2), [&](int r, diloco::Group& g) {
      const diloco::ScopedPayloadContext context(r == 0 ? diloco::PayloadContext{3, 0} : theirs);
      g.allgather(at::full({8}, float(r)), "outer_gather");
    });
    INFO(errors[0]);
    CHECK_THAT(errors[0], Contains("the payload from rank 1 (allgather #0, outer step 3 fragment "
                                   "0, 32 bytes) failed authentication"));
  }
  // Under the same context, and on a CommThread job submitted under it, it verifies.
  const auto same = run_keyed(2, same_key(2), [](int r, diloco::Group& g) {
    const diloco::ScopedPayloadContext context({3, 1});
    diloco::CommThread comm(/*background=*/true);
    comm.submit([&] {
          at::Tensor t = at::full({64}, float(r));
          g.allreduce_sum(t, "outer_sync");
          if (t[0].item<float>() != 1.0f) throw std::runtime_error("wrong sum");
        })
        .wait();
  });
  CHECK(same[0].empty());
  CHECK(same[1].empty());
  CHECK(diloco::payload_context().outer_step == -1);  // restored
}
