// Codecs by name: make_codec("int8(block=256)") builds one; an unknown name or parameter throws
// OptionError listing every valid name with its parameters. User code can add its own codecs.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "diloco/compress/codec.h"
#include "diloco/compress/codec_params.h"

namespace diloco {

// Parses "name" or "name(key=value,...)" and builds the codec.
std::unique_ptr<Codec> make_codec(const std::string& spec);

// One line per codec: "int8(block=256, rounding=nearest|stochastic): blockwise int8 ...".
std::vector<std::string> codec_help();

// Adds a codec under `name` (after the built-in ones; a built-in name cannot be replaced).
// `help` is the line codec_help() shows. The factory reads its parameters from CodecParams.
using CodecFactory = std::function<std::unique_ptr<Codec>(CodecParams&)>;
void register_codec(const std::string& name, const std::string& help, CodecFactory factory);

}  // namespace diloco
