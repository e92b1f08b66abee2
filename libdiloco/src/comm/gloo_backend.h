// The Gloo backend: c10d's ProcessGroupGloo (through c10d_compat) behind the Backend seam.
//
// Besides the collectives it owns what only Gloo needs: once the mesh is connected every rank
// publishes the local ports of its TCP sockets in the store, so that a connection Gloo reports
// lost ("[10.0.0.2]:40123") is named by rank and host in the PeerLostError. It is not the
// rendezvous (rendezvous.cpp forms the store) and it counts no bytes (Group does).
#pragma once

#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "diloco/comm/backend.h"

namespace diloco {
namespace compat {
class GlooGroup;
}  // namespace compat

class GlooBackend : public Backend {
 public:
  // See make_gloo_backend() in backend.h.
  GlooBackend(c10::intrusive_ptr<c10d::Store> store, int rank, int world_size,
              std::chrono::milliseconds timeout, const std::string& hostname);
  ~GlooBackend() override;
  GlooBackend(const GlooBackend&) = delete;
  GlooBackend& operator=(const GlooBackend&) = delete;

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::string name() const override { return "gloo"; }

  c10::intrusive_ptr<c10d::Work> allreduce_sum(at::Tensor& tensor) override;
  c10::intrusive_ptr<c10d::Work> broadcast(at::Tensor& tensor, int root) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<at::Tensor>& outputs,
                                           at::Tensor& input) override;
  c10::intrusive_ptr<c10d::Work> barrier() override;
  c10::intrusive_ptr<c10d::Work> send(at::Tensor& tensor, int dst, int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(at::Tensor& tensor, int src, int tag) override;
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& operation) override;

 private:
  void exchange_socket_ports();
  // "rank R at HOST" for the peer a failed collective lost (`what`: Gloo's error); "" if unknown.
  std::string name_lost_peer(const std::string& what, int* rank = nullptr) const;

  c10::intrusive_ptr<c10d::Store> store_;
  std::shared_ptr<compat::GlooGroup> gloo_;
  int rank_;
  int world_size_;
  std::chrono::milliseconds timeout_;
  std::vector<std::set<int>> peer_ports_;  // per rank, the local ports of its TCP sockets
};

}  // namespace diloco
