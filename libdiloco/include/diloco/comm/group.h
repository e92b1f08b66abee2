// The wide-area process group: the collectives islands use to talk over the slow link.
//
// A Group is three layers over a Backend (backend.h: the raw collectives of one process group,
// Gloo today, the seam where NCCL would fit):
//   backend          moves the bytes and turns its failures into PeerLostError / Error
//                    (GlooBackend: c10d's ProcessGroupGloo, naming a lost peer by rank and host);
//   link emulation   makes each operation take at least the time of an emulated link (below;
//                    src/comm/link_emulator.h);
//   accounting       bytes and time per operation (CommStats; src/comm/accounting.h).
// The last two know nothing of the backend, so they survive replace_backend(): a new membership
// epoch (a new Gloo group over PrefixStore("epoch/N"), possibly of another size) keeps the
// statistics and the link's queue. create() adds the rendezvous (a TCPStore, rank claims, one
// deadline; src/comm/rendezvous.cpp) and connects a Gloo backend over its store.
//
// c10d's rule holds here too: every rank must call the same collectives in the same order, with
// tensors of the same sizes. All collectives block until complete and are thread-compatible
// (one thread issues them) but the statistics may be read from any thread.
//
// Link emulation: with GroupOptions::link set (or DILOCO_LINK_MBPS / DILOCO_LINK_LATENCY_MS),
// every collective and send/recv takes at least the time comm_stats.h's link model gives it on
// a link of that rate and latency, counted from when the last rank it waits for put it on its
// own link (a recv: the sender's send; a broadcast: the root's; a send: this rank's own), since a
// real link carries nothing a peer has not sent: each rank's issue time on the steady clock and
// its queue's hold travel beside each collective on the backend (not counted in the
// statistics), so every rank of a group must emulate a link or none (Group::create and elastic
// join check; the rates may differ), and the ranks must share one machine's clock (a peer's
// issue time later than this rank's wait is impossible there, and such a collective keeps this
// rank's own reckoning). The wait for the backend's operation and the emulated delay overlap,
// and an asynchronous collective's delay runs while the caller computes, ending in wait().
// Collectives in flight together share the link: each island's outgoing (and incoming) direction
// transmits one collective after another, in issue order. No root rights and no traffic shaping
// are involved; the bytes still cross the real network at its own speed
// (benchmarks/netns_link.sh shapes a real link instead). Send and recv tags are in [0, 2^29).
//
// It is not an intra-island group (that one is per-step and uncompressed) and it does not
// compress anything: compression is layered above it.
#pragma once

#include <ATen/Tensor.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "diloco/comm/backend.h"
#include "diloco/comm/comm_stats.h"

namespace c10d {
class Store;
}

namespace diloco {

struct GroupOptions {
  std::string master_addr = "127.0.0.1";     // MASTER_ADDR (torchrun convention)
  int master_port = 29500;                   // MASTER_PORT, 1..65535
  int rank = -1;                             // RANK, 0..world_size-1
  int world_size = -1;                       // WORLD_SIZE, >= 1
  std::chrono::milliseconds timeout{60000};  // rendezvous and every collective
  std::string hostname = "";  // interface Gloo binds to; "" = resolve from master_addr's route
  LinkModel link;             // emulated wide-area link; default unlimited (no delay)
  // Every rank joins a store that someone else already serves at master_addr:master_port
  // (torchrun's agent does, and says so with TORCHELASTIC_USE_AGENT_STORE=True); by default
  // rank 0 serves it.
  bool join_existing_store = false;
  // The run key (diloco/comm/auth.h): at most one of the key itself (>= 16 bytes) or a file
  // holding it. Every rank of a run must have the same one, or none. With a key, joining needs
  // it (a process without it fails on its own), store values and payloads carry MACs, and the
  // all-reduce is an authenticated ring. Empty: no authentication, and no cost.
  std::string run_key = "";       // DILOCO_RUN_KEY
  std::string run_key_file = "";  // DILOCO_RUN_KEY_FILE

  // Throws OptionError naming the option and its allowed range.
  void validate() const;
  // Reads MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE (all required) and DILOCO_TIMEOUT_S
  // (optional, seconds), DILOCO_HOSTNAME, DILOCO_LINK_MBPS and DILOCO_LINK_LATENCY_MS (optional,
  // see LinkModel), DILOCO_RUN_KEY or DILOCO_RUN_KEY_FILE (optional, the run key),
  // TORCHELASTIC_USE_AGENT_STORE (set by torchrun). Throws OptionError naming a missing or malformed variable and its range.
  static GroupOptions from_env();
  // The same variables, each optional: unset ones keep the defaults above (rank and world_size
  // stay -1). Malformed values still throw OptionError; nothing is validated as a whole. For
  // front ends that take some values from arguments and the rest from the environment.
  static GroupOptions read_env();
};

class Group;

// A flag another thread raises to make every collective of a Group give up at once: those in
// flight stop waiting and throw PeerLostError with the reason, and new ones throw before they
// start. Elastic runs (diloco/elastic/membership.h) raise it when a peer misses its heartbeat or
// another island reports that the membership epoch failed, so that no island waits out the
// collective timeout for a peer that is stopped or gone. What the backend was doing is left to
// it: the group is abandoned, not repaired.
class Interrupt {
 public:
  // The first reason wins until clear().
  void raise(const std::string& reason);
  void clear();
  bool raised() const { return raised_.load(std::memory_order_acquire); }
  std::string reason() const;

 private:
  mutable std::mutex mutex_;
  std::atomic<bool> raised_{false};
  std::string reason_;
};

// A collective in flight. wait() blocks until it completes, records its bytes and time, and throws
// the backend's PeerLostError or Error on failure; it is idempotent. The Group must outlive it.
class PendingCollective {
 public:
  PendingCollective() = default;
  void wait();
  // Whether wait() would return now without blocking: the operation completed (or failed: wait()
  // throws) and the emulated link, if any, has carried it. Never blocks. A send or a recv is
  // never ready before wait() (Gloo completes them only there). Same thread as wait().
  bool ready();
  bool valid() const { return state_ != nullptr; }

 private:
  friend class Group;
  struct State;
  static void arrive(State& s);
  static void settle_on_backend(State& s);
  std::shared_ptr<State> state_;
};

class Group {
 public:
  // Rendezvous over a c10d::TCPStore (rank 0 hosts it at master_addr:master_port) and connect
  // a Gloo process group, all of it within one deadline (options.timeout), whatever the peers
  // do: a stopped rank 0 or another program on the port cannot hold it longer. Throws
  // OptionError for bad options, a world_size that differs from rank 0's, or a RANK claimed by
  // two processes (both fail, naming the rank); Error at once for a MASTER_ADDR that does not
  // resolve or a port in use, and when the peers do not all arrive within the timeout (naming
  // the ranks that did not). With a run key (GroupOptions::run_key), the rendezvous store's values
  // are MACed, each rank answers rank 0's challenge before it claims its rank, and the group's
  // payloads are authenticated (diloco/comm/auth.h); a process with another key or none throws
  // AuthenticationError before claiming a rank, and the others carry on waiting for the rank.
  static std::shared_ptr<Group> create(const GroupOptions& options);
  static std::shared_ptr<Group> from_env();

  // Connect a Gloo backend over an existing store (a HashStore for ranks that are threads of one
  // process, or a PrefixStore for a new membership epoch); see make_gloo_backend().
  Group(c10::intrusive_ptr<c10d::Store> store, int rank, int world_size,
        std::chrono::milliseconds timeout = std::chrono::milliseconds(60000),
        const std::string& hostname = "127.0.0.1");
  // Layer accounting and link emulation over any connected backend. `timeout` is what timeout()
  // reports: the one the backend was built with. Throws OptionError for a null backend.
  explicit Group(std::unique_ptr<Backend> backend,
                 std::chrono::milliseconds timeout = std::chrono::milliseconds(60000));
  ~Group();
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  // Those of the current backend: they change with replace_backend().
  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  const Backend& backend() const;

  // Swap the backend under this Group (a new membership epoch: a Gloo backend over
  // PrefixStore("epoch/N") of a store that outlives the old group, of any rank and world size).
  // The statistics, the link and its queue of transmissions carry on; collectives still in flight
  // complete on the backend that started them, which lives until they are waited. Call it from
  // the thread that issues collectives, on every rank of the new backend, at the same point in
  // the order of collectives. Returns the previous backend, for the caller to keep or drop
  // (dropping a Gloo backend whose peer is stopped blocks until its collectives time out).
  // Throws OptionError for a null backend.
  std::shared_ptr<Backend> replace_backend(std::unique_ptr<Backend> backend);

  // Collectives issued from now on give up when `interrupt` is raised (see Interrupt); their
  // waits poll it (about every millisecond) instead of blocking in the backend. Null: block.
  void set_interrupt(std::shared_ptr<Interrupt> interrupt);

  // The emulated link (see the class comment). Set it before issuing collectives, to the same
  // value on every rank; create() sets it from GroupOptions::link. Throws OptionError.
  void set_link(const LinkModel& link);
  const LinkModel& link() const;

  // Sum `tensor` (contiguous, CPU or CUDA) in place over all ranks. `label` names the purpose in
  // the statistics and in error messages ("outer_sync", "grad_sync", ...).
  void allreduce_sum(at::Tensor& tensor, const std::string& label);
  // The same, returning at once; the tensor must not be touched until wait() returns. Several may
  // be in flight; they complete in any order but must be issued in the same order on all ranks.
  PendingCollective allreduce_sum_async(at::Tensor tensor, const std::string& label);
  // Overwrite `tensor` on every rank with root's.
  void broadcast(at::Tensor& tensor, int root, const std::string& label);
  // Every rank contributes a tensor of the same shape and dtype; returns world_size tensors,
  // index r holding rank r's.
  std::vector<at::Tensor> allgather(const at::Tensor& tensor, const std::string& label);
  // The same, returning at once: after wait(), outputs[r] holds rank r's tensor. `outputs` is
  // resized here; neither it nor `tensor` may be touched (or destroyed) until wait() returns.
  PendingCollective allgather_async(const at::Tensor& tensor, std::vector<at::Tensor>& outputs,
                                    const std::string& label);
  // Gather variable-length byte strings from every rank (two all-gathers: lengths, then bytes).
  std::vector<std::string> allgather_bytes(const std::string& bytes, const std::string& label);
  void barrier(const std::string& label);
  // Point-to-point, for algorithms built on them (the requantizing ring). A send and the matching
  // recv on the peer must use the same tag; both return at once.
  PendingCollective send_async(at::Tensor tensor, int dst, int tag, const std::string& label);
  PendingCollective recv_async(at::Tensor tensor, int src, int tag, const std::string& label);

  // A snapshot of the statistics (safe from any thread).
  CommStats stats() const;
  void reset_stats();

 private:
  struct Impl;  // the backend and the two layers over it
  struct Peer {  // a send's or recv's
    int rank = -1;
    int tag = 0;
  };
  template <typename Fn>
  PendingCollective issue(Collective c, const std::string& label, std::uint64_t payload_bytes,
                          int root, Peer peer, Fn&& start);
  friend class PendingCollective;

  std::unique_ptr<Impl> impl_;
  int rank_;
  int world_size_;
  std::chrono::milliseconds timeout_;
};

}  // namespace diloco
