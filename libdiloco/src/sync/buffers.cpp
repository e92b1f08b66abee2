// Module buffers across islands (see buffers.h).
#include "diloco/sync/buffers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <map>
#include <set>
#include <sstream>

#include "diloco/comm/group.h"
#include "diloco/errors.h"
#include "diloco/sync/fingerprint.h"

namespace diloco {
namespace {

// The buffers `indices` of `buffers`, grouped by the dtype they cross the link in: one flat
// tensor per group, so a model with fifty BatchNorm layers costs one collective, not fifty.
// Averaging sums in float32 (float64 for double buffers); broadcasts keep each buffer's dtype.
struct Packed {
  at::ScalarType wire;
  std::vector<std::size_t> members;
  at::Tensor flat;
};

std::vector<Packed> pack(const std::vector<NamedParameter>& buffers,
                         const std::vector<std::size_t>& indices, bool for_average) {
  std::map<at::ScalarType, std::size_t> group_of;
  std::vector<Packed> groups;
  for (std::size_t i : indices) {
    const at::Tensor& t = buffers[i].tensor;
    at::ScalarType wire = t.scalar_type();
    if (for_average) wire = wire == at::kDouble ? at::kDouble : at::kFloat;
    if (wire == at::kBool) wire = at::kByte;  // Gloo does not carry bool
    auto [it, inserted] = group_of.emplace(wire, groups.size());
    if (inserted) groups.push_back({wire, {}, at::Tensor()});
    groups[it->second].members.push_back(i);
  }
  for (Packed& g : groups) {
    std::vector<at::Tensor> parts;
    for (std::size_t i : g.members) parts.push_back(buffers[i].tensor.reshape({-1}).to(g.wire));
    g.flat = at::cat(parts).contiguous();
  }
  return groups;
}

void unpack(const Packed& g, const std::vector<NamedParameter>& buffers) {
  std::int64_t offset = 0;
  for (std::size_t i : g.members) {
    at::Tensor t = buffers[i].tensor;
    t.copy_(g.flat.narrow(0, offset, t.numel()).view(t.sizes()));
    offset += t.numel();
  }
}

void broadcast_from_rank0(Group& group, const std::vector<NamedParameter>& buffers,
                          const std::vector<std::size_t>& indices) {
  for (Packed& g : pack(buffers, indices, /*for_average=*/false)) {
    group.broadcast(g.flat, 0, "buffers");
    unpack(g, buffers);
  }
}

}  // namespace

BufferSync parse_buffer_sync(const std::string& name, const std::string& option) {
  if (name == "average") return BufferSync::kAverage;
  if (name == "rank0") return BufferSync::kRank0;
  if (name == "local") return BufferSync::kLocal;
  throw OptionError("[buffers] " + option + " must be one of average, rank0, local; got '" +
                    name + "'");
}

const char* to_string(BufferSync mode) {
  switch (mode) {
    case BufferSync::kAverage: return "average";
    case BufferSync::kRank0: return "rank0";
    case BufferSync::kLocal: return "local";
  }
  return "?";
}

std::vector<NamedParameter> named_buffers(const torch::nn::Module& module) {
  std::vector<NamedParameter> out;
  for (const auto& item : module.named_buffers(/*recurse=*/true)) {
    if (item.value().defined()) out.push_back({item.key(), item.value()});
  }
  return out;
}

ModelBuffers::ModelBuffers(std::vector<NamedParameter> buffers) : buffers_(std::move(buffers)) {
  std::set<std::string> seen;
  for (std::size_t i = 0; i < buffers_.size(); ++i) {
    const auto& b = buffers_[i];
    if (!b.tensor.defined()) throw Error("[buffers] buffer '" + b.name + "' is undefined");
    if (!seen.insert(b.name).second) {
      throw Error("[buffers] buffer name '" + b.name + "' appears twice");
    }
    (at::isFloatingType(b.tensor.scalar_type()) ? floating_ : integral_).push_back(i);
  }
}

void ModelBuffers::describe_into(Fingerprint& fingerprint) const {
  describe_tensors(fingerprint, "buffer", buffers_);
}

void ModelBuffers::copy_from_rank0(Group& group) {
  if (buffers_.empty()) return;
  at::NoGradGuard no_grad;
  std::vector<std::size_t> all(buffers_.size());
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = i;
  broadcast_from_rank0(group, buffers_, all);
}

void ModelBuffers::sync(Group& group, BufferSync mode, const std::string& who, std::int64_t step) {
  if (buffers_.empty() || mode == BufferSync::kLocal || group.world_size() == 1) return;
  at::NoGradGuard no_grad;
  if (mode == BufferSync::kRank0) {
    copy_from_rank0(group);
    return;
  }
  // The sums are bit-identical on every rank (one all-reduce), so every rank finds the same
  // non-finite value, if any, and all refuse together.
  std::vector<Packed> groups = pack(buffers_, floating_, /*for_average=*/true);
  for (Packed& g : groups) group.allreduce_sum(g.flat, "buffers");
  for (Packed& g : groups) {
    const at::Tensor bad = at::logical_not(at::isfinite(g.flat)).nonzero();
    if (bad.numel() == 0) continue;
    std::int64_t index = bad[0][0].item<std::int64_t>();
    std::string name;
    for (std::size_t i : g.members) {
      if (index < buffers_[i].tensor.numel()) { name = buffers_[i].name; break; }
      index -= buffers_[i].tensor.numel();
    }
    std::ostringstream m;
    m << "[" << who << " step " << step << "] rank " << group.rank()
      << ": the sum of buffer '" << name << "' over the islands is NaN or infinite; every "
      << "island keeps its own buffers";
    throw Error(m.str());
  }
  for (Packed& g : groups) {
    g.flat.div_(static_cast<double>(group.world_size()));
    unpack(g, buffers_);
  }
  // Integer and bool buffers (step counters, masks) stay equal when every island takes the same
  // steps, so only a digest of them crosses the link; rank 0's values are sent only when the
  // digests differ (every rank sees the same digests, so all decide alike).
  if (integral_.empty()) return;
  const auto all = group.allgather(integral_digest(), "buffers_digest");
  if (digests_differ(all)) broadcast_from_rank0(group, buffers_, integral_);
}

bool ModelBuffers::digest_only(BufferSync mode) const {
  return mode == BufferSync::kAverage && floating_.empty() && !integral_.empty();
}

std::unique_ptr<ModelBuffers::PendingDigest> ModelBuffers::start_digest(Group& group) {
  auto pending = std::make_unique<PendingDigest>();
  pending->mine = integral_digest();
  pending->collective = group.allgather_async(pending->mine, pending->all, "buffers_digest");
  return pending;
}

void ModelBuffers::finish_digest(Group& group, PendingDigest& pending) {
  pending.collective.wait();
  at::NoGradGuard no_grad;
  if (digests_differ(pending.all)) broadcast_from_rank0(group, buffers_, integral_);
}

at::Tensor ModelBuffers::integral_digest() const {
  std::uint64_t digest = 1469598103934665603ull;  // FNV-1a over the bytes
  for (std::size_t i : integral_) {
    const at::Tensor t = buffers_[i].tensor.to(at::kCPU).contiguous();
    const auto* p = static_cast<const unsigned char*>(t.data_ptr());
    for (std::size_t k = 0; k < t.nbytes(); ++k) digest = (digest ^ p[k]) * 1099511628211ull;
  }
  at::Tensor mine = at::empty({1}, at::kLong);
  mine[0] = static_cast<std::int64_t>(digest);
  return mine;
}

bool ModelBuffers::digests_differ(const std::vector<at::Tensor>& all) {
  return std::any_of(all.begin(), all.end(), [&](const at::Tensor& d) {
    return d.item<std::int64_t>() != all[0].item<std::int64_t>();
  });
}

}  // namespace diloco
