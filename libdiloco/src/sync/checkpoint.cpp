// Checkpoints (see checkpoint.h) and DiLoCo::save/load.
#include "diloco/sync/checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "audit/auditor.h"
#include "diloco/errors.h"
#include "diloco/sync/diloco.h"
#include "diloco/sync/fingerprint.h"

namespace diloco {
namespace fs = std::filesystem;
namespace {

constexpr std::int64_t kCheckpointFormat = 1;
constexpr const char* kPrefix = "ckpt-";
constexpr const char* kSuffix = ".pt";

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("[checkpoint] cannot open '" + path + "': " + std::strerror(errno));
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string to_bytes(torch::serialize::OutputArchive& archive) {
  std::string bytes;
  archive.save_to([&bytes](const void* data, std::size_t size) {
    bytes.append(static_cast<const char*>(data), size);
    return size;
  });
  return bytes;
}

// The payload of a checkpoint file, its checksum verified.
std::string verified_payload(const std::string& path) {
  const std::string bytes = read_file(path);
  torch::serialize::InputArchive wrapper;
  at::Tensor payload;
  c10::IValue digest;
  try {
    wrapper.load_from(bytes.data(), bytes.size());
    wrapper.read("payload", payload);
    wrapper.read("sha256", digest);
  } catch (const std::exception& e) {
    throw Error("[checkpoint] '" + path + "' is not a readable checkpoint (truncated or corrupted; " +
                std::to_string(bytes.size()) + " bytes): " + std::string(e.what()).substr(0, 200));
  }
  std::string data(static_cast<const char*>(payload.data_ptr()),
                   static_cast<std::size_t>(payload.numel()));
  const std::string actual = sha256_hex(data.data(), data.size());
  if (actual != digest.toStringRef()) {
    throw Error("[checkpoint] '" + path + "' is corrupted: its payload's SHA-256 is " + actual +
                ", the file says " + digest.toStringRef());
  }
  return data;
}

}  // namespace

std::string sha256_hex(const void* data, std::size_t size) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (EVP_Digest(data, size, digest, &length, EVP_sha256(), nullptr) != 1) {
    throw Error("[sha256] libcrypto's EVP_Digest failed");
  }
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < length; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

void write_file_atomically(const std::string& path, const std::string& bytes) {
  const fs::path target(path);
  const fs::path folder = target.has_parent_path() ? target.parent_path() : fs::path(".");
  const std::string tmp =
      (folder / ("." + target.filename().string() + ".tmp" + std::to_string(::getpid()))).string();
  auto fail = [&](const std::string& what) {
    const std::string why = std::strerror(errno);
    ::unlink(tmp.c_str());
    throw Error("[checkpoint] cannot write '" + path + "': " + what + ": " + why);
  };
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("open " + tmp);
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      ::close(fd);
      fail("write");
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) {
    ::close(fd);
    fail("fsync");
  }
  if (::close(fd) != 0) fail("close");
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("rename");
  const int dir = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

void verify_checkpoint(const std::string& path) { verified_payload(path); }

CheckpointDir::CheckpointDir(std::string dir, int keep) : dir_(std::move(dir)), keep_(keep) {
  if (keep < 1) {
    throw OptionError("[checkpoint] keep (checkpoints kept) must be >= 1, got " +
                      std::to_string(keep));
  }
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec || !fs::is_directory(dir_)) {
    throw OptionError("[checkpoint] cannot create the checkpoint folder '" + dir_ +
                      "': " + (ec ? ec.message() : "not a folder"));
  }
}

std::string CheckpointDir::path_for(std::int64_t outer_step) const {
  char name[64];
  std::snprintf(name, sizeof(name), "%s%08lld%s", kPrefix, static_cast<long long>(outer_step),
                kSuffix);
  return (fs::path(dir_) / name).string();
}

std::vector<std::int64_t> CheckpointDir::steps() const {
  std::vector<std::int64_t> out;
  for (const auto& entry : fs::directory_iterator(dir_)) {
    const std::string name = entry.path().filename().string();
    const std::size_t pre = std::strlen(kPrefix), suf = std::strlen(kSuffix);
    if (name.size() <= pre + suf || name.compare(0, pre, kPrefix) != 0 ||
        name.compare(name.size() - suf, suf, kSuffix) != 0) {
      continue;
    }
    const std::string digits = name.substr(pre, name.size() - pre - suf);
    if (digits.empty() || !std::all_of(digits.begin(), digits.end(), ::isdigit)) continue;
    out.push_back(std::stoll(digits));
  }
  std::sort(out.rbegin(), out.rend());
  return out;
}

std::vector<std::int64_t> CheckpointDir::intact_steps(std::vector<std::string>* problems) const {
  std::vector<std::int64_t> out;
  for (auto step : steps()) {
    try {
      verify_checkpoint(path_for(step));
      out.push_back(step);
    } catch (const Error& e) {
      if (problems) problems->push_back(e.what());
    }
  }
  return out;
}

void CheckpointDir::prune() const {
  const auto all = steps();
  for (std::size_t i = static_cast<std::size_t>(keep_); i < all.size(); ++i) {
    std::error_code ec;
    fs::remove(path_for(all[i]), ec);
  }
}

void DiLoCo::save(const std::string& path, const std::vector<torch::optim::Optimizer*>& inner,
                  const std::map<std::string, std::string>& extra) const {
  check_nothing_in_flight("save");
  torch::serialize::OutputArchive content;
  content.write("format", c10::IValue(kCheckpointFormat));
  const Fingerprint config = fingerprint();
  for (const auto& [field, value] : config.fields()) {
    content.write("config." + field, c10::IValue(value));
  }
  torch::serialize::OutputArchive outer;
  state_.save(outer);
  content.write("outer", outer);
  const auto& buckets = params_.buckets();
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    content.write("local." + std::to_string(i), buckets[i].flat);
  }
  content.write("inner_optimizers", c10::IValue(static_cast<std::int64_t>(inner.size())));
  for (std::size_t k = 0; k < inner.size(); ++k) {
    torch::serialize::OutputArchive o;
    inner[k]->save(o);
    content.write("inner." + std::to_string(k), o);
  }
  std::string keys;  // one per line
  for (const auto& [key, value] : extra) {
    if (key.empty() || key.find('\n') != std::string::npos) {
      throw OptionError("[checkpoint] an extra field's name must be one non-empty line, got '" +
                        key + "'");
    }
    content.write("extra." + key, c10::IValue(value));
    keys += key + "\n";
  }
  content.write("extra_keys", c10::IValue(keys));

  const std::string payload = to_bytes(content);
  torch::serialize::OutputArchive wrapper;
  wrapper.write("payload", at::from_blob(const_cast<char*>(payload.data()),
                                         {static_cast<std::int64_t>(payload.size())}, at::kByte));
  wrapper.write("sha256", c10::IValue(sha256_hex(payload.data(), payload.size())));
  write_file_atomically(path, to_bytes(wrapper));
}

std::map<std::string, std::string> DiLoCo::load(
    const std::string& path, const std::vector<torch::optim::Optimizer*>& inner) {
  check_nothing_in_flight("load");
  const std::string payload = verified_payload(path);
  torch::serialize::InputArchive content;
  content.load_from(payload.data(), payload.size());
  c10::IValue format;
  content.read("format", format);
  if (format.toInt() != kCheckpointFormat) {
    throw OptionError("[checkpoint] '" + path + "' has format " + std::to_string(format.toInt()) +
                      ", this library reads " + std::to_string(kCheckpointFormat));
  }
  // The configuration first: a checkpoint of another run is refused before anything changes.
  const Fingerprint config = fingerprint();
  for (const auto& [field, value] : config.fields()) {
    c10::IValue saved;
    if (!content.try_read("config." + field, saved)) {
      throw OptionError("[checkpoint] '" + path + "' does not record " + field +
                        " (written by another release?)");
    }
    if (saved.toStringRef() != value) {
      throw OptionError("[checkpoint] '" + path + "' was written with " + field + " = '" +
                        saved.toStringRef() + "', this run has '" + value + "'");
    }
  }
  c10::IValue count;
  content.read("inner_optimizers", count);
  if (count.toInt() != static_cast<std::int64_t>(inner.size())) {
    throw OptionError("[checkpoint] '" + path + "' holds " + std::to_string(count.toInt()) +
                      " inner optimizer(s), this run passes " + std::to_string(inner.size()));
  }
  const auto& buckets = params_.buckets();
  std::vector<at::Tensor> local(buckets.size());
  for (std::size_t i = 0; i < buckets.size(); ++i) content.read("local." + std::to_string(i), local[i]);
  torch::serialize::InputArchive outer;
  content.read("outer", outer);
  state_.load(outer);  // checks shapes and exchange specs before it changes anything
  state_hash_.reset();  // the state it described is gone
  at::NoGradGuard no_grad;
  for (std::size_t i = 0; i < buckets.size(); ++i) buckets[i].flat.copy_(local[i]);
  for (std::size_t k = 0; k < inner.size(); ++k) {
    torch::serialize::InputArchive o;
    content.read("inner." + std::to_string(k), o);
    inner[k]->load(o);
  }
  // Audits: the round in progress starts from the loaded state.
  if (auditor_) auditor_->begin_round(state_.global, state_.inner_step);
  c10::IValue keys;
  content.read("extra_keys", keys);
  std::map<std::string, std::string> extra;
  const std::string& names = keys.toStringRef();
  for (std::size_t start = 0, end; (end = names.find('\n', start)) != std::string::npos;
       start = end + 1) {
    const std::string key = names.substr(start, end - start);
    c10::IValue v;
    content.read("extra." + key, v);
    extra[key] = v.toStringRef();
  }
  return extra;
}

}  // namespace diloco
