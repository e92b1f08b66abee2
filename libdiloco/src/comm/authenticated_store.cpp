// A c10d::Store whose values carry HMAC(run key, name || value) (see diloco/comm/auth.h).
//
// Stored value = value || tag, tag = HMAC-SHA256(key, "diloco-store-v1" || u64 len(name) || name
// || value). Binding the name stops a valid value being copied under another name (rank 1's
// address under rank 2's). What it does not cover: counters (add() keeps an integer the server
// adds to: rank claims, arrival counts, heartbeats), the presence of a key (check()), deletions
// and waits. A client without the key can therefore bump or delete, which makes a rendezvous
// or an epoch fail, but it cannot make a member read a value it wrote.
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstring>

#include "diloco/comm/auth.h"
#include "diloco/errors.h"

namespace diloco {
namespace {

constexpr char kDomain[] = "diloco-store-v1";

class AuthenticatedStore : public c10d::Store {
 public:
  AuthenticatedStore(c10::intrusive_ptr<c10d::Store> inner, RunKey key)
      : Store(inner->getTimeout()), inner_(std::move(inner)), key_(std::move(key)) {}

  void set(const std::string& name, const std::vector<std::uint8_t>& value) override {
    inner_->set(name, seal(name, value));
  }

  std::vector<std::uint8_t> compareSet(const std::string& name,
                                       const std::vector<std::uint8_t>& current,
                                       const std::vector<std::uint8_t>& desired) override {
    // An empty `current` means "only if absent"; otherwise MACs are deterministic, so the
    // sealed forms compare as the values do.
    auto now = inner_->compareSet(name, current.empty() ? current : seal(name, current),
                                  seal(name, desired));
    if (now.empty() && current.empty()) return now;
    return open(name, now);
  }

  std::vector<std::uint8_t> get(const std::string& name) override {
    return open(name, inner_->get(name));
  }

  std::int64_t add(const std::string& name, std::int64_t value) override {
    return inner_->add(name, value);
  }
  bool deleteKey(const std::string& name) override { return inner_->deleteKey(name); }
  bool check(const std::vector<std::string>& names) override { return inner_->check(names); }
  std::int64_t getNumKeys() override { return inner_->getNumKeys(); }
  void wait(const std::vector<std::string>& names) override { inner_->wait(names); }
  void wait(const std::vector<std::string>& names,
            const std::chrono::milliseconds& timeout) override {
    inner_->wait(names, timeout);
  }
  const std::chrono::milliseconds& getTimeout() const noexcept override {
    return inner_->getTimeout();
  }
  void setTimeout(const std::chrono::milliseconds& timeout) override {
    Store::setTimeout(timeout);
    inner_->setTimeout(timeout);
  }

 private:
  MacTag tag(const std::string& name, const std::uint8_t* value, std::size_t size) const {
    const std::uint64_t length = name.size();
    return key_.mac({{kDomain, sizeof(kDomain)},
                     {&length, sizeof(length)},
                     {name.data(), name.size()},
                     {value, size}});
  }

  std::vector<std::uint8_t> seal(const std::string& name,
                                 const std::vector<std::uint8_t>& value) const {
    std::vector<std::uint8_t> out(value);
    const MacTag t = tag(name, value.data(), value.size());
    out.insert(out.end(), t.begin(), t.end());
    return out;
  }

  std::vector<std::uint8_t> open(const std::string& name,
                                 const std::vector<std::uint8_t>& stored) const {
    MacTag found{};
    if (stored.size() >= found.size()) {
      const std::size_t size = stored.size() - found.size();
      std::memcpy(found.data(), stored.data() + size, found.size());
      if (RunKey::equal(found, tag(name, stored.data(), size))) {
        return std::vector<std::uint8_t>(stored.begin(),
                                         stored.begin() + static_cast<std::ptrdiff_t>(size));
      }
    }
    throw AuthenticationError("[store] the entry '" + name +
                              "' is forged or was written without this run key (its MAC does "
                              "not match)");
  }

  c10::intrusive_ptr<c10d::Store> inner_;
  RunKey key_;
};

}  // namespace

c10::intrusive_ptr<c10d::Store> make_authenticated_store(c10::intrusive_ptr<c10d::Store> inner,
                                                         const RunKey& key) {
  if (!inner) throw OptionError("[store] the store to authenticate must not be null");
  return c10::make_intrusive<AuthenticatedStore>(std::move(inner), key);
}

}  // namespace diloco
