// Helpers shared by the codec tests (tests/compress): the shapes every codec's own test covers,
// building a codec from its name and parameters through the library's registry (its own spec
// parser included), and encoding into guarded buffers. No assertions about any one codec here.
#pragma once

#include <ATen/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "diloco/compress/codec.h"

namespace diloco_test {

// 0-d, one element, odd, longer than a chunk, whole tiles, ragged tiles, three dimensions.
const std::vector<std::vector<std::int64_t>>& codec_shapes();

// make_codec("dct(chunk=8,k=8)") from {"dct", {{"chunk", "8"}, {"k", "8"}}}: what a user's spec
// builds, through the same parser and the same unknown-parameter check.
std::unique_ptr<diloco::Codec> make_codec_with(
    const std::string& name, const std::map<std::string, std::string>& values = {});

// Encodes x into exactly payload_bytes(x.sizes()) bytes. The buffer has guard bytes after the
// payload, and an encoder that writes past its size fails the test (REQUIRE).
std::vector<std::uint8_t> encode_payload(diloco::Codec& codec, const at::Tensor& x);

// Decodes `payload` into a new float32 tensor of this shape.
at::Tensor decode_payload(const diloco::Codec& codec, const std::vector<std::uint8_t>& payload,
                          c10::IntArrayRef shape);

// The same for codecs whose payload is an array of float32 (random-k): a test can add the
// payloads of two islands as the all-reduce does.
std::vector<float> encode_floats(diloco::Codec& codec, const at::Tensor& x);
at::Tensor decode_floats(const diloco::Codec& codec, const std::vector<float>& payload,
                         c10::IntArrayRef shape);

// Registers `name`: the codec `inner` (a spec) whose every payload `tamper` changes after it is
// encoded; it spells its spec as `inner` does, so an island running it passes for one running
// `inner` (a hostile island, to the others and to the configuration check).
void register_tampering_codec(const std::string& name, const std::string& inner,
                              std::function<void(std::uint8_t*, std::int64_t)> tamper);

}  // namespace diloco_test
