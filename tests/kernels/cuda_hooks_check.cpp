// Checks that the library's CUDA paths give what its CPU paths give, through the public entry
// points: OuterSGD::step on CUDA tensors against the same step on CPU tensors (bit for bit, the
// same first non-finite index), and BlockwiseIntCodec encode/decode of CUDA tensors against CPU
// tensors (identical payloads, identical decoded values, the same error messages). Built and
// registered only when the library has the CUDA kernels (DILOCO_WITH_CUDA_KERNELS).
//
// Usage: cuda_hooks_check   (exit 0 pass, 1 fail, 77 no CUDA device: ctest reports a skip)
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "compress/blockwise_int.h"
#include "diloco/errors.h"
#include "diloco/outer/outer_sgd.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.cpu().contiguous(), y = b.cpu().contiguous();
  return x.numel() == y.numel() &&
         std::memcmp(x.data_ptr(), y.data_ptr(), static_cast<std::size_t>(x.numel()) * 4) == 0;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

void check_outer(diloco::OuterSGDOptions options, bool poison) {
  const std::string name = "OuterSGD lr=" + std::to_string(options.lr) +
                           " momentum=" + std::to_string(options.momentum) +
                           (options.nesterov ? " nesterov" : "") + (poison ? " poisoned" : "");
  const diloco::OuterSGD opt(options);
  const std::int64_t n = 5 * 2048 + 123;
  at::Tensor global = at::randn({n}) * 3;
  at::Tensor delta = at::randn({n});
  if (poison) {
    delta[3 * 2048 + 5] = std::numeric_limits<float>::quiet_NaN();
    delta[4 * 2048 + 7] = std::numeric_limits<float>::infinity();
  }
  at::Tensor momentum = opt.make_state(global);
  at::Tensor g_cuda = global.cuda(), d_cuda = delta.cuda();
  at::Tensor m_cuda = momentum.defined() ? momentum.cuda() : at::Tensor();
  for (int step = 0; step < 3; ++step) {  // three steps: momentum carries over
    at::Tensor back = delta.clone(), back_cuda = d_cuda.clone();  // write_back aliases delta_sum
    const std::int64_t bad = opt.step(global, momentum, back, 0.25, back);
    const std::int64_t bad_cuda = opt.step(g_cuda, m_cuda, back_cuda, 0.25, back_cuda);
    expect(bad == bad_cuda, name + ": first non-finite " + std::to_string(bad_cuda) + " vs CPU " +
                                std::to_string(bad));
    expect(same_bits(global, g_cuda), name + ": global differs");
    expect(same_bits(back, back_cuda), name + ": write_back differs");
    if (momentum.defined()) expect(same_bits(momentum, m_cuda), name + ": momentum differs");
  }
}

void check_codec(int bits, std::int64_t block, std::int64_t n) {
  const std::string name =
      "int" + std::to_string(bits) + " block=" + std::to_string(block) + " n=" + std::to_string(n);
  diloco::BlockwiseIntCodec cpu(bits, block, diloco::BlockwiseIntCodec::Rounding::kNearest, 0);
  diloco::BlockwiseIntCodec gpu(bits, block, diloco::BlockwiseIntCodec::Rounding::kNearest, 0);
  at::Tensor x = at::randn({n}) * at::exp(at::randn({n}) * 4);
  const std::int64_t bytes = cpu.payload_bytes(x.sizes());
  std::vector<std::uint8_t> p_cpu(static_cast<std::size_t>(bytes)), p_gpu(p_cpu.size(), 0xab);
  cpu.encode(x, p_cpu.data());
  gpu.encode(x.cuda(), p_gpu.data());
  expect(p_cpu == p_gpu, name + ": payloads differ");
  at::Tensor y = at::empty({n}), y_cuda = at::empty({n}, at::TensorOptions().device(at::kCUDA));
  cpu.decode(p_cpu.data(), bytes, y);
  gpu.decode(p_cpu.data(), bytes, y_cuda);
  expect(same_bits(y, y_cuda), name + ": decoded values differ");

  if (n > block) {  // malformed payload: a negative scale in block 1, same message on both
    std::vector<std::uint8_t> bad = p_cpu;
    const std::int64_t per_block = 4 + block * bits / 8;
    bad[static_cast<std::size_t>(per_block + 3)] |= 0x80;
    const std::string m_cpu = message_of([&] { cpu.decode(bad.data(), bytes, y); });
    const std::string m_gpu = message_of([&] { gpu.decode(bad.data(), bytes, y_cuda); });
    expect(m_cpu == m_gpu, name + ": decode errors differ: '" + m_cpu + "' vs '" + m_gpu + "'");
    at::Tensor poisoned = x.clone();
    poisoned[n - 1] = std::numeric_limits<float>::infinity();
    const std::string e_cpu = message_of([&] { cpu.encode(poisoned, p_cpu.data()); });
    const std::string e_gpu = message_of([&] { gpu.encode(poisoned.cuda(), p_gpu.data()); });
    expect(e_cpu == e_gpu, name + ": encode errors differ: '" + e_cpu + "' vs '" + e_gpu + "'");
  }
}

}  // namespace

int main() {
  if (!at::hasCUDA()) {
    std::printf("SKIP no CUDA device\n");
    return 77;
  }
  try {
    at::manual_seed(0);
    check_outer(diloco::OuterSGDOptions{}, false);
    check_outer(diloco::OuterSGDOptions{}, true);
    diloco::OuterSGDOptions plain;
    plain.nesterov = false;
    check_outer(plain, false);
    check_outer(diloco::OuterSGDOptions::averaging(), true);
    for (int bits : {8, 4, 3, 2}) {  // int3 through its copy to the CPU
      for (std::int64_t block : {32, 256, 4096}) {
        for (std::int64_t n : {std::int64_t{1}, block, 3 * block + 17}) check_codec(bits, block, n);
      }
    }
    // Stochastic rounding and clipped scales: CUDA tensors go through the CPU; the payloads are
    // a CPU tensor's, twice in a row (the random stream advances alike).
    for (double clip : {0.0, 2.0}) {
      const auto stochastic = diloco::BlockwiseIntCodec::Rounding::kStochastic;
      diloco::BlockwiseIntCodec cpu(4, 256, stochastic, 3, clip);
      diloco::BlockwiseIntCodec gpu(4, 256, stochastic, 3, clip);
      const at::Tensor x = at::randn({1000});
      const auto bytes = static_cast<std::size_t>(cpu.payload_bytes(x.sizes()));
      for (int round = 0; round < 2; ++round) {
        std::vector<std::uint8_t> p_cpu(bytes), p_gpu(bytes, 0xab);
        cpu.encode(x, p_cpu.data());
        gpu.encode(x.cuda(), p_gpu.data());
        expect(p_cpu == p_gpu, "int4 stochastic clip=" + std::to_string(clip) + " round " +
                                   std::to_string(round) + ": payloads differ");
      }
    }
  } catch (const std::exception& e) {
    std::printf("FAIL exception: %s\n", e.what());
    return 1;
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}
