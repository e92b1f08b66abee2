// Membership epochs over the coordinator's store (see elastic/membership.h).
//
// Store keys, all under the prefix "diloco-elastic/":
//   inc/<slot>                 processes started for a slot (the incarnation counter)
//   hb/<island>                the island's heartbeat counter
//   left/<island>              the island left on purpose (its silence is not a loss)
//   removed/<island>           removed for good, and why (a failed audit): no epoch takes it back
//   init/<slot>, init/epoch    the first islands' names, and the first epoch's number
//   started                    the first epoch formed: later islands join
//   epochs, latest             epoch numbers handed out; the newest announced
//   e/<E>/members, /from       an epoch's islands in rank order; the epoch it was formed from
//   e/<E>/arrived[/<island>]   the arrival barrier before the epoch's group connects
//   e/<E>/failed, /lost/<i>    why the epoch failed; islands known to be gone
//   e/<E>/abandoned            an announced epoch that will not form (its joiners give up)
//   e/<E>/reform/<round>/...   count, leader, in/<island>, members: forming the next epoch
//   e/<E>/b/<outer step>       rank 0's admission decision at a boundary ("-" or the next epoch)
//   join/seq, join/count, join/list/<i>, join/processed, join/<island>/{fingerprint,status}
//   xfer/<E>/manifest, xfer/<E>/<chunk>   the outer state for an epoch's joiners
//   g/<E>/...                  the epoch's Gloo rendezvous (and, with a run key, its session nonces)
//   auth/run                   with a run key: the run's challenge (MACed); without one: "none"
#include "diloco/elastic/membership.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <openssl/rand.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "comm/c10d_compat.h"
#include "comm/net.h"
#include "diloco/comm/auth.h"
#include "diloco/comm/backend.h"
#include "diloco/comm/group.h"
#include "diloco/errors.h"
#include "diloco/sync/checkpoint.h"
#include "diloco/sync/fingerprint.h"

namespace diloco {
namespace {

using Clock = std::chrono::steady_clock;
using Store = c10::intrusive_ptr<c10d::Store>;

constexpr std::size_t kChunkBytes = 4 << 20;
constexpr auto kPoll = std::chrono::milliseconds(10);
constexpr int kMaxReformRounds = 16;

std::string get(const Store& s, const std::string& key) {
  const auto v = s->get(key);
  return std::string(v.begin(), v.end());
}
void put(const Store& s, const std::string& key, const std::string& value) {
  s->set(key, std::vector<std::uint8_t>(value.begin(), value.end()));
}
bool has(const Store& s, const std::string& key) { return s->check({key}); }
std::string get_or(const Store& s, const std::string& key, const std::string& fallback) {
  return has(s, key) ? get(s, key) : fallback;
}

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}
std::string joined(const std::vector<std::string>& words) {
  std::string out;
  for (const auto& w : words) out += (out.empty() ? "" : " ") + w;
  return out;
}
bool contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

std::string epoch_key(std::int64_t e, const std::string& what) {
  return "e/" + std::to_string(e) + "/" + what;
}

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The group of a joiner before its admission: no peers, and nothing may be issued on it.
class Unconnected : public Backend {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  std::string name() const override { return "unconnected"; }
  c10::intrusive_ptr<c10d::Work> allreduce_sum(at::Tensor&) override { refuse(); }
  c10::intrusive_ptr<c10d::Work> broadcast(at::Tensor&, int) override { refuse(); }
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<at::Tensor>&, at::Tensor&) override {
    refuse();
  }
  c10::intrusive_ptr<c10d::Work> barrier() override { refuse(); }
  c10::intrusive_ptr<c10d::Work> send(at::Tensor&, int, int) override { refuse(); }
  c10::intrusive_ptr<c10d::Work> recv(at::Tensor&, int, int) override { refuse(); }
  void wait(const c10::intrusive_ptr<c10d::Work>&, const std::string&) override { refuse(); }

 private:
  [[noreturn]] static void refuse() {
    throw Error("[elastic] this island is not a member of the run yet (it is being admitted)");
  }
};

// The first field in which a joiner's configuration differs from the run's, or "".
std::string first_difference(const std::string& run, const std::string& joiner,
                             const std::string& who) {
  const Fingerprint mine = Fingerprint::parse(run, "the run's configuration");
  const Fingerprint theirs = Fingerprint::parse(joiner, who + "'s configuration");
  std::map<std::string, std::string> values(theirs.fields().begin(), theirs.fields().end());
  for (const auto& [field, value] : mine.fields()) {
    auto it = values.find(field);
    if (it == values.end()) return field + " is '" + value + "' in the run but unset on " + who;
    if (it->second != value) {
      return field + " is '" + value + "' in the run but '" + it->second + "' on " + who +
             "; a joining island must use the run's value";
    }
  }
  for (const auto& [field, value] : theirs.fields()) {
    bool known = false;
    for (const auto& f : mine.fields()) known = known || f.first == field;
    if (!known) return field + " is '" + value + "' on " + who + " but unset in the run";
  }
  return "";
}

// An optional integer variable >= 1 (DILOCO_MIN_ISLANDS, DILOCO_*_TIMEOUT_S); `unit` names it.
long env_count(const char* name, long fallback, const char* unit) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  if (end == v || *end != '\0' || n < 1) {
    throw OptionError(std::string("[elastic] environment variable ") + name + "='" + v +
                      "' must be an integer >= 1 (" + unit + ")");
  }
  return n;
}

long whole_seconds(std::chrono::milliseconds d) { return static_cast<long>(d.count() / 1000); }

}  // namespace

void ElasticOptions::validate() const {
  if (world_size < 1) {
    throw OptionError("[elastic] world_size (WORLD_SIZE, the islands the run starts with) must "
                      "be >= 1, got " + std::to_string(world_size));
  }
  if (slot < 0) throw OptionError("[elastic] slot (RANK) must be >= 0, got " + std::to_string(slot));
  if (min_islands < 1 || min_islands > world_size) {
    throw OptionError("[elastic] min_islands must be in [1, world_size = " +
                      std::to_string(world_size) + "], got " + std::to_string(min_islands));
  }
  if (store_port < 1 || store_port > 65535) {
    throw OptionError("[elastic] store_port (MASTER_PORT) must be in [1, 65535], got " +
                      std::to_string(store_port));
  }
  if (store_addr.empty()) throw OptionError("[elastic] store_addr (MASTER_ADDR) must not be empty");
  const auto ms = [](std::chrono::milliseconds d) { return std::to_string(d.count()) + " ms"; };
  if (heartbeat_interval.count() < 10) {
    throw OptionError("[elastic] heartbeat_interval must be >= 10 ms, got " + ms(heartbeat_interval));
  }
  if (heartbeat_timeout < 2 * heartbeat_interval) {
    throw OptionError("[elastic] heartbeat_timeout must be >= 2 x heartbeat_interval (" +
                      ms(2 * heartbeat_interval) + "), got " + ms(heartbeat_timeout));
  }
  if (timeout <= heartbeat_timeout) {
    throw OptionError("[elastic] timeout (the collective timeout) must be above heartbeat_timeout (" +
                      ms(heartbeat_timeout) + "), got " + ms(timeout));
  }
  if (rendezvous_timeout < timeout) {
    throw OptionError("[elastic] rendezvous_timeout must be >= timeout (" + ms(timeout) +
                      "), got " + ms(rendezvous_timeout));
  }
  link.validate();
  RunKey::resolve(run_key, run_key_file, "run_key (DILOCO_RUN_KEY)",
                  "run_key_file (DILOCO_RUN_KEY_FILE)");
}

ElasticOptions ElasticOptions::read_env() {
  const GroupOptions g = GroupOptions::read_env();
  ElasticOptions o;
  o.run_key = g.run_key;
  o.run_key_file = g.run_key_file;
  o.store_addr = g.master_addr;
  o.store_port = g.master_port;
  o.slot = g.rank;
  o.world_size = g.world_size;
  o.hostname = g.hostname;
  o.link = g.link;
  o.min_islands = static_cast<int>(env_count("DILOCO_MIN_ISLANDS", o.min_islands, "islands"));
  o.heartbeat_timeout = std::chrono::seconds(
      env_count("DILOCO_HEARTBEAT_TIMEOUT_S", whole_seconds(o.heartbeat_timeout), "seconds"));
  o.heartbeat_interval = interval_for(o.heartbeat_timeout);
  o.timeout =
      std::chrono::seconds(env_count("DILOCO_TIMEOUT_S", whole_seconds(o.timeout), "seconds"));
  o.rendezvous_timeout = std::chrono::seconds(env_count(
      "DILOCO_RENDEZVOUS_TIMEOUT_S", whole_seconds(o.rendezvous_timeout), "seconds"));
  return o;
}

ElasticOptions ElasticOptions::from_env() {
  for (const char* name : {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"}) {
    const char* v = std::getenv(name);
    if (v == nullptr || *v == '\0') {
      throw OptionError(std::string("[elastic] environment variable ") + name +
                        " is not set; launch the islands with diloco-run --elastic (or set "
                        "MASTER_ADDR/MASTER_PORT to the coordinator's store, RANK and WORLD_SIZE)");
    }
  }
  ElasticOptions o = read_env();
  o.validate();
  return o;
}

std::chrono::milliseconds ElasticOptions::interval_for(std::chrono::milliseconds heartbeat_timeout) {
  return std::min<std::chrono::milliseconds>(std::chrono::milliseconds(1000), heartbeat_timeout / 5);
}

struct Membership::Impl {
  ElasticOptions options;
  std::optional<RunKey> key;  // the run key, if any: every store connection and group uses it
  std::string id;
  std::string hostname;
  Store calls, beats, uploads;  // one connection per thread that uses the store
  std::shared_ptr<Interrupt> interrupt = std::make_shared<Interrupt>();
  std::shared_ptr<Group> group;
  // The groups of past epochs. They are never destroyed: a Gloo group whose peer is stopped
  // joins its threads only after its collectives time out, and a survivor must not close its
  // sockets either (its peers would read that as its own loss). One per epoch, so few.
  std::vector<std::shared_ptr<Backend>> retired;
  std::int64_t pending = -1;  // the epoch announced at the last boundary
  std::int64_t epochs_joined = 0;
  bool joining = false;

  // Shared with the heartbeat thread.
  mutable std::mutex mutex;
  std::condition_variable wake;
  bool stopping = false;
  std::int64_t epoch = -1;
  std::vector<std::string> members;
  bool alarms = false;  // raise the interrupt on a silent peer, a failed epoch, a removal
  struct Silence {
    std::int64_t count = -1;
    Clock::time_point since;
  };
  std::map<std::string, Silence> silence;  // per member of the current epoch
  std::thread beat_thread;
  std::thread upload_thread;

  std::string who() const { return "[elastic] island " + id; }

  // The current epoch and its members, as the heartbeat thread sees them too.
  std::pair<std::int64_t, std::vector<std::string>> current() const {
    std::lock_guard<std::mutex> lock(mutex);
    return {epoch, members};
  }

  std::string where() const {
    return options.store_addr + ":" + std::to_string(options.store_port);
  }

  // A new connection to the coordinator's store, under the run's prefix; with a run key (and
  // `keyed`), every value MACed below the prefix, so that the MACs bind full names.
  Store open_store(bool keyed = true) const {
    const std::string where = this->where();
    try {
      Store raw = compat::make_tcp_store(options.store_addr,
                                         static_cast<std::uint16_t>(options.store_port),
                                         /*is_server=*/false, options.timeout);
      if (key && keyed) raw = make_authenticated_store(raw, *key);
      return Store(c10::make_intrusive<c10d::PrefixStore>("diloco-elastic", raw));
    } catch (const std::exception& e) {
      const std::string what = e.what();
      throw Error("[elastic] slot " + std::to_string(options.slot) +
                  ": no coordinator answered at " + where +
                  " (start diloco-coordinator, or launch with diloco-run --elastic): " +
                  what.substr(0, what.find('\n')));
    }
  }

  // Before this process takes an incarnation: it holds the run's key, or the run has none and
  // neither has it. The first keyed island makes the challenge; an unkeyed one marks the run
  // "none". Throws AuthenticationError saying which of the three mismatches it is.
  void check_run_key() const {
    const std::string who = "[elastic] slot " + std::to_string(options.slot);
    const Store plain = open_store(/*keyed=*/false);
    const std::vector<std::uint8_t> none = {'n', 'o', 'n', 'e'};
    if (!key) {
      if (plain->compareSet("auth/run", {}, none) != none) {
        throw AuthenticationError(who + ": the run at " + where() + " requires a run key and this "
                                  "process has none: set DILOCO_RUN_KEY or DILOCO_RUN_KEY_FILE "
                                  "(ElasticOptions::run_key or run_key_file) to the run's key");
      }
      return;
    }
    std::vector<std::uint8_t> challenge(32);
    if (RAND_bytes(challenge.data(), static_cast<int>(challenge.size())) != 1) {
      throw Error(who + ": OpenSSL could not make a random challenge");
    }
    try {
      open_store()->compareSet("auth/run", {}, challenge);
    } catch (const AuthenticationError&) {
      if (plain->get("auth/run") == none) {
        throw AuthenticationError(who + ": this process has a run key but the run at " + where() +
                                  " has none (its islands started without DILOCO_RUN_KEY / "
                                  "DILOCO_RUN_KEY_FILE); give every island the same key, or none");
      }
      throw AuthenticationError(who + ": this process's run key does not match the run's at " +
                                where() + " (the run's challenge was made with another key); "
                                "check DILOCO_RUN_KEY / DILOCO_RUN_KEY_FILE");
    }
  }

  // --- the heartbeat thread ---
  void beat_loop() {
    std::unique_lock<std::mutex> lock(mutex);
    while (!stopping) {
      lock.unlock();
      try {
        beat_once();
      } catch (const std::exception& e) {
        interrupt->raise("the coordinator's store at " + options.store_addr + ":" +
                         std::to_string(options.store_port) + " stopped answering: " + e.what());
      }
      lock.lock();
      wake.wait_for(lock, options.heartbeat_interval, [&] { return stopping; });
    }
  }

  void beat_once() {
    beats->add("hb/" + id, 1);
    std::int64_t e;
    std::vector<std::string> m;
    bool alarm;
    {
      std::lock_guard<std::mutex> lock(mutex);
      e = epoch;
      m = members;
      alarm = alarms;
    }
    if (e < 0) return;
    if (alarm) {
      // Removed: a newer epoch was formed without us. Every epoch is formed from the newest one
      // (by a reform of its survivors, or by admitting joiners to its members), so a member that
      // is still in the run is in the newest epoch, whatever happened since its own.
      const std::int64_t latest = std::stoll(get_or(beats, "latest", "-1"));
      if (latest > e && !contains(split(get_or(beats, epoch_key(latest, "members"), "")), id)) {
        interrupt->raise("island " + id + " was removed from the run (epoch " +
                         std::to_string(latest) + " formed without it)");
        return;
      }
      if (has(beats, epoch_key(e, "failed"))) {
        interrupt->raise(get(beats, epoch_key(e, "failed")));
        return;
      }
    }
    const auto now = Clock::now();
    std::string silent;
    double silent_s = 0.0;
    for (const auto& x : m) {
      if (x == id) continue;
      const std::int64_t count = beats->add("hb/" + x, 0);
      std::lock_guard<std::mutex> lock(mutex);
      auto& s = silence[x];
      if (s.count != count) {
        s.count = count;
        s.since = now;
      } else if (now - s.since > options.heartbeat_timeout && silent.empty()) {
        silent = x;
        silent_s = seconds(now - s.since);
      }
    }
    if (alarm && !silent.empty() && !has(beats, "left/" + silent)) {
      std::ostringstream why;
      why << "island " << silent << " sent no heartbeat for " << static_cast<int>(silent_s)
          << " s (heartbeat_timeout " << options.heartbeat_timeout.count()
          << " ms: stopped, or its link is down)";
      put(beats, epoch_key(e, "lost/" + silent), why.str());
      if (!has(beats, epoch_key(e, "failed"))) put(beats, epoch_key(e, "failed"), why.str());
      interrupt->raise(why.str());
    }
  }

  // How long member x's heartbeat has not moved, as the heartbeat thread saw it.
  double silent_for(const std::string& x) const {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = silence.find(x);
    if (it == silence.end() || it->second.count < 0) return 0.0;
    return seconds(Clock::now() - it->second.since);
  }
  bool gone(std::int64_t e, const std::string& x) const {
    return has(calls, epoch_key(e, "lost/" + x)) || has(calls, "left/" + x) ||
           silent_for(x) > seconds(options.heartbeat_timeout);
  }

  void set_epoch(std::int64_t e, std::vector<std::string> m, bool alarm) {
    std::lock_guard<std::mutex> lock(mutex);
    if (e != epoch) {
      std::map<std::string, Silence> kept;
      for (const auto& x : m) {
        auto it = silence.find(x);
        if (it != silence.end()) kept[x] = it->second;
      }
      silence = std::move(kept);
    }
    epoch = e;
    members = std::move(m);
    alarms = alarm;
  }

  // Joins epoch e: the arrival barrier (every member there, none lost meanwhile), then its group.
  void enter(std::int64_t e) {
    const auto m = split(get(calls, epoch_key(e, "members")));
    const auto me = std::find(m.begin(), m.end(), id);
    if (me == m.end() && has(calls, "removed/" + id)) {
      throw RemovedError(who() + ": removed from the run: " + get(calls, "removed/" + id));
    }
    if (me == m.end()) {
      throw RemovedError(who() + ": removed from the run: epoch " + std::to_string(e) +
                         " was formed without it (" + joined(m) + "); start it again to rejoin");
    }
    set_epoch(e, m, false);
    interrupt->clear();
    put(calls, epoch_key(e, "arrived/" + id), "1");
    calls->add(epoch_key(e, "arrived"), 1);
    const auto deadline = Clock::now() + options.rendezvous_timeout;
    while (calls->add(epoch_key(e, "arrived"), 0) < static_cast<std::int64_t>(m.size())) {
      if (has(calls, epoch_key(e, "abandoned"))) {
        throw RemovedError(who() + ": epoch " + std::to_string(e) + " was abandoned before it "
                           "formed: " + get(calls, epoch_key(e, "abandoned")) +
                           "; start the island again to rejoin");
      }
      if (has(calls, epoch_key(e, "failed"))) {
        throw PeerLostError(who() + ": epoch " + std::to_string(e) + " failed while its "
                            "islands arrived: " + get(calls, epoch_key(e, "failed")));
      }
      for (std::size_t r = 0; r < m.size(); ++r) {
        if (m[r] == id || has(calls, epoch_key(e, "arrived/" + m[r]))) continue;
        if (gone(e, m[r]) || Clock::now() > deadline) {
          throw PeerLostError(who() + ": island " + m[r] + " did not arrive for epoch " +
                              std::to_string(e) + " (gone, or silent for " +
                              std::to_string(static_cast<int>(silent_for(m[r]))) + " s)",
                              static_cast<int>(r));
        }
      }
      std::this_thread::sleep_for(kPoll);
    }
    const int rank = static_cast<int>(me - m.begin());
    retired.push_back(group->replace_backend(connect(e, m, rank)));
    set_epoch(e, m, true);
    ++epochs_joined;
  }

  // Connects epoch e's Gloo group. Gloo's connect cannot be interrupted, and a member killed
  // between the arrival barrier and here would hold it for the whole collective timeout: it runs
  // on a thread of its own, and a member declared gone meanwhile ends the wait (the thread is left
  // to fail by itself at Gloo's timeout; it owns everything it uses).
  std::unique_ptr<Backend> connect(std::int64_t e, const std::vector<std::string>& m, int rank) {
    struct Attempt {
      std::mutex mutex;
      bool done = false;
      std::unique_ptr<Backend> backend;
      std::exception_ptr error;
    };
    auto attempt = std::make_shared<Attempt>();
    // A connection of its own: Gloo's blocking store reads would hold up this thread's calls.
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("g/" + std::to_string(e), open_store());
    std::thread([attempt, prefixed, rank, n = static_cast<int>(m.size()), timeout = options.timeout,
                 host = hostname, key = key] {
      std::unique_ptr<Backend> backend;
      std::exception_ptr error;
      try {
        backend = make_gloo_backend(prefixed, rank, n, timeout, host);
        if (key) backend = make_authenticated_backend(std::move(backend), prefixed, *key, timeout);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(attempt->mutex);
      attempt->backend = std::move(backend);
      attempt->error = error;
      attempt->done = true;
    }).detach();
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(attempt->mutex);
        if (attempt->done) {
          if (attempt->error) std::rethrow_exception(attempt->error);
          return std::move(attempt->backend);
        }
      }
      for (std::size_t r = 0; r < m.size(); ++r) {
        if (m[r] != id && gone(e, m[r])) {
          throw PeerLostError(who() + ": island " + m[r] + " was lost while epoch " +
                              std::to_string(e) + "'s group connected (silent for " +
                              std::to_string(static_cast<int>(silent_for(m[r]))) + " s)",
                              static_cast<int>(r));
        }
      }
      std::this_thread::sleep_for(kPoll);
    }
  }

  // The leader of a reform round decides the next epoch (or "!" and why the run stops).
  std::string lead(std::int64_t e, const std::vector<std::string>& m, const std::string& base) {
    const auto grace_end = Clock::now() + options.heartbeat_timeout;
    std::map<std::string, bool> in;  // decided members: true = in the next epoch
    in[id] = true;
    while (in.size() < m.size() && Clock::now() < grace_end) {
      for (const auto& x : m) {
        if (in.count(x) != 0) continue;
        if (has(calls, "removed/" + x)) {
          in[x] = false;
        } else if (has(calls, base + "in/" + x)) {
          in[x] = true;
        } else if (gone(e, x)) {
          in[x] = false;
        }
      }
      if (in.size() < m.size()) std::this_thread::sleep_for(kPoll);
    }
    std::vector<std::string> survivors, lost;
    for (const auto& x : m) (in.count(x) != 0 && in[x] ? survivors : lost).push_back(x);
    if (static_cast<int>(survivors.size()) < options.min_islands) {
      const std::string why = "!only " + std::to_string(survivors.size()) + " island(s) remain (" +
                              joined(survivors) + "; lost: " + joined(lost) +
                              "), below min_islands = " + std::to_string(options.min_islands);
      put(calls, base + "members", why);
      return why;
    }
    const std::int64_t next = calls->add("epochs", 1) - 1;
    put(calls, epoch_key(next, "members"), joined(survivors));
    put(calls, epoch_key(next, "from"), std::to_string(e));
    put(calls, "latest", std::to_string(next));
    put(calls, base + "members", std::to_string(next));
    return std::to_string(next);
  }

  void reform() {
    std::int64_t e;
    std::vector<std::string> m;
    {
      std::lock_guard<std::mutex> lock(mutex);
      e = epoch;
      m = members;
      alarms = false;
    }
    interrupt->clear();
    if (e < 0) throw Error(who() + ": reform() before the island is a member");
    if (pending >= 0) {
      put(calls, epoch_key(pending, "abandoned"),
          "epoch " + std::to_string(e) + " failed before it: " +
              get_or(calls, epoch_key(e, "failed"), "a member was lost"));
      pending = -1;
    }
    const auto began = Clock::now();
    const std::string why = get_or(calls, epoch_key(e, "failed"), "a member was lost");
    const auto deadline = began + options.timeout + 2 * options.heartbeat_timeout;
    for (int round = 0; round < kMaxReformRounds; ++round) {
      const std::string base = epoch_key(e, "reform/" + std::to_string(round) + "/");
      const std::int64_t n = calls->add(base + "count", 1);
      if (n == 1) put(calls, base + "leader", id);
      put(calls, base + "in/" + id, "1");
      std::string decided;
      if (n == 1) {
        decided = lead(e, m, base);
      } else {
        bool next_round = false;
        while (decided.empty() && !next_round) {
          if (has(calls, base + "members")) {
            decided = get(calls, base + "members");
          } else if (has(calls, base + "leader") && gone(e, get(calls, base + "leader"))) {
            next_round = true;  // the leader went silent while deciding
          } else if (Clock::now() > deadline) {
            throw Error(who() + ": no new membership was agreed within " +
                        std::to_string((options.timeout + 2 * options.heartbeat_timeout).count()) +
                        " ms after epoch " + std::to_string(e) + " failed");
          } else {
            std::this_thread::sleep_for(kPoll);
          }
        }
        if (next_round) continue;
      }
      if (decided[0] == '!') throw TooFewIslandsError(who() + ": " + decided.substr(1));
      enter(std::stoll(decided));
      std::vector<std::string> now_members;
      std::int64_t now_epoch;
      {
        std::lock_guard<std::mutex> lock(mutex);
        now_members = members;
        now_epoch = epoch;
      }
      std::vector<std::string> lost;
      for (const auto& x : m) {
        if (!contains(now_members, x)) lost.push_back(x);
      }
      std::fprintf(stderr,
                   "[elastic] island %s: epoch %lld formed in %.2f s with %zu islands (%s; lost: "
                   "%s) after epoch %lld failed: %s\n",
                   id.c_str(), static_cast<long long>(now_epoch), seconds(Clock::now() - began),
                   now_members.size(), joined(now_members).c_str(),
                   lost.empty() ? "none" : joined(lost).c_str(), static_cast<long long>(e),
                   why.c_str());
      return;
    }
    throw Error(who() + ": no leader formed a new membership in " +
                std::to_string(kMaxReformRounds) + " rounds after epoch " + std::to_string(e) +
                " failed");
  }

  // Waits for a key rank 0 writes, giving up when the epoch fails or after the timeout.
  std::string await_key(const std::string& key, const std::string& what) {
    const auto deadline = Clock::now() + options.timeout;
    while (!has(calls, key)) {
      if (interrupt->raised()) {
        throw PeerLostError(who() + ": given up waiting for " + what + ": " + interrupt->reason());
      }
      if (Clock::now() > deadline) {
        throw PeerLostError(who() + ": " + what + " did not come within " +
                            std::to_string(options.timeout.count()) + " ms", 0);
      }
      std::this_thread::sleep_for(kPoll);
    }
    return get(calls, key);
  }

  void upload(std::int64_t e, std::string bytes) {
    if (upload_thread.joinable()) upload_thread.join();
    upload_thread = std::thread([this, e, bytes = std::move(bytes)] {
      try {
        const std::string base = "xfer/" + std::to_string(e) + "/";
        std::string manifest;
        std::size_t chunks = 0;
        for (std::size_t at = 0; at < bytes.size() || chunks == 0; at += kChunkBytes, ++chunks) {
          const std::size_t n = std::min(kChunkBytes, bytes.size() - at);
          put(uploads, base + std::to_string(chunks), bytes.substr(at, n));
          manifest += sha256_hex(bytes.data() + at, n) + "\n";
        }
        put(uploads, base + "manifest",
            std::to_string(chunks) + " " + std::to_string(bytes.size()) + " " +
                sha256_hex(bytes.data(), bytes.size()) + "\n" + manifest);
      } catch (const std::exception& ex) {
        // The joiner then waits until the epoch is abandoned or its timeout: say why here.
        std::fprintf(stderr, "%s: publishing the state for epoch %lld failed: %s\n",
                     who().c_str(), static_cast<long long>(e), ex.what());
      }
    });
  }

  std::string download(std::int64_t e, std::int64_t from, Clock::time_point deadline) {
    const std::string base = "xfer/" + std::to_string(e) + "/";
    while (!has(calls, base + "manifest")) {
      if (has(calls, epoch_key(e, "abandoned")) || has(calls, epoch_key(from, "failed"))) {
        throw RemovedError(who() + ": the run's epoch " + std::to_string(from) +
                           " failed while this island was being admitted (" +
                           get_or(calls, epoch_key(from, "failed"), "abandoned") +
                           "); start it again to rejoin");
      }
      if (Clock::now() > deadline) {
        throw Error(who() + ": the outer state for epoch " + std::to_string(e) +
                    " was not published within the rendezvous timeout");
      }
      std::this_thread::sleep_for(kPoll);
    }
    std::istringstream manifest(get(calls, base + "manifest"));
    std::size_t chunks = 0, size = 0;
    std::string total;
    manifest >> chunks >> size >> total;
    std::string bytes;
    bytes.reserve(size);
    for (std::size_t i = 0; i < chunks; ++i) {
      std::string expected;
      manifest >> expected;
      const std::string chunk = get(calls, base + std::to_string(i));
      if (sha256_hex(chunk.data(), chunk.size()) != expected) {
        throw Error(who() + ": chunk " + std::to_string(i) + " of " + std::to_string(chunks) +
                    " of the outer state for epoch " + std::to_string(e) +
                    " does not match its checksum (corrupted in transfer)");
      }
      bytes += chunk;
    }
    if (bytes.size() != size || sha256_hex(bytes.data(), bytes.size()) != total) {
      throw Error(who() + ": the outer state for epoch " + std::to_string(e) + " is " +
                  std::to_string(bytes.size()) + " bytes, not the " + std::to_string(size) +
                  " its manifest lists, or does not match its checksum");
    }
    return bytes;
  }
};

Membership::Membership(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Membership::~Membership() {
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->wake.notify_all();
  if (impl_->beat_thread.joinable()) impl_->beat_thread.join();
  if (impl_->upload_thread.joinable()) impl_->upload_thread.join();
}

std::shared_ptr<Membership> Membership::join(const ElasticOptions& options) {
  options.validate();
  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  m.options = options;
  m.key = RunKey::resolve(options.run_key, options.run_key_file, "run_key (DILOCO_RUN_KEY)",
                          "run_key_file (DILOCO_RUN_KEY_FILE)");
  const std::string where = m.where();
  try {
    m.hostname = options.hostname.empty() ? net::local_address_towards(options.store_addr)
                                          : options.hostname;
  } catch (const std::invalid_argument& e) {
    throw Error("[elastic] MASTER_ADDR " + std::string(e.what()));
  }
  m.check_run_key();
  m.calls = m.open_store();
  // The link emulation exchanges the ranks' issue times beside each collective (comm/group.h):
  // every island of the run emulates a link (of any rate) or none does. The first island to
  // arrive sets it for the run.
  const std::vector<std::uint8_t> emulated = {options.link.enabled() ? std::uint8_t('1')
                                                                      : std::uint8_t('0')};
  if (m.calls->compareSet("link_emulated", {}, emulated) != emulated) {
    throw OptionError("[elastic] slot " + std::to_string(options.slot) + ": link emulation "
                      "(ElasticOptions::link, DILOCO_LINK_MBPS / DILOCO_LINK_LATENCY_MS) differs "
                      "from the run's at " + where + ": this island " +
                      (options.link.enabled() ? "emulates a link and the run's islands do not"
                                              : "does not emulate a link and the run's islands do") +
                      "; every island emulates one (of any rate) or none does");
  }
  m.beats = m.open_store();
  m.uploads = m.open_store();
  const std::string slot = std::to_string(options.slot);
  const std::int64_t incarnation = m.calls->add("inc/" + slot, 1) - 1;
  m.id = slot + "." + std::to_string(incarnation);
  m.group = std::make_shared<Group>(std::make_unique<Unconnected>(), options.timeout);
  m.group->set_link(options.link);
  m.group->set_interrupt(m.interrupt);
  m.beat_thread = std::thread([&m] { m.beat_loop(); });
  std::shared_ptr<Membership> self(new Membership(std::move(impl)));

  const bool first = incarnation == 0 && options.slot < options.world_size && !has(m.calls, "started");
  if (!first) {
    m.joining = true;
    return self;
  }
  put(m.calls, "init/" + slot, m.id);
  const auto deadline = Clock::now() + options.rendezvous_timeout;
  const auto late = [&] {
    std::string missing;
    for (int s = 0; s < options.world_size; ++s) {
      if (!has(m.calls, "init/" + std::to_string(s))) missing += " " + std::to_string(s);
    }
    return missing;
  };
  if (options.slot == 0) {
    std::vector<std::string> ids;
    for (int s = 0; s < options.world_size; ++s) {
      const std::string key = "init/" + std::to_string(s);
      while (!has(m.calls, key)) {
        if (Clock::now() > deadline) {
          throw Error(m.who() + ": slot(s)" + late() + " did not arrive at " + where + " within " +
                      std::to_string(options.rendezvous_timeout.count()) + " ms");
        }
        std::this_thread::sleep_for(kPoll);
      }
      ids.push_back(get(m.calls, key));
    }
    const std::int64_t e = m.calls->add("epochs", 1) - 1;
    put(m.calls, epoch_key(e, "members"), joined(ids));
    put(m.calls, epoch_key(e, "from"), "-1");
    put(m.calls, "latest", std::to_string(e));
    put(m.calls, "init/epoch", std::to_string(e));
    put(m.calls, "started", "1");
  }
  while (!has(m.calls, "init/epoch")) {
    if (Clock::now() > deadline) {
      throw Error(m.who() + ": the run's first epoch did not form at " + where + " within " +
                  std::to_string(options.rendezvous_timeout.count()) + " ms (missing slots:" +
                  late() + ")");
    }
    std::this_thread::sleep_for(kPoll);
  }
  m.enter(std::stoll(get(m.calls, "init/epoch")));
  return self;
}

const ElasticOptions& Membership::options() const { return impl_->options; }
const std::string& Membership::island() const { return impl_->id; }
bool Membership::joining() const { return impl_->joining; }
std::int64_t Membership::epoch() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->epoch;
}
std::vector<std::string> Membership::members() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->members;
}
std::shared_ptr<Group> Membership::group() const { return impl_->group; }
std::int64_t Membership::epochs_joined() const { return impl_->epochs_joined; }
bool Membership::failed() const { return impl_->interrupt->raised(); }

void Membership::report_failure(const std::string& reason, int peer) {
  Impl& m = *impl_;
  const auto [e, members] = m.current();
  m.interrupt->raise(reason);
  if (e < 0) return;
  if (peer >= 0 && peer < static_cast<int>(members.size()) && members[peer] != m.id) {
    put(m.calls, epoch_key(e, "lost/" + members[peer]), reason);
  }
  if (!has(m.calls, epoch_key(e, "failed"))) put(m.calls, epoch_key(e, "failed"), reason);
}

void Membership::reform() { impl_->reform(); }

void Membership::remove(const std::vector<std::string>& islands, const std::string& why) {
  for (const auto& x : islands) put(impl_->calls, "removed/" + x, why);
}

void Membership::at_boundary(std::int64_t outer_step, const std::string& mine,
                             const std::function<std::string()>& state) {
  Impl& m = *impl_;
  const auto [e, members] = m.current();
  const std::string decision_key = epoch_key(e, "b/" + std::to_string(outer_step));
  std::string decision;
  if (members.front() == m.id) {
    std::int64_t i = std::stoll(get_or(m.calls, "join/processed", "0"));
    const std::int64_t count = m.calls->add("join/count", 0);
    std::vector<std::string> accepted;
    for (; i < count && has(m.calls, "join/list/" + std::to_string(i)); ++i) {
      std::string joiner, theirs;
      try {
        joiner = get(m.calls, "join/list/" + std::to_string(i));
        theirs = get(m.calls, "join/" + joiner + "/fingerprint");
      } catch (const AuthenticationError& e) {
        // Written by a client without the run's key (one that skipped check_run_key): refused.
        std::fprintf(stderr, "%s: join request %lld refused: %s\n", m.who().c_str(),
                     static_cast<long long>(i), e.what());
        continue;
      }
      const std::string diff = first_difference(mine, theirs, "island " + joiner);
      if (!diff.empty()) {
        put(m.calls, "join/" + joiner + "/status", "rejected\n" + diff);
      } else if (!has(m.calls, "left/" + joiner)) {
        accepted.push_back(joiner);
      }
    }
    put(m.calls, "join/processed", std::to_string(i));
    decision = "-";
    if (!accepted.empty()) {
      const std::int64_t next = m.calls->add("epochs", 1) - 1;
      auto grown = members;
      grown.insert(grown.end(), accepted.begin(), accepted.end());
      put(m.calls, epoch_key(next, "members"), joined(grown));
      put(m.calls, epoch_key(next, "from"), std::to_string(e));
      put(m.calls, "latest", std::to_string(next));
      m.upload(next, state());
      for (const auto& joiner : accepted) {
        put(m.calls, "join/" + joiner + "/status",
            "admitted\n" + std::to_string(next) + " " + std::to_string(outer_step));
      }
      decision = std::to_string(next);
    }
    put(m.calls, decision_key, decision);
  } else {
    decision = m.await_key(decision_key, "rank 0's admission decision after outer step " +
                                             std::to_string(outer_step));
  }
  if (decision != "-") m.pending = std::stoll(decision);
}

void Membership::before_exchange() {
  Impl& m = *impl_;
  if (m.pending < 0) return;
  const std::int64_t e = m.pending;
  m.pending = -1;
  m.enter(e);
}

std::string Membership::await_admission(const std::string& mine) {
  Impl& m = *impl_;
  if (!m.joining) throw Error(m.who() + ": await_admission() on an island that is not joining");
  put(m.calls, "join/" + m.id + "/fingerprint", mine);
  const std::int64_t i = m.calls->add("join/seq", 1) - 1;
  put(m.calls, "join/list/" + std::to_string(i), m.id);
  m.calls->add("join/count", 1);
  const auto deadline = Clock::now() + m.options.rendezvous_timeout;
  const std::string status_key = "join/" + m.id + "/status";
  while (!has(m.calls, status_key)) {
    // Nobody is left to admit it when every member of the newest epoch has left, done.
    const auto newest = split(get_or(m.calls, epoch_key(std::stoll(get_or(m.calls, "latest", "0")),
                                                       "members"), ""));
    if (!newest.empty() && std::all_of(newest.begin(), newest.end(), [&](const std::string& x) {
          return has(m.calls, "left/" + x);
        })) {
      throw RunFinishedError(m.who() + ": the run is over (its last islands, " + joined(newest) +
                             ", finished) before this island was admitted");
    }
    if (Clock::now() > deadline) {
      throw Error(m.who() + ": not admitted within " +
                  std::to_string(m.options.rendezvous_timeout.count()) +
                  " ms (admission happens at the members' next outer step; are they running?)");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const std::string status = get(m.calls, status_key);
  if (status.rfind("rejected\n", 0) == 0) {
    throw OptionError(m.who() + ": not admitted: " + status.substr(9));
  }
  std::istringstream in(status.substr(9));
  std::int64_t e = -1, at = -1;
  in >> e >> at;
  const std::int64_t from = std::stoll(get(m.calls, epoch_key(e, "from")));
  std::string bytes = m.download(e, from, deadline);
  m.pending = e;
  m.joining = false;
  return bytes;
}

void Membership::leave() {
  Impl& m = *impl_;
  try {
    put(m.calls, "left/" + m.id, "1");
  } catch (const std::exception&) {
  }
  {
    std::lock_guard<std::mutex> lock(m.mutex);
    m.stopping = true;
  }
  m.wake.notify_all();
  if (m.beat_thread.joinable()) m.beat_thread.join();
}

}  // namespace diloco
