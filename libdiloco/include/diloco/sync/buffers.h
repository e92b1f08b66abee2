// Module buffers (BatchNorm's running statistics, counters) across islands.
//
// Buffers are not trained, so no optimizer and no pseudo-gradient touches them, yet the model's
// predictions depend on them: islands whose running statistics differ predict differently even
// with identical parameters. DDP broadcasts rank 0's buffers before every forward; DiLoCo keeps
// them consistent at every outer step (DataParallel at every gradient sync), chosen by BufferSync:
//   average  floating-point buffers become the mean over islands (one float32 all-reduce);
//            integer and bool buffers (num_batches_tracked, masks) take rank 0's values: an
//            8-byte digest per island is compared, and they are sent only when they differ;
//   rank0    every buffer takes rank 0's values (one broadcast per dtype);
//   local    buffers stay as each island computed them (they still start equal).
// All modes start every island from rank 0's buffers at construction. Bytes are counted under
// "allreduce:buffers", "allgather:buffers_digest" and "broadcast:buffers".
// DiLoCo starts the digest comparison after an outer step and settles it at the next exchange
// (digest_only, start_digest, finish_digest), so only averaging floating buffers blocks.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "diloco/comm/group.h"
#include "diloco/sync/parameters.h"

namespace diloco {

class Fingerprint;

enum class BufferSync { kAverage, kRank0, kLocal };

// "average", "rank0" or "local"; anything else throws OptionError naming `option`.
BufferSync parse_buffer_sync(const std::string& name, const std::string& option = "buffers");
const char* to_string(BufferSync mode);

class ModelBuffers {
 public:
  // Throws Error for an undefined tensor or a duplicate name.
  explicit ModelBuffers(std::vector<NamedParameter> buffers);

  const std::vector<NamedParameter>& buffers() const { return buffers_; }
  bool empty() const { return buffers_.empty(); }

  // One fingerprint field per buffer ("buffer 'bn.running_var'" = "[16] Float").
  void describe_into(Fingerprint& fingerprint) const;
  // Collective: every rank's buffers become rank 0's.
  void copy_from_rank0(Group& group);
  // Collective: apply `mode` (see the file comment). `who` and `step` name the operation in
  // errors. A non-finite mean is never written: every rank throws Error naming the buffer and
  // keeps its own values.
  void sync(Group& group, BufferSync mode, const std::string& who, std::int64_t step);

  // When `mode` is average and every buffer is an integer or bool one (a causal mask, step
  // counters), sync() is only the digest comparison: then it can be started now and settled later
  // (finish_digest, at the same point on every rank), so that no island waits for it.
  bool digest_only(BufferSync mode) const;
  struct PendingDigest {
    PendingCollective collective;
    at::Tensor mine;              // this rank's digest
    std::vector<at::Tensor> all;  // every rank's, once the all-gather completed
  };
  std::unique_ptr<PendingDigest> start_digest(Group& group);
  // Collective when the digests differ: every rank's integer buffers become rank 0's.
  void finish_digest(Group& group, PendingDigest& pending);

 private:
  at::Tensor integral_digest() const;
  static bool digests_differ(const std::vector<at::Tensor>& all);

  std::vector<NamedParameter> buffers_;
  std::vector<std::size_t> floating_;  // indices of floating-point buffers
  std::vector<std::size_t> integral_;  // the others
};

}  // namespace diloco
