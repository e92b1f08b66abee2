// Flat parameter buckets and the cross-island model check (see parameters.h).
#include "diloco/sync/parameters.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <map>
#include <set>
#include <utility>
#include <sstream>

#include "diloco/comm/group.h"
#include "diloco/errors.h"
#include "diloco/sync/buffers.h"
#include "diloco/sync/fingerprint.h"

namespace diloco {
std::vector<NamedParameter> named_parameters(const torch::nn::Module& module) {
  std::vector<NamedParameter> out;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    if (item.value().requires_grad()) out.push_back({item.key(), item.value()});
  }
  return out;
}

FlatParameters::FlatParameters(std::vector<NamedParameter> parameters,
                               const std::vector<std::int64_t>& fragment_of)
    : parameters_(std::move(parameters)) {
  if (parameters_.empty()) throw Error("[FlatParameters] no parameters to synchronize");
  if (!fragment_of.empty() && fragment_of.size() != parameters_.size()) {
    throw Error("[FlatParameters] fragment_of has " + std::to_string(fragment_of.size()) +
                " entries for " + std::to_string(parameters_.size()) + " parameters");
  }
  std::set<std::string> seen;
  const at::Device device = parameters_.front().tensor.device();
  std::map<std::pair<std::int64_t, at::ScalarType>, std::size_t> bucket_of;
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    const auto& p = parameters_[i];
    if (!p.tensor.defined()) throw Error("[FlatParameters] parameter '" + p.name + "' is undefined");
    if (!seen.insert(p.name).second) {
      throw Error("[FlatParameters] parameter name '" + p.name + "' appears twice");
    }
    if (!at::isFloatingType(p.tensor.scalar_type())) {
      throw Error("[FlatParameters] parameter '" + p.name + "' has dtype " +
                  std::string(c10::toString(p.tensor.scalar_type())) +
                  "; only floating-point parameters can be trained and synchronized");
    }
    if (p.tensor.device() != device) {
      throw Error("[FlatParameters] parameter '" + p.name + "' is on " + p.tensor.device().str() +
                  " but '" + parameters_.front().name + "' is on " + device.str() +
                  "; move the whole model to one device first");
    }
    const std::int64_t fragment = fragment_of.empty() ? 0 : fragment_of[i];
    auto [it, inserted] =
        bucket_of.emplace(std::make_pair(fragment, p.tensor.scalar_type()), buckets_.size());
    if (inserted) {
      buckets_.emplace_back();
      buckets_.back().fragment = fragment;
    }
    Bucket& b = buckets_[it->second];
    const std::int64_t offset =
        b.offsets.empty() ? 0 : b.offsets.back() + parameters_[b.members.back()].tensor.numel();
    b.members.push_back(i);
    b.offsets.push_back(offset);
  }
  for (Bucket& b : buckets_) {
    const auto& last = parameters_[b.members.back()].tensor;
    const std::int64_t total = b.offsets.back() + last.numel();
    b.flat = at::empty({total}, last.options().requires_grad(false));
    for (std::size_t j = 0; j < b.members.size(); ++j) {
      at::Tensor& param = parameters_[b.members[j]].tensor;
      at::Tensor view = b.flat.narrow(0, b.offsets[j], param.numel()).view(param.sizes());
      view.copy_(param.detach());
      param.set_data(view);  // same parameter object, storage now inside the bucket
    }
  }
}

std::int64_t FlatParameters::numel() const {
  std::int64_t n = 0;
  for (const auto& b : buckets_) n += b.flat.numel();
  return n;
}

const std::string& FlatParameters::name_at(std::size_t bucket, std::int64_t index) const {
  const Bucket& b = buckets_.at(bucket);
  std::size_t j = 0;
  while (j + 1 < b.offsets.size() && b.offsets[j + 1] <= index) ++j;
  return parameters_[b.members[j]].name;
}

namespace {

std::string shape_and_dtype(const at::Tensor& t) {
  std::ostringstream out;
  out << "[";
  for (std::size_t d = 0; d < t.sizes().size(); ++d) out << (d ? ", " : "") << t.sizes()[d];
  out << "] " << c10::toString(t.scalar_type());
  return out.str();
}

// FNV-1a over the names in order: the same parameters in another order lay the flat buffers
// out differently, so the order is compared too (as a short digest, not a list of names).
std::string order_digest(const std::vector<NamedParameter>& tensors) {
  std::uint64_t h = 1469598103934665603ull;
  for (const auto& t : tensors) {
    for (char c : t.name + '\n') {
      h ^= static_cast<unsigned char>(c);
      h *= 1099511628211ull;
    }
  }
  std::ostringstream out;
  out << std::hex << h;
  return out.str();
}

}  // namespace

void describe_tensors(Fingerprint& fingerprint, const std::string& kind,
                      const std::vector<NamedParameter>& tensors) {
  for (const auto& t : tensors) fingerprint.add(kind + " '" + t.name + "'", shape_and_dtype(t.tensor));
  fingerprint.add(kind + " count", std::to_string(tensors.size()));
  fingerprint.add(kind + " order", order_digest(tensors));
}

void FlatParameters::describe_into(Fingerprint& fingerprint) const {
  describe_tensors(fingerprint, "parameter", parameters_);
}

void FlatParameters::copy_from_rank0(Group& group) {
  for (Bucket& b : buckets_) group.broadcast(b.flat, 0, "initial_weights");
}

ModelTensors ModelTensors::of(const torch::nn::Module& module) {
  ModelTensors m;
  m.parameters = named_parameters(module);
  m.buffers = named_buffers(module);
  return m;
}

}  // namespace diloco
