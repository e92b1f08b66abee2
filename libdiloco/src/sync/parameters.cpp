// Flat parameter buckets and the cross-island model check (see parameters.h).
#include "diloco/sync/parameters.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <map>
#include <set>
#include <sstream>

#include "diloco/comm/group.h"
#include "diloco/errors.h"

namespace diloco {
namespace {

std::vector<std::string> split_lines(const std::string& s) {
  std::vector<std::string> lines;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// "name shape dtype" -> name.
std::string line_name(const std::string& line) { return line.substr(0, line.find(' ')); }
std::string line_spec(const std::string& line) {
  const auto space = line.find(' ');
  return space == std::string::npos ? "" : line.substr(space + 1);
}

constexpr const char* kProblemTag = "!problem ";

}  // namespace

std::vector<NamedParameter> named_parameters(const torch::nn::Module& module) {
  std::vector<NamedParameter> out;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    if (item.value().requires_grad()) out.push_back({item.key(), item.value()});
  }
  return out;
}

FlatParameters::FlatParameters(std::vector<NamedParameter> parameters)
    : parameters_(std::move(parameters)) {
  if (parameters_.empty()) throw Error("[FlatParameters] no parameters to synchronize");
  std::set<std::string> seen;
  const at::Device device = parameters_.front().tensor.device();
  std::map<at::ScalarType, std::size_t> bucket_of;
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    const auto& p = parameters_[i];
    if (!p.tensor.defined()) throw Error("[FlatParameters] parameter '" + p.name + "' is undefined");
    if (!seen.insert(p.name).second) {
      throw Error("[FlatParameters] parameter name '" + p.name + "' appears twice");
    }
    if (!at::isFloatingType(p.tensor.scalar_type())) {
      throw Error("[FlatParameters] parameter '" + p.name + "' has dtype " +
                  std::string(c10::toString(p.tensor.scalar_type())) +
                  "; only floating-point parameters can be trained and synchronized");
    }
    if (p.tensor.device() != device) {
      throw Error("[FlatParameters] parameter '" + p.name + "' is on " + p.tensor.device().str() +
                  " but '" + parameters_.front().name + "' is on " + device.str() +
                  "; move the whole model to one device first");
    }
    auto [it, inserted] = bucket_of.emplace(p.tensor.scalar_type(), buckets_.size());
    if (inserted) buckets_.emplace_back();
    Bucket& b = buckets_[it->second];
    const std::int64_t offset =
        b.offsets.empty() ? 0 : b.offsets.back() + parameters_[b.members.back()].tensor.numel();
    b.members.push_back(i);
    b.offsets.push_back(offset);
  }
  for (Bucket& b : buckets_) {
    const auto& last = parameters_[b.members.back()].tensor;
    const std::int64_t total = b.offsets.back() + last.numel();
    b.flat = at::empty({total}, last.options().requires_grad(false));
    for (std::size_t j = 0; j < b.members.size(); ++j) {
      at::Tensor& param = parameters_[b.members[j]].tensor;
      at::Tensor view = b.flat.narrow(0, b.offsets[j], param.numel()).view(param.sizes());
      view.copy_(param.detach());
      param.set_data(view);  // same parameter object, storage now inside the bucket
    }
  }
}

std::int64_t FlatParameters::numel() const {
  std::int64_t n = 0;
  for (const auto& b : buckets_) n += b.flat.numel();
  return n;
}

const std::string& FlatParameters::name_at(std::size_t bucket, std::int64_t index) const {
  const Bucket& b = buckets_.at(bucket);
  std::size_t j = 0;
  while (j + 1 < b.offsets.size() && b.offsets[j + 1] <= index) ++j;
  return parameters_[b.members[j]].name;
}

std::string FlatParameters::describe() const {
  std::ostringstream out;
  for (const auto& p : parameters_) {
    out << p.name << " [";
    for (std::size_t d = 0; d < p.tensor.sizes().size(); ++d) {
      out << (d ? ", " : "") << p.tensor.sizes()[d];
    }
    out << "] " << c10::toString(p.tensor.scalar_type()) << "\n";
  }
  return out.str();
}

void FlatParameters::agree_across(Group& group, const std::string& who,
                                  const std::string& local_problem) {
  // Problems found locally travel with the description, so every rank fails together instead of
  // one failing and the others waiting for it until the timeout.
  std::string mine = describe();
  if (!local_problem.empty()) mine = kProblemTag + local_problem + "\n" + mine;
  const std::vector<std::string> all = group.allgather_bytes(mine, "model_check");
  for (std::size_t r = 0; r < all.size(); ++r) {
    if (all[r].rfind(kProblemTag, 0) == 0) {
      throw Error("[" + who + "] rank " + std::to_string(r) + ": " +
                  all[r].substr(std::string(kProblemTag).size(),
                                all[r].find('\n') - std::string(kProblemTag).size()));
    }
  }
  const auto reference = split_lines(all[0]);
  for (std::size_t r = 1; r < all.size(); ++r) {
    const auto lines = split_lines(all[r]);
    const std::string here = "rank " + std::to_string(r);
    for (std::size_t i = 0; i < std::max(lines.size(), reference.size()); ++i) {
      std::ostringstream m;
      m << "[" << who << "] the islands hold different models: ";
      if (i >= lines.size()) {
        m << "parameter '" << line_name(reference[i]) << "' exists on rank 0 but not on " << here
          << " (rank 0 has " << reference.size() << " parameters, " << here << " has "
          << lines.size() << ")";
      } else if (i >= reference.size()) {
        m << "parameter '" << line_name(lines[i]) << "' exists on " << here
          << " but not on rank 0 (rank 0 has " << reference.size() << " parameters, " << here
          << " has " << lines.size() << ")";
      } else if (line_name(lines[i]) != line_name(reference[i])) {
        m << "parameter #" << i << " is '" << line_name(reference[i]) << "' on rank 0 but '"
          << line_name(lines[i]) << "' on " << here;
      } else if (line_spec(lines[i]) != line_spec(reference[i])) {
        m << "parameter '" << line_name(lines[i]) << "' is " << line_spec(reference[i])
          << " on rank 0 but " << line_spec(lines[i]) << " on " << here;
      } else {
        continue;
      }
      throw Error(m.str());
    }
  }
  for (Bucket& b : buckets_) group.broadcast(b.flat, 0, "initial_weights");
}

}  // namespace diloco
