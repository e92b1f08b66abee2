// Streaming DiLoCo's schedule (sync/schedule.h): over 2H steps every fragment starts every H
// steps at the documented offset, finishes tau steps later, and no two start together; the
// default fragments follow the strided pattern.

#include <map>
#include <set>
#include <string>
#include <vector>

#include "diloco/errors.h"
#include "diloco/sync/schedule.h"
#include "support/catch.h"

using Catch::Matchers::Contains;

TEST_CASE("schedule: every fragment every H steps at floor((p+1)H/P), never two at once", "[schedule]") {
  for (std::int64_t h : {1, 4, 10, 12, 100}) {
    for (std::int64_t p : {1, 2, 3, 4}) {
      if (p > h) continue;
      const std::int64_t max_tau = h / p > 0 ? h / p - 1 : 0;
      for (std::int64_t tau : {std::int64_t{0}, max_tau}) {
        INFO("H " << h << ", P " << p << ", tau " << tau);
        diloco::StreamingSchedule s(h, p, tau);
        std::map<std::int64_t, std::vector<std::int64_t>> starts, finishes;
        for (std::int64_t t = 1; t <= 2 * h + tau; ++t) {
          const auto st = s.starts_after(t);
          if (st != diloco::StreamingSchedule::kNone && t <= 2 * h) starts[st].push_back(t);
          const auto fi = s.finishes_after(t);
          if (fi != diloco::StreamingSchedule::kNone) finishes[fi].push_back(t);
        }
        REQUIRE(starts.size() == static_cast<std::size_t>(p));
        for (std::int64_t f = 0; f < p; ++f) {
          const std::int64_t o = (f + 1) * h / p;  // the documented offset
          CHECK(starts[f] == std::vector<std::int64_t>{o, o + h});
          CHECK(finishes[f] == std::vector<std::int64_t>{o + tau, o + h + tau});
        }
        CHECK(starts[p - 1].front() == h);  // the last fragment starts where DiLoCo syncs
        // An exchange finishes before the next one starts: at most one in flight.
        std::int64_t in_flight = 0, most = 0;
        for (std::int64_t t = 1; t <= 2 * h + tau; ++t) {
          if (s.starts_after(t) != diloco::StreamingSchedule::kNone && t <= 2 * h) ++in_flight;
          most = std::max(most, in_flight);
          if (s.finishes_after(t) != diloco::StreamingSchedule::kNone) --in_flight;
        }
        CHECK(most == 1);
      }
    }
  }
}

TEST_CASE("schedule: P=1, tau=0 is DiLoCo's outer step every H", "[schedule]") {
  diloco::StreamingSchedule s(5, 1, 0);
  for (std::int64_t t = 1; t <= 20; ++t) {
    const bool sync = t % 5 == 0;
    CHECK((s.starts_after(t) == 0) == sync);
    CHECK((s.finishes_after(t) == 0) == sync);
  }
}

TEST_CASE("schedule: options are checked by name", "[schedule]") {
  CHECK_THROWS_WITH(diloco::StreamingSchedule(0, 1, 0), Contains("inner_steps (H)"));
  CHECK_THROWS_WITH(diloco::StreamingSchedule(10, 0, 0), Contains("fragments (P)") && Contains("[1, inner_steps = 10]"));
  CHECK_THROWS_WITH(diloco::StreamingSchedule(10, 11, 0), Contains("fragments (P)"));
  CHECK_THROWS_WITH(diloco::StreamingSchedule(100, 4, 25), Contains("overlap_steps (tau)") && Contains("[0, 25)"));
  CHECK_THROWS_AS(diloco::StreamingSchedule(100, 4, -1), diloco::OptionError);
  CHECK_NOTHROW(diloco::StreamingSchedule(100, 4, 24));
}

TEST_CASE("strided fragments: every P-th block, the rest dealt round-robin", "[schedule]") {
  const std::vector<std::string> names = {"embed.weight",          "blocks.0.attn.weight",
                                          "blocks.0.mlp.weight",   "blocks.1.attn.weight",
                                          "blocks.2.attn.weight",  "blocks.3.mlp.bias",
                                          "norm.weight",           "head.weight",
                                          "layers.10.w"};
  const auto f = diloco::strided_fragments(names, 2);
  CHECK(f == std::vector<std::int64_t>{0, 0, 0, 1, 0, 1, 1, 0, 0});
  const auto one = diloco::strided_fragments(names, 1);
  CHECK(std::set<std::int64_t>(one.begin(), one.end()) == std::set<std::int64_t>{0});
}
