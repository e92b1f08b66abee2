// Real worker processes for multi-process tests (see processes.h).
#include "support/catch.h"
#include "support/processes.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <sstream>
#include <thread>

extern char** environ;

namespace diloco_test {

Proc spawn_worker(int rank, int world, int port, const std::vector<std::string>& extra_env) {
  static std::atomic<int> serial{0};
  Proc p;
  p.log = "/tmp/diloco_worker_" + std::to_string(::getpid()) + "_" + std::to_string(serial++) +
          "_" + std::to_string(rank) + ".log";
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) env.emplace_back(*e);
  env.push_back("MASTER_ADDR=127.0.0.1");
  env.push_back("MASTER_PORT=" + std::to_string(port));
  env.push_back("RANK=" + std::to_string(rank));
  env.push_back("WORLD_SIZE=" + std::to_string(world));
  for (const auto& e : extra_env) env.push_back(e);  // later entries win in getenv
  std::vector<char*> envp;
  for (auto it = env.rbegin(); it != env.rend(); ++it) envp.push_back(it->data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, p.log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  std::string exe = DILOCO_TEST_WORKER;
  char* argv[] = {exe.data(), nullptr};
  p.started = std::chrono::steady_clock::now();
  REQUIRE(posix_spawn(&p.pid, exe.c_str(), &fa, nullptr, argv, envp.data()) == 0);
  posix_spawn_file_actions_destroy(&fa);
  return p;
}

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
        p.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - p.started).count();
        ++done;
      }
    }
    if (std::chrono::steady_clock::now() > deadline) {
      for (auto& p : procs) {
        if (p.exit_code != -1) continue;
        ::kill(p.pid, SIGCONT);
        ::kill(p.pid, SIGKILL);
        ::waitpid(p.pid, nullptr, 0);
        p.exit_code = 999;
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

void cleanup(std::vector<Proc>& procs) {
  for (auto& p : procs) ::unlink(p.log.c_str());
}

}  // namespace diloco_test
