// Elastic islands: who is in the run, agreed through a store that outlives every island.
//
// A run's islands are the members of a membership epoch: a numbered list of island names whose
// order gives each its rank in that epoch's process group (a Gloo group over the store's prefix
// "g/<epoch>"). The store is a c10d TCPStore served by a process that trains nothing
// (diloco-coordinator, which diloco-run starts for local runs); islands are its clients, so
// islands can die, be stopped or restart and the run's bookkeeping survives them.
//
// What the membership does (DiLoCo drives it; see sync/diloco.h, "Elastic runs"):
//   heartbeats   a thread of each island adds to its counter every heartbeat_interval and watches
//                the other members' counters. A member whose counter has not moved for
//                heartbeat_timeout (stopped, or behind a dead link with its sockets open) is
//                declared lost; so is one a collective found gone (its connection closed). The
//                epoch is then marked failed in the store, and every member's group Interrupt
//                (comm/group.h) is raised: whatever it waits for ends at once.
//   reform       the survivors of a failed epoch register; the first to register leads: it waits
//                for each member to register, be reported lost, or go silent for
//                heartbeat_timeout, then publishes the next epoch (the survivors, in their old
//                order), or fails everyone with TooFewIslandsError below min_islands. A leader
//                that goes silent while deciding is replaced (a new round). A member left out
//                (it registered too late, or it was stopped and resumed) gets RemovedError;
//                so does an island removed for good (remove(): a failed audit).
//   admission    a new or restarted island registers as a joiner with its configuration
//                fingerprint. At the next outer-step boundary the epoch's rank 0 compares the
//                fingerprint (a mismatch is an OptionError on the joiner, naming the field; the
//                members go on), publishes the outer state in checksummed chunks from a thread of
//                its own, and announces the next epoch: the members plus the joiners, in effect
//                from the next outer step. Members train on meanwhile; the joiner loads the state
//                (global weights, momentum, counters, exchange state; its own error-feedback
//                residuals start at zero), trains the same H inner steps from it, and joins the
//                next exchange.
//
// Run keys (ElasticOptions::run_key or run_key_file; see diloco/comm/auth.h). With one:
//   store        every value an island writes to the coordinator's store carries an HMAC-SHA256
//                over its full name and bytes (membership lists, join requests and fingerprints,
//                admission decisions, the outer state published for joiners, each epoch's Gloo
//                rendezvous); a value without a valid MAC is refused. The coordinator holds no
//                key and decides nothing, so it cannot forge any of them either.
//   joining      before it takes an incarnation, an island proves the key against the run's
//                challenge ("auth/run", 32 random bytes the first keyed island writes, MACed): a
//                process without the key, or with another, fails on its own with an
//                AuthenticationError saying which, and the members never see it. An unkeyed run
//                marks the same entry "none", so a keyed process cannot join it either. A join
//                request whose entries are not MACed with the key (a client that skipped the
//                check) is refused by the epoch's rank 0 and the run goes on.
//   payloads     each epoch's group is an authenticated backend (make_authenticated_backend):
//                its session binds the epoch, every payload carries a tag, replays fail.
// Counters (heartbeats, incarnations, arrival counts) cannot carry a MAC: a client without the
// key can disrupt a run through them, never make a member accept its data.
//
// Timeouts, shortest first (each bounds a different wait; see libdiloco/docs/design.md):
//   heartbeat_interval   how often each island shows it is alive            default 1 s
//   heartbeat_timeout    silence after which a member is declared lost       default 10 s
//   timeout              one collective, and connecting an epoch's group     default 60 s
//   rendezvous_timeout   the first islands arriving; a joiner waiting to be admitted and
//                        for the members at its first exchange               default 600 s
//
// Threads: the membership's methods are called from the thread that issues the group's
// collectives; the heartbeat thread and the state upload use store connections of their own.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "diloco/comm/comm_stats.h"

namespace diloco {

class Group;

struct ElasticOptions {
  std::string store_addr = "127.0.0.1";  // MASTER_ADDR: where the coordinator serves the store
  int store_port = 29500;                // MASTER_PORT, 1..65535
  // RANK: the island's slot. Slots 0..world_size-1 start the run together (their order is the
  // first epoch's rank order); a slot started again (a restart), or one >= world_size, joins.
  int slot = -1;
  int world_size = -1;  // WORLD_SIZE: islands the run starts with, >= 1
  int min_islands = 1;  // the run stops with TooFewIslandsError below it; in [1, world_size]
  std::chrono::milliseconds heartbeat_interval{1000};
  std::chrono::milliseconds heartbeat_timeout{10000};
  std::chrono::milliseconds timeout{60000};
  std::chrono::milliseconds rendezvous_timeout{600000};
  std::string hostname = "";  // interface Gloo binds to; "" = the route towards store_addr
  LinkModel link;             // emulated wide-area link (comm/group.h): on every island or none
  // The run key (comm/auth.h): at most one of the key's bytes (>= 16) and a file holding them.
  // With one, only islands holding the same key take part: see "Run keys" below.
  std::string run_key = "";       // DILOCO_RUN_KEY
  std::string run_key_file = "";  // DILOCO_RUN_KEY_FILE

  // Throws OptionError naming the option and its range; the timeouts must be ordered
  // heartbeat_interval < heartbeat_timeout < timeout <= rendezvous_timeout.
  void validate() const;
  // MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE (required), and optionally DILOCO_MIN_ISLANDS,
  // DILOCO_HEARTBEAT_TIMEOUT_S, DILOCO_TIMEOUT_S, DILOCO_RENDEZVOUS_TIMEOUT_S, DILOCO_HOSTNAME,
  // DILOCO_LINK_MBPS, DILOCO_LINK_LATENCY_MS, DILOCO_RUN_KEY, DILOCO_RUN_KEY_FILE. Validated.
  static ElasticOptions from_env();
  // The same variables, each optional: unset ones keep the defaults above (slot and world_size
  // stay -1); malformed ones throw OptionError; nothing validated as a whole. For front ends that
  // take some values from arguments.
  static ElasticOptions read_env();
  // The heartbeat interval that goes with a heartbeat timeout: a fifth of it, at most 1 s.
  static std::chrono::milliseconds interval_for(std::chrono::milliseconds heartbeat_timeout);
};

class Membership {
 public:
  // Connects to the store (three connections: calls, heartbeats, uploads) and starts the
  // heartbeat. An island of the first epoch waits (rendezvous_timeout) for the others and
  // connects the epoch's group; any other island registers as a joiner and returns at once
  // (joining() is true until DiLoCo's constructor calls await_admission()). Throws Error when
  // the store does not answer, or the first islands do not all arrive.
  static std::shared_ptr<Membership> join(const ElasticOptions& options);
  ~Membership();
  Membership(const Membership&) = delete;
  Membership& operator=(const Membership&) = delete;

  const ElasticOptions& options() const;
  // "<slot>.<incarnation>": slot 2's first process is "2.0", its first restart "2.1".
  const std::string& island() const;
  bool joining() const;
  std::int64_t epoch() const;
  std::vector<std::string> members() const;
  // The group whose backend changes with each epoch (the same object throughout); a joiner's
  // has no peers until it is admitted.
  std::shared_ptr<Group> group() const;
  // Epochs this island went through, counting the first.
  std::int64_t epochs_joined() const;

  // --- For DiLoCo (sync/diloco.h); all on the collective-issuing thread. ---
  // The current epoch failed (a peer lost, or this island removed): the group's collectives
  // give up, and the caller should reform().
  bool failed() const;
  // A collective failed: marks the epoch failed in the store, naming `peer` (its rank in this
  // epoch, -1 if unknown) as lost when it is known to be gone.
  void report_failure(const std::string& reason, int peer);
  // Forms the next epoch with the survivors and connects its group (see the file comment).
  // Throws TooFewIslandsError, RemovedError, PeerLostError (a survivor lost while forming:
  // call it again), Error (the store stopped answering; no agreement within the timeouts).
  void reform();
  // After each outer step (every member, at the same step): rank 0 admits the joiners waiting
  // (`mine` is its fingerprint; `state` serializes the outer state when one is admitted). The
  // others read its decision. Throws PeerLostError when rank 0 is lost meanwhile.
  void at_boundary(std::int64_t outer_step, const std::string& mine,
                   const std::function<std::string()>& state);
  // Before each outer step's exchange: moves to the epoch announced at the last boundary, if any.
  void before_exchange();
  // Removes islands for good (`why`: the evidence, e.g. a failed audit): no later epoch takes
  // them (a reform leaves them out even if they register), and they learn why when they try to
  // enter one (RemovedError). The caller then fails the epoch (report_failure) to form the next.
  void remove(const std::vector<std::string>& islands, const std::string& why);
  // A joiner's admission: publishes `mine` (its fingerprint) and waits (rendezvous_timeout) to
  // be admitted; returns the outer state's bytes. Throws OptionError naming the first field in
  // which its configuration differs from the run's, RemovedError when the epoch it was admitted
  // to was abandoned (a member failed first), RunFinishedError when the run ended before it was
  // admitted, Error for a corrupted transfer (naming the chunk).
  std::string await_admission(const std::string& mine);
  // This island leaves on purpose (its run is done): the others do not count its silence as a
  // loss. Call it after the last collective.
  void leave();

 private:
  struct Impl;
  explicit Membership(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace diloco
