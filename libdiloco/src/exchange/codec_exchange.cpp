// What the codec exchanges share (see codec_exchange.h).
#include "exchange/codec_exchange.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "diloco/errors.h"

namespace diloco {

std::unique_ptr<Exchange> make_summable_exchange(std::unique_ptr<Codec> codec);
std::unique_ptr<Exchange> make_gathered_exchange(std::unique_ptr<Codec> codec,
                                                 const Aggregator& aggregator);
std::unique_ptr<Exchange> make_ring_requantized_exchange(std::unique_ptr<Codec> codec);

CodecExchange::CodecExchange(std::unique_ptr<Codec> codec) : codec_(std::move(codec)) {
  if (!codec_) throw OptionError("[compression] codec must not be null");
}

std::unique_ptr<Exchange> CodecExchange::make(std::unique_ptr<Codec> codec,
                                              const Aggregator& aggregator, bool gather) {
  if (!codec) throw OptionError("[compression] codec must not be null");
  if (aggregator.robust() || gather) return make_gathered_exchange(std::move(codec), aggregator);
  switch (codec->aggregation()) {
    case Aggregation::kSummable: return make_summable_exchange(std::move(codec));
    case Aggregation::kGathered: return make_gathered_exchange(std::move(codec), aggregator);
    case Aggregation::kRingRequantized: return make_ring_requantized_exchange(std::move(codec));
  }
  throw Error("[compression] unknown aggregation kind");
}

PendingExchange CodecExchange::start(Group& group, ExchangeRequest request, CommThread& comm) {
  return start_on_comm_thread(group, std::move(request), comm);
}

std::int64_t CodecExchange::payload_bytes(const std::vector<at::Tensor>& views) const {
  std::int64_t n = 0;
  for (const auto& v : views) n += codec_->payload_bytes(v.sizes());
  return n;
}

std::vector<std::int64_t> CodecExchange::encode_all(const ExchangeRequest& request,
                                                    std::uint8_t* payload) {
  const auto& views = request.views;
  std::vector<std::int64_t> offsets;
  std::int64_t off = 0;
  for (const auto& v : views) {
    offsets.push_back(off);
    codec_->encode(v.contiguous(), payload + off);
    off += codec_->payload_bytes(v.sizes());
  }
  if (!request.subtract_sent.empty()) {
    // What this island sent is what its own payload decodes to.
    for (std::size_t i = 0; i < views.size(); ++i) {
      at::Tensor sent = at::empty_like(views[i]);
      codec_->decode(payload + offsets[i], codec_->payload_bytes(views[i].sizes()), sent);
      request.subtract_sent[i].sub_(sent);
    }
  }
  return offsets;
}

void CodecExchange::decode_from(const Group& group, const std::string& label, int from,
                                const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out,
                                const std::string& how) const {
  try {
    codec_->decode(payload, bytes, out);
  } catch (const std::exception& e) {
    throw Error("[" + std::string(aggregation_name(codec_->aggregation())) + " '" + label +
                "'] rank " + std::to_string(group.rank()) + " of " +
                std::to_string(group.world_size()) + ": malformed payload from rank " +
                std::to_string(from) + how + ": " + e.what());
  }
}

void CodecExchange::save(torch::serialize::OutputArchive& archive) const {
  archive.write("spec", c10::IValue(spec()));
  archive.write("stream_position", c10::IValue(static_cast<std::int64_t>(codec_->stream_position())));
}

void CodecExchange::load(torch::serialize::InputArchive& archive) {
  check_saved_spec(archive);
  c10::IValue position;
  archive.read("stream_position", position);
  codec_->set_stream_position(static_cast<std::uint64_t>(position.toInt()));
}

}  // namespace diloco
