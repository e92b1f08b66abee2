// How the islands' contributions (pseudo-gradients) are combined into the one the outer step
// applies, and the screening that leaves hostile or broken ones out.
//
//   mean                 the average; the default. Every exchange kind computes it (summed in
//                        flight or decoded and summed in rank order).
//   trimmed_mean(trim=k) per coordinate, the k largest and k smallest values are dropped and the
//                        rest averaged (Yin et al. 2018); needs 2k < the islands taking part
//                        (with fewer, k shrinks to what leaves one value in the middle).
//   median               per coordinate, the median (of an even count, the mean of the two
//                        middle values).
//   norm_clip(k=c)       each contribution is scaled down to at most c x the median of the
//                        contributions' norms, then averaged (c in [1, 1e6], default 1: no island
//                        pulls harder than the median one).
// The robust three need each island's contribution, so they always use the gathered exchange:
// every island's payload is all-gathered, (N-1) x its bytes per rank, instead of a ring's
// 2(N-1)/N x (for 4 islands and no compression, 2x the bytes of mean's all-reduce; with a codec,
// each island's payload in that codec). Norms are taken per parameter bucket (the parameters of
// one fragment and dtype: the whole model for a float32 model without fragments).
//
// Screening (ContributionScreen, exchange.h) runs before the combination in exchanges that see
// each contribution: a contribution that does not decode, decodes to a NaN or an infinity, or
// whose norm is above screen factor x the median norm is refused and its sender named.
#pragma once

#include <ATen/Tensor.h>

#include <string>
#include <vector>

namespace diloco {

class CodecParams;

// The Euclidean norm of a float tensor, accumulated in float64: a contribution of 1e30s has a
// finite norm to compare (float32 would overflow to infinity).
double l2_norm(const at::Tensor& t);

class Aggregator {
 public:
  enum class Kind { kMean, kTrimmedMean, kMedian, kNormClip };

  Aggregator() = default;
  // "mean", "trimmed_mean", "trimmed_mean(trim=2)", "median", "norm_clip", "norm_clip(k=3)".
  // Throws OptionError naming the aggregator, the parameter and its range.
  static Aggregator parse(const std::string& spec);

  Kind kind() const { return kind_; }
  bool robust() const { return kind_ != Kind::kMean; }
  int trim() const { return trim_; }
  double clip() const { return clip_; }
  // Spelled out, parameters included: "trimmed_mean(trim=1)", "norm_clip(k=1)".
  std::string spec() const;

  // Throws OptionError when this aggregator cannot combine `islands` contributions
  // (trimmed_mean with 2 trim >= islands).
  void check_islands(int islands) const;

  // Writes the combination of `contributions` (float32 tensors of one shape, at least one) into
  // `out` (the same shape). Deterministic: the same inputs in the same order give the same bits.
  void combine(const std::vector<at::Tensor>& contributions, at::Tensor& out) const;

 private:
  void read(const std::string& name, CodecParams& params, const std::string& text);

  Kind kind_ = Kind::kMean;
  int trim_ = 1;
  double clip_ = 1.0;
};

}  // namespace diloco
