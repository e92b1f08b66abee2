// Replay audits of claimed work: did an island really run the inner steps it claims, on its data?
//
// Protocol, every outer step (DiLoCoOptions::audit_rate > 0; plain DiLoCo: P = 1, tau = 0,
// alpha = 0; static groups and elastic runs):
//   1. commit   before the exchange every island all-gathers a Commitment: the outer step, its
//               rank, the inner steps the round covers (first step and count: its data
//               position), the data seed, SHA-256 digests of its inner-optimizer state at the
//               round's start and at its end (by content, not address), of its pseudo-gradient
//               (float32, bucket by bucket) and of a fresh 32-byte random nonce. Each island's
//               start state must be the end state it committed the round before: the
//               inner-optimizer state is chained from round to round (by island: in an elastic
//               run the chain follows an island across epochs; a joiner's starts at its
//               admission), so no island can start a replay from a state it never reached.
//   2. reveal   then every island all-gathers its nonce; each must hash to its commitment. The
//               audit seed is SHA-256 over all nonces in rank order: no island controls it alone
//               (its own nonce was fixed before it saw the others').
//   3. select   from the seed, island i is audited with probability audit_rate, independently
//               of the others, by an auditor drawn among the other islands still taking part
//               (select_audits below; every rank computes the same).
//   4. exchange the outer step goes on as usual; an excluded island's contribution is left out
//               on every rank (audits use the gathered exchange: each contribution is seen, so
//               leaving one out needs no trust in its sender).
//   5. replay   after the outer step the audited island sends its auditor its inner-optimizer
//               state at the round's start (point to point; with a tolerance, its pseudo-
//               gradient too). The auditor checks it against the commitment, sets a replica of
//               the model to the round's start weights (the global weights, which every island
//               holds), loads the state into the replica's optimizer and runs the round's inner
//               steps through the user's step function, then compares:
//                 exact (tolerance 0): the digests of the recomputed pseudo-gradient and
//                   inner-optimizer end state equal the committed ones, bit for bit (CPU, the
//                   same number of threads on every island);
//                 tolerance t > 0 (GPUs): |replayed - sent| / |sent| <= t for the pseudo-
//                   gradient (its bytes must still match the committed digest).
//   6. verdict  the auditors all-gather their verdicts. A failed audit is reported on every rank
//               with its evidence (the commitment's digests, the recomputed ones, the relative
//               difference) and the island is excluded from every later outer step. In an
//               elastic run it is removed: the others form a new epoch without it (it may not
//               come back under that name; Membership::remove), and it stops with RemovedError.
//
// What it costs: per outer step, two small all-gathers (commitments 200 bytes per rank, nonces
// 32) and one of verdicts (about 60 bytes per island per rank); per audit, the inner-optimizer
// state (AdamW: 2 floats per parameter) sent once, and H inner steps replayed by the auditor,
// about audit_rate x one island's inner work in all, which the others wait for at the verdict.
// The gathered exchange sends (N-1) x the payload per rank instead of the ring's 2(N-1)/N x.
// Memory: a copy of the global weights at the round's start, the serialized inner-optimizer
// state of the round's start, and the replica with its optimizer.
//
// What it does not catch: an auditor that lies (its verdict is trusted), islands that collude
// with their auditor, and a modified library that commits to honest work but sends something
// else through the exchange (the screening and robust aggregators bound what that can do).
#pragma once

#include <ATen/Tensor.h>

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "diloco/sync/parameters.h"

namespace torch {
namespace nn {
class Module;
}
namespace optim {
class Optimizer;
}
}  // namespace torch

namespace diloco {

using Digest = std::array<std::uint8_t, 32>;  // SHA-256

// SHA-256 (libcrypto) of bytes, and of float tensors' bytes in order (contiguous copies).
Digest sha256(const void* data, std::size_t size);
Digest sha256_of(const std::vector<at::Tensor>& tensors);
std::string to_hex(const Digest& digest);

// One island's claim for one outer step (see the protocol above).
struct Commitment {
  std::int64_t outer_step = 0;  // the outer step the round ends in, 1-based
  std::int64_t island = 0;      // rank in the group
  std::int64_t first_step = 0;  // inner steps [first_step, first_step + steps) of the run
  std::int64_t steps = 0;
  std::int64_t data_seed = 0;  // AuditHooks::data_seed
  Digest start_state{};        // inner-optimizer state at the round's start
  Digest end_state{};          // and at its end
  Digest pseudo_gradient{};    // global - local, float32, bucket by bucket
  Digest nonce{};              // SHA-256 of the island's nonce (revealed after all commit)

  static constexpr std::size_t kBytes = 5 * 8 + 4 * 32;
  std::string serialize() const;
  // Throws Error naming `from` when the bytes are not a commitment.
  static Commitment parse(const std::string& bytes, int from);
  // "outer step 3, rank 1, inner steps [100, 150), ..., pseudo-gradient 9f2c..."
  std::string describe() const;
};

// Who audits whom at one outer step: auditor[i] audits island i, or -1 (not audited).
// Deterministic in (seed, islands, rate, excluded): island i is audited when the first 8 bytes of
// SHA-256(seed, "audit", i) read as a fraction of 2^64 are below `rate`; its auditor is drawn,
// from SHA-256(seed, "auditor", i), among the islands other than i that are not excluded.
// Excluded islands are neither audited nor auditors.
std::vector<int> select_audits(const Digest& seed, int islands, double rate,
                               const std::vector<bool>& excluded);

// What one audit replays: the round of `island` as its commitment says.
struct AuditTask {
  std::int64_t island = 0;  // the audited island's rank
  // Its data stream, what the step function draws its batches from: its rank in a static group;
  // in an elastic run AuditHooks::stream_of(its name), so that no island can claim another's.
  std::int64_t stream = 0;
  std::int64_t first_step = 0;  // the run's inner step the round starts at (0-based)
  std::int64_t steps = 0;
  std::int64_t data_seed = 0;
  std::string inner_state;  // the island's inner-optimizer state at the round's start
};

// Digests of the replica's inner-optimizer state when a replay loaded it and after its steps.
struct ReplayDigests {
  Digest start{};
  Digest end{};
};

// What audits need from the user (DiLoCo::enable_audits).
struct AuditHooks {
  // This island's inner-optimizer state, as bytes that load into the replica's optimizer bit for
  // bit (sent to an auditor), and a digest of its content that does not depend on where it lives
  // (what commitments hold: serialized optimizers name parameters by address). DiLoCo calls
  // both at every outer step, before the exchange (the state the next round starts from).
  std::function<std::string()> inner_state;
  std::function<Digest()> inner_digest;
  // A replica of the model (the same parameters, names and shapes; not the model itself): DiLoCo
  // rebinds it into flat buffers laid out like the model's, so that replayed kernels see the
  // same memory layout, and writes the round's start weights into it before each replay.
  std::vector<NamedParameter> replica;
  // Replays task.steps inner steps of island task.island from inner step task.first_step on the
  // replica: loads task.inner_state into the replica's optimizer, then runs what the island's
  // loop runs for each step (its batch for that island and step, lr schedule, clipping,
  // optimizer step); returns the digests (as inner_digest() computes them) of the replica
  // optimizer's state once loaded and after the steps. An exception fails the audit, with its
  // message as the evidence.
  std::function<ReplayDigests(const AuditTask& task)> replay;
  // The seed the run's data comes from, the same on every island (each island's stream is a
  // function of it and the island's rank): a commitment with another seed fails its audit.
  std::int64_t data_seed = 0;
  // Elastic runs (required there): the data stream of the island named `island` (its membership
  // name, "<slot>.<incarnation>"), as its own loop draws it. Ranks change with the epochs, names
  // do not, and the members agree on them, so an island's stream follows from who it is. Unset
  // in a static group: the stream is the rank.
  std::function<std::int64_t(const std::string& island)> stream_of;
};

// Hooks for a LibTorch loop: `inner` are the island's inner optimizers (their states are
// serialized with torch::serialize, in this order); `replica` a second model of the same
// architecture and `replica_inner` optimizers built over it like `inner`; `step(stream, t)` runs
// inner step t (0-based) of the island whose data stream is `stream` (AuditTask::stream: its rank
// in a static group) on the replica (batch, lr, backward, clipping, step). `stream_of`: see
// AuditHooks (elastic runs).
AuditHooks make_audit_hooks(
    std::vector<torch::optim::Optimizer*> inner, torch::nn::Module& replica,
    std::vector<torch::optim::Optimizer*> replica_inner,
    std::function<void(std::int64_t stream, std::int64_t step)> step, std::int64_t data_seed,
    std::function<std::int64_t(const std::string& island)> stream_of = {});

// Serializes optimizers' states into one byte string (torch::serialize), and loads them back
// (into optimizers built the same way over other parameters).
std::string optimizer_state_bytes(const std::vector<torch::optim::Optimizer*>& optimizers);
void load_optimizer_state_bytes(const std::vector<torch::optim::Optimizer*>& optimizers,
                                const std::string& bytes);
// SHA-256 of optimizers' states by position (optimizer, parameter group, parameter), not by
// address: equal for equal states wherever they live.
Digest optimizer_state_digest(const std::vector<torch::optim::Optimizer*>& optimizers);

// What an island's audits came to (DiLoCo::audits()).
struct AuditStats {
  std::int64_t audits = 0;                // audits run anywhere in the group, all outer steps
  std::int64_t failed = 0;                // of which failed
  std::vector<std::int64_t> audits_of;    // per island (rank): its audits so far
  std::int64_t replayed_steps = 0;        // inner steps this island replayed as an auditor
  double replay_seconds = 0.0;            // and the time they took
  std::vector<int> excluded;              // islands excluded (their ranks then), in the order
                                          // they failed
  std::vector<std::string> excluded_names;  // the same islands' names (elastic: "<slot>.<inc>")
  std::vector<std::int64_t> excluded_at;  // the outer step each was excluded at
  std::vector<std::string> excluded_reasons;  // the failed audit's report that excluded each
  std::string last_failure;               // the last failed audit's report, as on stderr
};

}  // namespace diloco
