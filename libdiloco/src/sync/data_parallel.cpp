// Data-parallel gradient averaging (see data_parallel.h).
#include "diloco/sync/data_parallel.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/nn/module.h>

#include <sstream>

#include "diloco/comm/group.h"
#include "diloco/errors.h"
#include "diloco/sync/fingerprint.h"
#include "kernels/cpu_kernels.h"
#include "sync/scoped_timer.h"

namespace diloco {

DataParallel::DataParallel(torch::nn::Module& model, std::shared_ptr<Group> group,
                           DataParallelOptions options)
    : DataParallel(ModelTensors::of(model), std::move(group), std::move(options)) {}

DataParallel::DataParallel(ModelTensors model, std::shared_ptr<Group> group,
                           DataParallelOptions options)
    : options_(std::move(options)),
      group_(std::move(group)),
      params_(std::move(model.parameters)),
      buffers_(std::move(model.buffers)) {
  if (!group_) throw OptionError("[DataParallel] group must not be null");
  Fingerprint f = library_fingerprint("DataParallel");
  f.add("buffers", to_string(options_.buffers));
  for (const auto& [field, value] : options_.agree_on) f.add(field, value);
  params_.describe_into(f);
  buffers_.describe_into(f);
  agree_on_fingerprint(*group_, "DataParallel", f);
  params_.copy_from_rank0(*group_);
  buffers_.copy_from_rank0(*group_);
  // One float32 buffer per bucket: gradients are summed in float32 whatever the model's dtype.
  for (const auto& b : params_.buckets()) {
    grad_flat_.push_back(at::empty({b.flat.numel()}, b.flat.options().dtype(at::kFloat)));
  }
}

DataParallel::~DataParallel() = default;

void DataParallel::sync_gradients() {
  const ScopedTimer syncing(sync_seconds_);
  at::NoGradGuard no_grad;
  auto& buckets = params_.buckets();
  const auto& params = params_.parameters();
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    const auto& b = buckets[i];
    at::Tensor& flat = grad_flat_[i];
    for (std::size_t j = 0; j < b.members.size(); ++j) {
      const at::Tensor& grad = params[b.members[j]].tensor.grad();
      at::Tensor slot = flat.narrow(0, b.offsets[j], params[b.members[j]].tensor.numel());
      if (grad.defined()) {
        slot.copy_(grad.reshape({-1}));
      } else {
        slot.zero_();  // a parameter unused this step contributes nothing
      }
    }
    group_->allreduce_sum(flat, "grad_sync");
    // The sum is identical on every rank, so all ranks agree on this check.
    std::int64_t bad = -1;
    if (flat.device().is_cpu()) {
      bad = kernels::first_nonfinite(flat.data_ptr<float>(), flat.numel());
    } else if (!at::isfinite(flat).all().item<bool>()) {
      bad = at::logical_not(at::isfinite(flat)).nonzero()[0][0].item<std::int64_t>();
    }
    if (bad >= 0) {
      std::ostringstream m;
      m << "[DataParallel step " << steps_ + 1 << "] rank " << group_->rank()
        << ": the summed gradient is NaN or infinite in parameter '" << params_.name_at(i, bad)
        << "'; the gradients were left as they were";
      throw Error(m.str());
    }
    flat.mul_(1.0 / group_->world_size());
    for (std::size_t j = 0; j < b.members.size(); ++j) {
      at::Tensor param = params[b.members[j]].tensor;
      at::Tensor mean = flat.narrow(0, b.offsets[j], param.numel()).view(param.sizes());
      if (param.grad().defined()) {
        param.mutable_grad().copy_(mean);
      } else {
        param.mutable_grad() = mean.to(param.options()).clone();
      }
    }
  }
  buffers_.sync(*group_, options_.buffers, "DataParallel", steps_ + 1);
  ++steps_;
}

SyncStats DataParallel::stats() const {
  return make_sync_stats(*group_, steps_, steps_, sync_seconds_);
}

}  // namespace diloco
