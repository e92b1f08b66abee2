// Per-chunk top-k (SparseLoCo) (see topk.h).
#include "compress/topk.h"

#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <numeric>
#include <sstream>

#include "compress/codec_checks.h"
#include "diloco/errors.h"

namespace diloco {

const char* const kTopkHelp =
    "topk(k=64, chunk=64, vector_chunk=4096, values=fp32|fp16|2bit): SparseLoCo per-chunk top-k "
    "(k largest |x| per 64x64 tile or 4096-run, 12-bit indices), all-gathered";

// ---- TopkCodec ----

TopkCodec::TopkCodec(std::int64_t k, std::int64_t chunk, std::int64_t vector_chunk, Values values)
    : k_(k), chunk_(chunk), vector_chunk_(vector_chunk), values_(values) {}

namespace {

SparseValues sparse_values(TopkCodec::Values v) {
  switch (v) {
    case TopkCodec::Values::kFp16:
      return SparseValues::kFp16;
    case TopkCodec::Values::kTwoBit:
      return SparseValues::kTwoBit;
    case TopkCodec::Values::kFp32:
      break;
  }
  return SparseValues::kFp32;
}

const char* values_name(TopkCodec::Values v) {
  switch (v) {
    case TopkCodec::Values::kFp16:
      return "fp16";
    case TopkCodec::Values::kTwoBit:
      return "2bit";
    case TopkCodec::Values::kFp32:
      break;
  }
  return "fp32";
}

}  // namespace

std::string TopkCodec::spec() const {
  return "topk(k=" + std::to_string(k_) + ",chunk=" + std::to_string(chunk_) +
         ",vector_chunk=" + std::to_string(vector_chunk_) + ",values=" + values_name(values_) + ")";
}

std::int64_t TopkCodec::payload_bytes(c10::IntArrayRef shape) const {
  return SparseChunkCoder("topk", k_, sparse_values(values_))
      .payload_bytes(ChunkGrid(shape, chunk_, vector_chunk_));
}

void TopkCodec::encode(const at::Tensor& x, std::uint8_t* out) {
  check_cpu_float("topk", x, "encode input");
  SparseChunkCoder("topk", k_, sparse_values(values_))
      .encode(x.data_ptr<float>(), ChunkGrid(x.sizes(), chunk_, vector_chunk_), out);
}

void TopkCodec::decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const {
  check_cpu_float("topk", out, "decode output");
  const SparseChunkCoder coder("topk", k_, sparse_values(values_));
  const ChunkGrid grid(out.sizes(), chunk_, vector_chunk_);
  const std::int64_t expected = coder.payload_bytes(grid);
  if (bytes != expected) {
    throw Error("[codec topk] payload of " + std::to_string(bytes) + " bytes for shape " +
                c10::str(out.sizes()) + ", expected " + std::to_string(expected) + " (" + spec() +
                ")");
  }
  coder.decode(payload, bytes, grid, out.data_ptr<float>());
}

double TopkCodec::error_bound(const at::Tensor& x) const {
  check_cpu_float("topk", x, "error_bound input");
  const SparseChunkCoder coder("topk", k_, sparse_values(values_));
  double bound = 0;
  for (const auto& st :
       coder.chunk_stats(x.data_ptr<float>(), ChunkGrid(x.sizes(), chunk_, vector_chunk_))) {
    double value_err = 0;
    switch (values_) {
      case Values::kFp32:
        break;
      case Values::kFp16:
        value_err = st.max_kept * std::ldexp(1.0, -11) + std::ldexp(1.0, -25) +
                    std::max(0.0, st.max_kept - kHalfMax);
        break;
      case Values::kTwoBit:
        value_err = std::max(st.mean_kept, st.max_kept - st.mean_kept) * (1 + std::ldexp(1.0, -20));
        break;
    }
    bound = std::max(bound, st.max_dropped + value_err);
  }
  return bound;
}

std::unique_ptr<Codec> make_topk_codec(CodecParams& params) {
  const std::int64_t k = params.get_int("k", 64, 1, 4096);
  const std::int64_t chunk = params.get_power_of_two("chunk", 64, 8, 256);
  const std::int64_t vector_chunk = params.get_power_of_two("vector_chunk", 4096, 64, 65536);
  const std::string values = params.get_choice("values", "fp32", {"fp32", "fp16", "2bit"});
  params.reject_unknown();
  const TopkCodec::Values v = values == "fp16"   ? TopkCodec::Values::kFp16
                              : values == "2bit" ? TopkCodec::Values::kTwoBit
                                                 : TopkCodec::Values::kFp32;
  return std::make_unique<TopkCodec>(k, chunk, vector_chunk, v);
}

}  // namespace diloco
