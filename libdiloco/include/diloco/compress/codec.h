// A codec turns one dense float32 tensor (a parameter's pseudo-gradient) into a payload of bytes
// and back, and says how its payloads are combined across islands.
//
// Three ways to aggregate (see libdiloco/docs/design.md):
//   kSummable        payloads are arrays of summable_dtype() that an all-reduce can add as they
//                    are (fp32, fp16 casts); decode(sum) / N is the average;
//   kRingRequantized a ring reduce-scatter where every hop decodes, accumulates in float32 and
//                    re-encodes, then an all-gather that forwards bytes unchanged (int8/4/2, fp4);
//   kGathered        every island's payload is all-gathered and decoded locally (top-k, sign).
//
// A codec is not a synchronizer: it never talks to the network. It is stateless between calls
// except for what it declares (a random generator for stochastic rounding). Error feedback is
// applied around any codec by the exchanges (diloco/exchange/), not part of it.
#pragma once

#include <ATen/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <memory>
#include <string>

namespace diloco {

enum class Aggregation { kSummable, kRingRequantized, kGathered };
const char* aggregation_name(Aggregation a);

class Codec {
 public:
  virtual ~Codec() = default;

  // The spec that builds this codec again with make_codec(), parameters spelled out:
  // "int8(block=256,rounding=nearest)".
  virtual std::string spec() const = 0;
  virtual Aggregation aggregation() const = 0;
  // Element type of the payload: at::kByte for byte streams; for kSummable codecs the type the
  // all-reduce adds (at::kFloat, at::kHalf), the payload then being an array of it.
  virtual at::ScalarType payload_dtype() const = 0;

  // Exact size in bytes of the payload of a tensor of this shape. Sizes depend on the shape
  // alone, so every island knows every payload's size without exchanging headers. Codecs that
  // chunk matrices (64x64 tiles) use the shape; the others only its element count.
  virtual std::int64_t payload_bytes(c10::IntArrayRef shape) const = 0;

  // x: contiguous float32 on the CPU, any shape (0-d included). Writes exactly
  // payload_bytes(x.sizes()) bytes to `out`.
  virtual void encode(const at::Tensor& x, std::uint8_t* out) = 0;

  // Reads a payload of `bytes` bytes made by encode() for a tensor shaped like `out` into `out`
  // (contiguous float32 on the CPU). Throws diloco::Error naming what is wrong when the payload
  // is malformed (wrong size, bad header, index out of range, non-finite scale); never reads or
  // writes out of bounds.
  virtual void decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const = 0;

  // The documented worst-case |decode(encode(x)) - x| for this x, elementwise maximum; tests
  // check the round trip against it. Lossy-by-design codecs (top-k, sign) state the bound of what
  // they keep: for them the round trip is checked by their own tests.
  virtual double error_bound(const at::Tensor& x) const = 0;

  // How far the codec's deterministic random stream has advanced (random-k's encode calls,
  // stochastic rounding's elements drawn): state that lives across outer steps, saved with the
  // exchange's (sync/outer_state.h). Codecs without a stream keep 0.
  virtual std::uint64_t stream_position() const { return 0; }
  virtual void set_stream_position(std::uint64_t /*position*/) {}
};

}  // namespace diloco
