// The one place that knows which c10d it is compiled against.
//
// LibTorch 1.13 (Debian) and 2.x (PyTorch wheels) differ in where ProcessGroupGloo sits in the
// class tree (ProcessGroup vs Backend) and in a few constructor options. Everything else in the
// library talks to c10d through these functions and the Work it returns.
#pragma once

#include <ATen/Tensor.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace c10d {
class Store;
}  // namespace c10d

namespace diloco {
namespace compat {

class GlooGroup;  // opaque holder of a c10d ProcessGroupGloo (a Backend in 2.x)

// A TCPStore at host:port, served by this process when `is_server`. It does not wait for the
// other workers (group.cpp's rendezvous does, under one deadline); `timeout` bounds the connect
// and each later store call.
c10::intrusive_ptr<c10d::Store> make_tcp_store(const std::string& host, std::uint16_t port,
                                               bool is_server, std::chrono::milliseconds timeout);

// The failure of a connection to a peer (Gloo's IoException: closed, reset, timed out), told
// apart by type at the Gloo boundary; any other failure keeps its own type.
class LinkFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};


// Connects a Gloo group over `store`; `hostname` is the address this rank's Gloo device binds.
std::shared_ptr<GlooGroup> make_gloo_group(const c10::intrusive_ptr<c10d::Store>& store,
                                              int rank, int world_size,
                                              std::chrono::milliseconds timeout,
                                              const std::string& hostname);

c10::intrusive_ptr<c10d::Work> allreduce_sum(GlooGroup& group, at::Tensor& tensor);
c10::intrusive_ptr<c10d::Work> broadcast(GlooGroup& group, at::Tensor& tensor, int root);
c10::intrusive_ptr<c10d::Work> allgather(GlooGroup& group, std::vector<at::Tensor>& outputs,
                                         at::Tensor& input);
c10::intrusive_ptr<c10d::Work> barrier(GlooGroup& group);
c10::intrusive_ptr<c10d::Work> send(GlooGroup& group, at::Tensor& tensor, int dst, int tag);
c10::intrusive_ptr<c10d::Work> recv(GlooGroup& group, at::Tensor& tensor, int src, int tag);
// Blocks until done; rethrows the collective's error (a LinkFailure for a broken connection).
void wait(const c10::intrusive_ptr<c10d::Work>& work);

}  // namespace compat
}  // namespace diloco
