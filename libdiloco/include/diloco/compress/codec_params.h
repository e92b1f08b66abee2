// The parameters of a codec spec, "topk(k=64,values=2bit)" -> {k: "64", values: "2bit"}, with
// typed getters that validate and name the parameter and its allowed range in their errors.
// Every parameter must be read: unknown() lists those a codec did not ask for, so a typo in a
// spec is an error rather than silently ignored.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace diloco {

class CodecParams {
 public:
  CodecParams(std::string codec, std::map<std::string, std::string> values);

  const std::string& codec() const { return codec_; }
  // Each getter throws OptionError("[codec 'int8'] block must be ... in [lo, hi], got 'x'").
  std::int64_t get_int(const std::string& key, std::int64_t fallback, std::int64_t lo,
                       std::int64_t hi);
  double get_double(const std::string& key, double fallback, double lo, double hi);
  // 0 (off, also the fallback) or a number in [lo, hi] (lo > 0): "... must be 0 (off) or a number
  // in [lo, hi], got 'x'".
  double get_double_or_off(const std::string& key, double lo, double hi);
  // One of `choices`.
  std::string get_choice(const std::string& key, const std::string& fallback,
                         const std::vector<std::string>& choices);
  // Integer that must be a power of two in [lo, hi].
  std::int64_t get_power_of_two(const std::string& key, std::int64_t fallback, std::int64_t lo,
                                std::int64_t hi);
  // Throws OptionError naming any key that no getter asked for.
  void reject_unknown() const;

 private:
  // get_double and get_double_or_off (zero_is_off: 0 is accepted too, and said in the error).
  double read_double(const std::string& key, double fallback, double lo, double hi,
                     bool zero_is_off);

  std::string codec_;
  std::map<std::string, std::string> values_;
  std::set<std::string> used_;
};

// The shortest decimal that reads back as exactly `v`: how specs and fingerprints spell numbers,
// so that a spec rebuilds the same codec and equal options print equal.
std::string exact_decimal(double v);

}  // namespace diloco
