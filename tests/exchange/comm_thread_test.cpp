// The communication thread: jobs in submission order, a failure stops the queue until
// clear_error(), inline threads run jobs on the waiting thread, discarded jobs never run.

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include "diloco/exchange/comm_thread.h"
#include "support/catch.h"

using Catch::Matchers::Contains;

TEST_CASE("a background communication thread runs jobs in order, off the caller's thread",
          "[comm_thread]") {
  diloco::CommThread comm(/*background=*/true);
  std::vector<int> order;
  std::vector<std::thread::id> threads;
  std::vector<diloco::CommThread::Job> jobs;
  for (int i = 0; i < 20; ++i) {
    jobs.push_back(comm.submit([&order, &threads, i] {
      if (i == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      order.push_back(i);
      threads.push_back(std::this_thread::get_id());
    }));
  }
  jobs.back().wait();
  REQUIRE(order.size() == 20);
  for (int i = 0; i < 20; ++i) CHECK(order[i] == i);
  for (const auto& id : threads) CHECK(id != std::this_thread::get_id());
}

TEST_CASE("a failed job stops the queue until clear_error", "[comm_thread]") {
  const bool background = GENERATE(true, false);
  INFO((background ? "background" : "inline"));
  diloco::CommThread comm(background);
  std::atomic<int> ran{0};
  auto first = comm.submit([&] { ++ran; });
  auto failing = comm.submit([&] {
    ++ran;
    throw std::runtime_error("peer 2 lost");
  });
  auto behind = comm.submit([&] { ran += 100; });  // a collective the others would skip
  CHECK_THROWS_WITH(behind.wait(), Contains("peer 2 lost"));
  CHECK_THROWS_WITH(failing.wait(), Contains("peer 2 lost"));
  CHECK_NOTHROW(first.wait());
  CHECK(ran == 2);
  comm.clear_error();
  auto after = comm.submit([&] { ran += 10; });
  after.wait();
  CHECK(ran == 12);
}

TEST_CASE("an inline communication thread runs jobs on the waiting thread, in order",
          "[comm_thread]") {
  diloco::CommThread comm(/*background=*/false);
  std::vector<int> order;
  std::thread::id where;
  auto a = comm.submit([&] { order.push_back(1); });
  auto b = comm.submit([&] {
    order.push_back(2);
    where = std::this_thread::get_id();
  });
  auto c = comm.submit([&] { order.push_back(3); });
  CHECK(order.empty());  // nothing runs until someone waits
  b.wait();              // runs a, then b
  CHECK(order == std::vector<int>{1, 2});
  CHECK(where == std::this_thread::get_id());
  a.wait();  // already done: returns
  c.wait();
  CHECK(order == std::vector<int>{1, 2, 3});
}

TEST_CASE("discarded jobs never run and their wait says so", "[comm_thread]") {
  diloco::CommThread comm(/*background=*/false);
  bool ran = false;
  auto job = comm.submit([&] { ran = true; });
  comm.discard_queued();
  CHECK_THROWS_WITH(job.wait(), Contains("discarded"));
  CHECK_FALSE(ran);
}
