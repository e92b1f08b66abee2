// Run keys: who may be a member of a run, and which bytes came from one.
//
// A run key is a shared secret of at least 16 bytes that every island of a run is given
// (GroupOptions::run_key or run_key_file; DILOCO_RUN_KEY or DILOCO_RUN_KEY_FILE). With one:
//   store      every value the library writes to the rendezvous store carries an HMAC-SHA256
//              over its key name and bytes (make_authenticated_store); a value without a valid
//              MAC is refused, naming the entry. Counters (Store::add) cannot carry one.
//   joining    Group::create answers a random challenge that rank 0 writes; a process with no
//              key or another key fails on its own, before it claims a rank (rendezvous.cpp).
//              Elastic runs (ElasticOptions::run_key) prove the key against the run's challenge
//              before an island takes an incarnation (elastic/membership.h, "Run keys").
//   payloads   every payload a rank sends another carries a 32-byte tag (make_authenticated_
//              backend): HMAC-SHA256 over the group's session (the run and the epoch), the
//              operation, its sequence number, the outer step and fragment it belongs to
//              (PayloadContext), the sender and receiver, and the bytes. A bad tag is an
//              AuthenticationError naming the sender; a replayed payload has a stale sequence
//              number or session and fails the same way. The uncompressed all-reduce becomes a
//              ring over byte payloads with a tag per hop (Gloo's own sums in flight could not be
//              checked).
// Without a key none of this exists: no wrapper, no extra bytes, no extra time.
//
// What it is not: encryption (payloads travel in the clear), nor protection against a store
// client or a network peer that only disrupts (deleting entries, bumping counters, closing
// connections): those make a run fail, loudly, but cannot make it accept forged data. See
// libdiloco/docs/design.md, "Run keys and authenticated payloads".
//
// The MAC is OpenSSL libcrypto's HMAC-SHA256 (EVP_MAC); comparisons are constant-time.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>

#include <c10/util/intrusive_ptr.h>

#include "diloco/comm/backend.h"
#include "diloco/errors.h"

namespace c10d {
class Store;
}

namespace diloco {

using MacTag = std::array<std::uint8_t, 32>;

// The outer step and fragment that the collectives a thread issues belong to; -1 outside an
// outer step (the constructor's checks, a reform). Authenticated payloads bind them into their
// tags, so a payload of another outer step or fragment fails authentication on its own, not only
// through the sequence number. DiLoCo sets it around each outer step (ScopedPayloadContext), and
// CommThread jobs run under the context they were submitted in. Every rank must issue each
// collective under the same context, as it issues them in the same order.
struct PayloadContext {
  std::int64_t outer_step = -1;
  std::int64_t fragment = -1;
};
PayloadContext payload_context();  // this thread's
class ScopedPayloadContext {
 public:
  explicit ScopedPayloadContext(PayloadContext context);
  ~ScopedPayloadContext();
  ScopedPayloadContext(const ScopedPayloadContext&) = delete;
  ScopedPayloadContext& operator=(const ScopedPayloadContext&) = delete;

 private:
  PayloadContext saved_;
};

// HMAC-SHA256 of `data` under `key` (one shot; RunKey::mac for many messages under one key).
MacTag hmac_sha256(const std::string& key, const void* data, std::size_t size);

class RunKey {
 public:
  static constexpr std::size_t kMinBytes = 16;

  // A key of at least kMinBytes bytes. `option` names where it came from, for the message of
  // the OptionError thrown when it is too short.
  explicit RunKey(std::string bytes, const std::string& option = "run_key");

  // The key given by exactly one of `key` (the bytes themselves) and `key_file` (a file holding
  // them; one trailing newline is dropped), or none when both are empty. Throws OptionError
  // naming the option (`key_option` / `file_option`) for both set, an unreadable file or a key
  // shorter than kMinBytes.
  static std::optional<RunKey> resolve(const std::string& key, const std::string& key_file,
                                       const std::string& key_option = "run_key",
                                       const std::string& file_option = "run_key_file");

  // One piece of a message to MAC.
  struct Part {
    const void* data;
    std::size_t size;
  };
  // HMAC-SHA256 of the concatenated parts under this key. Thread-safe.
  MacTag mac(std::initializer_list<Part> parts) const;
  // Constant-time comparison of two tags.
  static bool equal(const MacTag& a, const MacTag& b);

 private:
  friend MacTag hmac_sha256(const std::string& key, const void* data, std::size_t size);
  struct Mac;  // a keyed OpenSSL context, copied for each message
  std::shared_ptr<const Mac> mac_;
};

// A store whose values carry HMAC(key, name || value): set() appends the tag, get() checks and
// strips it (AuthenticationError naming the entry otherwise), compareSet() does both. add(),
// check(), deleteKey(), wait() pass through: counters are not MACed (see the file comment).
// Wrap the store at its root (a TCPStore), below any PrefixStore, so that MACs bind full names.
c10::intrusive_ptr<c10d::Store> make_authenticated_store(c10::intrusive_ptr<c10d::Store> inner,
                                                         const RunKey& key);

// A Backend whose payloads carry tags (see the file comment), over a connected `inner` backend.
// `store` is the group's own (the one `inner` connected over, e.g. PrefixStore("epoch/N")):
// each rank publishes a fresh random nonce there, MACed, and the group's session is the hash of
// all of them, so that no payload of another group, epoch or run verifies in this one. Blocks
// until every rank's nonce is there (`timeout`); throws AuthenticationError when one was written
// with another key (naming the rank), Error when one does not come.
std::unique_ptr<Backend> make_authenticated_backend(std::unique_ptr<Backend> inner,
                                                    c10::intrusive_ptr<c10d::Store> store,
                                                    const RunKey& key,
                                                    std::chrono::milliseconds timeout);

}  // namespace diloco
