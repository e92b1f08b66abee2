// Hostile islands (see hostile.h).
#include "hostile.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <memory>
#include <stdexcept>

#include "diloco/compress/registry.h"
#include "diloco/sync/diloco.h"

namespace train_lm {
namespace {

// The run's codec with every payload replaced by random bytes. It spells its spec as the run's
// codec does, so the island's configuration still matches the others'.
class RandomBytesCodec final : public diloco::Codec {
 public:
  explicit RandomBytesCodec(std::unique_ptr<diloco::Codec> base) : base_(std::move(base)) {}
  std::string spec() const override { return base_->spec(); }
  diloco::Aggregation aggregation() const override { return base_->aggregation(); }
  at::ScalarType payload_dtype() const override { return base_->payload_dtype(); }
  std::int64_t payload_bytes(c10::IntArrayRef shape) const override {
    return base_->payload_bytes(shape);
  }
  void encode(const at::Tensor& x, std::uint8_t* out) override {
    const std::int64_t n = base_->payload_bytes(x.sizes());
    for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<std::uint8_t>(bytes_());
  }
  void decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const override {
    base_->decode(payload, bytes, out);
  }
  double error_bound(const at::Tensor& x) const override { return base_->error_bound(x); }

 private:
  std::unique_ptr<diloco::Codec> base_;
  std::mt19937 bytes_{12345};
};

}  // namespace

const std::vector<std::string>& HostileIsland::kinds() {
  static const std::vector<std::string> all{"huge", "flip", "scale", "stale", "random"};
  return all;
}

std::string HostileIsland::compression_for(const std::string& kind,
                                           const std::string& compression) {
  if (kind != "random") return compression;
  if (compression == "none") {
    throw std::invalid_argument(
        "--hostile random replaces a codec's payload: give --compress a codec (fp32 sends what "
        "none does, as a codec)");
  }
  static int registered = 0;
  const std::string name = "hostile_random_bytes" + std::to_string(registered++);
  diloco::register_codec(name, "random bytes shaped like " + compression + "'s payloads",
                         [compression](diloco::CodecParams&) {
                           return std::make_unique<RandomBytesCodec>(
                               diloco::make_codec(compression));
                         });
  return name;
}

const std::vector<std::string>& HostileIsland::cheat_kinds() {
  static const std::vector<std::string> all{"lazy", "noise", "scale"};
  return all;
}

HostileIsland::HostileIsland(std::string kind, std::uint64_t seed, bool cheat)
    : kind_(std::move(kind)), scale_(cheat ? 2.0 : 10.0), noise_(seed ^ 0x6e6f697365ull) {}

void HostileIsland::before_outer_step(const diloco::DiLoCo& sync) {
  at::NoGradGuard no_grad;
  const auto& buckets = sync.parameters().buckets();
  const auto& global = sync.global_weights();
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    at::Tensor local = buckets[i].flat;
    const at::Tensor g = global[i].to(local.options());
    const at::Tensor honest = g - local;  // the pseudo-gradient it would send
    if (kind_ == "huge") {
      local.add_(1e30);
    } else if (kind_ == "flip") {
      local.copy_(g + honest);  // global - local = -honest
    } else if (kind_ == "scale") {
      local.copy_(g - scale_ * honest);
    } else if (kind_ == "noise") {
      at::Tensor noise = at::randn(honest.sizes(), at::make_generator<at::CPUGeneratorImpl>(noise_()),
                                   honest.options().dtype(at::kFloat).device(at::kCPU));
      noise.mul_(honest.norm().item<double>() / std::max(noise.norm().item<double>(), 1e-30));
      local.copy_(g - noise.to(local.options()));
    } else if (kind_ == "stale") {
      if (previous_.size() > i) local.copy_(g - previous_[i]);
      if (previous_.size() <= i) previous_.push_back(honest.clone());
      else previous_[i] = honest.clone();
    }
  }
}

}  // namespace train_lm
