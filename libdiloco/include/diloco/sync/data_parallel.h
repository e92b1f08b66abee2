// Data-parallel training over the wide-area group: the baseline DiLoCo is measured against.
//
// Gradients are averaged across all ranks after every backward pass (one all-reduce of one flat
// buffer per step), so every rank applies the same update. It lives in this library so that
// benchmarks compare like with like: same group, same byte accounting, same model check.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "diloco/sync/parameters.h"
#include "diloco/sync/sync_stats.h"

namespace diloco {

class Group;

// Data-parallel training over the same group, for comparing like with like: gradients are
// averaged across all ranks after every backward pass. Construction checks that all ranks hold
// the same model and copies rank 0's weights to all.
class DataParallel {
 public:
  explicit DataParallel(torch::nn::Module& model, std::shared_ptr<Group> group);
  DataParallel(std::vector<NamedParameter> parameters, std::shared_ptr<Group> group);
  ~DataParallel();

  // Call after backward() and before the optimizer step: every gradient becomes the mean over
  // ranks. Throws Error (on every rank) if any rank's gradient holds a NaN or an infinity.
  void sync_gradients();

  SyncStats stats() const;
  Group& group() { return *group_; }

 private:
  std::shared_ptr<Group> group_;
  FlatParameters params_;
  std::vector<at::Tensor> grad_flat_;  // per bucket
  std::int64_t steps_ = 0;
  double sync_seconds_ = 0.0;
};

}  // namespace diloco
