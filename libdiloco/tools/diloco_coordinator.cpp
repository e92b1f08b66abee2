// diloco-coordinator: the c10d TCPStore of an elastic run, served by a process that trains nothing.
//
// What it is: the islands' membership protocol keeps all its state (epochs, joins, heartbeats) in
// one TCPStore that must outlive every island, so no island can serve it. One coordinator per run:
// `diloco-coordinator --port P` serves the store and waits for SIGINT/SIGTERM; the islands connect
// as store clients (MASTER_ADDR/MASTER_PORT pointing here, TORCHELASTIC_USE_AGENT_STORE=True).
// diloco-run --elastic starts one by itself on a single host; for several hosts start it on one of
// them and run `diloco-run --coordinator THAT_HOST:P --nnodes M --node-rank R ...` on every host.
//
// What it is not: a rendezvous agent or a supervisor. It decides nothing and starts nothing; the
// protocol lives in the islands (the
// library). It prints one line to stdout once it
// listens: `diloco-coordinator: serving the store at HOST:PORT`.

#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "comm/c10d_compat.h"

namespace {

constexpr int kMaxPort = 65535;
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;  // as diloco-run
// Bounds the server's connection to itself (c10d's server process is also a client of its store).
constexpr std::chrono::milliseconds kSelfConnectTimeout{30000};

std::string first_line(const std::string& text) {
  return text.substr(0, text.find('\n'));
}

int fail(int code, const std::string& message) {
  std::cerr << "diloco-coordinator: " << message << std::endl;
  return code;
}

// temp file + rename, so that a script polling for PATH never reads a half-written port.
void write_ready_file(const std::string& path, int port) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << port << '\n';
    out.close();
    if (!out)
      throw std::runtime_error("cannot write --ready-file '" + tmp + "': " + std::strerror(errno));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int error = errno;
    std::remove(tmp.c_str());
    throw std::runtime_error("cannot rename '" + tmp + "' to --ready-file '" + path +
                             "': " + std::strerror(error));
  }
}

}  // namespace

int main(int argc, char** argv) {
  int port = 0;
  std::string host = "0.0.0.0";
  std::string ready_file;
  CLI::App app("Serve the c10d TCPStore of an elastic diloco run until SIGINT/SIGTERM.",
               "diloco-coordinator");
  app.footer(
      "Prints `diloco-coordinator: serving the store at HOST:PORT` once listening; exits 0 on\n"
      "SIGINT/SIGTERM, 1 if the store cannot be served (port in use), 2 on a bad command line.\n"
      "Example, islands on two hosts:\n"
      "  host0$ diloco-coordinator --port 29500 &\n"
      "  hostN$ diloco-run -n 4 --nnodes 2 --node-rank N --coordinator host0:29500 -- ./train");
  app.add_option("--port", port,
                 "Port to serve the store on, 1.." + std::to_string(kMaxPort) + " (required)")
      ->option_text("PORT");
  app.add_option("--host", host,
                 "Address the server connects to itself by and reports (default 0.0.0.0; "
                 "c10d's store listens on every interface)")
      ->option_text("ADDR");
  app.add_option("--ready-file", ready_file,
                 "Write the port to this file (atomically) once the store is listening")
      ->option_text("PATH");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    return fail(kExitUsage, std::string(e.what()) + " (diloco-coordinator --help for details)");
  }
  if (app.count("--port") == 0) {
    return fail(kExitUsage, "--port is required (1.." + std::to_string(kMaxPort) + ")");
  }
  if (port < 1 || port > kMaxPort) {
    return fail(kExitUsage, "--port must be in 1.." + std::to_string(kMaxPort) + ", got " +
                                std::to_string(port));
  }
  if (host.empty()) return fail(kExitUsage, "--host must not be empty");

  // Blocked before the store starts its threads, which inherit the mask: the signals then reach
  // only sigwait below, never a store thread (whose default action would kill us with 128+S).
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&stop_signals, sig);
  if (::pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr) != 0) {
    return fail(kExitError, "cannot block SIGINT/SIGTERM");
  }

  const std::string where = host + ":" + std::to_string(port);
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = diloco::compat::make_tcp_store(host, static_cast<std::uint16_t>(port),
                                           /*is_server=*/true, kSelfConnectTimeout);
  } catch (const std::exception& e) {
    const std::string what = first_line(e.what());
    if (what.find("in use") != std::string::npos) {
      return fail(kExitError, "cannot serve the store on port " + std::to_string(port) +
                                  ": the port is in use (pick another --port): " + what);
    }
    return fail(kExitError, "cannot serve the store at " + where + ": " + what);
  }
  std::cout << "diloco-coordinator: serving the store at " << where << std::endl;
  if (!ready_file.empty()) {
    try {
      write_ready_file(ready_file, port);
    } catch (const std::exception& e) {
      return fail(kExitError, e.what());
    }
  }

  int sig = 0;
  if (::sigwait(&stop_signals, &sig) != 0) return fail(kExitError, "sigwait failed");
  const char* abbrev = sigabbrev_np(sig);
  std::cerr << "diloco-coordinator: received SIG" << (abbrev != nullptr ? abbrev : "?")
            << ", stopping" << std::endl;
  return 0;
}
