// Test harness for real processes: start the test worker (tests/support/worker.cpp) as one rank
// of a group, wait for a set of them with a hard limit, and read what each printed.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

namespace diloco_test {

struct Proc {
  pid_t pid = -1;
  std::string log;     // its stdout and stderr
  int exit_code = -1;  // 128 + signal when killed; 999 when wait_all had to kill it
  double seconds = 0;  // from spawn to exit
  std::chrono::steady_clock::time_point started;
};

// Starts the worker as `rank` of `world` with MASTER_ADDR=127.0.0.1 MASTER_PORT=port, plus
// `extra_env` ("NAME=value") on top of this process's environment.
Proc spawn_worker(int rank, int world, int port, const std::vector<std::string>& extra_env);
// Waits for all; kills any still running after `limit` and fails the test (a hang).
void wait_all(std::vector<Proc>& procs, std::chrono::seconds limit);
std::string slurp(const std::string& path);
// Removes the logs.
void cleanup(std::vector<Proc>& procs);

}  // namespace diloco_test
