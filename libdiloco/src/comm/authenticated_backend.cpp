// A Backend whose every payload carries a MAC (see diloco/comm/auth.h), layered over another.
//
// Wire format: each payload travels as its bytes followed by a 32-byte tag,
//   tag = HMAC-SHA256(run key, "diloco-payload-v1" || session || op || seq || step ||
//                     outer step || fragment || sender || receiver || length || bytes)
// where
//   session   SHA-256-sized digest (an HMAC under the key) of every rank's random nonce, published
//             MACed in the group's store when the backend is made: new for every group, so for
//             every membership epoch and every run, even with the same key;
//   op        allgather, broadcast, send, ring reduce-scatter hop, ring all-gather hop;
//   seq       the collective's number in this group (all ranks issue collectives in the same
//             order, so they agree on it), or for send/recv the message's number among those
//             from this sender to this receiver with this tag;
//   step      the ring hop, or the send/recv tag;
//   outer step, fragment   the PayloadContext of the thread that issued the operation, on
//             each side (-1 outside an outer step): every rank issues each operation under the
//             same one, so a payload of another outer step or fragment does not verify;
//   sender / receiver   ranks (receiver -1 for a payload every rank receives).
// A payload replayed from earlier in the group has another seq (and, from an earlier outer step,
// another outer step), one from another group another session: all fail like a forgery.
//
// The all-reduce cannot be a Gloo all-reduce (Gloo sums in flight; no one could check what the
// others added): it is a ring over send/recv of byte payloads on a thread of this backend,
// reduce-scatter then all-gather, a tag per hop. Each chunk is summed along one path and then
// copied, so every rank ends bit-identical. Its send/recv tags (Gloo's) lie above 2^30, clear of
// the small tags callers use for their own rings.
#include <ATen/ATen.h>
#include <openssl/rand.h>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include "diloco/comm/auth.h"
#include "diloco/errors.h"

namespace diloco {
namespace {

constexpr std::size_t kTag = 32;
constexpr char kPayloadDomain[] = "diloco-payload-v1";
constexpr char kNonceDomain[] = "diloco-nonce-v1";
constexpr char kSessionDomain[] = "diloco-session-v1";

enum class Op : std::uint8_t {
  kAllGather = 1,
  kBroadcast = 2,
  kSend = 3,
  kRingReduce = 4,
  kRingGather = 5,
};

const char* op_name(Op op) {
  switch (op) {
    case Op::kAllGather: return "allgather";
    case Op::kBroadcast: return "broadcast";
    case Op::kSend: return "send";
    case Op::kRingReduce: return "ring reduce-scatter hop";
    case Op::kRingGather: return "ring all-gather hop";
  }
  return "?";
}

struct Header {
  Op op;
  std::uint64_t seq;
  std::uint32_t step;
  std::int32_t sender;
  std::int32_t receiver;  // -1: every rank
  PayloadContext context = payload_context();  // of the issuing thread, when the header is made
};

std::uint8_t* bytes_of(const at::Tensor& t) { return static_cast<std::uint8_t*>(t.data_ptr()); }

// Copies `size` bytes at `src` into `dst` (any device, contiguous, `size` == dst.nbytes()).
void copy_into(at::Tensor& dst, const std::uint8_t* src) {
  if (dst.nbytes() == 0) return;
  if (dst.device().is_cpu()) {
    std::memcpy(dst.data_ptr(), src, dst.nbytes());
  } else {
    dst.copy_(at::from_blob(const_cast<std::uint8_t*>(src), dst.sizes(),
                            dst.options().device(at::kCPU)));
  }
}

// A payload plus room for its tag, holding `t`'s bytes.
at::Tensor with_room_for_tag(const at::Tensor& t) {
  at::Tensor host = t.device().is_cpu() ? t.contiguous() : t.contiguous().cpu();
  at::Tensor buf = at::empty({static_cast<std::int64_t>(host.nbytes() + kTag)}, at::kByte);
  if (host.nbytes() > 0) std::memcpy(bytes_of(buf), host.data_ptr(), host.nbytes());
  return buf;
}

// The Work handed to Group: either an inner operation followed by a step run in wait() (verify,
// copy out), or a ring run on the backend's thread.
class AuthWork : public c10d::Work {
 public:
  bool isCompleted() override {
    if (!on_thread) return inner->isCompleted();
    std::lock_guard<std::mutex> hold(state_mutex);
    return finished;
  }

  c10::intrusive_ptr<c10d::Work> inner;
  std::function<void()> then;
  std::vector<at::Tensor> keep;  // buffers the inner operation uses

  bool on_thread = false;
  std::mutex state_mutex;
  std::condition_variable state_changed;
  bool finished = false;
  std::exception_ptr failure;
};

class AuthenticatedBackend : public Backend {
 public:
  AuthenticatedBackend(std::unique_ptr<Backend> inner, c10::intrusive_ptr<c10d::Store> store,
                       RunKey key, std::chrono::milliseconds timeout)
      : inner_(std::move(inner)), key_(std::move(key)) {
    if (!inner_) throw OptionError("[auth] the backend to authenticate must not be null");
    if (!store) throw OptionError("[auth] the store must not be null");
    rank_ = inner_->rank();
    world_size_ = inner_->world_size();
    agree_on_session(*store, timeout);
  }

  ~AuthenticatedBackend() override {
    {
      std::lock_guard<std::mutex> hold(jobs_mutex_);
      stopping_ = true;
    }
    jobs_changed_.notify_all();
    // Bounded: a ring's waits end within the inner backend's timeout.
    if (thread_.joinable()) thread_.join();
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::string name() const override { return inner_->name() + "+mac"; }

  c10::intrusive_ptr<c10d::Work> allreduce_sum(at::Tensor& tensor) override {
    const std::uint64_t seq = collectives_++;
    if (2 * (world_size_ - 1) >= (1 << 12)) {
      throw OptionError("[auth] the authenticated all-reduce supports up to 2048 ranks, got " +
                        std::to_string(world_size_));
    }
    auto work = c10::make_intrusive<AuthWork>();
    work->on_thread = true;
    at::Tensor t = tensor;
    submit([this, work, t, seq, context = payload_context()] {
      std::exception_ptr failure;
      try {
        ring_allreduce(t, seq, context);
      } catch (...) {
        failure = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> hold(work->state_mutex);
        work->failure = failure;
        work->finished = true;
      }
      work->state_changed.notify_all();
    });
    return work;
  }

  c10::intrusive_ptr<c10d::Work> broadcast(at::Tensor& tensor, int root) override {
    const Header h{Op::kBroadcast, collectives_++, 0, root, -1};
    const std::size_t size = tensor.nbytes();
    at::Tensor buf = rank_ == root ? with_room_for_tag(tensor)
                                   : at::empty({static_cast<std::int64_t>(size + kTag)}, at::kByte);
    if (rank_ == root) seal(h, buf);
    auto work = c10::make_intrusive<AuthWork>();
    work->keep = {buf};
    work->inner = inner_->broadcast(buf, root);
    at::Tensor out = tensor;
    work->then = [this, h, buf, out]() mutable {
      if (rank_ == h.sender) return;
      check(h, buf);
      copy_into(out, bytes_of(buf));
    };
    return work;
  }

  c10::intrusive_ptr<c10d::Work> allgather(std::vector<at::Tensor>& outputs,
                                           at::Tensor& input) override {
    const std::uint64_t seq = collectives_++;
    at::Tensor mine = with_room_for_tag(input);
    seal(Header{Op::kAllGather, seq, 0, rank_, -1}, mine);
    std::vector<at::Tensor> bufs;
    bufs.reserve(static_cast<std::size_t>(world_size_));
    for (int r = 0; r < world_size_; ++r) bufs.push_back(at::empty_like(mine));
    auto work = c10::make_intrusive<AuthWork>();
    work->keep = {mine};
    work->inner = inner_->allgather(bufs, mine);
    std::vector<at::Tensor> outs = outputs;
    work->then = [this, seq, bufs, outs, context = payload_context()]() mutable {
      for (int r = 0; r < world_size_; ++r) {
        if (r != rank_) check(Header{Op::kAllGather, seq, 0, r, -1, context}, bufs[r]);
        copy_into(outs[r], bytes_of(bufs[r]));
      }
    };
    return work;
  }

  c10::intrusive_ptr<c10d::Work> barrier() override {
    ++collectives_;  // carries no payload; counted so that the sequence stays aligned
    return inner_->barrier();
  }

  c10::intrusive_ptr<c10d::Work> send(at::Tensor& tensor, int dst, int tag) override {
    const Header h{Op::kSend, sent_[{dst, tag}]++, static_cast<std::uint32_t>(tag), rank_, dst};
    at::Tensor buf = with_room_for_tag(tensor);
    seal(h, buf);
    auto work = c10::make_intrusive<AuthWork>();
    work->keep = {buf};
    work->inner = inner_->send(buf, dst, tag);
    return work;
  }

  c10::intrusive_ptr<c10d::Work> recv(at::Tensor& tensor, int src, int tag) override {
    const Header h{Op::kSend, received_[{src, tag}]++, static_cast<std::uint32_t>(tag), src,
                   rank_};
    at::Tensor buf =
        at::empty({static_cast<std::int64_t>(tensor.nbytes() + kTag)}, at::kByte);
    auto work = c10::make_intrusive<AuthWork>();
    work->keep = {buf};
    work->inner = inner_->recv(buf, src, tag);
    at::Tensor out = tensor;
    work->then = [this, h, buf, out]() mutable {
      check(h, buf);
      copy_into(out, bytes_of(buf));
    };
    return work;
  }

  void wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& operation) override {
    auto* mine = dynamic_cast<AuthWork*>(work.get());
    if (mine == nullptr) {  // a barrier: the inner backend's own
      inner_->wait(work, operation);
      return;
    }
    const std::string where =
        "[" + operation + "] rank " + std::to_string(rank_) + " of " + std::to_string(world_size_);
    if (!mine->on_thread) {
      inner_->wait(mine->inner, operation);
      try {
        if (mine->then) mine->then();
      } catch (const AuthenticationError& e) {
        throw AuthenticationError(where + ": " + e.what(), e.sender());
      }
      return;
    }
    std::exception_ptr failure;
    {
      std::unique_lock<std::mutex> hold(mine->state_mutex);
      mine->state_changed.wait(hold, [&] { return mine->finished; });
      failure = mine->failure;
    }
    if (!failure) return;
    try {
      std::rethrow_exception(failure);
    } catch (const AuthenticationError& e) {
      throw AuthenticationError(where + ": " + e.what(), e.sender());
    } catch (const PeerLostError& e) {
      throw PeerLostError("[" + operation + "] " + e.what(), e.peer());
    } catch (const Error& e) {
      throw Error("[" + operation + "] " + e.what());
    } catch (const std::exception& e) {
      throw Error(where + ": " + e.what());
    }
  }

 private:
  // Each rank publishes a random nonce, MACed with its rank and the world size; the session is
  // an HMAC over all of them in rank order.
  void agree_on_session(c10d::Store& store, std::chrono::milliseconds timeout) {
    const std::string who =
        "[auth] rank " + std::to_string(rank_) + " of " + std::to_string(world_size_);
    const std::int32_t world = world_size_;
    auto record_mac = [&](std::int32_t r, const std::uint8_t* nonce) {
      return key_.mac({{kNonceDomain, sizeof(kNonceDomain)},
                       {&r, sizeof(r)},
                       {&world, sizeof(world)},
                       {nonce, kTag}});
    };
    std::vector<std::uint8_t> mine(2 * kTag);
    if (RAND_bytes(mine.data(), static_cast<int>(kTag)) != 1) {
      throw Error(who + ": OpenSSL RAND_bytes failed");
    }
    const MacTag mac = record_mac(rank_, mine.data());
    std::memcpy(mine.data() + kTag, mac.data(), kTag);
    store.set("auth/nonce/" + std::to_string(rank_), mine);

    std::vector<std::uint8_t> nonces(kTag * static_cast<std::size_t>(world_size_));
    std::string rejected;
    for (int r = 0; r < world_size_; ++r) {
      const std::string entry = "auth/nonce/" + std::to_string(r);
      std::vector<std::uint8_t> record;
      try {
        store.wait({entry}, timeout);
        record = store.get(entry);
      } catch (const AuthenticationError&) {
        record.clear();  // the store's own MAC failed: the same verdict as ours
      } catch (const std::exception& e) {
        const std::string what = e.what();
        throw Error(who + ": rank " + std::to_string(r) + " did not publish its session nonce ('" +
                    entry + "') within " + std::to_string(timeout.count()) +
                    " ms: " + what.substr(0, what.find('\n')));
      }
      MacTag found{};
      bool ok = record.size() == 2 * kTag;
      if (ok) {
        std::memcpy(found.data(), record.data() + kTag, kTag);
        ok = RunKey::equal(found, record_mac(r, record.data()));
      }
      if (!ok) {
        rejected += (rejected.empty() ? "" : ", ") + std::to_string(r);
        continue;
      }
      std::memcpy(nonces.data() + kTag * static_cast<std::size_t>(r), record.data(), kTag);
    }
    if (!rejected.empty()) {
      throw AuthenticationError(
          who + ": the session nonce of rank(s) " + rejected +
              " (store entries 'auth/nonce/R') was not made with this process's run key: their "
              "key differs from this one, or the entries are forged",
          rejected.find(',') == std::string::npos ? std::stoi(rejected) : -1);
    }
    session_ = key_.mac({{kSessionDomain, sizeof(kSessionDomain)}, {nonces.data(), nonces.size()}});
  }

  MacTag tag_of(const Header& h, const std::uint8_t* bytes, std::size_t size) const {
    const std::uint8_t op = static_cast<std::uint8_t>(h.op);
    const std::uint64_t length = size;
    return key_.mac({{kPayloadDomain, sizeof(kPayloadDomain)},
                     {session_.data(), session_.size()},
                     {&op, sizeof(op)},
                     {&h.seq, sizeof(h.seq)},
                     {&h.step, sizeof(h.step)},
                     {&h.context.outer_step, sizeof(h.context.outer_step)},
                     {&h.context.fragment, sizeof(h.context.fragment)},
                     {&h.sender, sizeof(h.sender)},
                     {&h.receiver, sizeof(h.receiver)},
                     {&length, sizeof(length)},
                     {bytes, size}});
  }

  // Writes the tag of `buf`'s payload (all but its last kTag bytes) into those last bytes.
  void seal(const Header& h, at::Tensor& buf) const {
    const std::size_t size = buf.nbytes() - kTag;
    const MacTag t = tag_of(h, bytes_of(buf), size);
    std::memcpy(bytes_of(buf) + size, t.data(), kTag);
  }

  void check(const Header& h, const at::Tensor& buf) const {
    const std::size_t size = buf.nbytes() - kTag;
    MacTag found{};
    std::memcpy(found.data(), bytes_of(buf) + size, kTag);
    if (RunKey::equal(found, tag_of(h, bytes_of(buf), size))) return;
    std::string what = "the payload from rank " + std::to_string(h.sender) + " (" +
                       op_name(h.op) + " #" + std::to_string(h.seq);
    if (h.op == Op::kSend) what += ", tag " + std::to_string(h.step);
    if (h.op == Op::kRingReduce || h.op == Op::kRingGather) {
      what += ", hop " + std::to_string(h.step);
    }
    if (h.context.outer_step >= 0) {
      what += ", outer step " + std::to_string(h.context.outer_step) + " fragment " +
              std::to_string(h.context.fragment);
    }
    throw AuthenticationError(what + ", " + std::to_string(size) +
                                  " bytes) failed authentication: tampered with, replayed, or "
                                  "sent without this run key; rejected",
                              h.sender);
  }

  void submit(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> hold(jobs_mutex_);
      jobs_.push_back(std::move(job));
      if (!thread_.joinable()) thread_ = std::thread([this] { run_jobs(); });
    }
    jobs_changed_.notify_all();
  }

  void run_jobs() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> hold(jobs_mutex_);
        jobs_changed_.wait(hold, [&] { return stopping_ || !jobs_.empty(); });
        if (jobs_.empty()) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }

  // Reduce-scatter then all-gather over send/recv, a tag per hop (see the file comment).
  void ring_allreduce(at::Tensor tensor, std::uint64_t seq, PayloadContext context) {
    const int n = world_size_, r = rank_;
    // Chunks are ranges of the flattened tensor, whatever its shape.
    at::Tensor host = (tensor.device().is_cpu() ? tensor : tensor.cpu()).view({-1});
    const std::int64_t numel = host.numel();
    const std::size_t item = host.element_size();
    const std::int64_t chunk = (numel + n - 1) / n;
    auto range = [&](int c) {
      const std::int64_t begin = std::min(numel, static_cast<std::int64_t>(c) * chunk);
      return std::make_pair(begin, std::min(numel, begin + chunk) - begin);
    };
    auto mod = [n](int x) { return ((x % n) + n) % n; };
    const int next = mod(r + 1), prev = mod(r - 1);
    std::uint8_t* base = bytes_of(host);
    const auto room = static_cast<std::int64_t>(static_cast<std::size_t>(chunk) * item + kTag);
    at::Tensor out = at::empty({room}, at::kByte), in = at::empty({room}, at::kByte);
    for (int s = 0; s < 2 * (n - 1); ++s) {
      const bool reduce = s < n - 1;
      const int k = reduce ? s : s - (n - 1);
      const int send_c = reduce ? mod(r - k) : mod(r + 1 - k);
      const int recv_c = reduce ? mod(r - k - 1) : mod(r - k);
      const auto [send_begin, send_len] = range(send_c);
      const auto [recv_begin, recv_len] = range(recv_c);
      const Op op = reduce ? Op::kRingReduce : Op::kRingGather;
      const int gloo_tag = (1 << 30) | static_cast<int>((seq & 0xffff) << 12) | s;
      const std::string hop = std::string(op_name(op)) + " " + std::to_string(s);
      c10::intrusive_ptr<c10d::Work> sent, got;
      at::Tensor o, i;
      if (send_len > 0) {
        const std::size_t size = static_cast<std::size_t>(send_len) * item;
        o = out.narrow(0, 0, static_cast<std::int64_t>(size + kTag));
        std::memcpy(bytes_of(o), base + static_cast<std::size_t>(send_begin) * item, size);
        seal(Header{op, seq, static_cast<std::uint32_t>(s), r, next, context}, o);
        sent = inner_->send(o, next, gloo_tag);
      }
      if (recv_len > 0) {
        i = in.narrow(0, 0, static_cast<std::int64_t>(recv_len) * static_cast<std::int64_t>(item) +
                                static_cast<std::int64_t>(kTag));
        got = inner_->recv(i, prev, gloo_tag);
      }
      if (sent) inner_->wait(sent, "authenticated ring, " + hop + " to rank " + std::to_string(next));
      if (got) inner_->wait(got, "authenticated ring, " + hop + " from rank " + std::to_string(prev));
      if (recv_len == 0) continue;
      check(Header{op, seq, static_cast<std::uint32_t>(s), prev, r, context}, i);
      if (reduce) {
        host.narrow(0, recv_begin, recv_len)
            .add_(at::from_blob(bytes_of(i), {recv_len}, host.options()));
      } else {
        std::memcpy(base + static_cast<std::size_t>(recv_begin) * item, bytes_of(i),
                    static_cast<std::size_t>(recv_len) * item);
      }
    }
    if (!tensor.device().is_cpu()) tensor.copy_(host.view(tensor.sizes()));
  }

  std::unique_ptr<Backend> inner_;
  RunKey key_;
  int rank_ = 0;
  int world_size_ = 1;
  MacTag session_{};
  // Touched only by the thread that issues operations.
  std::uint64_t collectives_ = 0;
  std::map<std::pair<int, int>, std::uint64_t> sent_, received_;  // (peer, tag) -> messages
  // The ring's thread, started with the first all-reduce.
  std::mutex jobs_mutex_;
  std::condition_variable jobs_changed_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace

std::unique_ptr<Backend> make_authenticated_backend(std::unique_ptr<Backend> inner,
                                                    c10::intrusive_ptr<c10d::Store> store,
                                                    const RunKey& key,
                                                    std::chrono::milliseconds timeout) {
  return std::make_unique<AuthenticatedBackend>(std::move(inner), std::move(store), key, timeout);
}

}  // namespace diloco
