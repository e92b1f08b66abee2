// The three exchanges of compressed pseudo-gradients and error feedback (see compressor.h).
#include "diloco/compress/compressor.h"

#include <ATen/ATen.h>

#include <cstring>

#include "comm/ring_requantized.h"
#include "compress/spec_parse.h"
#include "diloco/comm/group.h"
#include "diloco/compress/powersgd.h"
#include "diloco/compress/registry.h"
#include "diloco/errors.h"

namespace diloco {
namespace {

// Ring chunks start at multiples of this many elements, so that blockwise codecs (blocks are
// powers of two up to 4096) see whole blocks wherever a chunk starts.
constexpr std::int64_t kRingAlign = 4096;

std::uint8_t* bytes_of(at::Tensor& t) { return static_cast<std::uint8_t*>(t.data_ptr()); }

// Decodes a payload that rank `from` sent. A malformed one (a corrupt link, a peer running another
// codec or library version) is rethrown naming the sender, so that the bad peer can be found
// without guessing: "[gathered 'outer_sync'] rank 1 of 3: malformed payload from rank 2: ...".
// `how` adds where the bytes came from when the sender only forwarded them.
void decode_from(const Codec& codec, const Group& group, const std::string& label, int from,
                 const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out,
                 const std::string& how = "") {
  try {
    codec.decode(payload, bytes, out);
  } catch (const std::exception& e) {
    throw Error("[" + std::string(aggregation_name(codec.aggregation())) + " '" + label +
                "'] rank " + std::to_string(group.rank()) + " of " +
                std::to_string(group.world_size()) + ": malformed payload from rank " +
                std::to_string(from) + how + ": " + e.what());
  }
}

// The ring's hop for a ring-requantized codec: encode and decode with it.
class CodecRingHop final : public RingHop {
 public:
  CodecRingHop(Codec& codec, const Group& group, const std::string& label)
      : codec_(codec), group_(group), label_(label) {}
  std::int64_t payload_bytes(std::int64_t elements) const override {
    return codec_.payload_bytes({elements});
  }
  void encode(const at::Tensor& chunk, std::uint8_t* out) override {
    codec_.encode(chunk, out);
  }
  void decode(const std::uint8_t* in, std::int64_t bytes, at::Tensor& out, int from,
              const std::string& how) const override {
    decode_from(codec_, group_, label_, from, in, bytes, out, how);
  }

 private:
  Codec& codec_;
  const Group& group_;
  const std::string& label_;
};

}  // namespace

std::unique_ptr<Compressor> Compressor::from_spec(const std::string& spec) {
  std::string codec_spec = spec;
  bool ef = false;
  double beta = 1.0;
  const auto plus = spec.rfind("+ef");
  if (plus != std::string::npos && plus + 3 <= spec.size()) {
    const std::string tail = spec.substr(plus + 3);
    if (tail.empty() || tail.front() == '(') {
      codec_spec = spec.substr(0, plus);
      ef = true;
      if (!tail.empty()) {
        if (tail.back() != ')') throw OptionError("[compression] malformed '+ef" + tail + "' in '" + spec + "'");
        const std::string inner = tail.substr(1, tail.size() - 2);
        const std::string key = "beta=";
        if (inner.rfind(key, 0) != 0) {
          throw OptionError("[compression] ef takes one parameter, beta (in [0, 1]), got '" + inner + "'");
        }
        std::map<std::string, std::string> values{{"beta", inner.substr(key.size())}};
        CodecParams p("ef", values);
        beta = p.get_double("beta", 1.0, 0.0, 1.0);
      }
    }
  }
  auto [name, values] = parse_spec(codec_spec);
  if (name == "powersgd") {
    CodecParams params(name, values);
    auto c = std::make_unique<PowerSGD>(PowerSGD::Options::from_params(params), ef, beta);
    params.reject_unknown();
    return c;
  }
  return std::make_unique<CodecCompressor>(make_codec(codec_spec), ef, beta);
}

CodecCompressor::CodecCompressor(std::unique_ptr<Codec> codec, bool error_feedback, double beta)
    : codec_(std::move(codec)), error_feedback_(error_feedback), beta_(beta) {
  if (!codec_) throw OptionError("[compression] codec must not be null");
  if (!(beta >= 0.0 && beta <= 1.0)) {
    throw OptionError("[compression] ef beta must be in [0, 1], got " + std::to_string(beta));
  }
}

std::string CodecCompressor::spec() const {
  std::string s = codec_->spec();
  if (error_feedback_) s += "+ef(beta=" + std::to_string(beta_) + ")";
  return s;
}

std::int64_t CodecCompressor::payload_bytes(const std::vector<at::Tensor>& views) const {
  std::int64_t n = 0;
  for (const auto& v : views) n += codec_->payload_bytes(v.sizes());
  return n;
}

void CodecCompressor::sum(Group& group, at::Tensor& flat, const std::vector<at::Tensor>& views,
                     const std::string& label) {
  TORCH_CHECK(flat.device().is_cpu() && flat.scalar_type() == at::kFloat && flat.is_contiguous(),
              "[compression] the pseudo-gradient buffer must be contiguous float32 on the CPU");
  if (error_feedback_ && residuals_.empty()) {
    for (const auto& v : views) residuals_.push_back(at::zeros_like(v));
  }
  if (error_feedback_) {
    for (std::size_t i = 0; i < views.size(); ++i) {
      at::Tensor v = views[i];
      v.add_(residuals_[i], beta_);  // p = delta + beta * e, in place
    }
  }
  switch (codec_->aggregation()) {
    case Aggregation::kSummable: return sum_summable(group, views, label);
    case Aggregation::kGathered: return sum_gathered(group, flat, views, label);
    case Aggregation::kRingRequantized: return sum_ring(group, flat, views, label);
  }
}

void CodecCompressor::apply_error_feedback(const std::vector<at::Tensor>& p,
                                      const std::vector<at::Tensor>& sent) {
  for (std::size_t i = 0; i < p.size(); ++i) at::sub_out(residuals_[i], p[i], sent[i]);
}

std::vector<std::int64_t> CodecCompressor::encode_all(const std::vector<at::Tensor>& views,
                                                 std::uint8_t* payload) {
  std::vector<std::int64_t> offsets;
  std::int64_t off = 0;
  for (const auto& v : views) {
    offsets.push_back(off);
    codec_->encode(v.contiguous(), payload + off);
    off += codec_->payload_bytes(v.sizes());
  }
  if (error_feedback_) {
    // What this island sent is what its own payload decodes to.
    std::vector<at::Tensor> sent;
    for (std::size_t i = 0; i < views.size(); ++i) {
      at::Tensor s = at::empty_like(views[i]);
      codec_->decode(payload + offsets[i], codec_->payload_bytes(views[i].sizes()), s);
      sent.push_back(s);
    }
    apply_error_feedback(views, sent);
  }
  return offsets;
}

void CodecCompressor::sum_summable(Group& group, const std::vector<at::Tensor>& views,
                              const std::string& label) {
  const auto dtype = codec_->payload_dtype();
  const auto elem = static_cast<std::int64_t>(c10::elementSize(dtype));
  at::Tensor payload = at::empty({payload_bytes(views) / elem}, at::TensorOptions().dtype(dtype));
  const auto offsets = encode_all(views, bytes_of(payload));
  group.allreduce_sum(payload, label);
  for (std::size_t i = 0; i < views.size(); ++i) {
    at::Tensor v = views[i];
    codec_->decode(bytes_of(payload) + offsets[i], codec_->payload_bytes(v.sizes()), v);
  }
}

void CodecCompressor::sum_gathered(Group& group, at::Tensor& flat, const std::vector<at::Tensor>& views,
                              const std::string& label) {
  at::Tensor payload = at::empty({payload_bytes(views)}, at::kByte);
  const auto offsets = encode_all(views, bytes_of(payload));
  std::vector<at::Tensor> all = group.allgather(payload, label);
  // Sum in rank order, the same on every rank, so the result is bit-identical everywhere.
  flat.zero_();
  for (std::size_t i = 0; i < views.size(); ++i) {
    at::Tensor decoded = at::empty_like(views[i]);
    at::Tensor v = views[i];
    for (std::size_t from = 0; from < all.size(); ++from) {
      decode_from(*codec_, group, label, static_cast<int>(from), bytes_of(all[from]) + offsets[i],
                  codec_->payload_bytes(v.sizes()), decoded);
      v.add_(decoded);
    }
  }
}

void CodecCompressor::sum_ring(Group& group, at::Tensor& flat, const std::vector<at::Tensor>& views,
                          const std::string& label) {
  if (error_feedback_) {
    // The island's own contribution is its quantize-dequantize: feed that error back.
    std::vector<at::Tensor> p;
    for (const auto& v : views) p.push_back(v.clone());
    for (std::size_t i = 0; i < views.size(); ++i) {
      at::Tensor buf = at::empty({codec_->payload_bytes(views[i].sizes())}, at::kByte);
      at::Tensor v = views[i];
      codec_->encode(v.contiguous(), bytes_of(buf));
      codec_->decode(bytes_of(buf), buf.numel(), v);
    }
    apply_error_feedback(p, views);
  }
  CodecRingHop hop(*codec_, group, label);
  ring_allreduce_requantized(group, flat, hop, label, kRingAlign);
}

}  // namespace diloco
