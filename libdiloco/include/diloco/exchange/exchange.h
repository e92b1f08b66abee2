// An exchange sums every island's pseudo-gradient over the group, bit-identical on every rank,
// through what its compression lets through. It is the seam between the DiLoCo loop and the link:
// the loop starts an exchange, trains on, and finishes it when the schedule says (diloco.h).
//
//   start(group, request, comm) -> PendingExchange   the pseudo-gradient is produced and sent;
//   finish(pending) -> the sum over ranks             waits; the mean is sum / world_size (the
//                                                     outer step divides in its fused pass).
//
// One implementation per aggregation kind (src/exchange/):
//   none              float32 all-reduces, issued at once, in segments: the pseudo-gradient of
//                     segment k+1 is computed while segment k travels (Gloo's own threads);
//   summable          one all-reduce of the codec's payloads (fp16, bf16 bits, random-k);
//   ring-requantized  ring reduce-scatter and all-gather of encoded chunks (comm/ring_requantized.h);
//   gathered          one all-gather of the payloads, decoded and summed in rank order;
//   powersgd          two all-reduces of low-rank factors (powersgd.h).
// Error feedback is a layer over any of them but none (error_feedback.h). The compressed kinds are
// sequences of blocking collectives: they run as one job on the communication thread
// (comm_thread.h), so they are asynchronous too.
//
// Spec: "none", "CODEC", "CODEC+ef", "CODEC+ef(beta=0.9)", "powersgd(rank=4)+ef"
// (see diloco/compress/registry.h for the codecs).
// Bytes per rank (n = payload bytes of the island's tensors, N ranks):
//   none, summable, ring-requantized   about 2(N-1)/N * n;
//   gathered                           (N-1) * n;
//   powersgd                           2(N-1)/N * n over both rounds.
//
// State: an exchange keeps what lives across outer steps for its tensors (error-feedback
// residuals, PowerSGD's warm-start factors, the position of a codec's random stream); save() and
// load() carry it (sync/outer_state.h holds it with the global weights).
// Every start() must pass tensors of the same shapes in the same order (the state is per view),
// and every rank must start the same exchanges in the same order (they are collectives).
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "diloco/comm/group.h"
#include "diloco/compress/codec.h"
#include "diloco/exchange/comm_thread.h"

namespace torch {
namespace serialize {
class OutputArchive;
class InputArchive;
}  // namespace serialize
}  // namespace torch

namespace diloco {

// Screening inside an exchange that sees each island's contribution (the gathered exchange, which
// every robust aggregator uses; see aggregator.h). The caller sets `factor`; the exchange fills
// the rest before it finishes, identically on every rank.
struct ContributionScreen {
  // With 3 or more islands and factor > 0, a contribution is refused when its payload does not
  // decode, when it decodes to a NaN or an infinity, or when its norm is above factor x the
  // median norm of the finite ones. 0: nothing is refused (a malformed payload is an Error).
  double factor = 0.0;
  // Filled by the exchange: the ranks refused, in order, with why ("rank 2 (norm 1e+30)").
  std::vector<int> refused;
  std::string reasons;
  // Set by the caller: ranks whose contributions are left out whatever they hold (islands that
  // failed an audit, diloco/audit/audit.h), named with the others refused.
  std::vector<int> excluded;
  // The contributions combined, and whether the buffer holds their combination (a robust
  // aggregator's average) rather than their sum.
  int contributors = 0;
  bool averaged = false;
};

// What one exchange sums: the island's pseudo-gradient for some tensors.
struct ExchangeRequest {
  // Contiguous float32 (on the CPU for compressed exchanges): the island's pseudo-gradient once
  // produced; the sum over ranks when the exchange finishes.
  at::Tensor flat;
  // The parameters' tensors inside `flat`, in order, with their shapes (codecs that tile
  // matrices and PowerSGD use the shapes).
  std::vector<at::Tensor> views;
  // Names the exchange in statistics and errors ("outer_sync").
  std::string label = "exchange";
  // Writes the pseudo-gradient of flat[offset, offset + length); called on the caller's thread
  // within start(), once for the whole buffer or (none) segment by segment, so that the first
  // segments travel while the next are computed. Unset: `flat` already holds it.
  std::function<void(std::int64_t offset, std::int64_t length)> produce;
  // Error feedback's hook (one tensor per view, or empty): the exchange subtracts from each what
  // this island's own contribution decodes to, i.e. what of it crossed the link.
  std::vector<at::Tensor> subtract_sent;
  // Exchanges that see each contribution (sees_contributions()) screen them and report here.
  std::shared_ptr<ContributionScreen> screen;
};

// An exchange in flight; finish it with the Exchange that started it. Move-only.
class PendingExchange {
 public:
  PendingExchange() = default;
  PendingExchange(PendingExchange&&) = default;
  PendingExchange& operator=(PendingExchange&&) = default;
  bool valid() const { return flat_.defined(); }
  // Blocks until the sum is in the request's buffer; rethrows the exchange's failure
  // (PeerLostError, Error). Safe to call again.
  void wait();
  // Whether wait() would return now: every collective and the job are ready (never blocks).
  bool ready();

 private:
  friend class Exchange;
  at::Tensor flat_;
  std::vector<PendingCollective> collectives_;
  CommThread::Job job_;
};

class Exchange {
 public:
  // "none", a codec spec, or "powersgd(...)", each optionally "+ef[(beta=B)]". Throws OptionError
  // for a bad spec, listing the valid codecs. A robust `aggregator` (aggregator.h), or `gather`
  // (audits: an excluded island's contribution must be left out, so each must be seen), makes
  // every codec's exchange, and none's ("fp32"), a gathered one that combines the decoded
  // contributions; PowerSGD cannot (its factors are summed), an OptionError.
  static std::unique_ptr<Exchange> from_spec(const std::string& spec,
                                             const std::string& aggregator = "mean",
                                             bool gather = false);
  virtual ~Exchange() = default;

  // The spec that builds this exchange again, parameters spelled out.
  virtual std::string spec() const = 0;
  // Starts the exchange of `request` (see ExchangeRequest); returns once the pseudo-gradient is
  // produced and its transfer issued or queued on `comm`. Throws PeerLostError if the group is
  // already broken.
  virtual PendingExchange start(Group& group, ExchangeRequest request, CommThread& comm) = 0;
  // Waits for `pending`; returns the buffer that now holds the sum over ranks.
  at::Tensor finish(PendingExchange& pending);
  // start() then finish() on this thread: `flat` holds the island's pseudo-gradient and then the
  // sum over ranks.
  void sum(Group& group, at::Tensor& flat, const std::vector<at::Tensor>& views,
           const std::string& label);

  // Bytes this rank's payloads take for these tensors, all rounds together (what the exchange
  // carries per island, before the collective's own 2(N-1)/N or N-1 factor).
  virtual std::int64_t payload_bytes(const std::vector<at::Tensor>& views) const = 0;
  // Error feedback's residuals, one per view (empty without error feedback or before the first
  // exchange).
  virtual const std::vector<at::Tensor>& residuals() const;
  // Forgets this island's own part of the state (error-feedback residuals), keeping what every
  // island shares (PowerSGD's factors, a codec's stream position): what an island that joins a
  // run mid-way starts from.
  virtual void clear_residuals() {}
  // The codec of a single-payload exchange; null for none and multi-round ones (PowerSGD).
  virtual const Codec* codec() const { return nullptr; }
  // Whether it decodes each island's contribution (gathered): it then screens them through
  // ExchangeRequest::screen. The others sum in flight: what an island sent cannot be seen.
  virtual bool sees_contributions() const { return false; }

  // The state that lives across outer steps, under keys of this exchange's own (a stateless
  // exchange writes nothing). load() restores it bit for bit; it throws Error naming what does
  // not match (another spec's state, other shapes).
  virtual void save(torch::serialize::OutputArchive& archive) const;
  virtual void load(torch::serialize::InputArchive& archive);

 protected:
  // For implementations: a pending exchange of these collectives and/or this job.
  static PendingExchange pending(at::Tensor flat, std::vector<PendingCollective> collectives,
                                 CommThread::Job job = {});
  // For exchanges that are sequences of blocking collectives: checks the buffer (contiguous
  // float32 on the CPU), produces the pseudo-gradient on this thread, and queues
  // run(group, request) on `comm`.
  PendingExchange start_on_comm_thread(Group& group, ExchangeRequest request, CommThread& comm);
  virtual void run(Group& group, const ExchangeRequest& request);
  // Reads the spec a saved state was written with and throws Error unless it is this one's.
  void check_saved_spec(torch::serialize::InputArchive& archive) const;
};

}  // namespace diloco
