// The exchanges of single-payload codecs, one per aggregation kind (see exchange.h), and the
// uncompressed one. Internal: Exchange::from_spec builds them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "diloco/exchange/aggregator.h"
#include "diloco/exchange/exchange.h"

namespace diloco {

// float32 all-reduces, in segments (spec "none").
std::unique_ptr<Exchange> make_all_reduce_exchange();

// What the three codec exchanges share: the codec, its payload layout, the state of its stream,
// and running the exchange's blocking collectives as one job on the communication thread.
class CodecExchange : public Exchange {
 public:
  explicit CodecExchange(std::unique_ptr<Codec> codec);
  // The exchange for the codec's aggregation kind; the gathered one for a robust aggregator or
  // when `gather` is set (audits).
  static std::unique_ptr<Exchange> make(std::unique_ptr<Codec> codec,
                                        const Aggregator& aggregator = Aggregator(),
                                        bool gather = false);

  std::string spec() const override { return codec_->spec(); }
  PendingExchange start(Group& group, ExchangeRequest request, CommThread& comm) override;
  std::int64_t payload_bytes(const std::vector<at::Tensor>& views) const override;
  const Codec* codec() const override { return codec_.get(); }
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 protected:
  // The exchange itself: blocking collectives, on the communication thread.
  void run(Group& group, const ExchangeRequest& request) override = 0;
  // Encodes every view into `payload` and returns each one's offset; subtracts what the island
  // sent from request.subtract_sent when set (error feedback).
  std::vector<std::int64_t> encode_all(const ExchangeRequest& request, std::uint8_t* payload);
  // Decodes a payload that rank `from` sent. A malformed one (a corrupt link, a peer running
  // another codec or library version) is rethrown naming the sender, so that the bad peer can be
  // found without guessing: "[gathered 'outer_sync'] rank 1 of 3: malformed payload from rank 2:
  // ...". `how` adds where the bytes came from when the sender only forwarded them.
  void decode_from(const Group& group, const std::string& label, int from,
                   const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out,
                   const std::string& how = "") const;

  std::unique_ptr<Codec> codec_;
};

}  // namespace diloco
