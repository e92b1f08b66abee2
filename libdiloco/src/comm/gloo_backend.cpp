// The Gloo backend (see gloo_backend.h): collectives through c10d_compat, Gloo's failures told
// apart by type and the lost peer named by the socket ports every rank published.
#include "comm/gloo_backend.h"

#include <csignal>

#include <torch/csrc/distributed/c10d/Store.hpp>

#include <algorithm>
#include <cstdlib>
#include <sstream>

#include "comm/c10d_compat.h"
#include "comm/net.h"
#include "diloco/errors.h"

namespace diloco {
namespace {

// Gloo failures that do not arrive as gloo::IoException (compat::LinkFailure) but still mean a
// connection to a peer is gone: c10d rewraps some of them as plain runtime errors.
bool looks_like_lost_peer(const std::string& what) {
  static const char* kMarkers[] = {"Connection closed", "Connection reset", "closed by peer",
                                   "Timed out",         "timed out",        "pair closure",
                                   "Broken pipe",       "Connection refused", "Socket"};
  return std::any_of(std::begin(kMarkers), std::end(kMarkers),
                     [&](const char* m) { return what.find(m) != std::string::npos; });
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// Gloo writes to its sockets without MSG_NOSIGNAL: a write to a peer that died raises SIGPIPE,
// whose default action kills this process instead of failing the collective. A process that
// left SIGPIPE at its default gets it ignored (the write then fails with EPIPE, which becomes a
// PeerLostError); a handler the program installed itself is left alone. Python ignores it
// already.
void ignore_sigpipe_once() {
  static const bool done = [] {
    struct sigaction current {};
    if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
      std::signal(SIGPIPE, SIG_IGN);
    }
    return true;
  }();
  (void)done;
}

}  // namespace

std::unique_ptr<Backend> make_gloo_backend(c10::intrusive_ptr<c10d::Store> store, int rank,
                                           int world_size, std::chrono::milliseconds timeout,
                                           const std::string& hostname) {
  return std::make_unique<GlooBackend>(std::move(store), rank, world_size, timeout, hostname);
}

GlooBackend::GlooBackend(c10::intrusive_ptr<c10d::Store> store, int rank, int world_size,
                         std::chrono::milliseconds timeout, const std::string& hostname)
    : store_(std::move(store)), rank_(rank), world_size_(world_size), timeout_(timeout) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    throw OptionError("[gloo] rank must be in [0, world_size) and world_size >= 1, got rank " +
                      std::to_string(rank) + " of " + std::to_string(world_size));
  }
  if (timeout.count() <= 0) {
    throw OptionError("[gloo] timeout must be > 0 ms, got " + std::to_string(timeout.count()));
  }
  if (!store_) throw OptionError("[gloo] the store must not be null");
  ignore_sigpipe_once();
  try {
    gloo_ = compat::make_gloo_group(store_, rank, world_size, timeout, hostname);
    exchange_socket_ports();
  } catch (const std::exception& e) {
    throw PeerLostError("[gloo] rank " + std::to_string(rank) + " of " +
                        std::to_string(world_size) + ": connecting the Gloo group on '" +
                        hostname + "' failed within " + std::to_string(timeout.count()) +
                        " ms: " + first_line(e.what()));
  }
}

GlooBackend::~GlooBackend() = default;

void GlooBackend::exchange_socket_ports() {
  // Every rank publishes the local ports of its sockets once the Gloo mesh is connected, and
  // reads the others' (all are connected by then, so the reads do not wait long), so that a lost
  // connection can be named by rank even when the store is gone with rank 0 (name_lost_peer).
  std::string mine;
  for (int port : net::own_tcp_ports()) mine += std::to_string(port) + " ";
  store_->set("socket_ports/" + std::to_string(rank_),
              std::vector<std::uint8_t>(mine.begin(), mine.end()));
  peer_ports_.assign(static_cast<std::size_t>(world_size_), {});
  for (int r = 0; r < world_size_; ++r) {
    if (r == rank_) continue;
    const auto bytes = store_->get("socket_ports/" + std::to_string(r));
    std::istringstream in(std::string(bytes.begin(), bytes.end()));
    for (int port; in >> port;) peer_ports_[static_cast<std::size_t>(r)].insert(port);
  }
}

std::string GlooBackend::name_lost_peer(const std::string& what, int* rank) const {
  // Gloo names the peer by the address of the socket it lost ("[10.0.0.2]:40123", on some
  // versions with the port's bytes swapped): the peer's listening port or its ephemeral one. Each
  // rank published the ports of its own sockets when the group connected (see the constructor);
  // a port that exactly one rank holds names it. Ranks that are threads of one process share
  // their sockets, so there nothing matches uniquely and nothing is named.
  const auto open = what.rfind("]:");
  const auto start = open == std::string::npos ? open : what.rfind('[', open);
  if (start == std::string::npos) return "";
  const std::string host = what.substr(start + 1, open - start - 1);
  const int printed = std::atoi(what.c_str() + open + 2);
  const int swapped = ((printed & 0xff) << 8) | ((printed >> 8) & 0xff);
  int found = -1;
  for (std::size_t r = 0; r < peer_ports_.size(); ++r) {
    if (static_cast<int>(r) == rank_) continue;
    const auto& ports = peer_ports_[r];
    if (ports.count(printed) != 0 || ports.count(swapped) != 0) {
      if (found >= 0) return "";  // ambiguous
      found = static_cast<int>(r);
    }
  }
  if (found < 0) return "";
  if (rank != nullptr) *rank = found;
  return "rank " + std::to_string(found) + " at " + host;
}

c10::intrusive_ptr<c10d::Work> GlooBackend::allreduce_sum(at::Tensor& tensor) {
  return compat::allreduce_sum(*gloo_, tensor);
}

c10::intrusive_ptr<c10d::Work> GlooBackend::broadcast(at::Tensor& tensor, int root) {
  return compat::broadcast(*gloo_, tensor, root);
}

c10::intrusive_ptr<c10d::Work> GlooBackend::allgather(std::vector<at::Tensor>& outputs,
                                                      at::Tensor& input) {
  return compat::allgather(*gloo_, outputs, input);
}

c10::intrusive_ptr<c10d::Work> GlooBackend::barrier() { return compat::barrier(*gloo_); }

c10::intrusive_ptr<c10d::Work> GlooBackend::send(at::Tensor& tensor, int dst, int tag) {
  return compat::send(*gloo_, tensor, dst, tag);
}

c10::intrusive_ptr<c10d::Work> GlooBackend::recv(at::Tensor& tensor, int src, int tag) {
  return compat::recv(*gloo_, tensor, src, tag);
}

void GlooBackend::wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& operation) {
  try {
    compat::wait(work);
  } catch (const std::exception& e) {
    std::ostringstream msg;
    msg << "[" << operation << "] rank " << rank_ << " of " << world_size_ << ": ";
    const std::string what = e.what();
    if (dynamic_cast<const compat::LinkFailure*>(&e) != nullptr || looks_like_lost_peer(what)) {
      int peer = -1;
      const std::string lost = name_lost_peer(what, &peer);
      msg << "lost a peer" << (lost.empty() ? "" : ": " + lost)
          << " (it exited, or the link broke, or it did not answer within " << timeout_.count()
          << " ms): " << first_line(what);
      // A closed or reset connection means the process is gone; a timeout names a peer that
      // may only be waiting for another, so it is not blamed.
      const bool closed = what.find("imed out") == std::string::npos;
      throw PeerLostError(msg.str(), closed ? peer : -1);
    }
    msg << first_line(what);
    throw Error(msg.str());
  }
}

}  // namespace diloco
