// diloco-run: a torchrun-style launcher that starts the local processes of a distributed job.
//
// What it is: `diloco-run -n N -- PROGRAM ARGS...` starts N copies of PROGRAM on this host, each
// with the rendezvous environment that diloco's process-group setup reads (MASTER_ADDR,
// MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK). It prefixes every
// output line with the rank that wrote it and forwards SIGINT/SIGTERM/SIGHUP to the processes.
// Multi-host jobs run one diloco-run per host with --nnodes/--node-rank.
//
// Two modes:
// - Default (static): it tears the whole job down as soon as one process fails: the survivors
//   would otherwise sit in a collective until Gloo's timeout, waiting for a peer that is gone.
//   Ranks meet at --master-addr/--master-port, where rank 0 serves the store.
// - Elastic (--elastic, --max-restarts N > 0 or --coordinator): the islands survive lost peers
//   and admit restarted ones, so a failed process stops nobody else. It is started again up to
//   --max-restarts times (same RANK, DILOCO_RESTART=k) after --restart-delay seconds; once out of
//   restarts it stays down and the others go on. The store that holds the islands' membership
//   must outlive every island, so no rank serves it: a diloco-coordinator does, started here as
//   a child (one host) or elsewhere and named by --coordinator HOST:PORT (several hosts); ranks
//   join it as store clients (TORCHELASTIC_USE_AGENT_STORE=True).
//
// What it is not: a rendezvous agent or a scheduler. Membership (who is in, epochs) is decided by
// the islands through the store, not here; there are no health checks beyond "the process
// exited", and it starts nothing on other hosts (use ssh, Slurm, ... for that). It does not link
// LibTorch; it only sets the environment the processes read.
//
// Linux only: it relies on signalfd, execvpe, /proc/self/exe and PR_SET_PDEATHSIG.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "comm/net.h"

namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kUsage = "diloco-run -n N [OPTIONS] -- PROGRAM [ARGS...]";
constexpr int kMaxProcsPerNode = 1024;
constexpr int kMaxNodes = 65536;
constexpr int kMaxPort = 65535;
// Bounds the seconds options so that converting them to clock ticks cannot overflow.
constexpr double kMaxSeconds = 1e9;
constexpr double kDefaultKillAfterSeconds = 10.0;
constexpr const char* kDefaultMasterAddr = "127.0.0.1";
constexpr std::chrono::seconds kRepeatSignalGap{1};
// Restarts are bounded like every other loop here; a million is more than any run needs.
constexpr int kMaxRestarts = 1000000;
constexpr double kDefaultRestartDelaySeconds = 1.0;
constexpr double kMaxRestartDelaySeconds = 3600.0;
constexpr const char* kCoordinatorProgram = "diloco-coordinator";
// What diloco-coordinator prints once it listens; the ranks start only after this line.
constexpr std::string_view kCoordinatorReadyLine = "diloco-coordinator: serving the store at ";
// Serving a store takes milliseconds; this only bounds a coordinator that is stuck.
constexpr std::chrono::seconds kCoordinatorStartTimeout{30};

constexpr int kExitInternalError = 1;
constexpr int kExitUsage = 2;  // what getopt-style tools and torchrun's argparse use
constexpr int kExitTimeout = 124;  // coreutils' timeout(1) code, which scripts already test for
constexpr int kExitCannotExecute = 127;  // the shell's "command not found"

constexpr std::size_t kReadChunk = 64 * 1024;
// A child that never writes '\n' must not make the launcher buffer without bound; such a line is
// printed in pieces, and only its first piece gets the prefix.
constexpr std::size_t kMaxPendingLine = 1024 * 1024;
// After a child exits, a grandchild may still hold its pipe and keep writing; draining stops
// after this many chunks so the launcher cannot be kept from noticing the exit.
constexpr int kMaxDrainChunks = 256;

struct Options {
  int nproc_per_node = 0;
  int nnodes = 1;
  int node_rank = 0;
  std::string master_addr = kDefaultMasterAddr;
  int master_port = 0;  // 0 = not given
  double kill_after_s = kDefaultKillAfterSeconds;
  double timeout_s = 0.0;  // 0 = no timeout
  bool no_prefix = false;
  bool bind_cores = false;  // --bind-cores: local rank r runs on the r-th allowed CPU (mod count)
  bool elastic = false;  // --elastic, or implied by --max-restarts > 0 or --coordinator
  int max_restarts = 0;
  double restart_delay_s = kDefaultRestartDelaySeconds;
  std::string coordinator;       // --coordinator HOST:PORT as given; empty: elastic mode starts one
  std::string coordinator_host;  // parsed from it
  int coordinator_port = 0;
  std::vector<std::string> command;
};

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

std::system_error errno_error(const std::string& what) {
  return std::system_error(errno, std::generic_category(), what);
}

std::string signal_name(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  return abbrev != nullptr ? std::string("SIG") + abbrev : "signal " + std::to_string(sig);
}

std::string format_seconds(double seconds) {
  std::ostringstream out;
  out << seconds;
  return out.str();
}

Clock::duration to_duration(double seconds) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

// Writes everything or gives up silently: when the reader of our output has gone away (EPIPE),
// the job itself should keep running rather than die on a logging failure.
void write_all(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::write(fd, data.data(), data.size());
    if (n >= 0) {
      data.remove_prefix(static_cast<std::size_t>(n));
      continue;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      // Our stdout may be a non-blocking descriptor shared with someone else.
      pollfd pfd{fd, POLLOUT, 0};
      ::poll(&pfd, 1, -1);
      continue;
    }
    return;
  }
}

void log_message(const std::string& message) {
  write_all(STDERR_FILENO, "diloco-run: " + message + "\n");
}

// Children get fds 0-2 by dup2; if the launcher was started with one of them closed, a pipe could
// land on it and be clobbered, so make sure all three are taken first.
void ensure_standard_fds_open() {
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) == -1 && errno == EBADF) {
      const int null_fd = ::open("/dev/null", O_RDWR);
      if (null_fd >= 0 && null_fd != fd) ::close(null_fd);
    }
  }
}

std::vector<std::string> make_environment(
    const std::vector<std::pair<std::string, std::string>>& overrides) {
  std::vector<std::string> env;
  for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
    const std::string_view text(*entry);
    const std::string_view name = text.substr(0, text.find('='));
    const bool overridden = std::any_of(overrides.begin(), overrides.end(),
                                        [&](const auto& kv) { return kv.first == name; });
    if (!overridden) env.emplace_back(text);
  }
  for (const auto& [name, value] : overrides) env.push_back(name + "=" + value);
  return env;
}

std::vector<char*> to_c_array(std::vector<std::string>& strings) {
  std::vector<char*> pointers;
  pointers.reserve(strings.size() + 1);
  for (auto& s : strings) pointers.push_back(s.data());
  pointers.push_back(nullptr);
  return pointers;
}

// ---------------------------------------------------------------------------------------------
// Command line

class HelpFormatter : public CLI::Formatter {
 public:
  // CLI11 would print the description above the usage line; put `Usage:` first, as man pages and
  // every other launcher do.
  std::string make_description(const CLI::App*) const override { return {}; }
  std::string make_usage(const CLI::App* app, std::string) const override {
    return std::string("Usage: ") + kUsage + "\n\n" + app->get_description() + "\n";
  }
};

constexpr const char* kDescription =
    "Start N local processes of PROGRAM ARGS..., each with the torchrun environment that\n"
    "diloco's process group reads, and supervise them until all have exited. In elastic mode\n"
    "(--elastic, --max-restarts, --coordinator) a failed process stops nobody else and may be\n"
    "restarted.";

constexpr const char* kFooter =
    "Environment of each process (everything else is inherited):\n"
    "  MASTER_ADDR, MASTER_PORT  where the store is: rank 0's (default mode) or the\n"
    "                            coordinator's (elastic mode)\n"
    "  RANK                      node_rank * N + LOCAL_RANK\n"
    "  WORLD_SIZE                nnodes * N\n"
    "  LOCAL_RANK                0 .. N-1 on this host\n"
    "  LOCAL_WORLD_SIZE          N\n"
    "  GROUP_RANK                the node rank\n"
    "  elastic mode only:\n"
    "  TORCHELASTIC_USE_AGENT_STORE=True  join the coordinator's store as a client\n"
    "  DILOCO_ELASTIC=1\n"
    "  DILOCO_RESTART            0 on the first start, k on the k-th restart of this rank\n"
    "  stdin is /dev/null: the processes share no terminal input.\n"
    "\n"
    "Output: each line a process writes is printed as `[rank R] line`, stdout to stdout and\n"
    "stderr to stderr; an unfinished last line is printed when the process exits.\n"
    "--no-prefix lets the processes write to diloco-run's stdout/stderr directly. The\n"
    "coordinator's lines are always prefixed `[coordinator] `.\n"
    "\n"
    "Failures and signals (default mode): when a process exits non-zero or is killed by a\n"
    "signal, the others get SIGTERM, then SIGKILL after --kill-after seconds.\n"
    "Elastic mode: a failed process is started again after --restart-delay seconds, up to\n"
    "--max-restarts times per rank, with the same RANK; once out of restarts it stays down\n"
    "and the other ranks go on. A process that exits 0 is done. Unless --coordinator names\n"
    "one, diloco-run starts a diloco-coordinator (looked for next to diloco-run, then on\n"
    "PATH) on --master-port or a free port before the ranks, and stops it after the last one.\n"
    "Both modes: SIGINT, SIGTERM and SIGHUP sent to diloco-run are forwarded to every process\n"
    "(and its children), with the same SIGKILL deadline, and nothing is restarted; another\n"
    "such signal a second or more later kills them at once. Each process runs in its own\n"
    "process group and is killed if diloco-run itself dies.\n"
    "\n"
    "Exit status:\n"
    "  0        every process exited with 0 (elastic mode: every rank's last run did)\n"
    "  C        the first process to fail exited with C (128+S if killed by signal S);\n"
    "           elastic mode: the first rank to fail with no restarts left\n"
    "  1        the coordinator could not be started, or died during the run\n"
    "  124      --timeout expired\n"
    "  127      PROGRAM (or diloco-coordinator) could not be executed\n"
    "  128+S    diloco-run received signal S\n"
    "  2        invalid command line\n"
    "\n"
    "Examples:\n"
    "  One host, 4 processes (MASTER_PORT is picked automatically):\n"
    "    diloco-run -n 4 -- ./train --steps 1000\n"
    "\n"
    "  Two hosts with 8 processes each; run on both, 10.0.0.1 being host 0:\n"
    "    host0$ diloco-run -n 8 --nnodes 2 --node-rank 0 \\\n"
    "             --master-addr 10.0.0.1 --master-port 29500 -- ./train\n"
    "    host1$ diloco-run -n 8 --nnodes 2 --node-rank 1 \\\n"
    "             --master-addr 10.0.0.1 --master-port 29500 -- ./train\n"
    "\n"
    "  Elastic, one host, each process restarted up to 3 times:\n"
    "    diloco-run -n 4 --max-restarts 3 -- ./train\n"
    "\n"
    "  Elastic, two hosts, the coordinator on 10.0.0.1:\n"
    "    host0$ diloco-coordinator --port 29500 &\n"
    "    host0$ diloco-run -n 8 --nnodes 2 --node-rank 0 \\\n"
    "             --coordinator 10.0.0.1:29500 --max-restarts 3 -- ./train\n"
    "    host1$ diloco-run -n 8 --nnodes 2 --node-rank 1 \\\n"
    "             --coordinator 10.0.0.1:29500 --max-restarts 3 -- ./train\n";

void configure_command_line(CLI::App& app, Options& options) {
  app.name("diloco-run");
  app.description(kDescription);
  app.footer(kFooter);
  auto formatter = std::make_shared<HelpFormatter>();
  formatter->column_width(28);
  app.formatter(formatter);
  // Everything from PROGRAM on belongs to PROGRAM, even when the user leaves out `--`.
  app.prefix_command();

  app.add_option(
         "-n,--nproc-per-node", options.nproc_per_node,
         "Processes to start on this host, 1.." + std::to_string(kMaxProcsPerNode) + " (required)")
      ->option_text("N");
  app.add_option("--nnodes", options.nnodes,
                 "Hosts in the job, 1.." + std::to_string(kMaxNodes) + " (default 1)")
      ->option_text("M");
  app.add_option("--node-rank", options.node_rank, "Rank of this host, 0..nnodes-1 (default 0)")
      ->option_text("R");
  app.add_option("--master-addr", options.master_addr,
                 std::string("Address of rank 0's host; elastic: of the coordinator started "
                             "here (default ") +
                     kDefaultMasterAddr + ")")
      ->option_text("HOST");
  app.add_option("--master-port", options.master_port,
                 "Rendezvous port (elastic: the coordinator's), 1.." + std::to_string(kMaxPort) +
                     " (default: a free one; required if nnodes > 1)")
      ->option_text("PORT");
  app.add_option("--kill-after", options.kill_after_s,
                 "Seconds from SIGTERM to SIGKILL when stopping (default " +
                     format_seconds(kDefaultKillAfterSeconds) + ")")
      ->option_text("SECONDS");
  app.add_option("--timeout", options.timeout_s,
                 "Stop all and exit 124 after this many seconds (default 0 = never)")
      ->option_text("SECONDS");
  app.add_flag("--no-prefix", options.no_prefix, "Do not prefix output lines with `[rank R] `");
  app.add_flag("--bind-cores", options.bind_cores,
               "Pin local rank R to the R-th CPU this launcher may use (modulo their count), so "
               "that islands sharing a host each keep a core of their own");
  app.add_flag("--elastic", options.elastic,
               "Elastic mode: a failed process stops no other; ranks use a coordinator's store");
  app.add_option("--max-restarts", options.max_restarts,
                 "Restarts per rank in elastic mode, 0.." + std::to_string(kMaxRestarts) +
                     " (default 0; N > 0 implies --elastic)")
      ->option_text("N");
  app.add_option("--restart-delay", options.restart_delay_s,
                 "Seconds before a restart, 0.." +
                     std::to_string(static_cast<int>(kMaxRestartDelaySeconds)) + " (default " +
                     format_seconds(kDefaultRestartDelaySeconds) + ")")
      ->option_text("SECONDS");
  app.add_option("--coordinator", options.coordinator,
                 "Use the diloco-coordinator at HOST:PORT instead of starting one (implies "
                 "--elastic; required for elastic runs with nnodes > 1)")
      ->option_text("HOST:PORT");
}

std::vector<std::string> program_from(const CLI::App& app) {
  std::vector<std::string> rest = app.remaining();
  if (!rest.empty() && rest.front() == "--") {
    rest.erase(rest.begin());
  } else if (!rest.empty() && rest.front().size() > 1 && rest.front()[0] == '-') {
    // In prefix mode CLI11 hands unknown options over as if they began the program.
    throw UsageError("unknown option '" + rest.front() + "'");
  }
  if (rest.empty()) throw UsageError("missing PROGRAM after '--'");
  return rest;
}

void check_seconds(const char* option, double value, const char* zero_means) {
  if (!std::isfinite(value) || value < 0 || value > kMaxSeconds) {
    throw UsageError(std::string(option) + " must be in 0.." +
                     std::to_string(static_cast<long long>(kMaxSeconds)) + " seconds" + zero_means +
                     ", got " + format_seconds(value));
  }
}

// HOST:PORT; an IPv6 host goes in brackets ([::1]:29500), as in URLs.
void parse_coordinator(Options& options) {
  const std::string& text = options.coordinator;
  const std::string expected = "--coordinator must be HOST:PORT with PORT in 1.." +
                               std::to_string(kMaxPort) + ", got '" + text + "'";
  const std::size_t colon = text.rfind(':');
  if (colon == std::string::npos) throw UsageError(expected);
  std::string host = text.substr(0, colon);
  const std::string port = text.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  const bool digits =
      !port.empty() && port.size() <= 5 &&
      std::all_of(port.begin(), port.end(), [](unsigned char c) { return std::isdigit(c) != 0; });
  if (host.empty() || !digits) throw UsageError(expected);
  const int number = std::stoi(port);
  if (number < 1 || number > kMaxPort) throw UsageError(expected);
  options.coordinator_host = host;
  options.coordinator_port = number;
}

// Also settles what the options imply (elastic mode), so that the rest reads one flag.
void validate(Options& options, const CLI::App& app) {
  if (app.count("--nproc-per-node") == 0) {
    throw UsageError("-n/--nproc-per-node is required (1.." + std::to_string(kMaxProcsPerNode) +
                     ")");
  }
  if (options.nproc_per_node < 1 || options.nproc_per_node > kMaxProcsPerNode) {
    throw UsageError("-n/--nproc-per-node must be in 1.." + std::to_string(kMaxProcsPerNode) +
                     ", got " + std::to_string(options.nproc_per_node));
  }
  if (options.nnodes < 1 || options.nnodes > kMaxNodes) {
    throw UsageError("--nnodes must be in 1.." + std::to_string(kMaxNodes) + ", got " +
                     std::to_string(options.nnodes));
  }
  if (options.node_rank < 0 || options.node_rank >= options.nnodes) {
    throw UsageError("--node-rank must be in 0..nnodes-1 = 0.." +
                     std::to_string(options.nnodes - 1) + ", got " +
                     std::to_string(options.node_rank));
  }
  if (options.master_addr.empty()) throw UsageError("--master-addr must not be empty");
  if (app.count("--master-port") > 0 &&
      (options.master_port < 1 || options.master_port > kMaxPort)) {
    throw UsageError("--master-port must be in 1.." + std::to_string(kMaxPort) + ", got " +
                     std::to_string(options.master_port));
  }
  if (options.max_restarts < 0 || options.max_restarts > kMaxRestarts) {
    throw UsageError("--max-restarts must be in 0.." + std::to_string(kMaxRestarts) + ", got " +
                     std::to_string(options.max_restarts));
  }
  if (!std::isfinite(options.restart_delay_s) || options.restart_delay_s < 0 ||
      options.restart_delay_s > kMaxRestartDelaySeconds) {
    throw UsageError("--restart-delay must be in 0.." +
                     std::to_string(static_cast<int>(kMaxRestartDelaySeconds)) + " seconds, got " +
                     format_seconds(options.restart_delay_s));
  }
  if (app.count("--coordinator") > 0) {
    // The coordinator's address is MASTER_ADDR/MASTER_PORT; two answers would be one too many.
    if (app.count("--master-addr") > 0 || app.count("--master-port") > 0) {
      throw UsageError(
          "--coordinator HOST:PORT replaces --master-addr/--master-port; give one "
          "or the other");
    }
    parse_coordinator(options);
  }
  options.elastic = options.elastic || options.max_restarts > 0 || app.count("--coordinator") > 0;
  if (options.nnodes > 1) {
    // A coordinator started by one host's diloco-run would stop with that host's ranks, and the
    // other hosts' islands would lose their store.
    if (options.elastic && options.coordinator.empty()) {
      throw UsageError(
          "elastic runs with --nnodes > 1 need --coordinator HOST:PORT of a "
          "diloco-coordinator started on its own (diloco-coordinator --port P)");
    }
    // Each host would pick a different free port and the rendezvous could never meet.
    if (!options.elastic && app.count("--master-port") == 0) {
      throw UsageError(
          "--master-port is required when --nnodes > 1 (every host must use the same port)");
    }
  }
  check_seconds("--kill-after", options.kill_after_s, "");
  check_seconds("--timeout", options.timeout_s, " (0 = no timeout)");
}

void report_usage_error(const std::string& message) {
  log_message(message);
  write_all(STDERR_FILENO, std::string("Usage: ") + kUsage + "  (diloco-run --help for details)\n");
}

// ---------------------------------------------------------------------------------------------
// Supervision

struct OutputStream {
  int fd = -1;            // read end of the child's pipe; -1 when closed or not prefixing
  int target_fd = -1;     // where the prefixed lines go
  std::string pending;    // the current line, not yet ended by '\n'
  bool mid_line = false;  // the start of the current line (and its prefix) is already printed
};

// A rank, or the coordinator (is_coordinator; its rank fields unused).
struct Child {
  int rank = 0;
  int local_rank = 0;
  bool is_coordinator = false;
  std::string prefix;  // "[rank R] " or "[coordinator] "
  pid_t pid = -1;
  bool running = false;
  int restarts = 0;  // restarts used so far; the current run's DILOCO_RESTART
  std::optional<Clock::time_point> restart_at;  // a restart is due then (elastic mode)
  OutputStream out;
  OutputStream err;
};

// The child's whole process group (it may have started processes of its own), or the child alone
// if the group is not there yet. Only for unreaped children: until reaped, a child keeps its pid,
// and so its group id, so neither can have been reused.
void signal_child(const Child& child, int sig) {
  if (::kill(-child.pid, sig) != 0) ::kill(child.pid, sig);
}

// What a wait status means, for the logs, and the exit code diloco-run reports for it.
struct ExitReport {
  int code = 0;  // 128+S for signal S
  std::string how;
};

ExitReport describe_exit(int status) {
  if (WIFEXITED(status)) {
    const int code = WEXITSTATUS(status);
    return {code, "exited with code " + std::to_string(code)};
  }
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    return {128 + sig, "killed by signal " + std::to_string(sig) + " (" + signal_name(sig) + ")"};
  }
  return {};
}

// Next to diloco-run first (the build tree, an install's bin/), so that a launcher uses the
// coordinator built with it; then execvpe searches PATH.
std::string coordinator_program() {
  std::vector<char> self(PATH_MAX + 1);
  const ssize_t n = ::readlink("/proc/self/exe", self.data(), self.size() - 1);
  if (n > 0) {
    const std::string exe(self.data(), static_cast<std::size_t>(n));
    const std::string beside = exe.substr(0, exe.rfind('/') + 1) + kCoordinatorProgram;
    if (::access(beside.c_str(), X_OK) == 0) return beside;
  }
  return kCoordinatorProgram;
}

class Launcher {
 public:
  explicit Launcher(Options options);
  ~Launcher();
  Launcher(const Launcher&) = delete;
  Launcher& operator=(const Launcher&) = delete;

  // Starts the processes and returns diloco-run's exit code once all of them are gone.
  int run();

 private:
  void install_signal_handling();
  void start_coordinator();
  void stop_coordinator();
  void start_children();
  std::vector<std::string> rank_environment(const Child& child) const;
  // Returns 0, or the errno of a failed exec.
  int spawn(Child& child, const std::vector<std::string>& args, std::vector<std::string> env,
            bool pipe_output);
  void poll_once();
  int poll_timeout_ms() const;
  void handle_signals();
  void on_interrupt(int sig);
  void reap_children();
  void on_child_exit(Child& child, int status);
  void on_elastic_exit(Child& child, const ExitReport& report);
  void on_coordinator_exit(int status);
  void start_due_restarts();
  void enforce_deadlines();
  void stop_all(int sig);
  void signal_running(int sig);
  bool any_running() const;
  bool restart_pending() const;
  std::vector<Child*> all_children();  // the ranks, then the coordinator if there is one
  std::string running_ranks() const;

  void read_once(const Child& child, OutputStream& stream);
  void drain(const Child& child, OutputStream& stream);
  void emit(const Child& child, OutputStream& stream, const char* data, std::size_t size);
  void close_stream(const Child& child, OutputStream& stream);

  Options options_;
  std::vector<int> allowed_cpus_;  // --bind-cores: the CPUs this launcher may use, in order
  std::vector<Child> children_;
  std::optional<Child> coordinator_;   // the one diloco-run started (elastic, no --coordinator)
  bool coordinator_ready_ = false;     // it printed kCoordinatorReadyLine
  bool coordinator_stopping_ = false;  // its exit is our doing
  // While starting: give up waiting for the ready line; while stopping: send SIGKILL.
  std::optional<Clock::time_point> coordinator_deadline_;
  std::vector<char> buffer_;
  std::string master_addr_;
  int master_port_ = 0;
  int signal_fd_ = -1;
  int null_fd_ = -1;
  sigset_t original_mask_{};
  struct sigaction inherited_sigpipe_ {};
  struct sigaction inherited_sigchld_ {};
  // Set by the first event that ends the run (a failed process, a signal, the timeout); later
  // exits are usually our own doing and must not override it.
  std::optional<int> exit_code_;
  // Set with exit_code_ when the whole job is being stopped: nothing is restarted any more.
  bool stopping_ = false;
  // Elastic mode: the first rank that failed with no restarts left, and its exit code.
  std::optional<std::pair<int, int>> first_final_failure_;
  std::optional<Clock::time_point> first_interrupt_at_;
  std::optional<Clock::time_point> timeout_at_;
  std::optional<Clock::time_point> kill_at_;
};

Launcher::Launcher(Options options) : options_(std::move(options)), buffer_(kReadChunk) {
  if (!options_.coordinator.empty()) {
    master_addr_ = options_.coordinator_host;
    master_port_ = options_.coordinator_port;
  } else {
    master_addr_ = options_.master_addr;
    master_port_ = options_.master_port > 0 ? options_.master_port : diloco::net::free_local_port();
  }
  null_fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (null_fd_ < 0) throw errno_error("open /dev/null");
  if (options_.bind_cores) {
    cpu_set_t mask;
    CPU_ZERO(&mask);
    if (::sched_getaffinity(0, sizeof mask, &mask) != 0) throw errno_error("sched_getaffinity");
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &mask)) allowed_cpus_.push_back(c);
    }
  }
  install_signal_handling();
}

Launcher::~Launcher() {
  const std::vector<Child*> all = all_children();
  // Only reached with processes still running when run() threw; never leave them orphaned.
  for (Child* child : all) {
    if (!child->running) continue;
    signal_child(*child, SIGKILL);
    int status = 0;
    while (::waitpid(child->pid, &status, 0) < 0 && errno == EINTR) {
    }
  }
  for (Child* child : all) {
    for (OutputStream* s : {&child->out, &child->err}) {
      if (s->fd >= 0) ::close(s->fd);
    }
  }
  if (signal_fd_ >= 0) ::close(signal_fd_);
  if (null_fd_ >= 0) ::close(null_fd_);
}

void Launcher::install_signal_handling() {
  sigset_t watched;
  sigemptyset(&watched);
  sigaddset(&watched, SIGCHLD);
  // A signal we were started with ignored (nohup, a background job of a script) stays ignored, as
  // whoever started us intended; the children inherit that too.
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction current {};
    if (::sigaction(sig, nullptr, &current) == 0 && current.sa_handler != SIG_IGN) {
      sigaddset(&watched, sig);
    }
  }
  // An inherited SIG_IGN for SIGCHLD would make the kernel reap the children behind our back.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  ::sigaction(SIGCHLD, &dfl, &inherited_sigchld_);
  // A closed stdout must not kill the launcher and orphan the job; write_all sees EPIPE instead.
  struct sigaction ign {};
  ign.sa_handler = SIG_IGN;
  sigemptyset(&ign.sa_mask);
  ::sigaction(SIGPIPE, &ign, &inherited_sigpipe_);

  // Blocking first means a signal that arrives while children start waits in the signalfd.
  if (::sigprocmask(SIG_BLOCK, &watched, &original_mask_) != 0) throw errno_error("sigprocmask");
  signal_fd_ = ::signalfd(-1, &watched, SFD_NONBLOCK | SFD_CLOEXEC);
  if (signal_fd_ < 0) throw errno_error("signalfd");
}

int Launcher::run() {
  // Set first: --timeout bounds the whole job, the coordinator's start included.
  if (options_.timeout_s > 0) timeout_at_ = Clock::now() + to_duration(options_.timeout_s);
  if (options_.elastic && options_.coordinator.empty()) start_coordinator();
  if (!stopping_) start_children();
  while (any_running() || restart_pending()) {
    poll_once();
    // SIGCHLDs coalesce, so reap on every wake-up rather than once per signal.
    reap_children();
    enforce_deadlines();
    start_due_restarts();
  }
  stop_coordinator();
  if (exit_code_) return *exit_code_;
  if (first_final_failure_) {
    const auto [rank, code] = *first_final_failure_;
    log_message("exiting with code " + std::to_string(code) + " of rank " + std::to_string(rank) +
                ", the first rank that failed with no restarts left");
    return code;
  }
  return 0;
}

void Launcher::start_coordinator() {
  coordinator_.emplace();
  Child& coordinator = *coordinator_;
  coordinator.is_coordinator = true;
  coordinator.prefix = "[coordinator] ";
  const std::string program = coordinator_program();
  const std::string where = master_addr_ + ":" + std::to_string(master_port_);
  // Its output is always piped, even with --no-prefix: that is how we learn that it listens.
  const int exec_errno =
      spawn(coordinator, {program, "--port", std::to_string(master_port_), "--host", master_addr_},
            make_environment({}), /*pipe_output=*/true);
  if (exec_errno != 0) {
    log_message("cannot execute the coordinator '" + program + "' (looked next to diloco-run, " +
                "then on PATH): " + std::strerror(exec_errno));
    exit_code_ = kExitCannotExecute;
    stopping_ = true;
    return;
  }
  coordinator_deadline_ = Clock::now() + kCoordinatorStartTimeout;
  // Ends on the ready line, the coordinator's exit (on_coordinator_exit reports it), a signal or
  // --timeout (both set exit_code_), or the deadline.
  while (!coordinator_ready_ && coordinator.running && !exit_code_) {
    if (Clock::now() >= *coordinator_deadline_) {
      log_message("the coordinator did not report serving the store at " + where + " within " +
                  std::to_string(kCoordinatorStartTimeout.count()) + " s; stopping it");
      exit_code_ = kExitInternalError;
      stopping_ = true;
      break;
    }
    poll_once();
    reap_children();
    enforce_deadlines();
  }
  coordinator_deadline_.reset();
}

void Launcher::stop_coordinator() {
  if (!coordinator_ || !coordinator_->running) return;
  Child& coordinator = *coordinator_;
  coordinator_stopping_ = true;
  // The ranks are gone; what is left is bounded by --kill-after, and the ranks' deadlines must
  // not make poll_once spin.
  timeout_at_.reset();
  kill_at_.reset();
  signal_child(coordinator, SIGTERM);
  coordinator_deadline_ = Clock::now() + to_duration(options_.kill_after_s);
  while (coordinator.running) {
    poll_once();
    reap_children();
    if (coordinator_deadline_ && Clock::now() >= *coordinator_deadline_) {
      coordinator_deadline_.reset();
      log_message("the coordinator is still running " + format_seconds(options_.kill_after_s) +
                  " s after SIGTERM, sending SIGKILL");
      signal_child(coordinator, SIGKILL);
    }
  }
}

std::vector<std::string> Launcher::rank_environment(const Child& child) const {
  const int nproc = options_.nproc_per_node;
  std::vector<std::pair<std::string, std::string>> vars = {
      {"MASTER_ADDR", master_addr_},
      {"MASTER_PORT", std::to_string(master_port_)},
      {"RANK", std::to_string(child.rank)},
      {"WORLD_SIZE", std::to_string(options_.nnodes * nproc)},
      {"LOCAL_RANK", std::to_string(child.local_rank)},
      {"LOCAL_WORLD_SIZE", std::to_string(nproc)},
      {"GROUP_RANK", std::to_string(options_.node_rank)},
  };
  if (options_.elastic) {
    // torchrun's name for "a store is already served; connect to it as a client".
    vars.emplace_back("TORCHELASTIC_USE_AGENT_STORE", "True");
    vars.emplace_back("DILOCO_ELASTIC", "1");
    vars.emplace_back("DILOCO_RESTART", std::to_string(child.restarts));
  }
  return make_environment(vars);
}

void Launcher::start_children() {
  const int nproc = options_.nproc_per_node;
  children_.resize(static_cast<std::size_t>(nproc));
  for (int local = 0; local < nproc; ++local) {
    Child& child = children_[static_cast<std::size_t>(local)];
    child.local_rank = local;
    child.rank = options_.node_rank * nproc + local;
    child.prefix = "[rank " + std::to_string(child.rank) + "] ";
    const int exec_errno =
        spawn(child, options_.command, rank_environment(child), !options_.no_prefix);
    if (exec_errno != 0) {
      log_message("cannot execute '" + options_.command.front() +
                  "': " + std::strerror(exec_errno));
      exit_code_ = kExitCannotExecute;
      stop_all(SIGTERM);  // the ranks already started would wait forever for this one
      return;
    }
  }
}

void Launcher::start_due_restarts() {
  const auto now = Clock::now();
  for (Child& child : children_) {
    if (!child.restart_at || now < *child.restart_at) continue;
    child.restart_at.reset();
    // The first line of each restart, so that the `[rank R]` lines after it can be told apart.
    log_message("rank " + std::to_string(child.rank) + ": restart " +
                std::to_string(child.restarts) + " of " + std::to_string(options_.max_restarts) +
                " (DILOCO_RESTART=" + std::to_string(child.restarts) + ")");
    const int exec_errno =
        spawn(child, options_.command, rank_environment(child), !options_.no_prefix);
    if (exec_errno != 0) {
      // Another try would fail the same way.
      log_message("cannot execute '" + options_.command.front() +
                  "': " + std::strerror(exec_errno) + "; rank " + std::to_string(child.rank) +
                  " stays down, the other ranks go on");
      if (!first_final_failure_) first_final_failure_ = {child.rank, kExitCannotExecute};
    }
  }
}

int Launcher::spawn(Child& child, const std::vector<std::string>& args_in,
                    std::vector<std::string> env, bool pipe_output) {
  int out_pipe[2] = {-1, -1};
  int err_pipe[2] = {-1, -1};
  int exec_pipe[2] = {-1, -1};
  const bool prefix = pipe_output;
  // O_CLOEXEC everywhere: no child may hold another child's pipe, or EOF would never come.
  if (prefix && (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0)) {
    throw errno_error("pipe");
  }
  // A successful exec closes the write end (O_CLOEXEC), so EOF on it means "exec worked".
  if (::pipe2(exec_pipe, O_CLOEXEC) != 0) throw errno_error("pipe");

  std::vector<std::string> args = args_in;
  std::vector<char*> argv = to_c_array(args);
  std::vector<char*> envp = to_c_array(env);
  const pid_t parent = ::getpid();
  // --bind-cores: the child's CPU, chosen before the fork (only syscalls after it).
  cpu_set_t cpu;
  CPU_ZERO(&cpu);
  const bool bind = options_.bind_cores && !child.is_coordinator && !allowed_cpus_.empty();
  if (bind) {
    CPU_SET(allowed_cpus_[static_cast<std::size_t>(child.local_rank) % allowed_cpus_.size()], &cpu);
  }

  const pid_t pid = ::fork();
  if (pid < 0) throw errno_error("fork");
  if (pid == 0) {
    // Only async-signal-safe calls from here to exec.
    // Own process group: terminal Ctrl-C reaches the child once (through us, not also directly),
    // and a group signal also reaches whatever the child started itself.
    ::setpgid(0, 0);
    // If diloco-run is SIGKILLed it cannot forward anything; do not leave ranks holding GPUs.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(kExitInternalError);
    ::sigaction(SIGPIPE, &inherited_sigpipe_, nullptr);
    ::sigaction(SIGCHLD, &inherited_sigchld_, nullptr);
    ::sigprocmask(SIG_SETMASK, &original_mask_, nullptr);
    int ok = ::dup2(null_fd_, STDIN_FILENO) >= 0;
    if (bind) ::sched_setaffinity(0, sizeof cpu, &cpu);  // a CPU of our own mask: cannot fail
    if (prefix) {
      ok = ok && ::dup2(out_pipe[1], STDOUT_FILENO) >= 0 && ::dup2(err_pipe[1], STDERR_FILENO) >= 0;
    }
    if (ok) ::execvpe(argv[0], argv.data(), envp.data());
    const int error = errno;
    ssize_t ignored = ::write(exec_pipe[1], &error, sizeof(error));
    (void)ignored;
    ::_exit(kExitCannotExecute);
  }

  // Also from the parent, so that a signal sent before the child ran setpgid still finds the group.
  ::setpgid(pid, pid);
  child.pid = pid;
  child.running = true;
  if (prefix) {
    ::close(out_pipe[1]);
    ::close(err_pipe[1]);
    child.out.fd = out_pipe[0];
    child.out.target_fd = STDOUT_FILENO;
    child.err.fd = err_pipe[0];
    child.err.target_fd = STDERR_FILENO;
    for (int fd : {child.out.fd, child.err.fd}) {
      ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    }
  }
  ::close(exec_pipe[1]);
  int exec_errno = 0;
  ssize_t n = 0;
  do {
    n = ::read(exec_pipe[0], &exec_errno, sizeof(exec_errno));
  } while (n < 0 && errno == EINTR);
  ::close(exec_pipe[0]);
  if (n != static_cast<ssize_t>(sizeof(exec_errno))) return 0;

  // Reaped here so that the generic "rank R exited with code 127" report does not follow the
  // more useful "cannot execute" one.
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  child.running = false;
  close_stream(child, child.out);
  close_stream(child, child.err);
  return exec_errno != 0 ? exec_errno : ENOEXEC;
}

void Launcher::poll_once() {
  std::vector<pollfd> fds;
  std::vector<std::pair<Child*, OutputStream*>> sources;
  fds.push_back({signal_fd_, POLLIN, 0});
  sources.emplace_back(nullptr, nullptr);
  const std::vector<Child*> all = all_children();
  for (Child* child : all) {
    for (OutputStream* stream : {&child->out, &child->err}) {
      if (stream->fd < 0) continue;
      fds.push_back({stream->fd, POLLIN, 0});
      sources.emplace_back(child, stream);
    }
  }
  if (::poll(fds.data(), fds.size(), poll_timeout_ms()) < 0) {
    if (errno == EINTR) return;
    throw errno_error("poll");
  }
  // One read per ready stream per round: a child that writes without pause cannot starve the
  // others or delay signal handling.
  for (std::size_t i = 1; i < fds.size(); ++i) {
    if (fds[i].revents != 0) read_once(*sources[i].first, *sources[i].second);
  }
  if (fds[0].revents != 0) handle_signals();
}

int Launcher::poll_timeout_ms() const {
  std::optional<Clock::time_point> next;
  std::vector<std::optional<Clock::time_point>> deadlines = {timeout_at_, kill_at_,
                                                             coordinator_deadline_};
  for (const Child& child : children_) deadlines.push_back(child.restart_at);
  for (const auto& deadline : deadlines) {
    if (deadline && (!next || *deadline < *next)) next = deadline;
  }
  if (!next) return -1;
  const auto left = *next - Clock::now();
  if (left <= Clock::duration::zero()) return 0;
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
  return static_cast<int>(std::min<long long>(ms, INT_MAX));
}

void Launcher::handle_signals() {
  signalfd_siginfo info{};
  while (::read(signal_fd_, &info, sizeof(info)) == static_cast<ssize_t>(sizeof(info))) {
    if (info.ssi_signo != SIGCHLD) on_interrupt(static_cast<int>(info.ssi_signo));
  }
}

void Launcher::on_interrupt(int sig) {
  const auto now = Clock::now();
  if (first_interrupt_at_) {
    // Wrappers often deliver one request twice (timeout(1) signals our pid and then its whole
    // process group); only a later signal means "the graceful stop is taking too long".
    if (now - *first_interrupt_at_ < kRepeatSignalGap) return;
    log_message("received " + signal_name(sig) + " again, killing all ranks");
    signal_running(SIGKILL);
    if (coordinator_stopping_ && coordinator_->running) signal_child(*coordinator_, SIGKILL);
    return;
  }
  first_interrupt_at_ = now;
  if (!exit_code_) exit_code_ = 128 + sig;
  log_message("received " + signal_name(sig) + ", forwarding it to all ranks (SIGKILL after " +
              format_seconds(options_.kill_after_s) + " s)");
  stop_all(sig);
}

void Launcher::reap_children() {
  for (;;) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid < 0 && errno == EINTR) continue;
    if (pid <= 0) return;
    if (coordinator_ && coordinator_->running && coordinator_->pid == pid) {
      on_coordinator_exit(status);
      continue;
    }
    for (Child& child : children_) {
      if (child.pid == pid && child.running) {
        on_child_exit(child, status);
        break;
      }
    }
  }
}

void Launcher::on_child_exit(Child& child, int status) {
  // Print what the child wrote before dying ahead of the report of its death.
  drain(child, child.out);
  drain(child, child.err);
  child.running = false;

  const ExitReport report = describe_exit(status);
  if (options_.elastic) {
    on_elastic_exit(child, report);
    return;
  }
  const int code = report.code;
  const std::string& how = report.how;
  if (code == 0 || exit_code_) return;

  exit_code_ = code;
  const bool others = any_running();
  log_message("rank " + std::to_string(child.rank) + " " + how +
              (others ? " (stopping the other ranks)" : ""));
  // The survivors would block in their next collective until Gloo's timeout.
  if (others) stop_all(SIGTERM);
}

void Launcher::on_elastic_exit(Child& child, const ExitReport& report) {
  // A rank that exits 0 is done; after a signal or --timeout the exits are our own doing.
  if (report.code == 0 || stopping_) return;
  const std::string who = "rank " + std::to_string(child.rank) + " " + report.how;
  if (child.restarts < options_.max_restarts) {
    ++child.restarts;
    child.restart_at = Clock::now() + to_duration(options_.restart_delay_s);
    log_message(who + "; restarting it (restart " + std::to_string(child.restarts) + " of " +
                std::to_string(options_.max_restarts) + ") in " +
                format_seconds(options_.restart_delay_s) + " s");
    return;
  }
  const bool others = any_running() || restart_pending();
  log_message(who + "; " +
              (options_.max_restarts == 0
                   ? std::string("not restarted (--max-restarts 0)")
                   : "no restarts left (" + std::to_string(child.restarts) + " used)") +
              (others ? ", the other ranks go on" : ""));
  if (!first_final_failure_) first_final_failure_ = {child.rank, report.code};
}

void Launcher::on_coordinator_exit(int status) {
  Child& coordinator = *coordinator_;
  drain(coordinator, coordinator.out);
  drain(coordinator, coordinator.err);
  coordinator.running = false;
  if (coordinator_stopping_) return;
  const ExitReport report = describe_exit(status);
  const std::string where = master_addr_ + ":" + std::to_string(master_port_);
  if (!coordinator_ready_) {
    log_message("the coordinator " + report.how + " before it served the store at " + where +
                " (its lines above start with [coordinator])");
  } else {
    // The islands' membership lives in its store; without it no island can go on or rejoin.
    log_message(
        "the coordinator " + report.how + " during the run" +
        (any_running() ? "; stopping the ranks, which cannot go on without its store" : ""));
  }
  if (!exit_code_) exit_code_ = kExitInternalError;
  stop_all(SIGTERM);
}

void Launcher::enforce_deadlines() {
  const auto now = Clock::now();
  if (timeout_at_ && now >= *timeout_at_) {
    timeout_at_.reset();
    if (!exit_code_) {
      exit_code_ = kExitTimeout;
      log_message("timed out after " + format_seconds(options_.timeout_s) +
                  " s (--timeout), stopping all ranks");
      stop_all(SIGTERM);
    }
  }
  if (kill_at_ && now >= *kill_at_ && any_running()) {
    kill_at_.reset();
    log_message("rank(s) " + running_ranks() + " still running " +
                format_seconds(options_.kill_after_s) +
                " s after being signalled, sending SIGKILL");
    signal_running(SIGKILL);
  }
}

void Launcher::stop_all(int sig) {
  stopping_ = true;
  for (Child& child : children_) child.restart_at.reset();
  signal_running(sig);
  if (!kill_at_) kill_at_ = Clock::now() + to_duration(options_.kill_after_s);
}

void Launcher::signal_running(int sig) {
  for (const Child& child : children_) {
    if (child.running) signal_child(child, sig);
  }
}

bool Launcher::any_running() const {
  return std::any_of(children_.begin(), children_.end(), [](const Child& c) { return c.running; });
}

std::vector<Child*> Launcher::all_children() {
  std::vector<Child*> all;
  for (Child& child : children_) all.push_back(&child);
  if (coordinator_) all.push_back(&*coordinator_);
  return all;
}

bool Launcher::restart_pending() const {
  return std::any_of(children_.begin(), children_.end(),
                     [](const Child& c) { return c.restart_at.has_value(); });
}

std::string Launcher::running_ranks() const {
  std::string ranks;
  for (const Child& child : children_) {
    if (!child.running) continue;
    if (!ranks.empty()) ranks += ",";
    ranks += std::to_string(child.rank);
  }
  return ranks;
}

void Launcher::read_once(const Child& child, OutputStream& stream) {
  const ssize_t n = ::read(stream.fd, buffer_.data(), buffer_.size());
  if (n > 0) {
    emit(child, stream, buffer_.data(), static_cast<std::size_t>(n));
  } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
    close_stream(child, stream);
  }
}

void Launcher::drain(const Child& child, OutputStream& stream) {
  for (int i = 0; i < kMaxDrainChunks && stream.fd >= 0; ++i) {
    const ssize_t n = ::read(stream.fd, buffer_.data(), buffer_.size());
    if (n > 0) {
      emit(child, stream, buffer_.data(), static_cast<std::size_t>(n));
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      break;
    }
  }
  close_stream(child, stream);
}

void Launcher::emit(const Child& child, OutputStream& stream, const char* data, std::size_t size) {
  const std::string& prefix = child.prefix;
  std::string out;
  std::size_t start = 0;
  for (std::size_t i = 0; i < size; ++i) {
    if (data[i] != '\n') continue;
    if (child.is_coordinator && &stream == &child.out && !coordinator_ready_) {
      const std::string line = stream.pending + std::string(data + start, i - start);
      coordinator_ready_ =
          line.compare(0, kCoordinatorReadyLine.size(), kCoordinatorReadyLine) == 0;
    }
    if (!stream.mid_line) out += prefix;
    out += stream.pending;
    out.append(data + start, i + 1 - start);
    stream.pending.clear();
    stream.mid_line = false;
    start = i + 1;
  }
  stream.pending.append(data + start, size - start);
  if (stream.pending.size() > kMaxPendingLine) {
    if (!stream.mid_line) out += prefix;
    out += stream.pending;
    stream.pending.clear();
    stream.mid_line = true;
  }
  // One write per chunk: whole lines from different ranks then never interleave mid-line.
  write_all(stream.target_fd, out);
}

void Launcher::close_stream(const Child& child, OutputStream& stream) {
  if (stream.fd < 0) return;
  ::close(stream.fd);
  stream.fd = -1;
  if (stream.pending.empty() && !stream.mid_line) return;
  // End the unfinished line so the next rank's line starts on a line of its own.
  std::string out = stream.mid_line ? std::string() : child.prefix;
  out += stream.pending;
  out += '\n';
  stream.pending.clear();
  stream.mid_line = false;
  write_all(stream.target_fd, out);
}

}  // namespace

int main(int argc, char** argv) {
  ensure_standard_fds_open();
  Options options;
  CLI::App app;
  configure_command_line(app, options);
  try {
    app.parse(argc, argv);
    validate(options, app);
    options.command = program_from(app);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    report_usage_error(e.what());
    return kExitUsage;
  } catch (const UsageError& e) {
    report_usage_error(e.what());
    return kExitUsage;
  }
  try {
    Launcher launcher(std::move(options));
    return launcher.run();
  } catch (const std::exception& e) {
    log_message(std::string("error: ") + e.what());
    return kExitInternalError;
  }
}
