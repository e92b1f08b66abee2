// Run keys and HMAC-SHA256 (see diloco/comm/auth.h), through OpenSSL libcrypto's EVP_MAC.
#include "diloco/comm/auth.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include <fstream>
#include <sstream>

#include "diloco/errors.h"

namespace diloco {
namespace {

[[noreturn]] void openssl_failed(const char* what) {
  throw Error(std::string("[auth] OpenSSL: ") + what + " failed");
}

}  // namespace

// A context keyed once; each message works on a copy, so one key is hashed into HMAC's inner and
// outer pads once rather than per message, and concurrent callers share nothing mutable.
struct RunKey::Mac {
  EVP_MAC* mac = nullptr;
  EVP_MAC_CTX* keyed = nullptr;

  explicit Mac(const std::string& key) {
    mac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
    if (mac == nullptr) openssl_failed("EVP_MAC_fetch(HMAC)");
    keyed = EVP_MAC_CTX_new(mac);
    if (keyed == nullptr) {
      EVP_MAC_free(mac);
      openssl_failed("EVP_MAC_CTX_new");
    }
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                           OSSL_PARAM_construct_end()};
    if (EVP_MAC_init(keyed, reinterpret_cast<const unsigned char*>(key.data()), key.size(),
                     params) != 1) {
      EVP_MAC_CTX_free(keyed);
      EVP_MAC_free(mac);
      openssl_failed("EVP_MAC_init(HMAC-SHA256)");
    }
  }
  ~Mac() {
    EVP_MAC_CTX_free(keyed);
    EVP_MAC_free(mac);
  }
  Mac(const Mac&) = delete;
  Mac& operator=(const Mac&) = delete;

  MacTag run(std::initializer_list<RunKey::Part> parts) const {
    EVP_MAC_CTX* ctx = EVP_MAC_CTX_dup(keyed);
    if (ctx == nullptr) openssl_failed("EVP_MAC_CTX_dup");
    bool ok = true;
    for (const auto& p : parts) {
      if (p.size > 0) {
        ok = ok && EVP_MAC_update(ctx, static_cast<const unsigned char*>(p.data), p.size) == 1;
      }
    }
    MacTag tag{};
    std::size_t written = 0;
    ok = ok && EVP_MAC_final(ctx, tag.data(), &written, tag.size()) == 1 && written == tag.size();
    EVP_MAC_CTX_free(ctx);
    if (!ok) openssl_failed("HMAC-SHA256");
    return tag;
  }
};

MacTag hmac_sha256(const std::string& key, const void* data, std::size_t size) {
  return RunKey::Mac(key).run({{data, size}});
}

RunKey::RunKey(std::string bytes, const std::string& option) {
  if (bytes.size() < kMinBytes) {
    throw OptionError("[auth] " + option + " must be at least " + std::to_string(kMinBytes) +
                      " bytes, got " + std::to_string(bytes.size()) +
                      " (use a random string, e.g. `openssl rand -hex 32`)");
  }
  mac_ = std::make_shared<const Mac>(bytes);
  // The bytes live on only inside OpenSSL's keyed context.
  OPENSSL_cleanse(bytes.data(), bytes.size());
}

std::optional<RunKey> RunKey::resolve(const std::string& key, const std::string& key_file,
                                      const std::string& key_option,
                                      const std::string& file_option) {
  if (!key.empty() && !key_file.empty()) {
    throw OptionError("[auth] give the run key once: " + key_option + " and " + file_option +
                      " are both set");
  }
  if (!key.empty()) return RunKey(key, key_option);
  if (key_file.empty()) return std::nullopt;
  std::ifstream in(key_file, std::ios::binary);
  if (!in) {
    throw OptionError("[auth] " + file_option + " '" + key_file + "' cannot be read");
  }
  std::ostringstream content;
  content << in.rdbuf();
  std::string bytes = content.str();
  if (!bytes.empty() && bytes.back() == '\n') bytes.pop_back();
  if (!bytes.empty() && bytes.back() == '\r') bytes.pop_back();
  return RunKey(std::move(bytes), file_option + " '" + key_file + "'");
}

MacTag RunKey::mac(std::initializer_list<Part> parts) const { return mac_->run(parts); }

bool RunKey::equal(const MacTag& a, const MacTag& b) {
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

namespace {
thread_local PayloadContext current_context;
}  // namespace

PayloadContext payload_context() { return current_context; }

ScopedPayloadContext::ScopedPayloadContext(PayloadContext context) : saved_(current_context) {
  current_context = context;
}

ScopedPayloadContext::~ScopedPayloadContext() { current_context = saved_; }

}  // namespace diloco
