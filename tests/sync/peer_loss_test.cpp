// Real processes: a rank that dies mid-run makes the survivors raise PeerLostError within the
// timeout instead of hanging.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "support/ranks.h"

extern char** environ;
using Catch::Matchers::Contains;

namespace {

struct Proc {
  pid_t pid = -1;
  std::string log;
  int exit_code = -1;
};

Proc spawn_worker(int rank, int world, int port, const std::vector<std::string>& extra_env) {
  Proc p;
  p.log = "/tmp/diloco_worker_" + std::to_string(::getpid()) + "_" + std::to_string(rank) + ".log";
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) env.emplace_back(*e);
  env.push_back("MASTER_ADDR=127.0.0.1");
  env.push_back("MASTER_PORT=" + std::to_string(port));
  env.push_back("RANK=" + std::to_string(rank));
  env.push_back("WORLD_SIZE=" + std::to_string(world));
  for (const auto& e : extra_env) env.push_back(e);
  std::vector<char*> envp;
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, p.log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  std::string exe = DILOCO_TEST_WORKER;
  char* argv[] = {exe.data(), nullptr};
  REQUIRE(posix_spawn(&p.pid, exe.c_str(), &fa, nullptr, argv, envp.data()) == 0);
  posix_spawn_file_actions_destroy(&fa);
  return p;
}

// Waits for all; kills any still running after `limit` (and fails the test).
void wait_all(std::vector<Proc>& procs, std::chrono::seconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  std::size_t done = 0;
  while (done < procs.size()) {
    done = 0;
    for (auto& p : procs) {
      if (p.exit_code != -1) { ++done; continue; }
      int status = 0;
      if (::waitpid(p.pid, &status, WNOHANG) == p.pid) {
        p.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        ++done;
      }
    }
    if (std::chrono::steady_clock::now() > deadline) {
      for (auto& p : procs) {
        if (p.exit_code == -1) { ::kill(p.pid, SIGKILL); ::waitpid(p.pid, nullptr, 0); p.exit_code = 999; }
      }
      FAIL("workers still running after " << limit.count() << " s: a hang");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

TEST_CASE("a rank that dies mid-run makes the others raise PeerLostError, no hang", "[peer_loss][process]") {
  const int world = 3, port = diloco_test::free_port();
  std::vector<Proc> procs;
  for (int r = 0; r < world; ++r) {
    procs.push_back(spawn_worker(r, world, port,
                                 {"WORKER_STEPS=400", "WORKER_H=2", "WORKER_DIE_RANK=2",
                                  "WORKER_DIE_STEP=11", "DILOCO_TIMEOUT_S=10"}));
  }
  const auto start = std::chrono::steady_clock::now();
  wait_all(procs, std::chrono::seconds(40));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  INFO("all workers ended after " << seconds << " s");
  CHECK(procs[2].exit_code == 3);
  for (int r : {0, 1}) {
    const std::string log = slurp(procs[r].log);
    INFO("rank " << r << " log:\n" << log);
    CHECK(procs[r].exit_code == 42);
    CHECK_THAT(log, Contains("PeerLostError") && Contains("allreduce 'outer_sync'") &&
                        Contains("lost a peer"));
  }
  for (auto& p : procs) ::unlink(p.log.c_str());
}

TEST_CASE("the same workers finish cleanly when nobody dies", "[peer_loss][process]") {
  const int world = 2, port = diloco_test::free_port();
  std::vector<Proc> procs;
  for (int r = 0; r < world; ++r) procs.push_back(spawn_worker(r, world, port, {"WORKER_STEPS=20"}));
  wait_all(procs, std::chrono::seconds(60));
  for (auto& p : procs) {
    const std::string log = slurp(p.log);
    INFO(log);
    CHECK(p.exit_code == 0);
    CHECK_THAT(log, Contains("10 outer steps"));
    ::unlink(p.log.c_str());
  }
}
