// c10d across LibTorch versions (see c10d_compat.h). Version checks stay in this file.
#include "comm/c10d_compat.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <gloo/common/error.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/version.h>

#include <cstring>

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

std::vector<std::string> gloo_peer_addresses(c10d::Store& store, int rank, int world_size) {
  // Gloo's full-mesh connect (rendezvous/context.cc) stores under "<device>/<rank>" the listening
  // addresses of that rank's pairs, one per other rank in rank order, each a sockaddr_storage
  // followed by a sequence number. Entry `rank < r ? rank : rank - 1` of rank r's list is the
  // address its pair with us listens on, which is what its errors name.
  std::vector<std::string> out(static_cast<std::size_t>(world_size));
  if (world_size < 2) return out;
  for (int r = 0; r < world_size; ++r) {
    if (r == rank) continue;
    try {
      const std::string key = "0/" + std::to_string(r);
      if (!store.check({key})) continue;
      const std::vector<std::uint8_t> bytes = store.get(key);
      const std::size_t entry = bytes.size() / static_cast<std::size_t>(world_size - 1);
      if (entry < sizeof(sockaddr_storage) || entry * (world_size - 1) != bytes.size()) continue;
      const std::size_t index = static_cast<std::size_t>(rank < r ? rank : rank - 1);
      sockaddr_storage ss{};
      std::memcpy(&ss, bytes.data() + index * entry, sizeof ss);
      char host[INET6_ADDRSTRLEN] = {0};
      int port = 0;
      if (ss.ss_family == AF_INET) {
        const auto* in = reinterpret_cast<const sockaddr_in*>(&ss);
        if (inet_ntop(AF_INET, &in->sin_addr, host, sizeof host) == nullptr) continue;
        port = ntohs(in->sin_port);
      } else if (ss.ss_family == AF_INET6) {
        const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&ss);
        if (inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host) == nullptr) continue;
        port = ntohs(in6->sin6_port);
      } else {
        continue;
      }
      out[static_cast<std::size_t>(r)] = "[" + std::string(host) + "]:" + std::to_string(port);
    } catch (const std::exception&) {
      // Best effort: an unknown layout only means errors cannot name the peer.
    }
  }
  return out;
}

}  // namespace compat
}  // namespace diloco
