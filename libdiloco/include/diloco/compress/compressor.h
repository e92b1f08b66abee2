// A compressor turns every island's pseudo-gradient into the sum over islands of what its
// compression lets through, bit-identical on every rank. Two kinds exist: a codec with the
// exchange of its aggregation kind (CodecCompressor, below) and PowerSGD (powersgd.h), whose
// two all-reduce rounds do not fit a single payload.
//
// Spec: "CODEC" or "CODEC+ef" or "CODEC+ef(beta=0.9)", e.g. "topk(k=64,values=2bit)+ef";
// "powersgd(rank=4)+ef".
// Error feedback (EF-SGD, Karimireddy et al. 2019): p = delta + beta * e; sent = C(p);
// e <- p - sent. It keeps one float32 residual per parameter (1x the parameters more memory).
// For ring-requantized codecs `sent` is the island's own quantize-dequantize of p; the ring's
// re-quantization of partial sums at later hops is not fed back.
//
// Exchanges (bytes per rank, n = payload bytes of the island's tensors, N ranks):
//   summable          one all-reduce of the payloads: 2(N-1)/N * n;
//   ring-requantized  ring reduce-scatter then all-gather of encoded chunks: about 2(N-1)/N * n;
//   gathered          one all-gather of the payloads: (N-1) * n;
//   powersgd          two all-reduces (the P and Q factors): 2(N-1)/N * n over both.
// All are collectives: every rank calls sum() with tensors of the same shapes in the same order.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "diloco/compress/codec.h"

namespace diloco {

class Group;

// The interface DiLoCo calls: one per parameter bucket, stateful across outer steps (error
// feedback residuals, PowerSGD's warm-started factors).
class Compressor {
 public:
  // Builds a CodecCompressor for "CODEC[+ef...]", or a PowerSGD for "powersgd(...)[+ef...]".
  // Throws OptionError for a bad spec, listing the valid codecs.
  static std::unique_ptr<Compressor> from_spec(const std::string& spec);
  virtual ~Compressor() = default;

  // The spec that builds this compressor again, parameters spelled out.
  virtual std::string spec() const = 0;
  // `flat` is a contiguous float32 CPU buffer; `views` are the parameters' tensors inside it, in
  // order, with their shapes (codecs that tile matrices use the shapes). On return `flat` holds
  // the sum over ranks of the decoded contributions (divide by N for the mean). Every call must
  // pass the same shapes in the same order (the state is per view).
  virtual void sum(Group& group, at::Tensor& flat, const std::vector<at::Tensor>& views,
                   const std::string& label) = 0;
  // Bytes this rank's payloads take for these tensors, all rounds of the exchange together
  // (what the exchange carries per island, before the collective's own 2(N-1)/N or N-1 factor).
  virtual std::int64_t payload_bytes(const std::vector<at::Tensor>& views) const = 0;
  // The error-feedback residuals, one per view (empty before the first sum() or without EF).
  virtual const std::vector<at::Tensor>& residuals() const = 0;
  // The codec of a single-payload compressor; null for multi-round ones (PowerSGD).
  virtual const Codec* codec() const { return nullptr; }
};

// A codec, optional error feedback around it, and the exchange its aggregation kind calls for.
class CodecCompressor final : public Compressor {
 public:
  CodecCompressor(std::unique_ptr<Codec> codec, bool error_feedback, double beta);

  std::string spec() const override;
  void sum(Group& group, at::Tensor& flat, const std::vector<at::Tensor>& views,
           const std::string& label) override;
  std::int64_t payload_bytes(const std::vector<at::Tensor>& views) const override;
  const std::vector<at::Tensor>& residuals() const override { return residuals_; }
  const Codec* codec() const override { return codec_.get(); }
  bool error_feedback() const { return error_feedback_; }

 private:
  void apply_error_feedback(const std::vector<at::Tensor>& views,
                            const std::vector<at::Tensor>& sent);
  // Encodes every view into `payload` (error feedback applied) and returns each one's offset.
  std::vector<std::int64_t> encode_all(const std::vector<at::Tensor>& views, std::uint8_t* payload);
  void sum_summable(Group& group, const std::vector<at::Tensor>& views, const std::string& label);
  void sum_gathered(Group& group, at::Tensor& flat, const std::vector<at::Tensor>& views,
                    const std::string& label);
  void sum_ring(Group& group, at::Tensor& flat, const std::vector<at::Tensor>& views,
                const std::string& label);

  std::unique_ptr<Codec> codec_;
  bool error_feedback_;
  double beta_;
  std::vector<at::Tensor> residuals_;
};

}  // namespace diloco
