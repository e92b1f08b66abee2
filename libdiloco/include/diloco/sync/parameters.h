// The parameters an island trains, gathered into contiguous buffers so that a whole model is
// exchanged with one collective and updated by one fused loop.
//
// On construction each parameter's storage is rebound (Tensor::set_data) to a view into one flat
// buffer per dtype. The parameter objects stay the same, so an optimizer built on them before
// keeps working; a later model.to(...) would undo the rebinding (call it before).
//
// It also checks that every island holds the same model: names, shapes and dtypes are gathered
// from all ranks and compared with rank 0's, and every rank throws the same error naming the
// first parameter that differs. Then rank 0's values are broadcast, so all islands start equal.
#pragma once

#include <ATen/Tensor.h>

#include <string>
#include <vector>

namespace torch {
namespace nn {
class Module;
}
}  // namespace torch

namespace diloco {

class Group;

struct NamedParameter {
  std::string name;
  at::Tensor tensor;
};

// All parameters of a module with their qualified names ("blocks.0.attn.weight").
std::vector<NamedParameter> named_parameters(const torch::nn::Module& module);

class FlatParameters {
 public:
  struct Bucket {
    at::Tensor flat;                   // contiguous, one dtype, one device
    std::vector<std::size_t> members;  // indices into parameters()
    std::vector<std::int64_t> offsets; // element offset of each member in `flat`
  };

  // Rebinds the parameters into buckets. Throws Error for an empty list, a duplicate name,
  // a non-floating-point tensor or parameters on different devices.
  explicit FlatParameters(std::vector<NamedParameter> parameters);

  const std::vector<NamedParameter>& parameters() const { return parameters_; }
  std::vector<Bucket>& buckets() { return buckets_; }
  const std::vector<Bucket>& buckets() const { return buckets_; }
  std::int64_t numel() const;
  // Which parameter holds element `index` of bucket `bucket`.
  const std::string& name_at(std::size_t bucket, std::int64_t index) const;

  // "name shape dtype" per line, the same on every island that holds the same model.
  std::string describe() const;

  // Collective: check that all ranks hold the same model (throws diloco::Error on every rank
  // naming the first difference), then copy rank 0's values to every rank. `who` prefixes
  // error messages ("DiLoCo", "DataParallel"). A non-empty `local_problem` (a setup error found
  // on this rank alone) is shared too, so that every rank throws it instead of waiting.
  void agree_across(Group& group, const std::string& who, const std::string& local_problem = "");

 private:
  std::vector<NamedParameter> parameters_;
  std::vector<Bucket> buckets_;
};

}  // namespace diloco
