// The ring-requantized exchange: blockwise quantizers (int8/4/2, fp4, normal-int8) sum over the
// requantizing ring of comm/ring_requantized.h, every hop decoding, adding in float32 and
// re-encoding with the codec.
#include <ATen/ATen.h>

#include "comm/ring_requantized.h"
#include "exchange/codec_exchange.h"

namespace diloco {
namespace {

// Ring chunks start at multiples of this many elements, so that blockwise codecs (blocks are
// powers of two up to 4096) see whole blocks wherever a chunk starts.
constexpr std::int64_t kRingAlign = 4096;

class RingRequantizedExchange final : public CodecExchange, private RingHop {
 public:
  using CodecExchange::CodecExchange;

 private:
  void run(Group& group, const ExchangeRequest& request) override {
    if (!request.subtract_sent.empty()) {
      // The island's own contribution is its quantize-dequantize; the ring's re-quantization of
      // partial sums at later hops is not the island's to feed back.
      for (std::size_t i = 0; i < request.views.size(); ++i) {
        at::Tensor v = request.views[i];
        at::Tensor buf = at::empty({codec_->payload_bytes(v.sizes())}, at::kByte);
        auto* bytes = static_cast<std::uint8_t*>(buf.data_ptr());
        codec_->encode(v.contiguous(), bytes);
        codec_->decode(bytes, buf.numel(), v);
        request.subtract_sent[i].sub_(v);
      }
    }
    group_ = &group;
    label_ = request.label;
    at::Tensor flat = request.flat;
    ring_allreduce_requantized(group, flat, *this, request.label, kRingAlign);
  }

  // The ring's hop: encode and decode with the codec.
  std::int64_t payload_bytes(std::int64_t elements) const override {
    return codec_->payload_bytes({elements});
  }
  void encode(const at::Tensor& chunk, std::uint8_t* out) override { codec_->encode(chunk, out); }
  void decode(const std::uint8_t* in, std::int64_t bytes, at::Tensor& out, int from,
              const std::string& how) const override {
    decode_from(*group_, label_, from, in, bytes, out, how);
  }
  using CodecExchange::payload_bytes;

  const Group* group_ = nullptr;  // of the exchange running (one at a time, on one thread)
  std::string label_;
};

}  // namespace

std::unique_ptr<Exchange> make_ring_requantized_exchange(std::unique_ptr<Codec> codec) {
  return std::make_unique<RingRequantizedExchange>(std::move(codec));
}

}  // namespace diloco
