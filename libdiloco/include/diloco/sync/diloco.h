// DiLoCo: islands train locally for H inner steps, then average their pseudo-gradients and take
// one outer optimizer step on the shared global weights.
//
// Terms (Douillard et al. 2023, arXiv 2311.08105, Alg. 1):
//   inner step      one step of the user's own optimizer (AdamW, SGD, ...) on local data;
//   outer step      every H inner steps: delta = (1/k) sum_i (theta - theta_i), then
//                   theta <- OuterSGD(theta, delta), and every island restarts from theta;
//   pseudo-gradient theta - theta_i, the change an island made since the last outer step;
//   fragment        the set of parameters one exchange covers (Streaming DiLoCo, Douillard et
//                   al. 2025, arXiv 2501.18512): with P fragments, fragment p is synchronized every
//                   H inner steps, the fragments' exchanges staggered by H/P (sync/schedule.h), so
//                   each exchange carries about 1/P of the model;
//   overlap tau     fragment p's pseudo-gradient is computed after inner step t and its exchange
//                   started; the island trains on, and after step t + tau the averaged
//                   pseudo-gradient is applied to the global fragment by the outer optimizer;
//   mixing alpha    then the island's fragment is merged: theta_local <- alpha * theta_local +
//                   (1 - alpha) * theta_global (alpha = 0 replaces it; the paper uses 0.5).
//   P = 1, tau = 0, alpha = 0 (the defaults) is DiLoCo, bit for bit.
//
// The loop is three parts: the schedule (sync/schedule.h: which fragment starts and which
// finishes after each inner step), the outer state (sync/outer_state.h: everything that lives
// across outer steps, saved and loaded whole) and the exchange (exchange/exchange.h: one per
// parameter bucket, start -> pending -> finish, over the Group).
//
// How the exchanges stay off the inner steps when tau > 0: the uncompressed exchange is a set of
// asynchronous all-reduces (Gloo runs them on its own threads), waited for when due; a compressed
// one is a sequence of blocking collectives run as jobs on one communication thread
// (exchange/comm_thread.h), in the order the schedule starts them, joined when due. At most one
// fragment's exchange is in flight (tau is below the gap between two fragments' starts), DiLoCo
// issues no other collective meanwhile (the buffers are synchronized after a round's last
// fragment is applied), and every rank starts and finishes the same fragments after the same
// steps, so collectives issue in the same order on every rank. The caller must not issue
// collectives on the same group while an exchange is in flight (between a start and its finish).
//
// Elastic runs (a Membership instead of a Group; diloco/elastic/membership.h): the run survives
// lost, stopped and restarted islands. A failed collective, or a peer declared lost by the
// heartbeats, makes every survivor drop the exchange in flight (the global weights are never
// partly updated, and the exchange state, e.g. error-feedback residuals, is rolled back to the
// start of the outer step), form a new epoch with the others, agree on the newest committed outer
// state (a survivor that missed the last outer step receives it and drops its round's progress),
// and redo the interrupted outer step with the survivors' pseudo-gradients: their inner steps
// are kept, since the model's own weights are never used as the exchange's buffer in elastic
// runs. Islands that join receive the outer state at an outer-step boundary and take part from
// the next one. Plain DiLoCo only (P = 1, tau = 0, alpha = 0); module buffers are not sent to
// joiners.
//
// The inner optimizer's state stays local (DiLoCo §6.1: syncing it triples the bytes for no gain).
//
// Memory: beyond the model and its inner optimizer, DiLoCo holds the global weights and the outer
// momentum, each a float32 copy of the parameters, on options.outer_device (the model's device by
// default, or the CPU to save accelerator memory). The pseudo-gradient is computed in the model's
// own storage, which the new global weights overwrite at the end of the outer step, so there is no
// third copy. A model that is not float32, or that lives on another device than the outer state,
// and streaming with tau > 0 or alpha > 0 (the island keeps its own weights while the exchange
// travels), need a float32 staging buffer for the pseudo-gradient on the outer device.
//
// Collectives: the constructor (configuration and model check, broadcast of rank 0's weights and
// buffers) and every outer step are collectives; all ranks must construct together and call
// step() the same number of times. The check compares a fingerprint of everything that must be
// equal on every island (sync/fingerprint.h) and fails on every rank naming the field.
#pragma once

#include <ATen/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "diloco/audit/audit.h"
#include "diloco/comm/group.h"
#include "diloco/exchange/comm_thread.h"
#include "diloco/exchange/exchange.h"
#include "diloco/outer/outer_sgd.h"
#include "diloco/sync/buffers.h"
#include "diloco/sync/outer_state.h"
#include "diloco/sync/parameters.h"
#include "diloco/sync/schedule.h"
#include "diloco/sync/sync_stats.h"

namespace torch {
namespace optim {
class Optimizer;
}
}  // namespace torch

namespace diloco {

class Auditor;
class Fingerprint;
class Group;
class Membership;

struct DiLoCoOptions {
  std::int64_t inner_steps = 500;  // H, DiLoCo §3 (H = 500); range >= 1
  OuterSGDOptions outer;           // Nesterov, lr 0.7, momentum 0.9
  // Where the global weights and the outer momentum live; unset = the model's device, or the CPU
  // when compressing (compressed exchanges run on the CPU in float32: the library decides).
  c10::optional<c10::Device> outer_device;
  // How pseudo-gradients cross the link: a compressor spec ("none", "fp16", "int8",
  // "topk(k=64,values=2bit)+ef", ...; see diloco/compress/registry.h). "none" sends float32
  // with one all-reduce.
  std::string compression = "none";
  // Module buffers (BatchNorm statistics) at every outer step: averaged, rank 0's, or left local
  // (diloco/sync/buffers.h). DDP users expect them consistent, hence the default.
  BufferSync buffers = BufferSync::kAverage;
  // Extra fields every island must agree on, compared at construction with the library's own
  // (sync/fingerprint.h), e.g. {{"steps", "2000"}} so that no island stops before the others.
  std::vector<std::pair<std::string, std::string>> agree_on;

  // Streaming DiLoCo (see the terms above). P in [1, H]; tau in [0, the fewest steps between two
  // fragments' starts), i.e. below H/P; alpha in [0, 1].
  std::int64_t fragments = 1;
  std::int64_t overlap_steps = 0;
  double mixing = 0.0;
  // After every applied fragment the islands compare a 128-bit XXH3 hash of its global weights,
  // outer momentum and the outer step, compared before the next exchange sends anything: with
  // screening it rides on the screening's all-gather (32 more bytes per rank), else it travels
  // in an all-gather of its own (32 bytes per rank) issued right after the outer step and
  // settled when the next exchange starts; check_state() compares the last one. A difference is
  // an Error on every rank naming the ranks that disagree with the majority; in elastic runs
  // those get RemovedError (started again, they rejoin with the run's state) and the others go
  // on.
  bool compare_states = true;
  // Contributions are screened before each exchange (with 3 or more islands): the islands
  // all-gather their pseudo-gradients' norms (8 bytes each, 40 with compare_states), and one
  // more than screen_factor x the median norm is refused: its island sends zeros, the outer step
  // averages the others, and every rank names it on stderr (refused_contributions() counts
  // them). 0 = off; else in
  // [1, 1e12].
  // The pseudo-gradient is then produced whole before its exchange starts (no segment overlap).
  // Exchanges that see each contribution (gathered codecs such as topk and sign, and every
  // robust aggregator) screen the decoded contributions instead, with the same factor, and also
  // refuse one that does not decode or decodes to a NaN or an infinity, naming its sender: what
  // an island declares cannot hide what it sent.
  double screen_factor = 100.0;
  // How the contributions are combined (diloco/exchange/aggregator.h): "mean" (default),
  // "trimmed_mean(trim=K)", "median", "norm_clip(k=C)". The robust ones gather every island's
  // payload ((N-1) x its bytes per rank instead of about 2(N-1)/N x) and do not work with
  // powersgd; trimmed_mean needs more than 2K islands.
  std::string aggregator = "mean";

  // Replay audits of claimed work (diloco/audit/audit.h): at every outer step each island is
  // audited with probability audit_rate, in [0, 1] (0 = off), by another island that replays
  // its round through the hooks given to enable_audits(). audit_tolerance 0 compares bit for
  // bit (CPU); in (0, 1] it accepts a replayed pseudo-gradient whose difference from the sent one
  // is at most that fraction of its norm (GPUs). Audits need plain DiLoCo (P = 1, tau = 0,
  // alpha = 0), a static group, and each contribution seen: the exchange is a gathered one
  // ((N-1) x the payload per rank), so powersgd cannot be audited.
  double audit_rate = 0.0;
  double audit_tolerance = 0.0;

  // Each parameter's fragment, in the model's parameter order, values in [0, P); empty: the
  // default_fragments of sync/schedule.h (strided over the blocks, or size-balanced when the
  // model has fewer blocks than fragments). Every fragment must hold a parameter.
  std::vector<std::int64_t> fragment_of;

  void validate() const;  // throws OptionError naming the option and its allowed range
};

// When one fragment's exchange started, was due and completed on this island, in seconds on the
// steady clock (std::chrono::steady_clock: CLOCK_MONOTONIC, which every process of one machine
// shares, so the records of islands on one machine compare). An exchange completes only once
// every island has started it: until the last one has, an island waits for a slower island;
// whatever it waits after that is the link (and the exchange's own work). Benchmarks split the
// waiting so (train_lm --exchange-log, benchmarks/wan_bench.py).
struct ExchangeTiming {
  std::int64_t outer_step = 0;  // the outer step the exchange belongs to (1-based)
  std::int64_t fragment = 0;
  std::int64_t inner_step = 0;  // the inner step after which it started
  double started = 0.0;  // this island started it (earlier collectives settled)
  double due = 0.0;      // this island needed its result
  double done = 0.0;     // it had completed here (before the outer step is applied)
};

class DiLoCo {
 public:
  // `model` and `inner` are the user's; both must outlive this object. Every parameter of the
  // model must be in `inner`'s parameter groups (a typo there would silently train nothing).
  // The model's buffers are synchronized as options.buffers says.
  DiLoCo(torch::nn::Module& model, torch::optim::Optimizer& inner, std::shared_ptr<Group> group,
         DiLoCoOptions options = {});
  // The same from tensors (the tensors the inner optimizer steps in model.optimized, if known).
  DiLoCo(ModelTensors model, std::shared_ptr<Group> group, DiLoCoOptions options = {});
  // An elastic run (see "Elastic runs" above) over membership->group(). An island of the first
  // epoch starts like any other; a joining one waits here to be admitted, then holds the run's
  // outer state (state().inner_step says where the run is: derive the learning-rate schedule
  // and the data position from it). Throws OptionError for streaming options, or when a joiner's
  // configuration differs from the run's (naming the field).
  DiLoCo(ModelTensors model, std::shared_ptr<Membership> membership, DiLoCoOptions options = {});
  ~DiLoCo();

  // Call after each inner optimizer step. Every inner_steps-th call runs an outer step (a
  // collective) and returns true. Streaming: each call starts and applies the fragments the
  // schedule says, and returns true when a round's last fragment was applied (every H steps, tau
  // steps late). Throws PeerLostError if a peer is lost: the model then holds
  // this rank's global weights, which may hold part of the interrupted outer step (segments
  // already received), so islands re-agree on the weights when they rebuild the group.
  // Throws Error if any island's pseudo-gradient holds a NaN or an infinity: no non-finite value
  // enters the global weights (the 2048-element blocks holding one keep their old values, the
  // same on every rank), and the model is set to the global weights.
  // Elastic runs: a lost peer is survived as described above (PeerLostError only after repeated
  // failures); RemovedError when this island was left out, TooFewIslandsError below
  // min_islands.
  bool step();
  // Whether the next step() applies an exchange that has not arrived yet, and so would block
  // until it does: streaming with tau > 0, the fragment in flight due after the next inner step,
  // its transfer (or the slowest island's start of it) not complete, the emulated link included.
  // Never blocks. A caller can fill that time with work instead of waiting: train_lm
  // --fill-waits adds batches to that inner step's gradient. False when nothing is due after the
  // next step, without overlap (tau = 0: an exchange starts and is applied in the same step()),
  // in elastic runs, and once the exchange has failed (the next step() throws it; a failure of
  // one of its collectives reads true until that collective has completed or timed out). Not
  // polled: the short waits step() may also have on a state comparison or a buffers digest.
  bool next_step_would_wait();
  // Run an outer step now, whatever the inner step count (all ranks must call it together):
  // the exchange in flight is applied, then every fragment is synchronized, in order (but the
  // one applied, when its exchange started after the last inner step: it has nothing left to
  // send, and the island takes its global weights).
  void sync();
  // options.compare_states, static runs: compares the global state of the last outer step now,
  // if it was not compared yet (all ranks together: a collective). After an outer step the
  // comparison rides on the next exchange's screening all-gather (with screening: world size
  // >= 3, screen_factor > 0, an exchange that does not see each contribution) or else travels in
  // an asynchronous all-gather of its own; call this after the last outer step so that the last
  // state is compared too. Throws Error naming the ranks that differ from the majority. Nothing
  // to do in elastic runs, which compare before an outer step is committed. It also settles the
  // last round's comparison of integer and bool buffers (see ModelBuffers::digest_only).
  void check_state();

  const DiLoCoOptions& options() const { return options_; }
  SyncStats stats() const;
  // Called on this thread with each exchange's timing once its outer step is applied (empty:
  // none). Not called for an exchange that failed. An exception from the observer propagates
  // out of step() or sync(), with the fragment already applied.
  void on_exchange(std::function<void(const ExchangeTiming&)> observer) {
    exchange_observer_ = std::move(observer);
  }
  Group& group() { return *group_; }
  const FlatParameters& parameters() const { return params_; }
  const ModelBuffers& buffers() const { return buffers_; }
  // The global weights, one flat float32 buffer per parameter bucket.
  const std::vector<at::Tensor>& global_weights() const { return state_.global; }
  // Everything that lives across outer steps (global weights, outer momentum, exchange state,
  // step counters).
  const OuterState& state() const { return state_; }
  // Audits (options.audit_rate > 0): the hooks that commit this island's inner-optimizer state
  // and replay other islands' rounds (diloco/audit/audit.h). Call before the first outer step
  // (or after load()); the round in progress starts now. OptionError when audits are off, for
  // hooks whose replica differs from the model, and in an elastic run for hooks without
  // stream_of. Elastic runs remove an island that fails an audit (a new epoch without it).
  void enable_audits(AuditHooks hooks);
  // What the audits found so far: counts, this island's replays, the islands excluded.
  AuditStats audits() const;
  // Contributions the screening refused so far (screen_factor), and the last refusal's message;
  // a fragment's refusals count once it is applied (with tau > 0, tau steps after its start).
  std::int64_t refused_contributions() const { return refused_; }
  const std::string& last_screening() const { return last_screening_; }
  // Writes the outer state to `path` (sync/outer_state.h), or reads it and sets the model to
  // the global weights it holds. Only between exchanges: after step() returned true, or before
  // the first step; throws Error while a fragment's exchange is in flight, OptionError when the
  // saved state does not fit this run (naming the field). Not collectives: each rank saves and
  // loads its own (they are identical but for error-feedback residuals).
  void save_state(const std::string& path) const;
  void load_state(const std::string& path);
  // A whole checkpoint of this island (sync/checkpoint.h): the outer state, the model's own
  // weights, the state of `inner` (the island's inner optimizers, in a fixed order) and the
  // caller's `extra` fields (a data position). Written atomically and checksummed; only between
  // exchanges, like save_state. load() restores all of it and returns `extra`; it throws Error
  // naming the file for an unreadable, truncated or corrupted one, and OptionError naming the
  // field for a checkpoint of another configuration (H, codec, shapes, ...), changing nothing.
  void save(const std::string& path, const std::vector<torch::optim::Optimizer*>& inner = {},
            const std::map<std::string, std::string>& extra = {}) const;
  std::map<std::string, std::string> load(const std::string& path,
                                          const std::vector<torch::optim::Optimizer*>& inner = {});

 private:
  DiLoCo(ModelTensors model, std::shared_ptr<Group> group, DiLoCoOptions options,
         std::shared_ptr<Membership> membership);
  Fingerprint fingerprint() const;
  // Elastic runs.
  bool elastic_step();
  void elastic_outer_step();
  // Forms the next epoch and aligns the outer state; true when this island received it.
  bool recover();
  bool align_state();
  std::string state_bytes() const;
  void load_state_bytes(const std::string& bytes, bool keep_inner_step);
  std::string snapshot_exchanges() const;
  void restore_exchanges(const std::string& bytes);
  void renew_staging();
  std::vector<at::Tensor> views_over(std::size_t bucket) const;
  bool staged() const;
  // The pseudo-gradient's buffer of bucket i: the staging buffer, or the model's own storage.
  at::Tensor& delta(std::size_t i);
  // delta[offset, offset + length) of bucket i = global - local; records whether it is finite.
  void produce(std::size_t i, std::int64_t offset, std::int64_t length);
  // The islands agree that every pseudo-gradient of the fragment is finite (compressed exchanges
  // only: a codec may not survive a NaN); throws NonFiniteError naming the ranks.
  void check_finite(std::int64_t fragment, bool mine_finite);
  // Throws NonFiniteError naming `ranks` unless it is empty.
  void throw_if_not_finite(std::int64_t fragment, const std::vector<int>& ranks) const;
  void start_sync(std::int64_t fragment);
  // Starts the exchange of each of the fragment's buckets (pending_); `produced`: the
  // pseudo-gradients are already in delta(), else each exchange produces its segments.
  void start_exchanges(std::int64_t fragment, bool produced);
  void finish_sync(std::int64_t fragment);
  // options_.compare_states: the islands compare the fragment's global state (see the option).
  // The outer step hashes the state as it writes it (state_hash_). With screening (screens())
  // the hash rides on the next exchange's screening all-gather (screen_contributions), which
  // compares it before anything of that exchange is sent: no collective of its own. Otherwise
  // start_state_check() issues the comparison (an asynchronous all-gather of 32 bytes per rank)
  // right after the outer step, and settle_state_check() waits for it and throws when the states
  // differ: plain runs settle it at the next exchange's start (or sync(), check_state(), or the
  // destructor, which reports a difference on stderr), so the training in between never waits
  // on it; elastic runs settle it at once.
  void start_state_check();
  void settle_state_check();
  void settle_buffers_digest();  // the buffers digest in flight, if any: wait and act on it
  // This rank's row for the comparison (outer step, fragment, the hash as 2 int64; -1, -1, 0, 0
  // when there is no hash), after which the hash is no longer pending.
  at::Tensor take_state_row();
  // Every rank's row: Error (RemovedError / PeerLostError in an elastic run) naming the ranks
  // that differ from a strict majority.
  void compare_state_rows(const std::vector<at::Tensor>& rows);
  // The islands screen the norms they declare before an exchange (screen_factor > 0, world size
  // >= 3, an exchange that does not see each contribution; constant over a static run).
  bool screens() const;
  // Audits: this island's commitment for the fragment's outer step (audit/auditor.h).
  void commit_for_audit(std::int64_t fragment);
  // Elastic runs: the audits of the committed outer step; islands that failed are removed (see
  // diloco/audit/audit.h): RemovedError on them, PeerLostError (a new epoch) on the others.
  void elastic_audit();
  // options_.screen_factor: the islands share their norms and refuse outliers (see the option).
  // The all-gather's time is added to *waited when given (not on the communication thread).
  void screen_contributions(std::int64_t fragment, bool mine_finite, double* waited);
  // The uncompressed sum against the norms the islands declared (an Error when it is longer).
  void check_declared_norms(std::int64_t fragment);
  // What an exchange that sees each contribution refused: counted and named on stderr.
  void report_refusals(std::int64_t fragment, std::size_t bucket, const ContributionScreen& screen);
  void end_round();
  void reset_model_to_global();
  void drain_and_reset();
  void wait_in_flight() noexcept;
  void check_nothing_in_flight(const char* what) const;

  DiLoCoOptions options_;
  std::shared_ptr<Group> group_;
  std::shared_ptr<Membership> membership_;  // elastic runs only
  FlatParameters params_;
  ModelBuffers buffers_;
  OuterSGD outer_;
  StreamingSchedule schedule_;
  OuterState state_;
  std::vector<std::vector<at::Tensor>> views_;  // per bucket: the parameters' shapes over delta
  // Per bucket: where the pseudo-gradient is summed. Undefined = in the model's own storage
  // (float32 model on the outer device); else a float32 buffer on the outer device.
  std::vector<at::Tensor> staging_;
  std::vector<bool> local_finite_;  // per bucket: this rank's pseudo-gradient was finite
  bool compressed_ = false;
  // Declared after the state and the group: destroyed first, once its jobs (which use both) ran.
  std::unique_ptr<CommThread> comm_;
  struct InFlight {
    std::size_t bucket;
    PendingExchange exchange;
    std::shared_ptr<ContributionScreen> screen;  // what the exchange refused and combined
  };
  std::vector<InFlight> pending_;  // the exchanges of the fragment in flight
  struct StateCheck {
    PendingCollective collective;
    at::Tensor mine;                  // this rank's row (take_state_row)
    std::vector<at::Tensor> hashes;   // every rank's, after the all-gather
  };
  std::unique_ptr<StateCheck> state_check_;  // the comparison in flight, if any
  // The buffers' digest comparison after the last round, settled at the next exchange.
  std::unique_ptr<ModelBuffers::PendingDigest> buffers_digest_;
  // XXH3-128 of the state the last outer step wrote (compare_states), until it is compared.
  struct StateHash {
    std::uint64_t high = 0, low = 0;
    std::int64_t outer_step = 0, fragment = 0;
  };
  std::optional<StateHash> state_hash_;
  // The fragment's job on the communication thread ahead of its exchanges: the finiteness check
  // (compressed exchanges without screening), or, streaming with screening, the screening and
  // the start of the exchanges themselves (pending_ is filled when it has run).
  CommThread::Job start_job_;
  std::int64_t in_flight_ = -1;    // the fragment whose exchange is in flight, or -1
  std::vector<std::int64_t> started_at_;  // per fragment: the inner step its last exchange started
  double started_clock_ = 0.0;     // the steady clock when the exchange in flight started
  std::function<void(const ExchangeTiming&)> exchange_observer_;
  double sync_seconds_ = 0.0;
  double wait_seconds_ = 0.0;      // of sync_seconds_: blocked until exchanges completed
  std::string fingerprint_text_;   // elastic: what a joiner's configuration must equal
  std::string exchange_snapshot_;  // elastic: exchange state at the start of the outer step
  int contributors_ = 1;            // islands averaged in the fragment's outer step
  // The sum of the norms the contributors declared (screening), or -1: what bounds the norm of
  // an uncompressed sum that only honest islands sent.
  double declared_norms_ = -1.0;
  bool exact_sum_ = false;  // the exchange sums float32 exactly (none, fp32): the bound holds
  std::unique_ptr<Auditor> auditor_;  // audits: after enable_audits()
  std::size_t removals_ = 0;          // elastic: excluded islands already removed
  std::int64_t refused_ = 0;        // contributions refused by the screening, in all
  std::string last_screening_;      // the last refusal, as named on stderr
  // The fragment in flight's screening (written where it ran, possibly the communication
  // thread), added to the two above when the fragment is applied.
  std::int64_t screened_refused_ = 0;
  std::string screened_message_;
};

}  // namespace diloco
