// The wide-area group (see group.h): rendezvous, accounted collectives, readable errors.
#include "diloco/comm/group.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "comm/c10d_compat.h"
#include "comm/net.h"
#include "diloco/errors.h"

namespace diloco {
namespace {

std::string required_env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') {
    throw OptionError(std::string("[Group] environment variable ") + name +
                      " is not set; set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE (as "
                      "torchrun and diloco-run do) or pass GroupOptions explicitly");
  }
  return v;
}

long parse_env_int(const char* name, const std::string& value) {
  char* end = nullptr;
  errno = 0;
  long v = std::strtol(value.c_str(), &end, 10);
  if (errno != 0 || end == value.c_str() || *end != '\0') {
    throw OptionError(std::string("[Group] environment variable ") + name + "='" + value +
                      "' is not an integer");
  }
  return v;
}

// A non-negative real number within [0, max] from an environment variable; `range` describes it
// for the message ("Mbit/s in [0, 1e6] (0 = unlimited)").
double parse_env_real(const char* name, const std::string& value, double max,
                      const std::string& range) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(value.c_str(), &end);
  const bool number = errno == 0 && end != value.c_str() && *end == '\0';
  if (!number || !(v >= 0.0 && v <= max)) {  // also rejects nan and inf
    throw OptionError(std::string("[Group] environment variable ") + name + "='" + value +
                      "' must be a number of " + range);
  }
  return v;
}

bool looks_like_lost_peer(const std::string& what) {
  static const char* kMarkers[] = {"Connection closed", "Connection reset", "closed by peer",
                                   "Timed out",         "timed out",        "pair closure",
                                   "Broken pipe",       "Connection refused", "Socket"};
  return std::any_of(std::begin(kMarkers), std::end(kMarkers),
                     [&](const char* m) { return what.find(m) != std::string::npos; });
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

}  // namespace

void GroupOptions::validate() const {
  if (world_size < 1) {
    throw OptionError("[Group] world_size (WORLD_SIZE) must be >= 1, got " +
                      std::to_string(world_size));
  }
  if (rank < 0 || rank >= world_size) {
    throw OptionError("[Group] rank (RANK) must be in [0, " + std::to_string(world_size - 1) +
                      "] for world_size " + std::to_string(world_size) + ", got " +
                      std::to_string(rank));
  }
  if (master_port < 1 || master_port > 65535) {
    throw OptionError("[Group] master_port (MASTER_PORT) must be in [1, 65535], got " +
                      std::to_string(master_port));
  }
  if (master_addr.empty()) throw OptionError("[Group] master_addr (MASTER_ADDR) must not be empty");
  if (timeout.count() <= 0) {
    throw OptionError("[Group] timeout must be > 0 ms, got " + std::to_string(timeout.count()));
  }
  link.validate();
}

GroupOptions GroupOptions::read_env() {
  GroupOptions o;
  const auto set = [](const char* name) -> const char* {
    const char* v = std::getenv(name);
    return v != nullptr && *v != '\0' ? v : nullptr;
  };
  if (const char* v = set("MASTER_ADDR")) o.master_addr = v;
  if (const char* v = set("MASTER_PORT")) o.master_port = static_cast<int>(parse_env_int("MASTER_PORT", v));
  if (const char* v = set("RANK")) o.rank = static_cast<int>(parse_env_int("RANK", v));
  if (const char* v = set("WORLD_SIZE")) o.world_size = static_cast<int>(parse_env_int("WORLD_SIZE", v));
  if (const char* t = set("DILOCO_TIMEOUT_S")) {
    long s = parse_env_int("DILOCO_TIMEOUT_S", t);
    if (s < 1) throw OptionError("[Group] DILOCO_TIMEOUT_S must be >= 1 second, got " + std::string(t));
    o.timeout = std::chrono::seconds(s);
  }
  if (const char* h = set("DILOCO_HOSTNAME")) o.hostname = h;
  if (const char* a = set("TORCHELASTIC_USE_AGENT_STORE")) {
    const std::string v = a;
    if (v == "True" || v == "true" || v == "1") {
      o.join_existing_store = true;
    } else if (!(v == "False" || v == "false" || v == "0")) {
      throw OptionError("[Group] environment variable TORCHELASTIC_USE_AGENT_STORE='" + v +
                        "' must be True/true/1 or False/false/0");
    }
  }
  if (const char* r = set("DILOCO_LINK_MBPS")) {
    o.link.mbit_per_s = parse_env_real("DILOCO_LINK_MBPS", r, LinkModel::kMaxMbitPerS,
                                       "Mbit/s in [0, 1e6] (0 = unlimited)");
  }
  if (const char* l = set("DILOCO_LINK_LATENCY_MS")) {
    o.link.latency_ms = parse_env_real("DILOCO_LINK_LATENCY_MS", l, LinkModel::kMaxLatencyMs,
                                       "milliseconds in [0, 60000]");
  }
  return o;
}

GroupOptions GroupOptions::from_env() {
  for (const char* name : {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"}) required_env(name);
  GroupOptions o = read_env();
  o.validate();
  return o;
}

namespace {

// The rendezvous (Group::create) runs on a thread of its own, and the caller stops waiting at one
// deadline for all of it. Store and socket calls can block past any timeout of theirs: a rank 0
// that is stopped (SIGSTOP), or another program listening on MASTER_PORT, keeps the connection
// open and never answers. The thread is then left to finish or fail by itself, owning what it
// uses; `phase` says what it was waiting for, for the error.
struct Rendezvous {
  std::mutex mutex;
  std::condition_variable done_cv;
  bool done = false;
  std::shared_ptr<Group> group;
  std::exception_ptr error;
  std::string phase = "starting";

  void enter(std::string what) {
    std::lock_guard<std::mutex> lock(mutex);
    phase = std::move(what);
  }
};

using Clock = std::chrono::steady_clock;

std::chrono::milliseconds remaining(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return std::max(left, std::chrono::milliseconds(1));
}

std::string store_string(c10d::Store& store, const std::string& key) {
  const auto bytes = store.get(key);
  return std::string(bytes.begin(), bytes.end());
}

void store_set(c10d::Store& store, const std::string& key, const std::string& value) {
  store.set(key, std::vector<std::uint8_t>(value.begin(), value.end()));
}

// Keys of the rendezvous protocol, under the group's prefix:
//   claim/R      how many processes claimed rank R (a second one is a duplicate RANK)
//   world_size   rank 0's WORLD_SIZE
//   arrived      ranks that claimed their rank and agree on the world size
//   abort        why the rendezvous failed, set by the rank that found out; every waiting rank
//                reads it and fails with the same reason instead of waiting for the deadline
constexpr const char* kAbortKey = "abort";

[[noreturn]] void abort_rendezvous(c10d::Store& store, const std::string& who,
                                   const std::string& why, bool option_error) {
  try {
    if (!store.check({kAbortKey})) store_set(store, kAbortKey, who + ": " + why);
  } catch (const std::exception&) {
  }
  if (option_error) throw OptionError("[Group] " + who + ": " + why);
  throw Error("[Group] " + who + ": " + why);
}

void check_abort(c10d::Store& store, const std::string& who) {
  if (store.check({kAbortKey})) {
    throw Error("[Group] " + who + ": the rendezvous was aborted: " +
                store_string(store, kAbortKey));
  }
}

void rendezvous(const GroupOptions& options, const std::string& hostname,
                Clock::time_point deadline, Rendezvous& progress) {
  const std::string where = options.master_addr + ":" + std::to_string(options.master_port);
  const std::string who =
      "rank " + std::to_string(options.rank) + " of " + std::to_string(options.world_size);
  const bool serve = options.rank == 0 && !options.join_existing_store;
  progress.enter(serve ? "serving the rendezvous store"
                       : "connecting to the rendezvous store at " + where + " (no answer: is "
                         "rank 0 running and not stopped? is another program listening on "
                         "MASTER_PORT?)");
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = compat::make_tcp_store(options.master_addr,
                                   static_cast<std::uint16_t>(options.master_port), serve,
                                   remaining(deadline));
  } catch (const std::exception& e) {
    const std::string what = e.what();
    if (serve && what.find("in use") != std::string::npos) {
      throw Error("[Group] rank 0 cannot serve the rendezvous store at " + where +
                  ": the port is in use; pick another MASTER_PORT (" + first_line(what) + ")");
    }
    throw Error("[Group] " + who + ": nothing answered at " + where + " within " +
                std::to_string(options.timeout.count()) + " ms (is rank 0 started, with the same "
                "MASTER_ADDR/MASTER_PORT?): " + first_line(what));
  }
  try {
    progress.enter("waiting for the store at " + where + " to answer (it accepted the connection; "
                   "is rank 0 stopped, or is another program listening on MASTER_PORT?)");
    store->setTimeout(remaining(deadline));
    // A store of our own is new for every group; a shared one (torchrun's agent store) outlives
    // them, so every group this process joins to it gets a prefix of its own (processes create
    // their groups in the same order, so the prefixes match across ranks).
    std::string prefix = "diloco";
    if (options.join_existing_store) {
      const auto n = store->add("diloco_joins/" + std::to_string(options.rank), 1) - 1;
      if (n > 0) prefix += "/" + std::to_string(n);
    }
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(prefix, store);
    c10d::Store& s = *prefixed;

    const std::string mine = std::to_string(options.world_size);
    if (options.rank == 0) store_set(s, "world_size", mine);
    const auto claims = s.add("claim/" + std::to_string(options.rank), 1);
    if (claims > 1) {
      const bool sealed = s.check({"sealed"});
      abort_rendezvous(s, who, "RANK=" + std::to_string(options.rank) + " was claimed by " +
                                   std::to_string(claims) + " processes" +
                                   (sealed ? " (the group had already formed without this one)" : "") +
                                   "; every process needs a rank of its own", true);
    }
    progress.enter("waiting for rank 0's world size");
    while (!s.check({"world_size"})) {
      check_abort(s, who);
      if (Clock::now() > deadline) {
        throw Error("[Group] " + who + ": rank 0 did not arrive at " + where + " within " +
                    std::to_string(options.timeout.count()) + " ms");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    const std::string rank0 = store_string(s, "world_size");
    if (rank0 != mine) {
      abort_rendezvous(s, who, "world_size (WORLD_SIZE) differs between ranks: rank " +
                                   std::to_string(options.rank) + " has " + mine +
                                   ", rank 0 has " + rank0, true);
    }
    s.add("arrived", 1);
    progress.enter("waiting for the other ranks to arrive");
    // Who has not claimed a rank yet, refreshed while waiting: if the store goes away (rank 0 gave
    // up at its own deadline and exited), the error can still say who was missing.
    const auto missing_ranks = [&] {
      std::string missing;
      for (int r = 0; r < options.world_size; ++r) {
        if (!s.check({"claim/" + std::to_string(r)})) {
          missing += (missing.empty() ? "" : ", ") + std::to_string(r);
        }
      }
      return missing;
    };
    std::string missing;
    const auto not_arrived = [&](const std::string& ranks) {
      return "rank(s) " + (ranks.empty() ? std::string("?") : ranks) + " did not arrive at " +
             where + " within " + std::to_string(options.timeout.count()) +
             " ms (started? same MASTER_ADDR, MASTER_PORT and WORLD_SIZE?)";
    };
    try {
      for (int polls = 0; s.add("arrived", 0) < options.world_size; ++polls) {
        check_abort(s, who);
        if (polls % 25 == 0) missing = missing_ranks();
        if (Clock::now() > deadline) {
          // Said in the store too, so that ranks still waiting fail with the same reason.
          abort_rendezvous(s, who, not_arrived(missing_ranks()), false);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Error("[Group] " + who + ": " + not_arrived(missing) + "; then the store at " + where +
                  " stopped answering (rank 0, which serves it, gave up or exited): " +
                  first_line(e.what()));
    }
    // A process started with a RANK that another already holds may claim it a moment after the
    // others arrived. Rank 0 seals the rendezvous after a short grace, during which such a claim
    // aborts it for everyone; a claim after the seal fails on the latecomer alone.
    progress.enter("waiting for rank 0 to seal the rendezvous");
    if (options.rank == 0) {
      // (A second RANK=0 cannot serve the store on the same port: it fails as "in use".)
      if (options.world_size > 1) {
        std::this_thread::sleep_for(std::min<std::chrono::milliseconds>(
            std::chrono::milliseconds(1000), options.timeout / 10));
      }
      check_abort(s, who);
      store_set(s, "sealed", "1");
    }
    while (!s.check({"sealed"})) {
      check_abort(s, who);
      if (Clock::now() > deadline) {
        throw Error("[Group] " + who + ": rank 0 did not seal the rendezvous at " + where +
                    " within " + std::to_string(options.timeout.count()) + " ms");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    check_abort(s, who);
    progress.enter("connecting the Gloo group (did a rank die during the rendezvous?)");
    auto group = std::make_shared<Group>(prefixed, options.rank, options.world_size,
                                         options.timeout, hostname);
    group->set_link(options.link);
    std::lock_guard<std::mutex> lock(progress.mutex);
    progress.group = std::move(group);
  } catch (...) {
    // Rank 0 serves the store: it stays a moment after a failure, so that the ranks still
    // waiting read the reason left under the abort key rather than a closed connection.
    if (serve) std::this_thread::sleep_for(std::chrono::milliseconds(250));
    try {
      throw;
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      std::string phase;
      {
        std::lock_guard<std::mutex> lock(progress.mutex);
        phase = progress.phase;
      }
      throw Error("[Group] " + who + ": the rendezvous store at " + where + " failed while " +
                  phase + ": " + first_line(e.what()));
    }
  }
}

}  // namespace

struct Group::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  std::shared_ptr<compat::GlooGroup> gloo;
  std::vector<std::set<int>> peer_ports;  // per rank, the local ports of its TCP sockets
};

std::shared_ptr<Group> Group::create(const GroupOptions& options) {
  options.validate();
  const auto deadline = Clock::now() + options.timeout;
  // Resolved first: an address that does not resolve is reported at once, not after the timeout.
  std::string hostname = options.hostname;
  if (hostname.empty()) {
    try {
      hostname = net::local_address_towards(options.master_addr);
    } catch (const std::invalid_argument& e) {
      throw Error("[Group] rank " + std::to_string(options.rank) + " of " +
                  std::to_string(options.world_size) + ": MASTER_ADDR " + e.what() +
                  "; check the name, or give an IP address");
    }
  }
  auto progress = std::make_shared<Rendezvous>();
  std::thread([progress, options, hostname, deadline] {
    std::exception_ptr error;
    try {
      rendezvous(options, hostname, deadline, *progress);
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(progress->mutex);
    progress->error = error;
    progress->done = true;
    progress->done_cv.notify_all();
  }).detach();
  std::unique_lock<std::mutex> lock(progress->mutex);
  // A little past the deadline, so that the rendezvous's own errors (which say more) win.
  if (!progress->done_cv.wait_until(lock, deadline + std::chrono::milliseconds(500),
                                    [&] { return progress->done; })) {
    throw Error("[Group] rank " + std::to_string(options.rank) + " of " +
                std::to_string(options.world_size) + ": the rendezvous at " +
                options.master_addr + ":" + std::to_string(options.master_port) +
                " did not complete within " + std::to_string(options.timeout.count()) +
                " ms; it was " + progress->phase);
  }
  if (progress->error) std::rethrow_exception(progress->error);
  return progress->group;
}

std::shared_ptr<Group> Group::from_env() { return create(GroupOptions::from_env()); }

Group::Group(c10::intrusive_ptr<c10d::Store> store, int rank, int world_size,
             std::chrono::milliseconds timeout, const std::string& hostname)
    : impl_(std::make_unique<Impl>()), rank_(rank), world_size_(world_size), timeout_(timeout) {
  GroupOptions check;
  check.rank = rank;
  check.world_size = world_size;
  check.timeout = timeout;
  check.validate();
  impl_->store = std::move(store);
  try {
    impl_->gloo = compat::make_gloo_group(impl_->store, rank, world_size, timeout, hostname);
    exchange_socket_ports();
  } catch (const std::exception& e) {
    throw PeerLostError("[Group] rank " + std::to_string(rank) + " of " +
                        std::to_string(world_size) + ": connecting the Gloo group on '" +
                        hostname + "' failed within " + std::to_string(timeout.count()) +
                        " ms: " + first_line(e.what()));
  }
}

void Group::exchange_socket_ports() {
  // Every rank publishes the local ports of its sockets once the Gloo mesh is connected, and
  // reads the others' (all are connected by then, so the reads do not wait long), so that a lost
  // connection can be named by rank even when the store is gone with rank 0 (name_lost_peers).
  std::string mine;
  for (int port : net::own_tcp_ports()) mine += std::to_string(port) + " ";
  impl_->store->set("socket_ports/" + std::to_string(rank_),
                    std::vector<std::uint8_t>(mine.begin(), mine.end()));
  impl_->peer_ports.assign(static_cast<std::size_t>(world_size_), {});
  for (int r = 0; r < world_size_; ++r) {
    if (r == rank_) continue;
    const auto bytes = impl_->store->get("socket_ports/" + std::to_string(r));
    std::istringstream in(std::string(bytes.begin(), bytes.end()));
    for (int port; in >> port;) impl_->peer_ports[static_cast<std::size_t>(r)].insert(port);
  }
}

Group::~Group() = default;

void Group::set_link(const LinkModel& link) {
  link.validate();
  link_ = link;
}

std::string Group::name_lost_peers(const std::string& what) {
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
  for (std::size_t r = 0; r < impl_->peer_ports.size(); ++r) {
    if (static_cast<int>(r) == rank_) continue;
    const auto& ports = impl_->peer_ports[r];
    if (ports.count(printed) != 0 || ports.count(swapped) != 0) {
      if (found >= 0) return "";  // ambiguous
      found = static_cast<int>(r);
    }
  }
  if (found < 0) return "";
  return "rank " + std::to_string(found) + " at " + host;
}

void Group::account(Collective c, const std::string& label, std::uint64_t payload_bytes, int root,
                    double seconds, double link_seconds) {
  const ByteCount b = collective_bytes(c, payload_bytes, world_size_, rank_, root);
  std::lock_guard<std::mutex> lock(stats_mutex_);
  OpStats& op = stats_.ops[std::string(collective_name(c)) + ":" + label];
  op.calls += 1;
  op.bytes_sent += b.sent;
  op.bytes_received += b.received;
  op.seconds += seconds;
  op.link_seconds += link_seconds;
}

struct PendingCollective::State {
  Group* group = nullptr;
  Collective kind = Collective::kBarrier;
  std::string label;
  std::uint64_t payload_bytes = 0;
  int root = 0;
  std::chrono::steady_clock::time_point start;
  // Emulated link: the collective completes no earlier than `link_done` (see group.h).
  double link_seconds = 0.0;
  std::chrono::steady_clock::time_point link_done;
  c10::intrusive_ptr<c10d::Work> work;  // null when there was nothing to send (one rank)
  bool done = false;
};

void PendingCollective::wait() {
  if (!state_ || state_->done) return;
  State& s = *state_;
  s.done = true;
  Group& g = *s.group;
  if (s.work) {
    try {
      compat::wait(s.work);
    } catch (const std::exception& e) {
      std::ostringstream msg;
      msg << "[" << collective_name(s.kind) << " '" << s.label << "'] rank " << g.rank_ << " of "
          << g.world_size_ << ": ";
      const std::string what = e.what();
      if (dynamic_cast<const compat::LinkFailure*>(&e) != nullptr || looks_like_lost_peer(what)) {
        const std::string lost = g.name_lost_peers(what);
        msg << "lost a peer" << (lost.empty() ? "" : ": " + lost)
            << " (it exited, or the link broke, or it did not answer within "
            << g.timeout_.count() << " ms): " << first_line(what);
        throw PeerLostError(msg.str());
      }
      msg << first_line(what);
      throw Error(msg.str());
    }
  }
  if (s.link_seconds > 0.0) std::this_thread::sleep_until(s.link_done);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - s.start).count();
  g.account(s.kind, s.label, s.payload_bytes, s.root, seconds, s.link_seconds);
}

template <typename Fn>
PendingCollective Group::issue(Collective c, const std::string& label,
                               std::uint64_t payload_bytes, int root, Fn&& start) {
  PendingCollective p;
  p.state_ = std::make_shared<PendingCollective::State>();
  auto& s = *p.state_;
  s.group = this;
  s.kind = c;
  s.label = label;
  s.payload_bytes = payload_bytes;
  s.root = root;
  s.start = std::chrono::steady_clock::now();
  if (world_size_ > 1 && link_.enabled()) {
    // The collective starts on the link once the directions it uses have finished transmitting
    // what was issued before it; its latency overlaps with the next one's transmission.
    using Duration = std::chrono::steady_clock::duration;
    const auto to_duration = [](double seconds) {
      return std::chrono::duration_cast<Duration>(std::chrono::duration<double>(seconds));
    };
    const bool up = c != Collective::kRecv;
    const bool down = c != Collective::kSend;
    auto on_link = s.start;
    if (up) on_link = std::max(on_link, uplink_free_);
    if (down) on_link = std::max(on_link, downlink_free_);
    const double transmission =
        link_transmission_seconds(c, payload_bytes, world_size_, root, link_);
    const auto transmitted = on_link + to_duration(transmission);
    if (up) uplink_free_ = transmitted;
    if (down) downlink_free_ = transmitted;
    s.link_seconds = link_seconds(c, payload_bytes, world_size_, root, link_);
    s.link_done = on_link + to_duration(s.link_seconds);
  }
  if (world_size_ > 1) {
    try {
      s.work = start();
    } catch (const std::exception& e) {
      s.done = true;
      throw PeerLostError("[" + std::string(collective_name(c)) + " '" + label + "'] rank " +
                          std::to_string(rank_) + " of " + std::to_string(world_size_) +
                          ": could not start: " + first_line(e.what()));
    }
  }
  return p;
}

void Group::allreduce_sum(at::Tensor& tensor, const std::string& label) {
  allreduce_sum_async(tensor, label).wait();
}

PendingCollective Group::allreduce_sum_async(at::Tensor tensor, const std::string& label) {
  TORCH_CHECK(tensor.is_contiguous(), "[allreduce '", label, "'] tensor must be contiguous");
  return issue(Collective::kAllReduce, label, tensor.nbytes(), 0,
               [&] { return compat::allreduce_sum(*impl_->gloo, tensor); });
}

void Group::broadcast(at::Tensor& tensor, int root, const std::string& label) {
  if (root < 0 || root >= world_size_) {
    throw OptionError("[broadcast '" + label + "'] root must be in [0, " +
                      std::to_string(world_size_ - 1) + "], got " + std::to_string(root));
  }
  TORCH_CHECK(tensor.is_contiguous(), "[broadcast '", label, "'] tensor must be contiguous");
  issue(Collective::kBroadcast, label, tensor.nbytes(), root,
        [&] { return compat::broadcast(*impl_->gloo, tensor, root); })
      .wait();
}

std::vector<at::Tensor> Group::allgather(const at::Tensor& tensor, const std::string& label) {
  at::Tensor input = tensor.contiguous();
  std::vector<at::Tensor> outputs;
  outputs.reserve(world_size_);
  for (int r = 0; r < world_size_; ++r) outputs.push_back(at::empty_like(input));
  if (world_size_ == 1) outputs[0].copy_(input);
  issue(Collective::kAllGather, label, input.nbytes(), 0,
        [&] { return compat::allgather(*impl_->gloo, outputs, input); })
      .wait();
  return outputs;
}

std::vector<std::string> Group::allgather_bytes(const std::string& bytes,
                                                const std::string& label) {
  at::Tensor len = at::full({1}, static_cast<std::int64_t>(bytes.size()), at::kLong);
  auto lens = allgather(len, label + ".length");
  std::int64_t longest = 0;
  for (const auto& l : lens) longest = std::max(longest, l.item<std::int64_t>());
  at::Tensor buf = at::zeros({std::max<std::int64_t>(longest, 1)}, at::kByte);
  std::memcpy(buf.data_ptr<std::uint8_t>(), bytes.data(), bytes.size());
  auto all = allgather(buf, label);
  std::vector<std::string> out;
  out.reserve(all.size());
  for (std::size_t r = 0; r < all.size(); ++r) {
    out.emplace_back(reinterpret_cast<const char*>(all[r].data_ptr<std::uint8_t>()),
                     static_cast<std::size_t>(lens[r].item<std::int64_t>()));
  }
  return out;
}

void Group::barrier(const std::string& label) {
  issue(Collective::kBarrier, label, 0, 0, [&] { return compat::barrier(*impl_->gloo); }).wait();
}

PendingCollective Group::send_async(at::Tensor tensor, int dst, int tag, const std::string& label) {
  TORCH_CHECK(tensor.is_contiguous(), "[send '", label, "'] tensor must be contiguous");
  TORCH_CHECK(dst >= 0 && dst < world_size_ && dst != rank_, "[send '", label, "'] bad peer ", dst);
  return issue(Collective::kSend, label, tensor.nbytes(), 0,
               [&] { return compat::send(*impl_->gloo, tensor, dst, tag); });
}

PendingCollective Group::recv_async(at::Tensor tensor, int src, int tag, const std::string& label) {
  TORCH_CHECK(tensor.is_contiguous(), "[recv '", label, "'] tensor must be contiguous");
  TORCH_CHECK(src >= 0 && src < world_size_ && src != rank_, "[recv '", label, "'] bad peer ", src);
  return issue(Collective::kRecv, label, tensor.nbytes(), 0,
               [&] { return compat::recv(*impl_->gloo, tensor, src, tag); });
}

CommStats Group::stats() const {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  return stats_;
}

void Group::reset_stats() {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  stats_ = CommStats{};
}

}  // namespace diloco
