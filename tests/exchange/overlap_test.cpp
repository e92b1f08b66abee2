// Every kind of exchange is asynchronous: start() returns before the transfer is done (on an
// emulated slow link, Group::set_link) and finish() gives the same sum as the blocking sum(),
// bit for bit, on every rank.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <string>
#include <vector>

#include "diloco/exchange/error_feedback.h"
#include "diloco/exchange/exchange.h"
#include "support/catch.h"
#include "support/ranks.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

at::Tensor contribution(int rank) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(40 + rank);
  return at::randn({64 * 48 + 100}, gen);
}

std::vector<at::Tensor> views_of(at::Tensor& flat) {
  return {flat.narrow(0, 0, 64 * 48).view({64, 48}), flat.narrow(0, 64 * 48, 100)};
}

}  // namespace

TEST_CASE("every exchange kind starts without waiting for the link and sums like sum()",
          "[exchange][gloo]") {
  // none: all-reduce; fp16: summable; int8: ring-requantized; topk: gathered; powersgd.
  const std::string spec =
      GENERATE("none", "fp16", "int8", "topk(k=64)+ef", "powersgd(rank=2)+ef");
  const bool background = GENERATE(true, false);
  INFO(spec << (background ? ", background thread" : ", inline"));
  constexpr int kWorld = 3;
  std::vector<double> start_s(kWorld), finish_s(kWorld);
  std::vector<at::Tensor> async_sum(kWorld), sync_sum(kWorld);
  diloco_test::run_ranks(kWorld, [&](int rank, std::shared_ptr<diloco::Group> group) {
    // Blocking reference on an unlimited link, from an exchange of its own.
    at::Tensor ref = contribution(rank);
    diloco::Exchange::from_spec(spec)->sum(*group, ref, views_of(ref), "reference");
    sync_sum[rank] = ref;

    // 300 ms of latency per message: any collective issued on the caller's thread would show.
    diloco::LinkModel link;
    link.latency_ms = 300.0;
    group->set_link(link);
    auto exchange = diloco::Exchange::from_spec(spec);
    diloco::CommThread comm(background);
    at::Tensor flat = at::empty({64 * 48 + 100});
    const at::Tensor mine = contribution(rank);
    diloco::ExchangeRequest request;
    request.flat = flat;
    request.views = views_of(flat);
    request.label = "overlap";
    request.produce = [&](std::int64_t offset, std::int64_t length) {
      flat.narrow(0, offset, length).copy_(mine.narrow(0, offset, length));
    };
    const auto t0 = std::chrono::steady_clock::now();
    diloco::PendingExchange pending = exchange->start(*group, std::move(request), comm);
    start_s[rank] = seconds_since(t0);
    async_sum[rank] = exchange->finish(pending).clone();
    finish_s[rank] = seconds_since(t0);
  });
  for (int r = 0; r < kWorld; ++r) {
    INFO("rank " << r << ": start " << start_s[r] << " s, finish " << finish_s[r] << " s");
    CHECK(start_s[r] < 0.15);    // nothing waited for the 0.3 s link
    CHECK(finish_s[r] >= 0.29);  // and the transfer did cross it
    CHECK(at::equal(async_sum[r], sync_sum[r]));
    CHECK(at::equal(async_sum[r], async_sum[0]));
  }
}
