// Islands that differ in one option fail at construction, on every rank, naming the option and
// every rank's value (sync/fingerprint.h): real worker processes, one case per option the
// issue's probes varied, and the Fingerprint format itself.

#include <chrono>
#include <string>
#include <vector>

#include "diloco/compress/codec_params.h"
#include "diloco/errors.h"
#include "diloco/sync/fingerprint.h"
#include "support/catch.h"
#include "support/processes.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;

namespace {

struct Case {
  const char* what;
  std::vector<std::string> rank0_env;
  std::vector<std::string> rank1_env;
  const char* field;  // what the message must name
};

}  // namespace

TEST_CASE("islands configured differently all fail within seconds, naming the field", "[config][process]") {
  const std::vector<Case> cases = {
      {"fp4 vs int4", {"WORKER_COMPRESS=fp4"}, {"WORKER_COMPRESS=int4"}, "compression"},
      {"randomk seeds", {"WORKER_COMPRESS=randomk(seed=1)"}, {"WORKER_COMPRESS=randomk(seed=2)"},
       "compression"},
      {"int8 vs none", {"WORKER_COMPRESS=int8"}, {"WORKER_COMPRESS=none"}, "compression"},
      {"outer lr", {"WORKER_OUTER_LR=0.7"}, {"WORKER_OUTER_LR=0.3"}, "outer lr"},
      {"nesterov", {"WORKER_NESTEROV=1"}, {"WORKER_NESTEROV=0"}, "outer nesterov"},
      {"H", {"WORKER_H=10"}, {"WORKER_H=20"}, "inner_steps (H)"},
      {"dp vs diloco", {"WORKER_MODE=dp"}, {"WORKER_MODE=diloco"}, "synchronizer"},
      {"buffers", {"WORKER_BUFFERS=average"}, {"WORKER_BUFFERS=local"}, "buffers"},
      {"run length", {"WORKER_AGREE_STEPS=1", "WORKER_STEPS=10"},
       {"WORKER_AGREE_STEPS=1", "WORKER_STEPS=20"}, "worker steps"},
  };
  for (const Case& c : cases) {
    INFO("case: " << c.what);
    const int port = diloco_test::free_port();
    std::vector<diloco_test::Proc> procs;
    auto env0 = c.rank0_env, env1 = c.rank1_env;
    env0.push_back("DILOCO_TIMEOUT_S=20");
    env1.push_back("DILOCO_TIMEOUT_S=20");
    procs.push_back(diloco_test::spawn_worker(0, 2, port, env0));
    procs.push_back(diloco_test::spawn_worker(1, 2, port, env1));
    diloco_test::wait_all(procs, std::chrono::seconds(40));
    for (int r = 0; r < 2; ++r) {
      const std::string log = diloco_test::slurp(procs[r].log);
      INFO("rank " << r << " (exit " << procs[r].exit_code << ", " << procs[r].seconds
                   << " s):\n" << log);
      CHECK(procs[r].exit_code == 2);  // OptionError: no abort, no exit 0
      CHECK_THAT(log, Contains("OptionError") && Contains("configured differently") &&
                          Contains(c.field) && Contains("on rank 0") && Contains("on rank 1"));
      CHECK(procs[r].seconds < 10.0);
    }
    diloco_test::cleanup(procs);
  }
}

TEST_CASE("one island of three configured differently is named on every rank", "[config][process]") {
  const int port = diloco_test::free_port();
  std::vector<diloco_test::Proc> procs;
  for (int r = 0; r < 3; ++r) {
    procs.push_back(diloco_test::spawn_worker(
        r, 3, port, {r == 2 ? "WORKER_COMPRESS=fp4" : "WORKER_COMPRESS=int4"}));
  }
  diloco_test::wait_all(procs, std::chrono::seconds(40));
  for (int r = 0; r < 3; ++r) {
    const std::string log = diloco_test::slurp(procs[r].log);
    INFO("rank " << r << ":\n" << log);
    CHECK(procs[r].exit_code == 2);
    CHECK_THAT(log, Contains("compression is 'int4(") && Contains("on rank 0 but 'fp4") &&
                        Contains("on rank 2") && Contains("every rank: 0 'int4("));
  }
  diloco_test::cleanup(procs);
}

TEST_CASE("islands that agree pass the check and train", "[config][process]") {
  const int port = diloco_test::free_port();
  std::vector<diloco_test::Proc> procs;
  for (int r = 0; r < 2; ++r) {
    procs.push_back(diloco_test::spawn_worker(
        r, 2, port, {"WORKER_COMPRESS=randomk(seed=3)", "WORKER_STEPS=8", "WORKER_AGREE_STEPS=1"}));
  }
  diloco_test::wait_all(procs, std::chrono::seconds(40));
  for (auto& p : procs) {
    const std::string log = diloco_test::slurp(p.log);
    INFO(log);
    CHECK(p.exit_code == 0);
    CHECK_THAT(log, Contains("4 outer steps"));
  }
  diloco_test::cleanup(procs);
}

TEST_CASE("a fingerprint round-trips and a malformed one is refused by sender", "[config]") {
  diloco::Fingerprint f;
  f.add("compression", "topk(k=64)+ef");
  f.add("odd:field", "with\nnewline and 12:colons");
  const auto back = diloco::Fingerprint::parse(f.serialize(), "rank 3");
  CHECK(back.fields() == f.fields());
  CHECK_THROWS_AS(f.add("compression", "int8"), diloco::Error);
  CHECK_THROWS_WITH(diloco::Fingerprint::parse("12:short", "rank 3"),
                    Contains("rank 3") && Contains("malformed"));
  CHECK(diloco::exact_decimal(0.7) == "0.7");
  CHECK(diloco::exact_decimal(0.1 + 0.2) == "0.30000000000000004");
}

TEST_CASE("a local setup problem fails every rank, naming the rank that has it", "[config][gloo]") {
  const auto errors = diloco_test::run_ranks_collect(3, [](int rank, std::shared_ptr<diloco::Group> g) {
    diloco::Fingerprint f;
    f.add("x", "1");
    diloco::agree_on_fingerprint(*g, "Test", f, rank == 1 ? "something is wrong here" : "");
  });
  for (int r = 0; r < 3; ++r) {
    INFO(errors[r]);
    CHECK_THAT(errors[r], Contains("[Test] rank 1: something is wrong here"));
  }
}
