// The grammar of a codec spec, shared by the codec registry and Exchange::from_spec:
// "name" or "name(key=value,key=value)", whitespace ignored. Not part of the public API.
#pragma once

#include <map>
#include <string>
#include <utility>

namespace diloco {

// Throws OptionError (listing every valid codec) for a malformed spec.
std::pair<std::string, std::map<std::string, std::string>> parse_spec(const std::string& spec);

}  // namespace diloco
