// The requantizing ring all-reduce (see ring_requantized.h).
#include "comm/ring_requantized.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "diloco/comm/group.h"

namespace diloco {
namespace {

std::uint8_t* bytes_of(at::Tensor& t) { return static_cast<std::uint8_t*>(t.data_ptr()); }

}  // namespace

void ring_allreduce_requantized(Group& group, at::Tensor& flat, RingHop& hop,
                                const std::string& label, std::int64_t align) {
  const int n = group.world_size(), r = group.rank();
  const std::int64_t numel = flat.numel();
  std::int64_t chunk = (numel + n - 1) / n;
  chunk = (chunk + align - 1) / align * align;
  auto range = [&](int c) {
    const std::int64_t begin = std::min(numel, static_cast<std::int64_t>(c) * chunk);
    return std::make_pair(begin, std::min(numel, begin + chunk) - begin);
  };
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  auto mod = [n](int x) { return ((x % n) + n) % n; };
  at::Tensor scratch = at::empty({chunk}, at::kFloat);

  // Reduce-scatter: each hop decodes, accumulates in float32 and re-encodes.
  for (int s = 0; s < n - 1; ++s) {
    const auto [send_begin, send_len] = range(mod(r - s));
    const auto [recv_begin, recv_len] = range(mod(r - s - 1));
    at::Tensor out = at::empty({hop.payload_bytes(send_len)}, at::kByte);
    at::Tensor in = at::empty({hop.payload_bytes(recv_len)}, at::kByte);
    PendingCollective sent, got;
    if (send_len > 0) {
      hop.encode(flat.narrow(0, send_begin, send_len), bytes_of(out));
      sent = group.send_async(out, next, s, label);
    }
    if (recv_len > 0) got = group.recv_async(in, prev, s, label);
    sent.wait();
    got.wait();
    if (recv_len > 0) {
      at::Tensor part = scratch.narrow(0, 0, recv_len);
      hop.decode(bytes_of(in), in.numel(), part, prev, "");
      flat.narrow(0, recv_begin, recv_len).add_(part);
    }
  }
  // The owner of each chunk quantizes its own sum too, so that every rank decodes the same bytes.
  const int own = mod(r + 1);
  std::vector<at::Tensor> payloads(n);
  {
    const auto [begin, len] = range(own);
    payloads[own] = at::empty({hop.payload_bytes(len)}, at::kByte);
    if (len > 0) {
      at::Tensor part = flat.narrow(0, begin, len);
      hop.encode(part, bytes_of(payloads[own]));
      hop.decode(bytes_of(payloads[own]), payloads[own].numel(), part, r, " (its own sum)");
    }
  }
  // All-gather: forward the owners' bytes unchanged around the ring.
  for (int s = 0; s < n - 1; ++s) {
    const int send_c = mod(r + 1 - s), recv_c = mod(r - s);
    const auto [recv_begin, recv_len] = range(recv_c);
    payloads[recv_c] = at::empty({hop.payload_bytes(recv_len)}, at::kByte);
    PendingCollective sent, got;
    if (range(send_c).second > 0) sent = group.send_async(payloads[send_c], next, n + s, label);
    if (recv_len > 0) got = group.recv_async(payloads[recv_c], prev, n + s, label);
    sent.wait();
    got.wait();
    if (recv_len > 0) {
      at::Tensor part = flat.narrow(0, recv_begin, recv_len);
      // Rank c - 1 encoded chunk c; the ranks between it and here forwarded its bytes unchanged.
      const int owner = mod(recv_c - 1);
      hop.decode(bytes_of(payloads[recv_c]), payloads[recv_c].numel(), part, prev,
                 owner == prev ? "" : " (encoded by rank " + std::to_string(owner) + ")");
    }
  }
}

}  // namespace diloco
