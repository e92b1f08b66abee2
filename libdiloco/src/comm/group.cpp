// The wide-area group (see group.h): accounting and link emulation layered over a Backend.
// GroupOptions and the rendezvous of Group::create are in rendezvous.cpp.
#include "diloco/comm/group.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "comm/accounting.h"
#include "comm/link_emulator.h"
#include "diloco/errors.h"

namespace diloco {
namespace {

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

std::unique_ptr<Backend> connect_gloo(c10::intrusive_ptr<c10d::Store> store, int rank,
                                      int world_size, std::chrono::milliseconds timeout,
                                      const std::string& hostname) {
  GroupOptions check;  // the same messages as create()'s options
  check.rank = rank;
  check.world_size = world_size;
  check.timeout = timeout;
  check.validate();
  return make_gloo_backend(std::move(store), rank, world_size, timeout, hostname);
}

std::shared_ptr<Backend> checked(std::unique_ptr<Backend> backend, const char* where) {
  if (!backend) throw OptionError(std::string("[Group] ") + where + ": the backend is null");
  return std::shared_ptr<Backend>(std::move(backend));
}

}  // namespace

void Interrupt::raise(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (raised_.load(std::memory_order_relaxed)) return;
  reason_ = reason;
  raised_.store(true, std::memory_order_release);
}

void Interrupt::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  reason_.clear();
  raised_.store(false, std::memory_order_release);
}

std::string Interrupt::reason() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return reason_;
}

struct Group::Impl {
  // Shared with the collectives in flight, so that one started before replace_backend() still
  // completes on the backend that started it.
  std::shared_ptr<Backend> backend;
  std::shared_ptr<Interrupt> interrupt;
  LinkEmulator link;
  Accounting accounting;
};

Group::Group(c10::intrusive_ptr<c10d::Store> store, int rank, int world_size,
             std::chrono::milliseconds timeout, const std::string& hostname)
    : Group(connect_gloo(std::move(store), rank, world_size, timeout, hostname), timeout) {}

Group::Group(std::unique_ptr<Backend> backend, std::chrono::milliseconds timeout)
    : impl_(std::make_unique<Impl>()), rank_(0), world_size_(1), timeout_(timeout) {
  if (timeout.count() <= 0) {
    throw OptionError("[Group] timeout must be > 0 ms, got " + std::to_string(timeout.count()));
  }
  impl_->backend = checked(std::move(backend), "Group");
  rank_ = impl_->backend->rank();
  world_size_ = impl_->backend->world_size();
}

Group::~Group() = default;

const Backend& Group::backend() const { return *impl_->backend; }

std::shared_ptr<Backend> Group::replace_backend(std::unique_ptr<Backend> backend) {
  auto next = checked(std::move(backend), "replace_backend");  // throws before anything changes
  auto previous = std::move(impl_->backend);
  impl_->backend = std::move(next);
  rank_ = impl_->backend->rank();
  world_size_ = impl_->backend->world_size();
  return previous;
}

void Group::set_interrupt(std::shared_ptr<Interrupt> interrupt) {
  impl_->interrupt = std::move(interrupt);
}

void Group::set_link(const LinkModel& link) { impl_->link.set(link); }

const LinkModel& Group::link() const { return impl_->link.model(); }

struct PendingCollective::State {
  Group* group = nullptr;
  std::shared_ptr<Backend> backend;  // the one that started it
  std::shared_ptr<Interrupt> interrupt;
  Collective kind = Collective::kBarrier;
  std::string label;
  std::uint64_t payload_bytes = 0;
  int rank = 0;
  int world_size = 1;
  int root = 0;
  std::chrono::steady_clock::time_point start;
  LinkEmulator::Slot link;              // the collective completes no earlier than link.done
  c10::intrusive_ptr<c10d::Work> work;  // null when there was nothing to send (one rank)
  // Link emulation only: when each rank issued the collective (steady-clock nanoseconds) and how
  // long its own link queue held it after that, exchanged beside the collective on the backend,
  // not counted: a send carries this rank's to the receiver, a recv gets the sender's, a
  // collective all-gathers every rank's. Null without an emulated link.
  c10::intrusive_ptr<c10d::Work> stamp_work;
  std::vector<at::Tensor> stamps;
  bool arrived = false;         // the backend's part completed and the link settled (arrive())
  std::exception_ptr failed;    // what arrive() threw, for wait() to rethrow
  bool done = false;
};

namespace {

using SteadyClock = std::chrono::steady_clock;

std::int64_t to_stamp(SteadyClock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

SteadyClock::time_point from_stamp(std::int64_t ns) {
  return SteadyClock::time_point(
      std::chrono::duration_cast<SteadyClock::duration>(std::chrono::nanoseconds(ns)));
}

// The tags of the link emulation's issue times beside a send/recv of tag t: t + kStampTag.
// Callers' tags stay below it; the authenticated backend's own lie above 2^30.
constexpr int kStampTag = 1 << 29;

// Who waits for a collective, for await_work().
struct Waiter {
  std::shared_ptr<Backend> backend;
  std::shared_ptr<Interrupt> interrupt;  // null: block in the backend
  bool point_to_point = false;
  int rank = 0;
  int world_size = 1;
};

// Blocks until `work` completes; throws the backend's PeerLostError / Error, or PeerLostError
// when the interrupt is raised first.
void await_work(const Waiter& s, const c10::intrusive_ptr<c10d::Work>& work,
                const std::string& what) {
  const auto given_up = [&] {
    return PeerLostError("[" + what + "] rank " + std::to_string(s.rank) + " of " +
                         std::to_string(s.world_size) + ": given up: " + s.interrupt->reason());
  };
  if (s.interrupt && s.point_to_point) {
    // Gloo completes a send or a recv only inside its wait(): that wait (bounded by the
    // timeout) runs on a thread of its own, which is left to finish by itself if the interrupt
    // is raised first; it owns what it uses.
    struct Outcome {
      std::mutex mutex;
      bool finished = false;
      std::exception_ptr error;
    };
    auto waiter = std::make_shared<Outcome>();
    std::thread([waiter, backend = s.backend, work, what] {
      std::exception_ptr error;
      try {
        backend->wait(work, what);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(waiter->mutex);
      waiter->error = error;
      waiter->finished = true;
    }).detach();
    auto pause = std::chrono::microseconds(20);
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(waiter->mutex);
        if (waiter->finished) {
          if (waiter->error) std::rethrow_exception(waiter->error);
          return;
        }
      }
      if (s.interrupt->raised()) throw given_up();
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(1000));
    }
  }
  if (s.interrupt) {
    // Poll, so that a raised interrupt ends the wait (the backend's own wait cannot be).
    auto pause = std::chrono::microseconds(20);
    while (!work->isCompleted()) {
      if (s.interrupt->raised()) throw given_up();
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(1000));
    }
  }
  s.backend->wait(work, what);
}

}  // namespace

// The backend's part of a collective: the operation itself (its wait() throws PeerLostError /
// Error) and, with an emulated link, the ranks' issue times, from which the link is settled.
// Blocks unless both completed; runs once (a failure is kept and thrown again).
void PendingCollective::arrive(State& s) {
  if (s.arrived) {
    if (s.failed) std::rethrow_exception(s.failed);
    return;
  }
  s.arrived = true;
  try {
    settle_on_backend(s);
  } catch (...) {
    s.failed = std::current_exception();
    throw;
  }
}

bool PendingCollective::ready() {
  if (!state_ || state_->done) return true;
  State& s = *state_;
  if (!s.arrived) {
    // Gloo completes a send or a recv only inside its wait(): they may always block.
    if (s.kind == Collective::kSend || s.kind == Collective::kRecv) return false;
    if (s.work && !s.work->isCompleted()) return false;
    if (s.stamp_work && !s.stamp_work->isCompleted()) return false;
    try {
      arrive(s);
    } catch (...) {
      return true;  // wait() throws it
    }
  }
  return s.link.seconds <= 0.0 || LinkEmulator::Clock::now() >= s.link.done;
}

void PendingCollective::settle_on_backend(State& s) {
  const std::string what = std::string(collective_name(s.kind)) + " '" + s.label + "'";
  const Waiter waiter{s.backend, s.interrupt,
                      s.kind == Collective::kSend || s.kind == Collective::kRecv, s.rank,
                      s.world_size};
  if (s.work) await_work(waiter, s.work, what);
  if (s.stamp_work) {
    // A real link starts carrying the collective only once the last rank it waits for has put it
    // on its own link: that rank's issue time plus what its queue held it. Every rank has issued
    // it by now (the backend's operation completed), so on the one machine's clock that link
    // emulation assumes no peer's issue time is later than now; one that is cannot be on this
    // clock, and the collective keeps this rank's own reckoning.
    await_work(waiter, s.stamp_work, what + " (the link emulation's issue times)");
    const auto now = SteadyClock::now();
    std::vector<int> peers;  // whose link start this rank's completion depends on
    if (s.kind == Collective::kBroadcast) {
      peers = {s.root};
    } else if (s.kind == Collective::kRecv) {
      peers = {0};  // the sender's, the only one received
    } else if (s.kind != Collective::kSend) {
      for (int r = 0; r < static_cast<int>(s.stamps.size()); ++r) peers.push_back(r);
    }
    bool same_clock = true;
    auto link_start = s.link.on_link;
    for (int r : peers) {
      const auto* v = s.stamps[static_cast<std::size_t>(r)].data_ptr<std::int64_t>();
      const auto issued = from_stamp(v[0]);
      if (issued > now) same_clock = false;
      link_start = std::max(link_start, issued + std::chrono::duration_cast<SteadyClock::duration>(
                                                     std::chrono::nanoseconds(v[1])));
    }
    if (same_clock) s.group->impl_->link.settle(s.link, link_start);
  }
}

void PendingCollective::wait() {
  if (!state_ || state_->done) return;
  State& s = *state_;
  s.done = true;
  arrive(s);
  // Link emulation: no earlier than the emulated link would have carried it.
  if (s.link.seconds > 0.0) std::this_thread::sleep_until(s.link.done);
  // Accounting, by the rank and world size the collective ran with.
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - s.start).count();
  s.group->impl_->accounting.record(s.kind, s.label, s.payload_bytes, s.world_size, s.rank,
                                    s.root, seconds, s.link.seconds);
}

template <typename Fn>
PendingCollective Group::issue(Collective c, const std::string& label,
                               std::uint64_t payload_bytes, int root, Peer peer, Fn&& start) {
  PendingCollective p;
  p.state_ = std::make_shared<PendingCollective::State>();
  auto& s = *p.state_;
  s.group = this;
  s.backend = impl_->backend;
  s.interrupt = impl_->interrupt;
  s.kind = c;
  s.label = label;
  s.payload_bytes = payload_bytes;
  s.rank = rank_;
  s.world_size = world_size_;
  s.root = root;
  s.start = std::chrono::steady_clock::now();
  if (s.interrupt && s.interrupt->raised()) {
    s.done = true;
    throw PeerLostError("[" + std::string(collective_name(c)) + " '" + label + "'] rank " +
                        std::to_string(rank_) + " of " + std::to_string(world_size_) +
                        ": not started: " + s.interrupt->reason());
  }
  s.link = impl_->link.reserve(c, payload_bytes, world_size_, root, s.start);
  if (world_size_ > 1) {
    try {
      s.work = start(*s.backend);
      // Link emulation: this rank's issue time and queueing to the ranks whose wait depends on
      // it, right behind the collective, so both keep the same order on every rank. Every rank
      // of the group emulates a link (checked when it forms), whatever its rate, so every rank
      // issues this, even for a collective its own link charges nothing.
      if (impl_->link.model().enabled()) {
        const at::Tensor mine = at::tensor(
            {to_stamp(s.start),
             std::chrono::duration_cast<std::chrono::nanoseconds>(s.link.on_link - s.start)
                 .count()},
            at::kLong);
        if (c == Collective::kSend) {
          s.stamps = {mine};
          s.stamp_work = s.backend->send(s.stamps[0], peer.rank, peer.tag + kStampTag);
        } else if (c == Collective::kRecv) {
          s.stamps = {at::empty_like(mine)};
          s.stamp_work = s.backend->recv(s.stamps[0], peer.rank, peer.tag + kStampTag);
        } else {
          for (int r = 0; r < world_size_; ++r) s.stamps.push_back(at::empty_like(mine));
          at::Tensor input = mine;
          s.stamp_work = s.backend->allgather(s.stamps, input);
        }
      }
    } catch (const std::exception& e) {
      s.done = true;
      throw PeerLostError("[" + std::string(collective_name(c)) + " '" + label + "'] rank " +
                          std::to_string(rank_) + " of " + std::to_string(world_size_) +
                          ": could not start on " + s.backend->name() + ": " +
                          first_line(e.what()));
    }
  }
  return p;
}

void Group::allreduce_sum(at::Tensor& tensor, const std::string& label) {
  allreduce_sum_async(tensor, label).wait();
}

PendingCollective Group::allreduce_sum_async(at::Tensor tensor, const std::string& label) {
  TORCH_CHECK(tensor.is_contiguous(), "[allreduce '", label, "'] tensor must be contiguous");
  return issue(Collective::kAllReduce, label, tensor.nbytes(), 0, {},
               [&](Backend& b) { return b.allreduce_sum(tensor); });
}

void Group::broadcast(at::Tensor& tensor, int root, const std::string& label) {
  if (root < 0 || root >= world_size_) {
    throw OptionError("[broadcast '" + label + "'] root must be in [0, " +
                      std::to_string(world_size_ - 1) + "], got " + std::to_string(root));
  }
  TORCH_CHECK(tensor.is_contiguous(), "[broadcast '", label, "'] tensor must be contiguous");
  issue(Collective::kBroadcast, label, tensor.nbytes(), root, {},
        [&](Backend& b) { return b.broadcast(tensor, root); })
      .wait();
}

std::vector<at::Tensor> Group::allgather(const at::Tensor& tensor, const std::string& label) {
  at::Tensor input = tensor.contiguous();
  std::vector<at::Tensor> outputs;
  outputs.reserve(world_size_);
  for (int r = 0; r < world_size_; ++r) outputs.push_back(at::empty_like(input));
  if (world_size_ == 1) outputs[0].copy_(input);
  issue(Collective::kAllGather, label, input.nbytes(), 0, {},
        [&](Backend& b) { return b.allgather(outputs, input); })
      .wait();
  return outputs;
}

PendingCollective Group::allgather_async(const at::Tensor& tensor,
                                         std::vector<at::Tensor>& outputs,
                                         const std::string& label) {
  TORCH_CHECK(tensor.is_contiguous(), "[allgather_async '", label, "'] tensor must be contiguous");
  outputs.clear();
  for (int r = 0; r < world_size_; ++r) outputs.push_back(at::empty_like(tensor));
  if (world_size_ == 1) outputs[0].copy_(tensor);
  at::Tensor input = tensor;
  return issue(Collective::kAllGather, label, tensor.nbytes(), 0, {},
               [&](Backend& b) { return b.allgather(outputs, input); });
}

std::vector<std::string> Group::allgather_bytes(const std::string& bytes,
                                                const std::string& label) {
  at::Tensor len = at::full({1}, static_cast<std::int64_t>(bytes.size()), at::kLong);
  auto lens = allgather(len, label + ".length");
  std::int64_t longest = 0;
  for (const auto& l : lens) longest = std::max(longest, l.item<std::int64_t>());
  at::Tensor buf = at::zeros({std::max<std::int64_t>(longest, 1)}, at::kByte);
  std::memcpy(buf.data_ptr<std::uint8_t>(), bytes.data(), bytes.size());
  auto all = allgather(buf, label);
  std::vector<std::string> out;
  out.reserve(all.size());
  for (std::size_t r = 0; r < all.size(); ++r) {
    out.emplace_back(reinterpret_cast<const char*>(all[r].data_ptr<std::uint8_t>()),
                     static_cast<std::size_t>(lens[r].item<std::int64_t>()));
  }
  return out;
}

void Group::barrier(const std::string& label) {
  issue(Collective::kBarrier, label, 0, 0, {}, [&](Backend& b) { return b.barrier(); }).wait();
}

PendingCollective Group::send_async(at::Tensor tensor, int dst, int tag, const std::string& label) {
  TORCH_CHECK(tensor.is_contiguous(), "[send '", label, "'] tensor must be contiguous");
  TORCH_CHECK(dst >= 0 && dst < world_size_ && dst != rank_, "[send '", label, "'] bad peer ", dst);
  TORCH_CHECK(tag >= 0 && tag < kStampTag, "[send '", label, "'] tag must be in [0, 2^29), got ",
              tag);
  return issue(Collective::kSend, label, tensor.nbytes(), 0, {dst, tag},
               [&](Backend& b) { return b.send(tensor, dst, tag); });
}

PendingCollective Group::recv_async(at::Tensor tensor, int src, int tag, const std::string& label) {
  TORCH_CHECK(tensor.is_contiguous(), "[recv '", label, "'] tensor must be contiguous");
  TORCH_CHECK(src >= 0 && src < world_size_ && src != rank_, "[recv '", label, "'] bad peer ", src);
  TORCH_CHECK(tag >= 0 && tag < kStampTag, "[recv '", label, "'] tag must be in [0, 2^29), got ",
              tag);
  return issue(Collective::kRecv, label, tensor.nbytes(), 0, {src, tag},
               [&](Backend& b) { return b.recv(tensor, src, tag); });
}

CommStats Group::stats() const { return impl_->accounting.snapshot(); }

void Group::reset_stats() { impl_->accounting.reset(); }

}  // namespace diloco
