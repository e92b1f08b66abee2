// The gathered exchange: one all-gather of the payloads (top-k, sign, DCT top-k: payloads that
// do not add; any codec under a robust aggregator), each island's decoded on every rank. With
// the mean, the accepted contributions are summed in rank order, so the sum is bit-identical
// everywhere; a robust aggregator combines them instead (aggregator.h). Seeing each contribution,
// it screens them first (ContributionScreen in exchange.h).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "diloco/errors.h"
#include "diloco/exchange/aggregator.h"
#include "exchange/codec_exchange.h"

namespace diloco {
namespace {

class GatheredExchange final : public CodecExchange {
 public:
  GatheredExchange(std::unique_ptr<Codec> codec, Aggregator aggregator)
      : CodecExchange(std::move(codec)), aggregator_(aggregator) {}

  bool sees_contributions() const override { return true; }

 private:
  void run(Group& group, const ExchangeRequest& request) override {
    const auto& views = request.views;
    at::Tensor payload = at::empty({payload_bytes(views)}, at::kByte);
    const auto offsets = encode_all(request, static_cast<std::uint8_t*>(payload.data_ptr()));
    std::vector<at::Tensor> all = group.allgather(payload, request.label);
    const int n = static_cast<int>(all.size());
    ContributionScreen* screen = request.screen.get();
    const bool screening = screen != nullptr && screen->factor > 0.0 && n >= 3;

    // Each island's contribution, decoded whole, and its norm.
    std::vector<at::Tensor> contributions;
    std::vector<double> norms(static_cast<std::size_t>(n), 0.0);
    std::vector<std::string> refusal(static_cast<std::size_t>(n));
    const auto excluded = [&](int r) {
      return screen != nullptr &&
             std::find(screen->excluded.begin(), screen->excluded.end(), r) != screen->excluded.end();
    };
    for (int from = 0; from < n; ++from) {
      if (excluded(from)) {  // not even decoded
        refusal[static_cast<std::size_t>(from)] = "excluded after a failed audit";
        contributions.emplace_back();
        continue;
      }
      at::Tensor c = at::empty_like(request.flat);
      std::int64_t at_element = 0;
      try {
        for (std::size_t i = 0; i < views.size(); ++i) {
          at::Tensor out = c.narrow(0, at_element, views[i].numel()).view(views[i].sizes());
          at_element += views[i].numel();
          decode_from(group, request.label, from,
                      static_cast<const std::uint8_t*>(all[from].data_ptr()) + offsets[i],
                      codec_->payload_bytes(views[i].sizes()), out);
        }
      } catch (const Error& e) {
        if (!screening) throw;
        refusal[static_cast<std::size_t>(from)] = std::string("a malformed payload: ") + e.what();
      }
      if (screening && refusal[static_cast<std::size_t>(from)].empty()) {
        norms[static_cast<std::size_t>(from)] = l2_norm(c);
        if (!std::isfinite(norms[static_cast<std::size_t>(from)])) {
          refusal[static_cast<std::size_t>(from)] = "it decodes to a NaN or an infinity";
        }
      }
      contributions.push_back(std::move(c));
    }

    double median = 0.0;
    if (screening) {
      std::vector<double> finite;
      for (int r = 0; r < n; ++r) {
        if (refusal[static_cast<std::size_t>(r)].empty()) finite.push_back(norms[r]);
      }
      std::sort(finite.begin(), finite.end());
      const std::size_t k = finite.size();
      median = k == 0 ? 0.0 : k % 2 == 1 ? finite[k / 2] : 0.5 * (finite[k / 2 - 1] + finite[k / 2]);
    }
    std::vector<int> accepted;
    std::ostringstream reasons;
    for (int r = 0; r < n; ++r) {
      auto& why = refusal[static_cast<std::size_t>(r)];
      if (screening && why.empty() && norms[r] > screen->factor * median) {
        std::ostringstream m;
        m << "norm " << norms[r] << ", above " << screen->factor << " x the median " << median;
        why = m.str();
      }
      if (why.empty()) {
        accepted.push_back(r);
      } else {
        screen->refused.push_back(r);
        reasons << (screen->refused.size() > 1 ? "; " : "") << "rank " << r << " (" << why << ")";
      }
    }
    if (screen != nullptr) screen->reasons = reasons.str();

    at::Tensor flat = request.flat;
    if (screen != nullptr) screen->contributors = static_cast<int>(accepted.size());
    if (accepted.empty()) {  // every one refused: nothing moves
      flat.zero_();
      if (screen != nullptr) {
        screen->contributors = 1;
        screen->averaged = true;
      }
      return;
    }
    if (aggregator_.robust()) {
      std::vector<at::Tensor> kept;
      for (int r : accepted) kept.push_back(contributions[static_cast<std::size_t>(r)]);
      aggregator_.combine(kept, flat);
      if (screen == nullptr) {
        throw Error("[gathered '" + request.label + "'] aggregator " + aggregator_.spec() +
                    " needs a ContributionScreen to report that the buffer holds an average");
      }
      screen->averaged = true;
      return;
    }
    flat.zero_();
    for (int r : accepted) flat.add_(contributions[static_cast<std::size_t>(r)]);
  }

  Aggregator aggregator_;
};

}  // namespace

std::unique_ptr<Exchange> make_gathered_exchange(std::unique_ptr<Codec> codec,
                                                 const Aggregator& aggregator) {
  return std::make_unique<GatheredExchange>(std::move(codec), aggregator);
}

}  // namespace diloco
