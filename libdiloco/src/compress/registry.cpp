// make_codec(): the one place that maps codec names to implementations (see registry.h).
#include "diloco/compress/registry.h"

#include <cctype>
#include <map>
#include <mutex>

#include "compress/blockwise_int.h"
#include "compress/cast.h"
#include "compress/dct.h"
#include "compress/fp4.h"
#include "compress/normal_int8.h"
#include "compress/randomk.h"
#include "compress/sign.h"
#include "compress/topk.h"
#include "compress/spec_parse.h"
#include "diloco/exchange/powersgd.h"
#include "diloco/errors.h"

namespace diloco {
namespace {

struct UserCodec {
  std::string help;
  CodecFactory factory;
};

// Codecs registered by user code. Guarded: registration may happen from any thread.
std::mutex& user_mutex() {
  static std::mutex m;
  return m;
}
std::map<std::string, UserCodec>& user_codecs() {
  static std::map<std::string, UserCodec> codecs;
  return codecs;
}

struct Builtin {
  const char* name;
  const char* const* help;
  std::unique_ptr<Codec> (*make)(CodecParams&);
};

std::unique_ptr<Codec> make_int8(CodecParams& p) { return make_blockwise_int_codec(8, p); }
std::unique_ptr<Codec> make_int4(CodecParams& p) { return make_blockwise_int_codec(4, p); }
std::unique_ptr<Codec> make_int3(CodecParams& p) { return make_blockwise_int_codec(3, p); }
std::unique_ptr<Codec> make_int2(CodecParams& p) { return make_blockwise_int_codec(2, p); }

const Builtin kBuiltins[] = {
    {"fp32", &kFp32Help, make_fp32_codec},
    {"fp16", &kFp16Help, make_fp16_codec},
    {"int8", &kInt8Help, make_int8},
    {"int4", &kInt4Help, make_int4},
    {"int3", &kInt3Help, make_int3},
    {"int2", &kInt2Help, make_int2},
    {"int8_normal", &kInt8NormalHelp, make_int8_normal_codec},
    {"fp4", &kFp4Help, make_fp4_codec},
    {"topk", &kTopkHelp, make_topk_codec},
    {"dct", &kDctHelp, make_dct_codec},
    {"randomk", &kRandomkHelp, make_randomk_codec},
    {"sign", &kSignHelp, make_sign_codec},
};

std::string all_help() {
  std::string out;
  for (const auto& line : codec_help()) out += "\n  " + line;
  return out;
}

[[noreturn]] void bad_spec(const std::string& spec, const std::string& why) {
  throw OptionError("[compression] " + why + " in spec '" + spec + "'; valid codecs (append " +
                    "'+ef' or '+ef(beta=B)' for error feedback):" + all_help());
}

}  // namespace

std::pair<std::string, std::map<std::string, std::string>> parse_spec(const std::string& spec) {
  std::string s;
  for (char c : spec) {
    if (!std::isspace(static_cast<unsigned char>(c))) s += c;
  }
  const auto open = s.find('(');
  std::string name = s.substr(0, open);
  if (name.empty()) bad_spec(spec, "no codec name");
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) bad_spec(spec, "bad codec name '" + name + "'");
  }
  std::map<std::string, std::string> values;
  if (open == std::string::npos) return {name, values};
  if (s.back() != ')') bad_spec(spec, "missing ')'");
  const std::string inner = s.substr(open + 1, s.size() - open - 2);
  std::size_t start = 0;
  while (start < inner.size()) {
    auto comma = inner.find(',', start);
    if (comma == std::string::npos) comma = inner.size();
    const std::string item = inner.substr(start, comma - start);
    const auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == item.size()) {
      bad_spec(spec, "parameter '" + item + "' is not key=value");
    }
    if (!values.emplace(item.substr(0, eq), item.substr(eq + 1)).second) {
      bad_spec(spec, "parameter '" + item.substr(0, eq) + "' given twice");
    }
    start = comma + 1;
  }
  return {name, values};
}

const char* aggregation_name(Aggregation a) {
  switch (a) {
    case Aggregation::kSummable: return "summable";
    case Aggregation::kRingRequantized: return "ring-requantized";
    case Aggregation::kGathered: return "gathered";
  }
  return "unknown";
}

std::unique_ptr<Codec> make_codec(const std::string& spec) {
  auto [name, values] = parse_spec(spec);
  if (name == "none") name = "fp32";
  if (name == "powersgd") {
    bad_spec(spec, "powersgd is an exchange of two all-reduce rounds, not a single-payload codec: "
                   "use it as a compression spec (Exchange::from_spec, DiLoCoOptions::compression)");
  }
  CodecParams params(name, values);
  for (const auto& b : kBuiltins) {
    if (name == b.name) {
      auto codec = b.make(params);
      params.reject_unknown();
      return codec;
    }
  }
  CodecFactory factory;
  {
    std::lock_guard<std::mutex> lock(user_mutex());
    auto it = user_codecs().find(name);
    if (it != user_codecs().end()) factory = it->second.factory;
  }
  if (!factory) bad_spec(spec, "unknown codec '" + name + "'");
  auto codec = factory(params);
  params.reject_unknown();
  if (!codec) throw OptionError("[compression] the factory of codec '" + name + "' returned null");
  return codec;
}

std::vector<std::string> codec_help() {
  std::vector<std::string> out;
  for (const auto& b : kBuiltins) out.push_back(*b.help);
  out.push_back(PowerSGD::kHelp);
  std::lock_guard<std::mutex> lock(user_mutex());
  for (const auto& [name, c] : user_codecs()) out.push_back(c.help);
  return out;
}

void register_codec(const std::string& name, const std::string& help, CodecFactory factory) {
  for (const auto& b : kBuiltins) {
    if (name == b.name || name == "none" || name == "powersgd") {
      throw OptionError("[compression] cannot register '" + name + "': a built-in codec has that name");
    }
  }
  if (!factory) throw OptionError("[compression] register_codec('" + name + "'): null factory");
  std::lock_guard<std::mutex> lock(user_mutex());
  user_codecs()[name] = {help, std::move(factory)};
}

}  // namespace diloco
