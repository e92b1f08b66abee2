// The requantizing ring all-reduce (INTELLECT-1, arXiv 2412.01152; PCCL, arXiv 2505.14065): a
// ring reduce-scatter over encoded chunks where every hop decodes what it received, accumulates
// in float32 and re-encodes, then a ring all-gather that forwards the chunks' owners' bytes
// unchanged. The owner of each chunk encodes and decodes its own sum too, so that every rank
// decodes the same bytes and ends bit-identical.
//
// Terms: N ranks, the flat float32 buffer split into N chunks (starting at multiples of `align`
// elements, so that blockwise codecs see whole blocks); hop s of the reduce-scatter sends chunk
// (r - s) mod N to rank r + 1 and receives chunk (r - s - 1) mod N from rank r - 1; after N - 1
// hops rank r owns the sum of chunk (r + 1) mod N.
// Bytes per rank: (N - 1) encoded chunks each way in both phases, about 2(N-1)/N of one encoded
// buffer. What a hop does to the bytes is the RingHop's: a codec today, a MAC with a key later.
// It is a collective: every rank calls it with buffers of the same size, in the same order.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <string>

namespace diloco {

class Group;

// What each hop of the ring does with a chunk of float32 values.
class RingHop {
 public:
  virtual ~RingHop() = default;
  // Bytes the encoding of `elements` values takes.
  virtual std::int64_t payload_bytes(std::int64_t elements) const = 0;
  // Not const: a codec may keep state across calls (stochastic rounding's counter).
  virtual void encode(const at::Tensor& chunk, std::uint8_t* out) = 0;
  // Decodes bytes that rank `from` sent into `out`; `how` says more when `from` only forwarded
  // them (" (encoded by rank 3)"). Throws Error naming `from` for a malformed payload.
  virtual void decode(const std::uint8_t* in, std::int64_t bytes, at::Tensor& out, int from,
                      const std::string& how) const = 0;
};

// Sums `flat` (contiguous float32 on the CPU) over all ranks in place, through `hop` at every
// hop; every rank ends with the same values. `label` names the exchange in statistics and errors.
void ring_allreduce_requantized(Group& group, at::Tensor& flat, RingHop& hop,
                                const std::string& label, std::int64_t align);

}  // namespace diloco
