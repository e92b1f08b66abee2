// Commitments, the audit selection and the LibTorch hooks (see diloco/audit/audit.h).
#include "diloco/audit/audit.h"

#include <c10/util/string_utils.h>
#include <openssl/evp.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <cstring>
#include <sstream>

#include "diloco/errors.h"

namespace diloco {
namespace {

struct Hasher {
  Hasher() : ctx(EVP_MD_CTX_new()) {
    if (ctx == nullptr || EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) != 1) {
      throw Error("[audit] libcrypto could not start a SHA-256");
    }
  }
  ~Hasher() { EVP_MD_CTX_free(ctx); }
  Hasher(const Hasher&) = delete;
  Hasher& operator=(const Hasher&) = delete;
  void update(const void* data, std::size_t size) {
    if (EVP_DigestUpdate(ctx, data, size) != 1) throw Error("[audit] SHA-256 update failed");
  }
  Digest digest() {
    Digest d{};
    unsigned int length = 0;
    if (EVP_DigestFinal_ex(ctx, d.data(), &length) != 1 || length != d.size()) {
      throw Error("[audit] SHA-256 final failed");
    }
    return d;
  }
  EVP_MD_CTX* ctx;
};

void put_int(std::string& out, std::int64_t v) {
  for (int b = 0; b < 8; ++b)
    out += static_cast<char>((static_cast<std::uint64_t>(v) >> (8 * b)) & 0xff);
}

std::int64_t get_int(const std::string& in, std::size_t& at) {
  std::uint64_t v = 0;
  for (int b = 0; b < 8; ++b) {
    v |= static_cast<std::uint64_t>(static_cast<std::uint8_t>(in[at + b])) << (8 * b);
  }
  at += 8;
  return static_cast<std::int64_t>(v);
}

// The first 8 bytes of SHA-256(seed, tag, index), as an unsigned integer.
std::uint64_t draw(const Digest& seed, const char* tag, int index) {
  Hasher h;
  h.update(seed.data(), seed.size());
  h.update(tag, std::strlen(tag));
  const std::int64_t i = index;
  h.update(&i, sizeof i);
  const Digest d = h.digest();
  std::uint64_t v = 0;
  for (int b = 0; b < 8; ++b) v = (v << 8) | d[static_cast<std::size_t>(b)];
  return v;
}

}  // namespace

Digest sha256(const void* data, std::size_t size) {
  Hasher h;
  h.update(data, size);
  return h.digest();
}

Digest sha256_of(const std::vector<at::Tensor>& tensors) {
  Hasher h;
  for (const auto& t : tensors) {
    const at::Tensor host = t.is_cpu() ? t.contiguous() : t.cpu().contiguous();
    h.update(host.data_ptr(), host.nbytes());
  }
  return h.digest();
}

std::string to_hex(const Digest& digest) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (auto b : digest) {
    out += hex[b >> 4];
    out += hex[b & 15];
  }
  return out;
}

std::string Commitment::serialize() const {
  std::string out;
  for (std::int64_t v : {outer_step, island, first_step, steps, data_seed}) put_int(out, v);
  for (const Digest* d : {&start_state, &end_state, &pseudo_gradient, &nonce}) {
    out.append(reinterpret_cast<const char*>(d->data()), d->size());
  }
  return out;
}

Commitment Commitment::parse(const std::string& bytes, int from) {
  if (bytes.size() != kBytes) {
    throw Error("[audit] rank " + std::to_string(from) + " sent a commitment of " +
                std::to_string(bytes.size()) + " bytes, not " + std::to_string(kBytes));
  }
  Commitment c;
  std::size_t at = 0;
  for (std::int64_t* v : {&c.outer_step, &c.island, &c.first_step, &c.steps, &c.data_seed}) {
    *v = get_int(bytes, at);
  }
  for (Digest* d : {&c.start_state, &c.end_state, &c.pseudo_gradient, &c.nonce}) {
    std::memcpy(d->data(), bytes.data() + at, d->size());
    at += d->size();
  }
  return c;
}

std::string Commitment::describe() const {
  std::ostringstream m;
  m << "outer step " << outer_step << ", rank " << island << ", inner steps [" << first_step << ", "
    << first_step + steps << "), data seed " << data_seed << ", start state "
    << to_hex(start_state).substr(0, 16) << ", end state " << to_hex(end_state).substr(0, 16)
    << ", pseudo-gradient " << to_hex(pseudo_gradient).substr(0, 16);
  return m.str();
}

std::vector<int> select_audits(const Digest& seed, int islands, double rate,
                               const std::vector<bool>& excluded) {
  std::vector<int> auditor(static_cast<std::size_t>(islands), -1);
  const auto out = [&](int r) {
    return static_cast<std::size_t>(r) < excluded.size() && excluded[static_cast<std::size_t>(r)];
  };
  for (int i = 0; i < islands; ++i) {
    if (out(i)) continue;
    // u in [0, 1): the top 53 bits of the draw.
    const double u = static_cast<double>(draw(seed, "audit", i) >> 11) * 0x1.0p-53;
    if (!(u < rate)) continue;
    std::vector<int> candidates;
    for (int r = 0; r < islands; ++r) {
      if (r != i && !out(r)) candidates.push_back(r);
    }
    if (candidates.empty()) continue;
    auditor[static_cast<std::size_t>(i)] = candidates[draw(seed, "auditor", i) % candidates.size()];
  }
  return auditor;
}

std::string optimizer_state_bytes(const std::vector<torch::optim::Optimizer*>& optimizers) {
  torch::serialize::OutputArchive all;
  for (std::size_t k = 0; k < optimizers.size(); ++k) {
    torch::serialize::OutputArchive one;
    optimizers[k]->save(one);
    all.write("optimizer." + std::to_string(k), one);
  }
  std::ostringstream out;
  all.save_to(out);
  return out.str();
}

void load_optimizer_state_bytes(const std::vector<torch::optim::Optimizer*>& optimizers,
                                const std::string& bytes) {
  torch::serialize::InputArchive all;
  try {
    all.load_from(bytes.data(), bytes.size());
  } catch (const std::exception& e) {
    throw Error("[audit] an inner-optimizer state of " + std::to_string(bytes.size()) +
                " bytes does not load: " + std::string(e.what()).substr(0, 200));
  }
  for (std::size_t k = 0; k < optimizers.size(); ++k) {
    torch::serialize::InputArchive one;
    all.read("optimizer." + std::to_string(k), one);
    // Loading adds the saved parameters' states to what is there: start from none, so that a
    // state saved before the first step loads as no state.
    optimizers[k]->state().clear();
    optimizers[k]->load(one);
  }
}

Digest optimizer_state_digest(const std::vector<torch::optim::Optimizer*>& optimizers) {
  Hasher h;
  for (std::size_t k = 0; k < optimizers.size(); ++k) {
    const auto& groups = optimizers[k]->param_groups();
    const auto& state = optimizers[k]->state();
    for (std::size_t g = 0; g < groups.size(); ++g) {
      const auto& params = groups[g].params();
      for (std::size_t p = 0; p < params.size(); ++p) {
        const std::string where =
            std::to_string(k) + "/" + std::to_string(g) + "/" + std::to_string(p) + ":";
        h.update(where.data(), where.size());
        // LibTorch keys an optimizer's state by the parameter's address, as text.
        const auto it = state.find(c10::guts::to_string(params[p].unsafeGetTensorImpl()));
        if (it == state.end()) continue;
        torch::serialize::OutputArchive one;
        it->second->serialize(one);
        std::ostringstream bytes;
        one.save_to(bytes);
        const std::string b = bytes.str();
        h.update(b.data(), b.size());
      }
    }
  }
  return h.digest();
}

AuditHooks make_audit_hooks(std::vector<torch::optim::Optimizer*> inner, torch::nn::Module& replica,
                            std::vector<torch::optim::Optimizer*> replica_inner,
                            std::function<void(std::int64_t stream, std::int64_t step)> step,
                            std::int64_t data_seed,
                            std::function<std::int64_t(const std::string& island)> stream_of) {
  if (inner.size() != replica_inner.size() || inner.empty()) {
    throw OptionError(
        "[audit] make_audit_hooks needs as many replica optimizers as inner ones "
        "(at least one), got " +
        std::to_string(inner.size()) + " and " + std::to_string(replica_inner.size()));
  }
  if (!step) throw OptionError("[audit] make_audit_hooks needs a step function");
  AuditHooks hooks;
  hooks.data_seed = data_seed;
  hooks.stream_of = std::move(stream_of);
  hooks.replica = named_parameters(replica);
  hooks.inner_state = [inner] { return optimizer_state_bytes(inner); };
  hooks.inner_digest = [inner] { return optimizer_state_digest(inner); };
  hooks.replay = [replica_inner, step](const AuditTask& task) {
    load_optimizer_state_bytes(replica_inner, task.inner_state);
    ReplayDigests digests;
    digests.start = optimizer_state_digest(replica_inner);
    for (std::int64_t t = task.first_step; t < task.first_step + task.steps; ++t) {
      step(task.stream, t);
    }
    digests.end = optimizer_state_digest(replica_inner);
    return digests;
  };
  return hooks;
}

}  // namespace diloco
