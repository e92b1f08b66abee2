// What every island must agree on before any pseudo-gradient crosses the link.
//
// Islands that differ in one option (the codec, its seed, H, the outer learning rate, a buffer
// mode, the model's shapes, the library release) do not fail by themselves: they exchange bytes
// the others decode differently, average into different global weights, or end at different
// steps. So DiLoCo and DataParallel build a Fingerprint of everything that must be equal — one
// named field per option — and compare it across ranks in one small collective at construction.
// A difference is an OptionError on every rank naming the field and every rank's value:
//   "[DiLoCo] the islands are configured differently: compression is 'fp4' on rank 0 but
//    'int4(block=256,rounding=nearest)' on rank 1; every island must use the same value"
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace diloco {

class Group;

class Fingerprint {
 public:
  // Adds a field; the first with a given name wins (Error on a second one).
  void add(const std::string& field, const std::string& value);
  const std::vector<std::pair<std::string, std::string>>& fields() const { return fields_; }

  std::string serialize() const;
  // Throws Error for bytes that are not a serialized Fingerprint (named with `from`).
  static Fingerprint parse(const std::string& bytes, const std::string& from);

 private:
  std::vector<std::pair<std::string, std::string>> fields_;
};

// A fingerprint holding what every synchronizer shares: the library version, the wire format
// version and `synchronizer` ("DiLoCo", "DataParallel": islands running different ones fail).
Fingerprint library_fingerprint(const std::string& synchronizer);

// Collective (one all-gather of the serialized fingerprints). Throws OptionError on every rank
// naming the first field (in rank 0's order) whose value differs, with each rank's value. A
// non-empty `local_problem` (a setup error found on this rank alone) travels with it, so that
// every rank throws it (as OptionError, naming the rank) instead of waiting for this one.
// `who` prefixes the messages ("DiLoCo", "DataParallel").
void agree_on_fingerprint(Group& group, const std::string& who, const Fingerprint& mine,
                          const std::string& local_problem = "");

}  // namespace diloco
