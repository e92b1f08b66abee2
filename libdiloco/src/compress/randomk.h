// Random-k sparsification with a seed shared by all islands, so that every island keeps the same
// positions and the payloads can be all-reduced. Not error feedback (diloco/exchange/error_feedback.h adds it).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "diloco/compress/codec.h"
#include "diloco/compress/codec_params.h"

namespace diloco {

extern const char* const kRandomkHelp;

// Random-k (Stich et al. 2018, "Sparsified SGD with memory"; the random-zeroing baseline of
// Streaming DiLoCo Fig. 11): keep k = max(1, round(fraction d)) of the d elements (k = 0 for
// d = 0), the same k positions on every island.
//
// Positions. Call number c of encode() on this codec instance (c = 0, 1, 2, ..., advancing on
// every encode whatever the tensor) draws k distinct positions with Floyd's algorithm from a
// std::mt19937_64 seeded with splitmix64(splitmix64(seed) + c), each draw below n taken by
// rejection (so no implementation-defined std:: distribution is involved). The islands therefore
// agree as long as each builds its codec from the same spec and calls encode() on the same
// tensors in the same order - the rule c10d already imposes on the collectives around it.
//
// Payload: the k kept values as float32, in ascending order of position (payload_dtype kFloat,
// kSummable: since the positions agree, the elementwise sum of the islands' payloads is the
// payload of the sum).
//   payload_bytes = 4k
// 1024x1024 at fraction=0.01: k = 10486, 41944 bytes (0.32 bits per parameter, 100x).
//
// Decode scatters the values to their positions, zeros elsewhere, times d/k if rescale=true
// (then E[decode(encode(x))] = x over the draws: unbiased, at the price of a larger variance).
// The positions are not in the payload, so decode uses those of the matching encode call on this
// instance: the encode that wrote the payload at this very address, since the last decode that
// followed an encode (the compressor encodes every tensor, all-reduces the payloads in place, then
// decodes each from where it was encoded); failing that, the most recent encode of a tensor with
// as many elements (a payload copied elsewhere, e.g. the sum of the islands' payloads for the
// last encode). A decode with no such encode throws diloco::Error, as do a payload of the wrong
// size and non-finite values. The instance is therefore stateful and not thread-safe.
//
// error_bound: max|x| (a dropped element's error is |x|, a kept one's 0), times max(1, d/k - 1)
// with rescale (a kept element's error is then |x| (d/k - 1)).
class RandomkCodec : public Codec {
 public:
  RandomkCodec(double fraction, std::int64_t seed, bool rescale);

  std::string spec() const override;
  Aggregation aggregation() const override { return Aggregation::kSummable; }
  at::ScalarType payload_dtype() const override { return at::kFloat; }
  std::int64_t payload_bytes(c10::IntArrayRef shape) const override;
  void encode(const at::Tensor& x, std::uint8_t* out) override;
  void decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const override;
  double error_bound(const at::Tensor& x) const override;

  // k for a tensor of d elements.
  std::int64_t kept(std::int64_t d) const;
  // The positions that encode call number `call` keeps in a tensor of d elements, ascending.
  std::vector<std::int64_t> positions(std::int64_t call, std::int64_t d) const;
  // How many encode calls this instance has made.
  std::int64_t calls() const { return calls_; }
  std::uint64_t stream_position() const override { return static_cast<std::uint64_t>(calls_); }
  void set_stream_position(std::uint64_t position) override {
    calls_ = static_cast<std::int64_t>(position);
    draws_.clear();
  }

 private:
  struct Draw {
    const std::uint8_t* payload;
    std::int64_t numel;
    std::vector<std::int64_t> positions;
  };

  double fraction_;
  std::int64_t seed_;
  bool rescale_;
  std::int64_t calls_ = 0;
  // The encodes of the current round (see the class comment); a decode ends the round, and the
  // next encode starts a new one.
  std::vector<Draw> draws_;
  mutable bool decoded_ = false;
};

// Builds randomk(fraction=0.01,seed=0,rescale=false|true).
std::unique_ptr<Codec> make_randomk_codec(CodecParams& params);

}  // namespace diloco
