// The seam under Group: the raw collectives of one process group, and nothing else.
//
// A Backend moves bytes between the ranks of one group: asynchronous all-reduce (sum), broadcast,
// all-gather, barrier and point-to-point send/recv, each returning a c10d::Work that the caller
// hands back to wait(). It does no byte accounting and no link emulation: Group layers both over
// whatever Backend it holds (see group.h), so a Group keeps its statistics and its emulated link
// when its backend is replaced (a new membership epoch, a new world size).
//
// wait() is where a backend turns its own failures into the library's two tiers: PeerLostError
// when a peer is gone (naming it when the backend can tell which), Error for everything else.
// Callers never see a transport's exception types.
//
// Implementations: GlooBackend (src/comm/gloo_backend.{h,cpp}), c10d's ProcessGroupGloo through
// c10d_compat, made by make_gloo_backend() below. An NCCL backend (the local group of a
// multi-process island on GPUs) would be a second pair, src/comm/nccl_backend.{h,cpp}, over
// c10d::ProcessGroupNCCL, again reached only through c10d_compat (the one file that knows the
// LibTorch version), with a make_nccl_backend() declared here and compiled only in CUDA builds
// (a no_nccl_backend.cpp stub otherwise, not #ifdefs). Its wait() would map NCCL's errors (a
// communicator aborted by a lost peer) the way GlooBackend maps Gloo's IoException.
//
// c10d's rule holds: every rank issues the same collectives in the same order, with tensors of
// the same sizes; one thread issues them.
#pragma once

#include <ATen/Tensor.h>
#include <c10/util/intrusive_ptr.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace c10d {
class Store;
class Work;
}  // namespace c10d

namespace diloco {

class Backend {
 public:
  virtual ~Backend() = default;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // "gloo", "nccl": for messages and statistics tables.
  virtual std::string name() const = 0;

  // Each starts the operation and returns at once; tensors must stay untouched until wait()
  // returns. They may throw if the operation cannot be started at all.
  // Sums `tensor` (contiguous) in place over all ranks.
  virtual c10::intrusive_ptr<c10d::Work> allreduce_sum(at::Tensor& tensor) = 0;
  // Overwrites `tensor` on every rank with root's.
  virtual c10::intrusive_ptr<c10d::Work> broadcast(at::Tensor& tensor, int root) = 0;
  // Fills outputs[r] (world_size tensors shaped like `input`) with rank r's input.
  virtual c10::intrusive_ptr<c10d::Work> allgather(std::vector<at::Tensor>& outputs,
                                                   at::Tensor& input) = 0;
  virtual c10::intrusive_ptr<c10d::Work> barrier() = 0;
  // A send and the matching recv on the peer use the same tag.
  virtual c10::intrusive_ptr<c10d::Work> send(at::Tensor& tensor, int dst, int tag) = 0;
  virtual c10::intrusive_ptr<c10d::Work> recv(at::Tensor& tensor, int src, int tag) = 0;

  // Blocks until `work` (returned by this backend) completes. Throws PeerLostError when a peer
  // was lost, Error otherwise, each message starting "[<operation>] rank R of N: ", where
  // `operation` names it for the reader ("allreduce 'outer_sync'").
  virtual void wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& operation) = 0;
};

// Connects a Gloo process group of `world_size` ranks over `store` (a TCPStore from the
// rendezvous, a HashStore for ranks that are threads of one process, or a PrefixStore such as
// "epoch/N" for a new group over a store that outlives it); `hostname` is the address this rank's
// Gloo device binds. Blocks until every rank has connected. Throws OptionError for a bad rank,
// world size or timeout, PeerLostError when the peers do not all connect within `timeout`.
// The first call sets SIGPIPE to ignored if the process left it at its default (Gloo's writes to
// a dead peer would otherwise kill the process rather than fail the collective).
std::unique_ptr<Backend> make_gloo_backend(c10::intrusive_ptr<c10d::Store> store, int rank,
                                           int world_size, std::chrono::milliseconds timeout,
                                           const std::string& hostname = "127.0.0.1");

}  // namespace diloco
