// The uncompressed exchange: float32 all-reduces of segments, issued as soon as each segment's
// pseudo-gradient is computed, so that computing segment k+1 overlaps with segment k's transfer.
// Gloo runs them on its own threads: nothing here blocks until finish().
#include <ATen/ATen.h>

#include "exchange/codec_exchange.h"

namespace diloco {
namespace {

// Elements per all-reduce: large enough that per-message latency does not dominate, small
// enough that computing a segment's pseudo-gradient overlaps with the others' transfer. A multiple
// of the outer step's 2048-element blocks.
constexpr std::int64_t kSegment = 1 << 24;

class AllReduceExchange final : public Exchange {
 public:
  std::string spec() const override { return "none"; }

  PendingExchange start(Group& group, ExchangeRequest request, CommThread&) override {
    at::Tensor flat = request.flat;
    std::vector<PendingCollective> collectives;
    try {
      for (std::int64_t off = 0; off < flat.numel(); off += kSegment) {
        const std::int64_t len = std::min(kSegment, flat.numel() - off);
        if (request.produce) request.produce(off, len);
        collectives.push_back(group.allreduce_sum_async(flat.narrow(0, off, len), request.label));
      }
    } catch (...) {
      // Segments already issued write into `flat` until they fail or complete: wait them out.
      for (auto& c : collectives) {
        try {
          c.wait();
        } catch (const std::exception&) {
        }
      }
      throw;
    }
    // Sent exactly: nothing is left for error feedback.
    for (auto& e : request.subtract_sent) e.zero_();
    return pending(std::move(flat), std::move(collectives));
  }

  std::int64_t payload_bytes(const std::vector<at::Tensor>& views) const override {
    std::int64_t n = 0;
    for (const auto& v : views) n += 4 * v.numel();
    return n;
  }
};

}  // namespace

std::unique_ptr<Exchange> make_all_reduce_exchange() {
  return std::make_unique<AllReduceExchange>();
}

}  // namespace diloco
