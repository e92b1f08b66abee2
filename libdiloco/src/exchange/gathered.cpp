// The gathered exchange: one all-gather of the payloads (top-k, sign, DCT top-k: payloads that
// do not add), each decoded and summed in rank order, so the sum is bit-identical everywhere.
#include <ATen/ATen.h>

#include "exchange/codec_exchange.h"

namespace diloco {
namespace {

class GatheredExchange final : public CodecExchange {
 public:
  using CodecExchange::CodecExchange;

 private:
  void run(Group& group, const ExchangeRequest& request) override {
    const auto& views = request.views;
    at::Tensor payload = at::empty({payload_bytes(views)}, at::kByte);
    const auto offsets = encode_all(request, static_cast<std::uint8_t*>(payload.data_ptr()));
    std::vector<at::Tensor> all = group.allgather(payload, request.label);
    at::Tensor flat = request.flat;
    flat.zero_();
    for (std::size_t i = 0; i < views.size(); ++i) {
      at::Tensor decoded = at::empty_like(views[i]);
      at::Tensor v = views[i];
      for (std::size_t from = 0; from < all.size(); ++from) {
        decode_from(group, request.label, static_cast<int>(from),
                    static_cast<const std::uint8_t*>(all[from].data_ptr()) + offsets[i],
                    codec_->payload_bytes(v.sizes()), decoded);
        v.add_(decoded);
      }
    }
  }
};

}  // namespace

std::unique_ptr<Exchange> make_gathered_exchange(std::unique_ptr<Codec> codec) {
  return std::make_unique<GatheredExchange>(std::move(codec));
}

}  // namespace diloco
