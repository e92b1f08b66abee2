// The parameters an island trains, gathered into contiguous buffers so that a whole model is
// exchanged with one collective and updated by one fused loop.
//
// On construction each parameter's storage is rebound (Tensor::set_data) to a view into one flat
// buffer per dtype. The parameter objects stay the same, so an optimizer built on them before
// keeps working; a later model.to(...) would undo the rebinding (call it before).
//
// Names, shapes and dtypes go into the fingerprint the islands compare (sync/fingerprint.h), so
// islands holding different models fail on every rank naming the first parameter that differs;
// then rank 0's values are broadcast, so all islands start equal.
#pragma once

#include <ATen/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

namespace torch {
namespace nn {
class Module;
}
}  // namespace torch

namespace diloco {

class Fingerprint;
class Group;

struct NamedParameter {
  std::string name;
  at::Tensor tensor;
};

// All parameters of a module with their qualified names ("blocks.0.attn.weight").
std::vector<NamedParameter> named_parameters(const torch::nn::Module& module);
// All buffers of a module ("bn1.running_mean", "bn1.num_batches_tracked").
std::vector<NamedParameter> named_buffers(const torch::nn::Module& module);

// What an island synchronizes, given as tensors instead of a torch::nn::Module (the Python
// bindings, or models that are not Modules).
struct ModelTensors {
  std::vector<NamedParameter> parameters;  // trained and synchronized
  std::vector<NamedParameter> buffers;     // not trained; kept consistent (see BufferSync)
  // The tensors the inner optimizer steps. When set, every parameter must be among them (a
  // parameter left out would silently train nothing); unset: not checked.
  c10::optional<std::vector<at::Tensor>> optimized;

  static ModelTensors of(const torch::nn::Module& module);
};

// Adds "KIND 'name'" = "[shape] dtype" for each tensor, then "KIND count" and "KIND order".
void describe_tensors(Fingerprint& fingerprint, const std::string& kind,
                      const std::vector<NamedParameter>& tensors);

class FlatParameters {
 public:
  struct Bucket {
    at::Tensor flat;                   // contiguous, one dtype, one device
    std::vector<std::size_t> members;  // indices into parameters()
    std::vector<std::int64_t> offsets; // element offset of each member in `flat`
    std::int64_t fragment = 0;         // the streaming fragment its members belong to
  };

  // Rebinds the parameters into buckets, one per (fragment, dtype), in the order the pairs first
  // appear. `fragment_of` gives each parameter's fragment (empty: all in fragment 0, so one
  // bucket per dtype). Throws Error for an empty list, a duplicate name, a non-floating-point
  // tensor, parameters on different devices, or a fragment_of of the wrong length.
  explicit FlatParameters(std::vector<NamedParameter> parameters,
                          const std::vector<std::int64_t>& fragment_of = {});

  const std::vector<NamedParameter>& parameters() const { return parameters_; }
  std::vector<Bucket>& buckets() { return buckets_; }
  const std::vector<Bucket>& buckets() const { return buckets_; }
  std::int64_t numel() const;
  // Which parameter holds element `index` of bucket `bucket`.
  const std::string& name_at(std::size_t bucket, std::int64_t index) const;

  // One fingerprint field per parameter ("parameter 'w'" = "[64, 32] Float") and one for their
  // order, the same on every island that holds the same model (sync/fingerprint.h).
  void describe_into(Fingerprint& fingerprint) const;

  // Collective: every rank's values become rank 0's, so that all islands start equal.
  void copy_from_rank0(Group& group);

 private:
  std::vector<NamedParameter> parameters_;
  std::vector<Bucket> buckets_;
};

}  // namespace diloco
