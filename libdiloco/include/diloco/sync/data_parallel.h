// Data-parallel training over the wide-area group: the baseline DiLoCo is measured against.
//
// Gradients are averaged across all ranks after every backward pass (one all-reduce of one flat
// buffer per step), so every rank applies the same update. It lives in this library so that
// benchmarks compare like with like: same group, same byte accounting, same model check.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "diloco/sync/buffers.h"
#include "diloco/sync/parameters.h"
#include "diloco/sync/sync_stats.h"

namespace diloco {

class Group;

struct DataParallelOptions {
  // Module buffers at every gradient sync (diloco/sync/buffers.h).
  BufferSync buffers = BufferSync::kAverage;
  // Extra fields every island must agree on (see DiLoCoOptions::agree_on).
  std::vector<std::pair<std::string, std::string>> agree_on;
};

// Data-parallel training over the same group, for comparing like with like: gradients are
// averaged across all ranks after every backward pass. Construction checks that all ranks hold
// the same model and configuration (sync/fingerprint.h) and copies rank 0's weights and buffers
// to all.
class DataParallel {
 public:
  explicit DataParallel(torch::nn::Module& model, std::shared_ptr<Group> group,
                        DataParallelOptions options = {});
  DataParallel(ModelTensors model, std::shared_ptr<Group> group, DataParallelOptions options = {});
  ~DataParallel();

  // Call after backward() and before the optimizer step: every gradient becomes the mean over
  // ranks, and the buffers are synchronized as options.buffers says. Throws Error (on every
  // rank) if any rank's gradient holds a NaN or an infinity.
  void sync_gradients();

  SyncStats stats() const;
  Group& group() { return *group_; }

 private:
  DataParallelOptions options_;
  std::shared_ptr<Group> group_;
  FlatParameters params_;
  ModelBuffers buffers_;
  std::vector<at::Tensor> grad_flat_;  // per bucket
  std::int64_t steps_ = 0;
  double sync_seconds_ = 0.0;
};

}  // namespace diloco
