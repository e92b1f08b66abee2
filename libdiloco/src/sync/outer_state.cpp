// The outer state's serialization (see outer_state.h).
#include "diloco/sync/outer_state.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "diloco/errors.h"
#include "diloco/sync/checkpoint.h"

namespace diloco {
namespace {

constexpr std::int64_t kFormat = 1;

std::string key(const char* what, std::size_t bucket) {
  return std::string(what) + "." + std::to_string(bucket);
}

// A saved tensor must fit the one it replaces: same shape and dtype (the device may differ).
void check_fits(const at::Tensor& saved, const at::Tensor& here, const std::string& field) {
  if (saved.defined() != here.defined()) {
    throw OptionError("[outer state] " + field + " is " +
                      (saved.defined() ? "in the saved state but not kept here"
                                       : "kept here but not in the saved state") +
                      " (a different outer momentum?)");
  }
  if (!saved.defined()) return;
  if (saved.sizes() != here.sizes() || saved.scalar_type() != here.scalar_type()) {
    throw OptionError("[outer state] " + field + " is " + c10::str(saved.scalar_type()) +
                      c10::str(saved.sizes()) + " in the saved state but " +
                      c10::str(here.scalar_type()) + c10::str(here.sizes()) +
                      " here (another model or fragment layout?)");
  }
}

}  // namespace

void OuterState::save(torch::serialize::OutputArchive& archive) const {
  archive.write("format", c10::IValue(kFormat));
  archive.write("inner_step", c10::IValue(inner_step));
  archive.write("outer_step", c10::IValue(outer_step));
  archive.write("buckets", c10::IValue(static_cast<std::int64_t>(global.size())));
  for (std::size_t i = 0; i < global.size(); ++i) {
    archive.write(key("global", i), global[i]);
    if (momentum[i].defined()) archive.write(key("momentum", i), momentum[i]);
    torch::serialize::OutputArchive exchange;
    exchanges[i]->save(exchange);
    archive.write(key("exchange", i), exchange);
  }
}

void OuterState::load(torch::serialize::InputArchive& archive) {
  c10::IValue format, inner, outer, buckets;
  archive.read("format", format);
  if (format.toInt() != kFormat) {
    throw OptionError("[outer state] format " + std::to_string(format.toInt()) +
                      " is not this library's (" + std::to_string(kFormat) + ")");
  }
  archive.read("inner_step", inner);
  archive.read("outer_step", outer);
  archive.read("buckets", buckets);
  if (buckets.toInt() != static_cast<std::int64_t>(global.size())) {
    throw OptionError("[outer state] the saved state has " + std::to_string(buckets.toInt()) +
                      " parameter buckets, this run " + std::to_string(global.size()) +
                      " (another model, dtype mix or number of fragments?)");
  }
  // Everything is read and checked before anything is replaced.
  std::vector<at::Tensor> g(global.size()), m(global.size());
  std::vector<torch::serialize::InputArchive> ex(global.size());
  for (std::size_t i = 0; i < global.size(); ++i) {
    archive.read(key("global", i), g[i]);
    check_fits(g[i], global[i], "the global weights of bucket " + std::to_string(i));
    archive.try_read(key("momentum", i), m[i]);
    check_fits(m[i], momentum[i], "the outer momentum of bucket " + std::to_string(i));
    archive.read(key("exchange", i), ex[i]);
  }
  for (std::size_t i = 0; i < global.size(); ++i) {
    try {
      exchanges[i]->load(ex[i]);
    } catch (const Error& e) {
      throw OptionError("[outer state] bucket " + std::to_string(i) + ": " + e.what());
    }
  }
  at::NoGradGuard no_grad;
  for (std::size_t i = 0; i < global.size(); ++i) {
    global[i].copy_(g[i]);
    if (momentum[i].defined()) momentum[i].copy_(m[i]);
  }
  inner_step = inner.toInt();
  outer_step = outer.toInt();
}

std::string OuterState::sha256() const {
  // The digest of the concatenated digests: no copy of the weights is made.
  std::string digests = std::to_string(inner_step) + ":" + std::to_string(outer_step);
  auto add = [&](const at::Tensor& t) {
    if (!t.defined()) return;
    const at::Tensor c = t.to(at::kCPU).contiguous();
    digests += sha256_hex(c.data_ptr(), static_cast<std::size_t>(c.nbytes()));
  };
  for (std::size_t i = 0; i < global.size(); ++i) {
    add(global[i]);
    add(momentum[i]);
  }
  return sha256_hex(digests.data(), digests.size());
}

void OuterState::save(const std::string& path) const {
  torch::serialize::OutputArchive archive;
  save(archive);
  archive.save_to(path);
}

void OuterState::load(const std::string& path) {
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
  } catch (const std::exception& e) {
    throw Error("[outer state] cannot read '" + path + "': " + e.what());
  }
  load(archive);
}

}  // namespace diloco
