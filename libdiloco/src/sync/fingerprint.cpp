// Configuration fingerprints compared across islands (see fingerprint.h).
#include "diloco/sync/fingerprint.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>

#include "diloco/comm/group.h"
#include "diloco/errors.h"
#include "diloco/version.h"

namespace diloco {
namespace {

// Serialized form: "<length>:<bytes>" for each field name and value in turn, so that names and
// values may hold any byte. A leading "!" entry carries a local problem (see the header).
void put(std::string& out, const std::string& s) {
  out += std::to_string(s.size());
  out += ':';
  out += s;
}

bool take(const std::string& in, std::size_t& pos, std::string& s) {
  const std::size_t colon = in.find(':', pos);
  if (colon == std::string::npos || colon == pos || colon - pos > 9) return false;
  std::size_t n = 0;
  for (std::size_t i = pos; i < colon; ++i) {
    if (in[i] < '0' || in[i] > '9') return false;
    n = n * 10 + static_cast<std::size_t>(in[i] - '0');
  }
  if (colon + 1 + n > in.size()) return false;
  s = in.substr(colon + 1, n);
  pos = colon + 1 + n;
  return true;
}

constexpr const char* kProblemField = "!problem";

// Model fields ("parameter 'w'", "buffer 'bn.running_mean'") name a shape; the others an option.
bool is_model_field(const std::string& field) {
  return field.rfind("parameter ", 0) == 0 || field.rfind("buffer ", 0) == 0;
}

std::string shown(const std::string& field, const std::string* value) {
  if (value == nullptr) return "absent";
  return is_model_field(field) ? *value : "'" + *value + "'";
}

}  // namespace

Fingerprint library_fingerprint(const std::string& synchronizer) {
  Fingerprint f;
  f.add("library version", DILOCO_VERSION);
  f.add("wire format", std::to_string(kWireFormatVersion));
  f.add("synchronizer", synchronizer);
  return f;
}

void Fingerprint::add(const std::string& field, const std::string& value) {
  const bool taken = std::any_of(fields_.begin(), fields_.end(),
                                 [&](const auto& f) { return f.first == field; });
  if (taken) throw Error("[Fingerprint] field '" + field + "' added twice");
  if (field.empty() || field[0] == '!') {
    throw Error("[Fingerprint] field name '" + field + "' is empty or starts with '!'");
  }
  fields_.emplace_back(field, value);
}

std::string Fingerprint::serialize() const {
  std::string out;
  for (const auto& [field, value] : fields_) {
    put(out, field);
    put(out, value);
  }
  return out;
}

Fingerprint Fingerprint::parse(const std::string& bytes, const std::string& from) {
  Fingerprint f;
  std::size_t pos = 0;
  while (pos < bytes.size()) {
    std::string field, value;
    if (!take(bytes, pos, field) || !take(bytes, pos, value)) {
      throw Error("[Fingerprint] the configuration sent by " + from +
                  " is malformed at byte " + std::to_string(pos) +
                  " (is it another program, or another release of the library?)");
    }
    f.fields_.emplace_back(std::move(field), std::move(value));
  }
  return f;
}

void agree_on_fingerprint(Group& group, const std::string& who, const Fingerprint& mine,
                          const std::string& local_problem) {
  std::string bytes = mine.serialize();
  if (!local_problem.empty()) {
    std::string problem;
    put(problem, kProblemField);
    put(problem, local_problem);
    bytes = problem + bytes;
  }
  const std::vector<std::string> all = group.allgather_bytes(bytes, "config_check");
  const int n = static_cast<int>(all.size());
  std::vector<std::map<std::string, std::string>> values(all.size());
  std::vector<std::string> order;  // rank 0's fields first, then any only others have
  for (int r = 0; r < n; ++r) {
    const Fingerprint f = Fingerprint::parse(all[r], "rank " + std::to_string(r));
    for (const auto& [field, value] : f.fields()) {
      if (field == kProblemField) {
        throw OptionError("[" + who + "] rank " + std::to_string(r) + ": " + value);
      }
      if (values[r].emplace(field, value).second &&
          std::find(order.begin(), order.end(), field) == order.end()) {
        order.push_back(field);
      }
    }
  }
  for (const std::string& field : order) {
    std::vector<const std::string*> v(all.size(), nullptr);
    for (int r = 0; r < n; ++r) {
      auto it = values[r].find(field);
      if (it != values[r].end()) v[r] = &it->second;
    }
    const auto same = [&](int r) {
      return (v[r] == nullptr) == (v[0] == nullptr) && (v[r] == nullptr || *v[r] == *v[0]);
    };
    int first_bad = -1;
    for (int r = 1; r < n && first_bad < 0; ++r) {
      if (!same(r)) first_bad = r;
    }
    if (first_bad < 0) continue;
    std::ostringstream m;
    m << "[" << who << "] "
      << (is_model_field(field) ? "the islands hold different models: "
                                : "the islands are configured differently: ")
      << field << " is " << shown(field, v[0]) << " on rank 0 but " << shown(field, v[first_bad])
      << " on rank " << first_bad;
    if (n > 2) {
      m << " (every rank: ";
      for (int r = 0; r < n; ++r) m << (r ? ", " : "") << r << " " << shown(field, v[r]);
      m << ")";
    }
    m << "; every island must " << (is_model_field(field) ? "hold the same model" : "use the same value");
    throw OptionError(m.str());
  }
}

}  // namespace diloco
