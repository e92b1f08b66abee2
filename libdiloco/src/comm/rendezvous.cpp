// GroupOptions and the rendezvous behind Group::create (see group.h and docs/design.md,
// "Rendezvous"): a TCPStore, rank claims and one deadline for all of it. It ends by connecting
// a Group over the rendezvous's store; the collectives, accounting and link are in group.cpp.
#include "diloco/comm/group.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <condition_variable>
#include <mutex>
#include <openssl/rand.h>
#include <thread>

#include "comm/c10d_compat.h"
#include "diloco/comm/auth.h"
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
  RunKey::resolve(run_key, run_key_file, "run_key (DILOCO_RUN_KEY)",
                  "run_key_file (DILOCO_RUN_KEY_FILE)");
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
  if (const char* k = set("DILOCO_RUN_KEY")) o.run_key = k;
  if (const char* f = set("DILOCO_RUN_KEY_FILE")) o.run_key_file = f;
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
// and with a run key (every value then MACed by the authenticated store under the prefix):
//   auth/challenge    random bytes rank 0 writes before world_size
//   auth/response/R   rank R's answer, HMAC(key, challenge || R), checked by rank 0 before it
//                     seals the rendezvous
constexpr const char* kAbortKey = "abort";
constexpr const char* kChallengeKey = "auth/challenge";

std::string response_to(const RunKey& key, const std::string& challenge, int rank) {
  static const char kDomain[] = "diloco-join-v1";
  const std::int32_t r = rank;
  const MacTag t = key.mac({{kDomain, sizeof(kDomain)},
                            {challenge.data(), challenge.size()},
                            {&r, sizeof(r)}});
  return std::string(t.begin(), t.end());
}

// Before a process claims a rank, it checks that it has the run's key (or that the run has
// none, when it has none): a process that fails here leaves no trace the members would notice.
// Returns the challenge, for the answer (empty without a key).
std::string check_run_key(c10d::Store& s, const std::optional<RunKey>& key,
                          const std::string& who, const std::string& where) {
  const bool keyed_run = s.check({kChallengeKey});
  if (!key) {
    if (keyed_run) {
      throw AuthenticationError("[Group] " + who + ": the run at " + where +
                                " requires a run key and this process has none: set "
                                "DILOCO_RUN_KEY or DILOCO_RUN_KEY_FILE (GroupOptions::run_key "
                                "or run_key_file) to the run's key");
    }
    return "";
  }
  if (!keyed_run) {
    throw AuthenticationError("[Group] " + who + ": this process has a run key but the run at " +
                              where + " has none (rank 0 started without DILOCO_RUN_KEY / "
                              "DILOCO_RUN_KEY_FILE); give every rank the same key, or none");
  }
  try {
    return store_string(s, kChallengeKey);
  } catch (const AuthenticationError&) {
    throw AuthenticationError("[Group] " + who + ": this process's run key does not match the "
                              "run's at " + where + " (rank 0's challenge was made with another "
                              "key); check DILOCO_RUN_KEY / DILOCO_RUN_KEY_FILE");
  }
}

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

void rendezvous(const GroupOptions& options, const std::optional<RunKey>& key,
                const std::string& hostname, Clock::time_point deadline, Rendezvous& progress) {
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
    // Below every prefix, so that the MACs bind full names.
    if (key) store = make_authenticated_store(store, *key);
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
    if (options.rank == 0) {
      if (key) {  // before world_size: whoever sees world_size sees whether the run has a key
        std::string challenge(32, '\0');
        if (RAND_bytes(reinterpret_cast<unsigned char*>(challenge.data()), 32) != 1) {
          throw Error("[Group] " + who + ": OpenSSL RAND_bytes failed");
        }
        store_set(s, kChallengeKey, challenge);
      }
      // Before world_size too: the link emulation exchanges issue times beside each collective,
      // so every rank emulates a link or none does.
      store_set(s, "link_emulated", options.link.enabled() ? "1" : "0");
      store_set(s, "world_size", mine);
    }
    // The first call that needs an answer from the store, under the phase that says so.
    s.check({"world_size"});
    progress.enter("waiting for rank 0's world size");
    while (!s.check({"world_size"})) {
      check_abort(s, who);
      if (Clock::now() > deadline) {
        throw Error("[Group] " + who + ": rank 0 did not arrive at " + where + " within " +
                    std::to_string(options.timeout.count()) + " ms");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    // Checked before claiming a rank: a process without the run's key leaves the rank free.
    const std::string challenge = check_run_key(s, key, who, where);
    const auto claims = s.add("claim/" + std::to_string(options.rank), 1);
    if (claims > 1) {
      const bool sealed = s.check({"sealed"});
      abort_rendezvous(s, who, "RANK=" + std::to_string(options.rank) + " was claimed by " +
                                   std::to_string(claims) + " processes" +
                                   (sealed ? " (the group had already formed without this one)" : "") +
                                   "; every process needs a rank of its own", true);
    }
    if (key) {
      store_set(s, "auth/response/" + std::to_string(options.rank),
                response_to(*key, challenge, options.rank));
    }
    const std::string rank0 = store_string(s, "world_size");
    if (rank0 != mine) {
      abort_rendezvous(s, who, "world_size (WORLD_SIZE) differs between ranks: rank " +
                                   std::to_string(options.rank) + " has " + mine +
                                   ", rank 0 has " + rank0, true);
    }
    const bool emulated = store_string(s, "link_emulated") == "1";
    if (emulated != options.link.enabled()) {
      abort_rendezvous(s, who, std::string("link emulation (GroupOptions::link, DILOCO_LINK_MBPS / "
                                           "DILOCO_LINK_LATENCY_MS) differs between ranks: rank ") +
                                   std::to_string(options.rank) +
                                   (options.link.enabled() ? " emulates a link, rank 0 does not"
                                                           : " does not emulate a link, rank 0 does") +
                                   "; every rank emulates one (of any rate) or none does", true);
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
      // Every rank that arrived answered the challenge before it did; a claim made without the
      // key (a client that skipped check_run_key) fails the rendezvous here, naming the rank.
      for (int r = 1; key && r < options.world_size; ++r) {
        const std::string entry = "auth/response/" + std::to_string(r);
        bool proved = false;
        try {
          const std::string answer = store_string(s, entry);
          const std::string expected = response_to(*key, challenge, r);
          MacTag a{}, b{};
          if (answer.size() == a.size()) {
            std::copy(answer.begin(), answer.end(), a.begin());
            std::copy(expected.begin(), expected.end(), b.begin());
            proved = RunKey::equal(a, b);
          }
        } catch (const AuthenticationError&) {
        }
        if (!proved) {
          abort_rendezvous(s, who, "rank " + std::to_string(r) + " claimed its rank without "
                           "answering the run-key challenge ('" + entry + "' is missing or "
                           "forged); it does not hold the run key", false);
        }
      }
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
    std::shared_ptr<Group> group;
    if (key) {
      auto gloo = make_gloo_backend(prefixed, options.rank, options.world_size, options.timeout,
                                    hostname);
      progress.enter("agreeing on the group's authenticated session");
      group = std::make_shared<Group>(
          make_authenticated_backend(std::move(gloo), prefixed, *key, remaining(deadline)),
          options.timeout);
    } else {
      group = std::make_shared<Group>(prefixed, options.rank, options.world_size,
                                      options.timeout, hostname);
    }
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
  const auto key = RunKey::resolve(options.run_key, options.run_key_file,
                                   "run_key (DILOCO_RUN_KEY)", "run_key_file (DILOCO_RUN_KEY_FILE)");
  auto progress = std::make_shared<Rendezvous>();
  std::thread([progress, options, key, hostname, deadline] {
    std::exception_ptr error;
    try {
      rendezvous(options, key, hostname, deadline, *progress);
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

}  // namespace diloco
