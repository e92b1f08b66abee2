// A compressor: a codec, optional error feedback around it, and the exchange its aggregation
// kind calls for. It turns every island's pseudo-gradient into the sum over islands of what the
// codec lets through, bit-identical on every rank.
//
// Spec: "CODEC" or "CODEC+ef" or "CODEC+ef(beta=0.9)", e.g. "topk(k=64,values=2bit)+ef".
// Error feedback (EF-SGD, Karimireddy et al. 2019): p = delta + beta * e; sent = C(p);
// e <- p - sent. It keeps one float32 residual per parameter (1x the parameters more memory).
// For ring-requantized codecs `sent` is the island's own quantize-dequantize of p; the ring's
// re-quantization of partial sums at later hops is not fed back.
//
// Exchanges (bytes per rank, n = payload bytes of the island's tensors, N ranks):
//   summable          one all-reduce of the payloads: 2(N-1)/N * n;
//   ring-requantized  ring reduce-scatter then all-gather of encoded chunks: about 2(N-1)/N * n;
//   gathered          one all-gather of the payloads: (N-1) * n.
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

class Compressor {
 public:
  // Throws OptionError for a bad spec, listing the valid codecs.
  static std::unique_ptr<Compressor> from_spec(const std::string& spec);
  Compressor(std::unique_ptr<Codec> codec, bool error_feedback, double beta);

  std::string spec() const;
  const Codec& codec() const { return *codec_; }
  bool error_feedback() const { return error_feedback_; }

  // `flat` is a contiguous float32 CPU buffer; `views` are the parameters' tensors inside it, in
  // order, with their shapes (codecs that tile matrices use the shapes). On return `flat` holds
  // the sum over ranks of the decoded contributions (divide by N for the mean).
  void sum(Group& group, at::Tensor& flat, const std::vector<at::Tensor>& views,
           const std::string& label);

  // Bytes this rank's payloads take for these tensors (what the exchange carries per island).
  std::int64_t payload_bytes(const std::vector<at::Tensor>& views) const;
  // The error-feedback residuals, one per view (empty before the first sum()).
  const std::vector<at::Tensor>& residuals() const { return residuals_; }

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
