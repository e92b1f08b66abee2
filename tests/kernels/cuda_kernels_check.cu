// Checks the CUDA kernels (libdiloco/src/kernels/cuda_kernels.cu) on raw device buffers against
// references on the host: the outer SGD step against the CPU's fused loop (kernels::outer_sgd,
// linked in), bit for bit; the blockwise int codec against a plain scalar encoder/decoder written
// from the format in compress/blockwise_int.h, byte for byte. No LibTorch.
//
// Usage: cuda_kernels_check   (exit 0 pass, 1 fail, 77 no CUDA device: ctest reports a skip)
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "diloco/errors.h"
#include "kernels/cpu_kernels.h"
#include "kernels/cuda_kernels.h"

namespace {

namespace kc = diloco::kernels::cuda;

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw diloco::Error(std::string(what) + ": " + cudaGetErrorString(e));
  }
}

// A device buffer of T.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    cuda_check(cudaMalloc(&p_, std::max<std::size_t>(n, 1) * sizeof(T)), "cudaMalloc");
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { cudaFree(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() { return p_; }
  void upload(const std::vector<T>& host) {
    cuda_check(cudaMemcpy(p_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
               "upload");
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    cuda_check(cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return host;
  }

 private:
  T* p_ = nullptr;
  std::size_t n_;
};

// Deterministic test data: a 64-bit LCG, values of widely varying magnitude per 64 elements.
std::vector<float> test_data(std::int64_t n, std::uint64_t seed) {
  std::uint64_t state = seed * 6364136223846793005ull + 1442695040888963407ull;
  std::vector<float> x(static_cast<std::size_t>(n));
  float magnitude = 1.f;
  for (std::int64_t i = 0; i < n; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const double u = static_cast<double>(state >> 11) * 0x1.0p-53;
    if (i % 64 == 0)
      magnitude = static_cast<float>(std::ldexp(1.0, static_cast<int>(state % 41) - 20));
    x[static_cast<std::size_t>(i)] = static_cast<float>((2.0 * u - 1.0) * magnitude);
  }
  return x;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b, std::int64_t* first) {
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], 4) != 0) {
      *first = static_cast<std::int64_t>(i);
      return false;
    }
  }
  return a.size() == b.size();
}

// ---- outer SGD ---------------------------------------------------------------------------------

void check_outer_sgd(std::int64_t n, float mu, bool nesterov, bool alias,
                     const std::vector<std::int64_t>& poison) {
  const std::string name = "outer_sgd n=" + std::to_string(n) + " mu=" + std::to_string(mu) +
                           (nesterov ? " nesterov" : "") + (alias ? " aliased" : "") +
                           " poisoned=" + std::to_string(poison.size());
  std::vector<float> global = test_data(n, 1);
  std::vector<float> momentum = test_data(n, 2);
  std::vector<float> delta = test_data(n, 3);
  for (std::size_t k = 0; k < poison.size(); ++k) {
    delta[static_cast<std::size_t>(poison[k])] =
        k % 2 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
  }
  std::vector<float> back(static_cast<std::size_t>(n), -7.f);
  const float scale = 0.25f, lr = 0.7f;

  DeviceBuffer<float> d_global(global), d_momentum(momentum), d_delta(delta), d_back(back);
  DeviceBuffer<std::uint64_t> word(1);
  kc::outer_sgd_async(d_global.get(), mu == 0.f ? nullptr : d_momentum.get(), d_delta.get(),
                      alias ? d_delta.get() : d_back.get(), n, scale, lr, mu, nesterov, word.get(),
                      nullptr);
  const std::uint64_t bad = kc::read_status(word.get(), nullptr);

  std::vector<float> ref_back = alias ? delta : back;
  const std::int64_t ref_bad = diloco::kernels::outer_sgd(
      global.data(), mu == 0.f ? nullptr : momentum.data(), delta.data(),
      alias ? delta.data() : ref_back.data(), n, scale, lr, mu, nesterov);
  if (alias) ref_back = delta;

  const std::int64_t got_bad = bad == kc::kNoReport ? -1 : static_cast<std::int64_t>(bad);
  expect(got_bad == ref_bad, name + ": first non-finite " + std::to_string(got_bad) + " vs CPU " +
                                 std::to_string(ref_bad));
  std::int64_t at = -1;
  expect(same_bits(d_global.download(), global, &at),
         name + ": global differs at " + std::to_string(at));
  if (mu != 0.f) {
    expect(same_bits(d_momentum.download(), momentum, &at),
           name + ": momentum differs at " + std::to_string(at));
  }
  const std::vector<float> got_back = alias ? d_delta.download() : d_back.download();
  expect(same_bits(got_back, ref_back, &at),
         name + ": write_back differs at " + std::to_string(at));
}

// ---- blockwise int codec: a scalar reference from the format in blockwise_int.h --------------

float ref_scale(float amax, int qmax) {
  float s = amax / static_cast<float>(qmax);
  if (s == 0.f && amax > 0.f) s = std::numeric_limits<float>::denorm_min();
  if (!std::isfinite(s * static_cast<float>(qmax))) s = std::nextafter(s, 0.f);
  return s;
}

std::vector<std::uint8_t> ref_encode(const std::vector<float>& x, int bits, std::int64_t block) {
  const std::int64_t n = static_cast<std::int64_t>(x.size());
  const int qmax = (1 << (bits - 1)) - 1;
  std::vector<std::uint8_t> out;
  for (std::int64_t start = 0; start < n; start += block) {
    const std::int64_t len = std::min(block, n - start);
    float amax = 0.f;
    for (std::int64_t i = 0; i < len; ++i)
      amax = std::max(amax, std::fabs(x[static_cast<std::size_t>(start + i)]));
    const float s = ref_scale(amax, qmax);
    std::uint8_t sb[4];
    std::memcpy(sb, &s, 4);
    out.insert(out.end(), sb, sb + 4);
    std::vector<std::uint8_t> codes(static_cast<std::size_t>((len * bits + 7) / 8), 0);
    for (std::int64_t i = 0; i < len; ++i) {
      int q = 0;
      if (s != 0.f) {
        float t = x[static_cast<std::size_t>(start + i)] / s;
        t = std::min(std::max(t, -static_cast<float>(qmax)), static_cast<float>(qmax));
        q = static_cast<int>(std::nearbyint(t));  // ties to even in the default rounding mode
      }
      const std::int64_t bit = i * bits;
      codes[static_cast<std::size_t>(bit / 8)] |=
          static_cast<std::uint8_t>((static_cast<unsigned>(q) & ((1u << bits) - 1)) << (bit % 8));
    }
    out.insert(out.end(), codes.begin(), codes.end());
  }
  return out;
}

std::vector<float> ref_decode(const std::vector<std::uint8_t>& p, std::int64_t n, int bits,
                              std::int64_t block) {
  std::vector<float> y(static_cast<std::size_t>(n));
  std::size_t off = 0;
  for (std::int64_t start = 0; start < n; start += block) {
    const std::int64_t len = std::min(block, n - start);
    float s;
    std::memcpy(&s, &p[off], 4);
    off += 4;
    for (std::int64_t i = 0; i < len; ++i) {
      const std::int64_t bit = i * bits;
      int q = (p[off + static_cast<std::size_t>(bit / 8)] >> (bit % 8)) & ((1 << bits) - 1);
      if (q >= (1 << (bits - 1))) q -= 1 << bits;
      y[static_cast<std::size_t>(start + i)] = static_cast<float>(q) * s;
    }
    off += static_cast<std::size_t>((len * bits + 7) / 8);
  }
  return y;
}

void check_codec(std::vector<float> x, int bits, std::int64_t block, const std::string& what) {
  const std::int64_t n = static_cast<std::int64_t>(x.size());
  const std::string name = "int" + std::to_string(bits) + " block=" + std::to_string(block) +
                           " n=" + std::to_string(n) + " " + what;
  const std::int64_t bytes = kc::blockwise_int_payload_bytes(n, bits, block);
  const std::vector<std::uint8_t> ref = ref_encode(x, bits, block);
  expect(bytes == static_cast<std::int64_t>(ref.size()), name + ": payload size");

  DeviceBuffer<float> d_x(x);
  DeviceBuffer<std::uint8_t> d_payload(static_cast<std::size_t>(bytes));
  DeviceBuffer<std::uint64_t> word(1);
  kc::blockwise_int_encode_async(d_x.get(), n, bits, block, d_payload.get(), word.get(), nullptr);
  expect(kc::read_status(word.get(), nullptr) == kc::kNoReport, name + ": reported non-finite");
  const std::vector<std::uint8_t> got = d_payload.download();
  const auto diff = std::mismatch(got.begin(), got.end(), ref.begin());
  expect(got == ref,
         name + ": payload differs at byte " + std::to_string(diff.first - got.begin()));

  DeviceBuffer<float> d_y(static_cast<std::size_t>(n));
  d_payload.upload(ref);
  kc::blockwise_int_decode_async(d_payload.get(), n, bits, block, d_y.get(), word.get(), nullptr);
  expect(kc::read_status(word.get(), nullptr) == kc::kNoReport, name + ": decode reported a fault");
  std::int64_t at = -1;
  expect(same_bits(d_y.download(), ref_decode(ref, n, bits, block), &at),
         name + ": decoded values differ at " + std::to_string(at));
}

void check_codec_faults() {
  const int bits = 4;
  const std::int64_t block = 64, n = 64 * 3 + 5;  // a partial last block of 5 codes: 4 padding bits
  const std::vector<float> x = test_data(n, 9);
  const std::vector<std::uint8_t> good = ref_encode(x, bits, block);
  const std::int64_t per_block = 4 + block * bits / 8;

  // Non-finite input: the first bad element is reported.
  std::vector<float> poisoned = x;
  poisoned[150] = std::numeric_limits<float>::infinity();
  poisoned[70] = std::numeric_limits<float>::quiet_NaN();
  poisoned[190] = std::numeric_limits<float>::quiet_NaN();
  {
    DeviceBuffer<float> d_x(poisoned);
    DeviceBuffer<std::uint8_t> d_payload(good.size());
    DeviceBuffer<std::uint64_t> word(1);
    kc::blockwise_int_encode_async(d_x.get(), n, bits, block, d_payload.get(), word.get(), nullptr);
    const std::uint64_t bad = kc::read_status(word.get(), nullptr);
    expect(bad == 70, "encode non-finite: reported " + std::to_string(bad) + ", expected 70");
  }

  struct Case {
    const char* what;
    std::int64_t byte;
    std::uint8_t value;
    std::uint64_t expected;
  };
  const float neg = -1.f, inf = std::numeric_limits<float>::infinity(), big = 3.0e38f;
  std::uint8_t neg_b[4], inf_b[4], big_b[4];
  std::memcpy(neg_b, &neg, 4);
  std::memcpy(inf_b, &inf, 4);
  std::memcpy(big_b, &big, 4);
  const std::uint64_t code = static_cast<std::uint64_t>(kc::PayloadFault::kCodeOutOfRange);
  const std::uint64_t pad = static_cast<std::uint64_t>(kc::PayloadFault::kPaddingNotZero);
  std::vector<std::pair<std::string, std::vector<std::uint8_t>>> payloads;
  std::vector<std::uint64_t> expected;
  auto with = [&](std::int64_t at, const std::uint8_t* b, int count) {
    std::vector<std::uint8_t> p = good;
    std::copy(b, b + count, p.begin() + at);
    return p;
  };
  const std::uint8_t minus8_low = 0x08, minus8_high = 0x80, padding = 0xf0;
  payloads.push_back({"scale not finite (block 1)", with(per_block, inf_b, 4)});
  expected.push_back((1u << 3) | static_cast<std::uint64_t>(kc::PayloadFault::kScaleNotFinite));
  payloads.push_back({"scale negative (block 2)", with(2 * per_block, neg_b, 4)});
  expected.push_back((2u << 3) | static_cast<std::uint64_t>(kc::PayloadFault::kScaleNegative));
  payloads.push_back({"scale overflows (block 0)", with(0, big_b, 4)});
  expected.push_back(static_cast<std::uint64_t>(kc::PayloadFault::kScaleOverflows));
  payloads.push_back({"code -8 low nibble (block 1)", with(per_block + 4 + 10, &minus8_low, 1)});
  expected.push_back((1u << 3) | code);
  payloads.push_back(
      {"code -8 high nibble (block 2)", with(2 * per_block + 4 + 31, &minus8_high, 1)});
  expected.push_back((2u << 3) | code);
  payloads.push_back({"padding (block 3)", with(3 * per_block + 4 + 2, &padding, 1)});
  expected.push_back((3u << 3) | pad);
  {
    // Two faulty blocks: the earlier one is reported.
    std::vector<std::uint8_t> p = with(2 * per_block, neg_b, 4);
    p[static_cast<std::size_t>(per_block + 4)] = minus8_low;
    payloads.push_back({"two faulty blocks", p});
    expected.push_back((1u << 3) | code);
  }
  for (std::size_t k = 0; k < payloads.size(); ++k) {
    DeviceBuffer<std::uint8_t> d_payload(payloads[k].second);
    DeviceBuffer<float> d_y(static_cast<std::size_t>(n));
    DeviceBuffer<std::uint64_t> word(1);
    kc::blockwise_int_decode_async(d_payload.get(), n, bits, block, d_y.get(), word.get(), nullptr);
    const std::uint64_t fault = kc::read_status(word.get(), nullptr);
    expect(fault == expected[k], "decode " + payloads[k].first + ": reported " +
                                     std::to_string(fault) + ", expected " +
                                     std::to_string(expected[k]));
  }
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP no CUDA device\n");
    return 77;
  }
  try {
    const std::int64_t b = 2048;
    for (bool alias : {false, true}) {
      check_outer_sgd(5 * b + 100, 0.9f, true, alias, {});
      check_outer_sgd(5 * b + 100, 0.9f, false, alias, {});
      check_outer_sgd(5 * b + 100, 0.f, false, alias, {});
      // Blocks 2 and 4 hold non-finite sums (the first at 2b + 77); block 5 is partial.
      check_outer_sgd(5 * b + 100, 0.9f, true, alias,
                      {4 * b + 1, 2 * b + 77, 2 * b + 1000, 5 * b + 99});
    }
    check_outer_sgd(1, 0.9f, true, false, {});
    check_outer_sgd(0, 0.9f, true, false, {});

    for (int bits : {8, 4, 2}) {
      for (std::int64_t block : {32, 256, 4096}) {
        for (std::int64_t n :
             {std::int64_t{0}, std::int64_t{1}, std::int64_t{31}, block, 3 * block + 17}) {
          check_codec(test_data(n, static_cast<std::uint64_t>(bits * 1000 + n)), bits, block,
                      "random");
        }
      }
      const int qmax = (1 << (bits - 1)) - 1;
      // Exact ties: every block of 32 opens with qmax, so s = 1 and x / s = k / 2 exactly.
      std::vector<float> ties;
      for (int k = -2 * qmax; k <= 2 * qmax; ++k) {
        if (ties.size() % 32 == 0) ties.push_back(static_cast<float>(qmax));
        ties.push_back(0.5f * static_cast<float>(k));
      }
      check_codec(ties, bits, 32, "ties");
      // An all-zero block, a subnormal-scale block, a block near FLT_MAX, negative zeros.
      std::vector<float> edges(4 * 64, 0.f);
      for (int i = 0; i < 64; ++i) {
        edges[64 + i] =
            (i % 3 ? 1 : -1) * std::numeric_limits<float>::denorm_min() * static_cast<float>(i % 5);
        edges[128 + i] = (i % 2 ? 1.f : -1.f) * std::numeric_limits<float>::max() /
                         static_cast<float>(1 + i % 7);
        edges[192 + i] = i % 2 ? -0.f : 1e-30f * static_cast<float>(i);
      }
      check_codec(edges, bits, 64, "edges");
    }
    check_codec_faults();
  } catch (const std::exception& e) {
    std::printf("FAIL exception: %s\n", e.what());
    return 1;
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}
