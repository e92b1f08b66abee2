// Shared codec checks (see codec_checks.h).
#include "compress/codec_checks.h"

#include <cstring>

#include "diloco/errors.h"

namespace diloco {

void check_cpu_float(const std::string& codec, const at::Tensor& t, const char* what) {
  if (t.scalar_type() != at::kFloat || !t.device().is_cpu() || !t.is_contiguous()) {
    throw Error("[codec '" + codec + "'] " + what +
                " must be a contiguous float32 CPU tensor, got " +
                std::string(c10::toString(t.scalar_type())) + " on " + t.device().str() +
                (t.is_contiguous() ? "" : " (not contiguous)"));
  }
}

void check_cpu_or_cuda_float(const std::string& codec, const at::Tensor& t, const char* what) {
  if (t.scalar_type() != at::kFloat || !(t.device().is_cpu() || t.device().is_cuda()) ||
      !t.is_contiguous()) {
    throw Error("[codec '" + codec + "'] " + what +
                " must be a contiguous float32 CPU or CUDA tensor, got " +
                std::string(c10::toString(t.scalar_type())) + " on " + t.device().str() +
                (t.is_contiguous() ? "" : " (not contiguous)"));
  }
}

std::int32_t abs_max_bits(const float* x, std::int64_t len) {
  std::int32_t m = 0;
  for (std::int64_t i = 0; i < len; ++i) {
    std::int32_t u;
    std::memcpy(&u, x + i, 4);
    u &= 0x7fffffff;
    m = u > m ? u : m;
  }
  return m;
}

}  // namespace diloco
