// Blockwise int8/int4/int2 (see blockwise_int.h). Each block is handled while it sits in L1: one
// read of the input for max|x|, then one loop that quantizes into int8 codes, then the packing.
// Every loop is branch-free over raw pointers so that GCC vectorizes it with baseline SSE2.
#include "compress/blockwise_int.h"

#include <ATen/Tensor.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "compress/codec_checks.h"
#include "diloco/errors.h"

#ifdef DILOCO_WITH_CUDA_KERNELS
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/cuda_kernels.h"
#endif

namespace diloco {

const char* const kInt8Help =
    "int8(block=256, rounding=nearest|stochastic, seed=0, clip=0): blockwise symmetric int8, "
    "float32 scale max|x|/127 per block, or min(max|x|, clip * rms)/127 with clip > 0 (8.125 "
    "bits/param at block=256)";
const char* const kInt4Help =
    "int4(block=256, rounding=nearest|stochastic, seed=0, clip=0): blockwise symmetric int4, "
    "float32 scale max|x|/7 per block, or min(max|x|, clip * rms)/7 with clip > 0 (4.125 "
    "bits/param at block=256)";
const char* const kInt3Help =
    "int3(block=256, rounding=nearest|stochastic, seed=0, clip=0): blockwise symmetric int3, "
    "float32 scale max|x|/3 per block, or min(max|x|, clip * rms)/3 with clip > 0 (3.125 "
    "bits/param at block=256)";
const char* const kInt2Help =
    "int2(block=256, rounding=nearest|stochastic, seed=0, clip=0): blockwise symmetric int2 "
    "{-1,0,1}, float32 scale max|x| per block, or min(max|x|, clip * rms) with clip > 0 (2.125 "
    "bits/param at block=256)";

namespace {

// 1.5 * 2^23: adding and subtracting it rounds |t| < 2^22 to an integer, ties to even, with two
// float adds (std::nearbyint needs SSE4.1 to vectorize).
constexpr float kRoundMagic = 12582912.f;
constexpr std::int32_t kExpMask = 0x7f800000;

float bits_float(std::int32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The block scale of blockwise_int.h, edge cases included.
float block_scale(float amax, int qmax) {
  float s = amax / static_cast<float>(qmax);
  if (s == 0.f && amax > 0.f) s = std::numeric_limits<float>::denorm_min();
  if (!std::isfinite(s * static_cast<float>(qmax))) s = std::nextafter(s, 0.f);
  return s;
}

// Codes with round-half-even, clamped to [-qmax, qmax]. Clamping first keeps |t| small for the
// magic-number rounding, and the comparisons send a NaN to -qmax (no undefined conversion).
void quantize_nearest(const float* x, std::int64_t len, float s, float qmax, std::int8_t* q) {
  for (std::int64_t i = 0; i < len; ++i) {
    float t = x[i] / s;
    t = t > -qmax ? t : -qmax;
    t = t < qmax ? t : qmax;
    t = (t + kRoundMagic) - kRoundMagic;
    q[i] = static_cast<std::int8_t>(static_cast<std::int32_t>(t));
  }
}

// lowbias32 (an integer hash with low bias, by C. Wellons): all 32-bit lane operations, so the
// loop below vectorizes.
inline std::uint32_t mix32(std::uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Codes floor(x / s + u) with u drawn for stream elements first, first + 1, ... (see the header):
// the float-to-int conversion truncates toward zero, so subtract one where that went up
// (negative non-integers). The hash's 32-bit multiplies need SSE4.1/AVX2 to vectorize well, so
// x86-64 builds also carry an AVX2 clone, picked at load time where the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void quantize_stochastic(const float* x, std::uint32_t first, std::uint32_t key, std::int64_t len,
                         float s, float qmax, std::int8_t* q) {
  for (std::int64_t i = 0; i < len; ++i) {
    const std::uint32_t h = mix32(((first + static_cast<std::uint32_t>(i)) * 0x9e3779b9u) ^ key);
    const float u = static_cast<float>(static_cast<std::int32_t>(h >> 8)) * (1.f / 16777216.f);
    float t = x[i] / s;
    t = t > -qmax ? t : -qmax;
    t = t < qmax ? t : qmax;
    const float v = t + u;
    std::int32_t c = static_cast<std::int32_t>(v);
    c -= static_cast<float>(c) > v ? 1 : 0;
    c = c < static_cast<std::int32_t>(qmax) ? c : static_cast<std::int32_t>(qmax);
    q[i] = static_cast<std::int8_t>(c);
  }
}

// Packs len codes (q padded with zeros to a multiple of 8/bits) little-endian into bytes.
template <int kBits>
void pack(const std::int8_t* q, std::int64_t len, std::uint8_t* out) {
  if constexpr (kBits == 8) {
    std::memcpy(out, q, static_cast<std::size_t>(len));
  } else if constexpr (kBits == 3) {
    // Eight codes in three bytes: code k of a group in bits 3k..3k+2 of a 24-bit little-endian
    // word. The codes are padded with zeros, so a partial last group writes only its bytes.
    const std::int64_t bytes = (len * 3 + 7) / 8;
    for (std::int64_t g = 0; 3 * g < bytes; ++g) {
      std::uint32_t v = 0;
      for (int k = 0; k < 8; ++k) v |= static_cast<std::uint32_t>(q[8 * g + k] & 7) << (3 * k);
      for (int b = 0; b < 3 && 3 * g + b < bytes; ++b) {
        out[3 * g + b] = static_cast<std::uint8_t>(v >> (8 * b));
      }
    }
  } else if constexpr (kBits == 4) {
    for (std::int64_t j = 0; j < (len + 1) / 2; ++j) {
      out[j] = static_cast<std::uint8_t>((q[2 * j] & 0xf) | ((q[2 * j + 1] & 0xf) << 4));
    }
  } else {
    for (std::int64_t j = 0; j < (len + 3) / 4; ++j) {
      out[j] = static_cast<std::uint8_t>((q[4 * j] & 3) | ((q[4 * j + 1] & 3) << 2) |
                                         ((q[4 * j + 2] & 3) << 4) | ((q[4 * j + 3] & 3) << 6));
    }
  }
}

// Decodes one block's codes into q s, returning nonzero when a code is -qmax-1.
template <int kBits>
std::uint32_t unpack_scale(const std::uint8_t* in, std::int64_t len, float s, float* y) {
  std::uint32_t bad = 0;
  if constexpr (kBits == 8) {
    for (std::int64_t i = 0; i < len; ++i) {
      const std::int8_t c = static_cast<std::int8_t>(in[i]);
      bad |= c == -128 ? 1u : 0u;
      y[i] = static_cast<float>(c) * s;
    }
  } else if constexpr (kBits == 3) {
    const std::int64_t bytes = (len * 3 + 7) / 8;
    for (std::int64_t g = 0; 8 * g < len; ++g) {
      std::uint32_t v = 0;
      for (int b = 0; b < 3 && 3 * g + b < bytes; ++b) {
        v |= static_cast<std::uint32_t>(in[3 * g + b]) << (8 * b);
      }
      const std::int64_t count = std::min<std::int64_t>(8, len - 8 * g);
      for (std::int64_t k = 0; k < count; ++k) {
        const int c = static_cast<int>((v >> (3 * k)) & 7);
        bad |= c == 4 ? 1u : 0u;  // -4: never written
        y[8 * g + k] = static_cast<float>(static_cast<std::int8_t>(c << 5) >> 5) * s;
      }
    }
  } else if constexpr (kBits == 4) {
    const std::int64_t pairs = len / 2;
    for (std::int64_t j = 0; j < pairs; ++j) {
      const std::uint8_t b = in[j];
      bad |= ((b & 0xf) == 8 ? 1u : 0u) | ((b >> 4) == 8 ? 1u : 0u);
      // Sign extension: move the nibble to the top of an int8 and shift it back arithmetically.
      y[2 * j] = static_cast<float>(static_cast<std::int8_t>(b << 4) >> 4) * s;
      y[2 * j + 1] = static_cast<float>(static_cast<std::int8_t>(b) >> 4) * s;
    }
    if (len & 1) {
      const std::uint8_t b = in[pairs];
      bad |= (b & 0xf) == 8 ? 1u : 0u;
      y[len - 1] = static_cast<float>(static_cast<std::int8_t>(b << 4) >> 4) * s;
    }
  } else {
    const std::int64_t quads = len / 4;
    for (std::int64_t j = 0; j < quads; ++j) {
      const std::uint8_t b = in[j];
      // Code 0b10 (-2) in any of the four fields: bit 1 set and bit 0 clear.
      bad |= (b & ~(b << 1)) & 0xaa;
      y[4 * j] = static_cast<float>(static_cast<std::int8_t>(b << 6) >> 6) * s;
      y[4 * j + 1] = static_cast<float>(static_cast<std::int8_t>(b << 4) >> 6) * s;
      y[4 * j + 2] = static_cast<float>(static_cast<std::int8_t>(b << 2) >> 6) * s;
      y[4 * j + 3] = static_cast<float>(static_cast<std::int8_t>(b) >> 6) * s;
    }
    for (std::int64_t i = 4 * quads; i < len; ++i) {
      const int c = (in[quads] >> (2 * (i - 4 * quads))) & 3;
      bad |= c == 2 ? 1u : 0u;
      y[i] = static_cast<float>(static_cast<std::int8_t>(c << 6) >> 6) * s;
    }
  }
  return bad;
}

#ifdef DILOCO_WITH_CUDA_KERNELS
// CUDA tensors (nearest rounding): the payload is made or read on the tensor's device by the
// kernels of kernels/cuda_kernels.cu, bit-identical to the CPU loops above, and copied from or to
// the host buffer on the current stream; errors carry the CPU path's messages.
void encode_cuda(const std::string& name, int bits, std::int64_t block, const at::Tensor& x,
                 std::uint8_t* out) {
  const c10::cuda::CUDAGuard guard(x.device());
  void* stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const std::int64_t n = x.numel();
  const std::int64_t bytes = kernels::cuda::blockwise_int_payload_bytes(n, bits, block);
  at::Tensor payload = at::empty({bytes}, x.options().dtype(at::kByte));
  at::Tensor word = at::empty({1}, x.options().dtype(at::kLong));
  auto* status = reinterpret_cast<std::uint64_t*>(word.data_ptr<std::int64_t>());
  kernels::cuda::blockwise_int_encode_async(x.data_ptr<float>(), n, bits, block,
                                            payload.data_ptr<std::uint8_t>(), status, stream);
  kernels::cuda::copy_async(out, payload.data_ptr<std::uint8_t>(), static_cast<std::size_t>(bytes),
                            stream);
  const std::uint64_t bad = kernels::cuda::read_status(status, stream);
  if (bad != kernels::cuda::kNoReport) {
    throw Error("[codec '" + name + "'] cannot encode a non-finite input (element " +
                std::to_string(bad) + ", block " + std::to_string(bad / static_cast<std::uint64_t>(block)) + ")");
  }
}

void decode_cuda(const std::string& name, int bits, std::int64_t block, const std::uint8_t* payload,
                 std::int64_t bytes, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  void* stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
  const std::int64_t n = out.numel();
  at::Tensor on_device = at::empty({bytes}, out.options().dtype(at::kByte));
  at::Tensor word = at::empty({1}, out.options().dtype(at::kLong));
  auto* status = reinterpret_cast<std::uint64_t*>(word.data_ptr<std::int64_t>());
  kernels::cuda::copy_async(on_device.data_ptr<std::uint8_t>(), payload,
                            static_cast<std::size_t>(bytes), stream);
  kernels::cuda::blockwise_int_decode_async(on_device.data_ptr<std::uint8_t>(), n, bits, block,
                                            out.data_ptr<float>(), status, stream);
  const std::uint64_t fault = kernels::cuda::read_status(status, stream);
  if (fault == kernels::cuda::kNoReport) return;
  const std::int64_t j = static_cast<std::int64_t>(fault >> 3);
  const std::int64_t start = j * block;
  const std::int64_t len = std::min(block, n - start);
  const int qmax = (1 << (bits - 1)) - 1;
  float s;
  std::memcpy(&s, payload + j * (4 + block * bits / 8), 4);
  std::string what;
  switch (static_cast<kernels::cuda::PayloadFault>(fault & 7)) {
    case kernels::cuda::PayloadFault::kScaleNotFinite:
      what = "scale " + std::to_string(s) + " is not finite";
      break;
    case kernels::cuda::PayloadFault::kScaleNegative:
      what = "scale " + std::to_string(s) + " is negative";
      break;
    case kernels::cuda::PayloadFault::kScaleOverflows:
      what = "scale " + std::to_string(s) + " times " + std::to_string(qmax) + " overflows float32";
      break;
    case kernels::cuda::PayloadFault::kCodeOutOfRange:
      what = "code " + std::to_string(-qmax - 1) + " is out of range [" + std::to_string(-qmax) +
             ", " + std::to_string(qmax) + "]";
      break;
    default:
      what = "padding bits of the last byte are not zero";
      break;
  }
  throw Error("[codec '" + name + "'] malformed payload: block " + std::to_string(j) +
              " (elements " + std::to_string(start) + ".." + std::to_string(start + len - 1) +
              "): " + what);
}
#endif

// Validated before qmax_ is derived from it.
int checked_bits(int bits) {
  if (bits != 8 && bits != 4 && bits != 3 && bits != 2) {
    throw OptionError("[codec 'int" + std::to_string(bits) + "'] bits must be 8, 4, 3 or 2");
  }
  return bits;
}

}  // namespace

BlockwiseIntCodec::BlockwiseIntCodec(int bits, std::int64_t block, Rounding rounding,
                                     std::uint32_t seed, double clip)
    : bits_(checked_bits(bits)),
      qmax_((1 << (bits_ - 1)) - 1),
      block_(block),
      rounding_(rounding),
      seed_(seed),
      clip_(clip) {
  if (block < 32 || block > 4096 || (block & (block - 1)) != 0) {
    throw OptionError("[codec '" + name() + "'] block must be a power of two in [32, 4096], got '" +
                      std::to_string(block) + "'");
  }
  if (!(clip == 0.0 || (clip >= kMinClip && clip <= kMaxClip))) {
    throw OptionError("[codec '" + name() + "'] clip must be 0 (off) or a number in [" +
                      exact_decimal(kMinClip) + ", " + exact_decimal(kMaxClip) + "], got '" +
                      exact_decimal(clip) + "'");
  }
}

float BlockwiseIntCodec::block_top(const float* x, std::int64_t len, float amax) const {
  if (clip_ == 0.0) return amax;
  double squares = 0.0;
  for (std::int64_t i = 0; i < len; ++i) squares += static_cast<double>(x[i]) * x[i];
  return std::min(amax, static_cast<float>(clip_ * std::sqrt(squares / static_cast<double>(len))));
}

std::string BlockwiseIntCodec::name() const { return "int" + std::to_string(bits_); }

std::string BlockwiseIntCodec::spec() const {
  return name() + "(block=" + std::to_string(block_) +
         ",rounding=" + (rounding_ == Rounding::kNearest ? "nearest" : "stochastic") +
         ",seed=" + std::to_string(seed_) + (clip_ > 0 ? ",clip=" + exact_decimal(clip_) : "") +
         ")";
}

std::int64_t BlockwiseIntCodec::payload_bytes(c10::IntArrayRef shape) const {
  const std::int64_t n = c10::multiply_integers(shape);
  const std::int64_t rem = n % block_;
  return (n / block_) * block_payload_bytes(block_) + (rem ? block_payload_bytes(rem) : 0);
}

void BlockwiseIntCodec::encode(const at::Tensor& x, std::uint8_t* out) {
#ifdef DILOCO_WITH_CUDA_KERNELS
  if (x.is_cuda()) {
    check_cpu_or_cuda_float(name(), x, "input");
    // The CUDA kernels pack whole codes per byte (8, 4, 2 bits), scale by max|x| alone and round
    // to nearest; int3's codes straddle bytes, clipped scales need the block's rms and stochastic
    // rounding draws from the codec's stream, so those CUDA tensors are encoded on the CPU,
    // through a copy (the same payload as from a CPU tensor, the stream advanced alike).
    if (bits_ == 3 || clip_ > 0 || rounding_ != Rounding::kNearest) {
      return encode(x.to(at::kCPU), out);
    }
    encode_cuda(name(), bits_, block_, x, out);
    drawn_ += static_cast<std::uint64_t>((x.numel() + block_ - 1) / block_ * block_);
    return;
  }
#endif
  check_cpu_float(name(), x, "input");
  const std::int64_t n = x.numel();
  const float* in = x.data_ptr<float>();
  const float qmax = static_cast<float>(qmax_);
  // Codes of one block, padded to whole bytes with zeros.
  std::vector<std::int8_t> q(static_cast<std::size_t>(block_) + 8, 0);
  for (std::int64_t start = 0, j = 0; start < n; start += block_, ++j) {
    const std::int64_t len = std::min(block_, n - start);
    const float* xb = in + start;
    const std::int32_t amax_bits = abs_max_bits(xb, len);
    if (amax_bits >= kExpMask) {
      const std::int64_t i = std::find_if(xb, xb + len, [](float v) { return !std::isfinite(v); }) - xb;
      throw Error("[codec '" + name() + "'] cannot encode a non-finite input (element " +
                  std::to_string(start + i) + ", block " + std::to_string(j) + ")");
    }
    const float s = block_scale(block_top(xb, len, bits_float(amax_bits)), qmax_);
    std::memcpy(out, &s, 4);
    out += 4;
    // Every block takes its place in the stochastic stream, even an all-zero one, so that the
    // draws depend on the shapes alone. A block never straddles a 2^32 boundary of the stream
    // (block sizes divide 2^32 and the stream advances by whole blocks).
    const std::uint64_t first = drawn_;
    drawn_ += static_cast<std::uint64_t>(block_);
    if (s == 0.f) {
      std::fill(q.begin(), q.begin() + len, 0);
    } else if (rounding_ == Rounding::kNearest) {
      quantize_nearest(xb, len, s, qmax, q.data());
    } else {
      const std::uint32_t key = mix32(seed_ ^ (0x9e3779b9u * static_cast<std::uint32_t>(first >> 32)) ^ 0x85ebca6bu);
      quantize_stochastic(xb, static_cast<std::uint32_t>(first), key, len, s, qmax, q.data());
    }
    std::fill(q.begin() + len, q.begin() + len + 8, 0);  // padding codes of a partial block
    switch (bits_) {
      case 8: pack<8>(q.data(), len, out); break;
      case 4: pack<4>(q.data(), len, out); break;
      case 3: pack<3>(q.data(), len, out); break;
      default: pack<2>(q.data(), len, out); break;
    }
    out += block_payload_bytes(len) - 4;
  }
}

void BlockwiseIntCodec::decode(const std::uint8_t* payload, std::int64_t bytes,
                               at::Tensor& out) const {
#ifdef DILOCO_WITH_CUDA_KERNELS
  check_cpu_or_cuda_float(name(), out, "output");
#else
  check_cpu_float(name(), out, "output");
#endif
  const std::int64_t n = out.numel();
  const std::int64_t expected = payload_bytes(out.sizes());
  if (bytes != expected) {
    throw Error("[codec '" + name() + "'] malformed payload: " + std::to_string(bytes) +
                " bytes, expected " + std::to_string(expected) + " for " + std::to_string(n) +
                " elements in blocks of " + std::to_string(block_));
  }
#ifdef DILOCO_WITH_CUDA_KERNELS
  if (out.is_cuda()) {
    if (bits_ != 3) return decode_cuda(name(), bits_, block_, payload, bytes, out);
    at::Tensor on_cpu = at::empty(out.sizes(), out.options().device(at::kCPU));  // as encode()
    decode(payload, bytes, on_cpu);
    out.copy_(on_cpu);
    return;
  }
#endif
  float* y = out.data_ptr<float>();
  const float qmax = static_cast<float>(qmax_);
  const std::uint8_t* in = payload;
  for (std::int64_t start = 0, j = 0; start < n; start += block_, ++j) {
    const std::int64_t len = std::min(block_, n - start);
    const std::int64_t code_bytes = block_payload_bytes(len) - 4;
    float s;
    std::memcpy(&s, in, 4);
    in += 4;
    const auto bad_block = [&](const std::string& what) {
      return Error("[codec '" + name() + "'] malformed payload: block " + std::to_string(j) +
                   " (elements " + std::to_string(start) + ".." +
                   std::to_string(start + len - 1) + "): " + what);
    };
    if (!std::isfinite(s)) throw bad_block("scale " + std::to_string(s) + " is not finite");
    if (std::signbit(s)) throw bad_block("scale " + std::to_string(s) + " is negative");
    if (!std::isfinite(s * qmax)) {
      throw bad_block("scale " + std::to_string(s) + " times " + std::to_string(qmax_) +
                      " overflows float32");
    }
    std::uint32_t bad = 0;
    switch (bits_) {
      case 8: bad = unpack_scale<8>(in, len, s, y + start); break;
      case 4: bad = unpack_scale<4>(in, len, s, y + start); break;
      case 3: bad = unpack_scale<3>(in, len, s, y + start); break;
      default: bad = unpack_scale<2>(in, len, s, y + start); break;
    }
    if (bad) {
      throw bad_block("code " + std::to_string(-qmax_ - 1) + " is out of range [" +
                      std::to_string(-qmax_) + ", " + std::to_string(qmax_) + "]");
    }
    const int tail_bits = static_cast<int>((len * bits_) % 8);
    if (tail_bits != 0 && (in[code_bytes - 1] >> tail_bits) != 0) {
      throw bad_block("padding bits of the last byte are not zero");
    }
    in += code_bytes;
  }
}

double BlockwiseIntCodec::error_bound(const at::Tensor& x) const {
  check_cpu_float(name(), x, "input");
  const std::int64_t n = x.numel();
  const float* in = x.data_ptr<float>();
  const double margin = qmax_ * std::ldexp(1.0, -22);
  const double steps = (rounding_ == Rounding::kNearest ? 0.5 : 1.0) + margin;
  double bound = 0.0;
  for (std::int64_t start = 0; start < n; start += block_) {
    const std::int64_t len = std::min(block_, n - start);
    const std::int32_t amax_bits = abs_max_bits(in + start, len);
    if (amax_bits >= kExpMask) return std::numeric_limits<double>::infinity();
    const float amax = bits_float(amax_bits);
    const double s = block_scale(block_top(in + start, len, amax), qmax_);
    // A clipped value decodes to +-qmax s: its error is how far it lies beyond.
    bound = std::max({bound, s * steps, amax - qmax_ * s + s * margin});
  }
  return bound + qmax_ * std::ldexp(1.0, -148);
}

std::unique_ptr<Codec> make_blockwise_int_codec(int bits, CodecParams& params) {
  const std::int64_t block = params.get_power_of_two("block", 256, 32, 4096);
  const std::string rounding = params.get_choice("rounding", "nearest", {"nearest", "stochastic"});
  const std::int64_t seed = params.get_int("seed", 0, 0, 4294967295LL);
  const double clip = params.get_double_or_off("clip", BlockwiseIntCodec::kMinClip,
                                                BlockwiseIntCodec::kMaxClip);
  params.reject_unknown();
  return std::make_unique<BlockwiseIntCodec>(
      bits, block,
      rounding == "nearest" ? BlockwiseIntCodec::Rounding::kNearest
                            : BlockwiseIntCodec::Rounding::kStochastic,
      static_cast<std::uint32_t>(seed), clip);
}

}  // namespace diloco
