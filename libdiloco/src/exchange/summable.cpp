// The summable exchange: one all-reduce of the codec's payloads (fp16, bf16 bits, random-k at
// shared positions), whose elementwise sum is the payload of the sum.
#include <ATen/ATen.h>

#include "exchange/codec_exchange.h"

namespace diloco {
namespace {

class SummableExchange final : public CodecExchange {
 public:
  using CodecExchange::CodecExchange;

 private:
  void run(Group& group, const ExchangeRequest& request) override {
    const auto dtype = codec_->payload_dtype();
    const auto elem = static_cast<std::int64_t>(c10::elementSize(dtype));
    at::Tensor payload =
        at::empty({payload_bytes(request.views) / elem}, at::TensorOptions().dtype(dtype));
    auto* bytes = static_cast<std::uint8_t*>(payload.data_ptr());
    const auto offsets = encode_all(request, bytes);
    group.allreduce_sum(payload, request.label);
    for (std::size_t i = 0; i < request.views.size(); ++i) {
      at::Tensor v = request.views[i];
      codec_->decode(bytes + offsets[i], codec_->payload_bytes(v.sizes()), v);
    }
  }
};

}  // namespace

std::unique_ptr<Exchange> make_summable_exchange(std::unique_ptr<Codec> codec) {
  return std::make_unique<SummableExchange>(std::move(codec));
}

}  // namespace diloco
