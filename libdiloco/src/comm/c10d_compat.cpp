// c10d across LibTorch versions (see c10d_compat.h). Version checks stay in this file.
#include "comm/c10d_compat.h"

#include <gloo/common/error.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/version.h>


namespace diloco {
namespace compat {

class GlooGroup {
 public:
  explicit GlooGroup(c10::intrusive_ptr<c10d::ProcessGroupGloo> pg) : pg(std::move(pg)) {}
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

c10::intrusive_ptr<c10d::Store> make_tcp_store(const std::string& host, std::uint16_t port,
                                               bool is_server, std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions opts;
  opts.port = port;
  opts.isServer = is_server;
  opts.waitWorkers = false;
  opts.timeout = timeout;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  opts.useLibUV = false;  // the classic server behaves like 1.13's: one code path to reason about
#endif
  return c10::make_intrusive<c10d::TCPStore>(host, opts);
}

std::shared_ptr<GlooGroup> make_gloo_group(const c10::intrusive_ptr<c10d::Store>& store,
                                              int rank, int world_size,
                                              std::chrono::milliseconds timeout,
                                              const std::string& hostname) {
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(hostname));
  return std::make_shared<GlooGroup>(
      c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, opts));
}

c10::intrusive_ptr<c10d::Work> allreduce_sum(GlooGroup& group, at::Tensor& tensor) {
  std::vector<at::Tensor> tensors{tensor};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  return group.pg->allreduce(tensors, opts);
}

c10::intrusive_ptr<c10d::Work> broadcast(GlooGroup& group, at::Tensor& tensor, int root) {
  std::vector<at::Tensor> tensors{tensor};
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  return group.pg->broadcast(tensors, opts);
}

c10::intrusive_ptr<c10d::Work> allgather(GlooGroup& group, std::vector<at::Tensor>& outputs,
                                         at::Tensor& input) {
  std::vector<std::vector<at::Tensor>> out{outputs};
  std::vector<at::Tensor> in{input};
  auto work = group.pg->allgather(out, in);
  // c10d fills the tensors held by `out`, which share storage with `outputs`.
  return work;
}

c10::intrusive_ptr<c10d::Work> barrier(GlooGroup& group) { return group.pg->barrier(); }

c10::intrusive_ptr<c10d::Work> send(GlooGroup& group, at::Tensor& tensor, int dst, int tag) {
  std::vector<at::Tensor> tensors{tensor};
  return group.pg->send(tensors, dst, tag);
}

c10::intrusive_ptr<c10d::Work> recv(GlooGroup& group, at::Tensor& tensor, int src, int tag) {
  std::vector<at::Tensor> tensors{tensor};
  return group.pg->recv(tensors, src, tag);
}

void wait(const c10::intrusive_ptr<c10d::Work>& work) {
  try {
    work->wait();
  } catch (const ::gloo::IoException& e) {
    throw LinkFailure(e.what());
  }
}

}  // namespace compat
}  // namespace diloco
