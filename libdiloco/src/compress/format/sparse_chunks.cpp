// The chunked sparse payload format (see sparse_chunks.h).
#include "compress/format/sparse_chunks.h"

#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <numeric>
#include <sstream>

#include "diloco/errors.h"

namespace diloco {

namespace {

// 2-bit scales stay below this so that (4/3) * scale is a finite float.
constexpr double kMaxTwoBitScale = 0.75 * static_cast<double>(FLT_MAX);
constexpr double kTwoBitLow = 2.0 / 3.0, kTwoBitHigh = 4.0 / 3.0;

// Little-endian bit stream writer: the first field goes to the lowest bits of the first byte.
class BitWriter {
 public:
  explicit BitWriter(std::uint8_t* p) : p_(p) {}
  void put(std::uint32_t v, int bits) {
    acc_ |= static_cast<std::uint64_t>(v) << n_;
    n_ += bits;
    while (n_ >= 8) {
      *p_++ = static_cast<std::uint8_t>(acc_);
      acc_ >>= 8;
      n_ -= 8;
    }
  }
  void flush() {
    if (n_ > 0) *p_++ = static_cast<std::uint8_t>(acc_);
    acc_ = 0;
    n_ = 0;
  }

 private:
  std::uint8_t* p_;
  std::uint64_t acc_ = 0;
  int n_ = 0;
};

// Reader of the same; the caller has checked that the stream lies inside the payload.
class BitReader {
 public:
  explicit BitReader(const std::uint8_t* p) : p_(p) {}
  std::uint32_t get(int bits) {
    while (n_ < bits) {
      acc_ |= static_cast<std::uint64_t>(*p_++) << n_;
      n_ += 8;
    }
    const std::uint32_t v = static_cast<std::uint32_t>(acc_ & ((std::uint64_t{1} << bits) - 1));
    acc_ >>= bits;
    n_ -= bits;
    return v;
  }

 private:
  const std::uint8_t* p_;
  std::uint64_t acc_ = 0;
  int n_ = 0;
};

float load_float(const std::uint8_t* p) {
  float v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

void store_float(std::uint8_t* p, float v) {
  std::memcpy(p, &v, sizeof v);
}

c10::Half saturated_half(float v) {
  return c10::Half(std::max(-kHalfMax, std::min(kHalfMax, v)));
}

// Calls fn(count, tile_rows, tile_cols) for the (at most four) kinds of tile of the grid.
template <typename Fn>
void for_each_tile_kind(const ChunkGrid& g, Fn fn) {
  if (g.rows * g.cols == 0) return;
  const std::int64_t full_r = g.rows / g.tile_rows, rem_r = g.rows % g.tile_rows;
  const std::int64_t full_c = g.cols / g.tile_cols, rem_c = g.cols % g.tile_cols;
  fn(full_r * full_c, g.tile_rows, g.tile_cols);
  if (rem_c) fn(full_r, g.tile_rows, rem_c);
  if (rem_r) fn(full_c, rem_r, g.tile_cols);
  if (rem_r && rem_c) fn(1, rem_r, rem_c);
}

// Total bits of the index stream: sum over chunks of k_c * ceil(log2(n_c)).
std::int64_t index_stream_bits(const ChunkGrid& grid, std::int64_t k) {
  std::int64_t bits = 0;
  for_each_tile_kind(grid, [&](std::int64_t count, std::int64_t r, std::int64_t c) {
    bits += count * std::min(k, r * c) * index_bits(r * c);
  });
  return bits;
}

// One chunk's kept values as they travel and as they decode. For kTwoBit and kSign, `scale` is
// the chunk scale and codes[j] the 2-bit code or the sign bit of value j.
struct ChunkValues {
  float scale = 0;
  std::vector<std::uint8_t> codes;
  std::vector<float> decoded;
};

void code_chunk(SparseValues mode, const float* v, std::int64_t n, ChunkValues& cv) {
  cv.codes.resize(static_cast<std::size_t>(n));
  cv.decoded.resize(static_cast<std::size_t>(n));
  switch (mode) {
    case SparseValues::kFp32:
      std::copy(v, v + n, cv.decoded.begin());
      return;
    case SparseValues::kFp16:
      for (std::int64_t j = 0; j < n; ++j) cv.decoded[j] = static_cast<float>(saturated_half(v[j]));
      return;
    case SparseValues::kTwoBit: {
      double sum = 0;
      for (std::int64_t j = 0; j < n; ++j) sum += std::fabs(v[j]);
      const double mean = n ? sum / static_cast<double>(n) : 0.0;
      std::int64_t low = 0;
      for (std::int64_t j = 0; j < n; ++j) low += std::fabs(v[j]) < mean;
      // The scale for which the decoded magnitudes add up to the kept ones (see topk.h).
      const double denom =
          kTwoBitLow * static_cast<double>(low) + kTwoBitHigh * static_cast<double>(n - low);
      const double s = denom > 0 ? std::min(sum / denom, kMaxTwoBitScale) : 0.0;
      cv.scale = static_cast<float>(s);
      const float lo = static_cast<float>(kTwoBitLow * cv.scale);
      const float hi = static_cast<float>(kTwoBitHigh * cv.scale);
      for (std::int64_t j = 0; j < n; ++j) {
        const bool neg = v[j] < 0, high = std::fabs(v[j]) >= mean;
        cv.codes[j] = static_cast<std::uint8_t>((neg ? 1 : 0) | (high ? 2 : 0));
        cv.decoded[j] = (neg ? -1.0f : 1.0f) * (high ? hi : lo);
      }
      return;
    }
    case SparseValues::kSign: {
      double sum = 0;
      for (std::int64_t j = 0; j < n; ++j) sum += std::fabs(v[j]);
      cv.scale = static_cast<float>(n ? sum / static_cast<double>(n) : 0.0);
      for (std::int64_t j = 0; j < n; ++j) {
        const bool neg = v[j] < 0;
        cv.codes[j] = neg ? 1 : 0;
        cv.decoded[j] = neg ? -cv.scale : cv.scale;
      }
      return;
    }
  }
}

}  // namespace

int index_bits(std::int64_t n) {
  int b = 0;
  while ((std::int64_t{1} << b) < n) ++b;
  return b;
}

// ---- ChunkGrid ----

ChunkGrid::ChunkGrid(c10::IntArrayRef shape, std::int64_t matrix_tile, std::int64_t vector_tile) {
  if (shape.size() >= 2) {
    rows = shape[0];
    cols = 1;
    for (std::size_t d = 1; d < shape.size(); ++d) cols *= shape[d];
    tile_rows = tile_cols = matrix_tile;
  } else {
    rows = 1;
    cols = shape.empty() ? 1 : shape[0];
    tile_rows = 1;
    tile_cols = vector_tile;
  }
}

ChunkGrid::Chunk ChunkGrid::chunk(std::int64_t i) const {
  Chunk c;
  c.row0 = i / grid_cols() * tile_rows;
  c.col0 = i % grid_cols() * tile_cols;
  c.rows = std::min(tile_rows, rows - c.row0);
  c.cols = std::min(tile_cols, cols - c.col0);
  return c;
}

std::string ChunkGrid::describe(std::int64_t i) const {
  const Chunk c = chunk(i);
  std::ostringstream s;
  s << "chunk " << i << " of " << num_chunks() << " (rows " << c.row0 << ".." << c.row0 + c.rows - 1
    << ", cols " << c.col0 << ".." << c.col0 + c.cols - 1 << ")";
  return s.str();
}

// ---- SparseChunkCoder ----

SparseChunkCoder::SparseChunkCoder(std::string codec, std::int64_t k, SparseValues values)
    : codec_(std::move(codec)), k_(k), values_(values) {}

std::int64_t SparseChunkCoder::payload_bytes(const ChunkGrid& grid) const {
  std::int64_t kept = 0;
  for_each_tile_kind(grid, [&](std::int64_t count, std::int64_t r, std::int64_t c) {
    kept += count * std::min(k_, r * c);
  });
  const std::int64_t chunks = grid.num_chunks();
  std::int64_t values = 0;
  switch (values_) {
    case SparseValues::kFp32:
      values = 4 * kept;
      break;
    case SparseValues::kFp16:
      values = 2 * kept;
      break;
    case SparseValues::kTwoBit:
      values = 4 * chunks + (2 * kept + 7) / 8;
      break;
    case SparseValues::kSign:
      values = 4 * chunks + (kept + 7) / 8;
      break;
  }
  return (index_stream_bits(grid, k_) + 7) / 8 + values;
}

void SparseChunkCoder::select(const float* data, const ChunkGrid& grid, std::int64_t i,
                              std::vector<float>& mag, std::vector<std::int32_t>& order,
                              std::vector<std::int32_t>& kept) const {
  const ChunkGrid::Chunk c = grid.chunk(i);
  const std::int64_t n = c.size();
  mag.resize(static_cast<std::size_t>(n));
  for (std::int64_t r = 0; r < c.rows; ++r) {
    const float* row = data + (c.row0 + r) * grid.cols + c.col0;
    float* m = mag.data() + r * c.cols;
    for (std::int64_t j = 0; j < c.cols; ++j) {
      if (!std::isfinite(row[j])) {
        std::ostringstream s;
        s << "[codec " << codec_ << "] non-finite input " << row[j] << " at row " << c.row0 + r
          << ", col " << c.col0 + j << " in " << grid.describe(i);
        throw Error(s.str());
      }
      m[j] = std::fabs(row[j]);
    }
  }
  const std::int64_t kc = std::min(k_, n);
  order.resize(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  if (kc < n) {
    // Larger magnitude first, lower position on ties: a strict total order, so the kept set is
    // the same whatever the selection algorithm.
    const float* m = mag.data();
    std::nth_element(
        order.begin(), order.begin() + kc, order.end(),
        [m](std::int32_t a, std::int32_t b) { return m[a] > m[b] || (m[a] == m[b] && a < b); });
  }
  kept.assign(order.begin(), order.begin() + kc);
  std::sort(kept.begin(), kept.end());
}

void SparseChunkCoder::encode(const float* data, const ChunkGrid& grid, std::uint8_t* out) const {
  const std::int64_t chunks = grid.num_chunks();
  std::vector<float> mag, vals;
  std::vector<std::int32_t> order, kept;
  std::vector<std::int64_t> begin(static_cast<std::size_t>(chunks) + 1, 0);
  BitWriter index_stream(out);
  for (std::int64_t i = 0; i < chunks; ++i) {
    select(data, grid, i, mag, order, kept);
    const ChunkGrid::Chunk c = grid.chunk(i);
    const int bits = index_bits(c.size());
    for (std::int32_t p : kept) {
      index_stream.put(static_cast<std::uint32_t>(p), bits);
      vals.push_back(data[(c.row0 + p / c.cols) * grid.cols + c.col0 + p % c.cols]);
    }
    begin[i + 1] = static_cast<std::int64_t>(vals.size());
  }
  index_stream.flush();
  std::uint8_t* v = out + (index_stream_bits(grid, k_) + 7) / 8;
  const std::int64_t total = static_cast<std::int64_t>(vals.size());

  switch (values_) {
    case SparseValues::kFp32:
      if (total) std::memcpy(v, vals.data(), static_cast<std::size_t>(total) * 4);
      return;
    case SparseValues::kFp16:
      for (std::int64_t j = 0; j < total; ++j) {
        const std::uint16_t h = saturated_half(vals[j]).x;
        std::memcpy(v + 2 * j, &h, 2);
      }
      return;
    case SparseValues::kTwoBit:
    case SparseValues::kSign: {
      const int code_bits = values_ == SparseValues::kTwoBit ? 2 : 1;
      BitWriter codes(v + 4 * chunks);
      ChunkValues cv;
      for (std::int64_t i = 0; i < chunks; ++i) {
        code_chunk(values_, vals.data() + begin[i], begin[i + 1] - begin[i], cv);
        store_float(v + 4 * i, cv.scale);
        for (std::uint8_t code : cv.codes) codes.put(code, code_bits);
      }
      codes.flush();
      return;
    }
  }
}

void SparseChunkCoder::decode(const std::uint8_t* payload, std::int64_t bytes,
                              const ChunkGrid& grid, float* out) const {
  const std::int64_t chunks = grid.num_chunks();
  // The codec checked the size against the shape; checked again here because every read below
  // relies on it.
  if (bytes != payload_bytes(grid)) {
    throw Error("[codec " + codec_ + "] payload of " + std::to_string(bytes) + " bytes, expected " +
                std::to_string(payload_bytes(grid)));
  }
  std::fill(out, out + grid.rows * grid.cols, 0.0f);
  if (chunks == 0) return;

  BitReader index_stream(payload);
  const std::uint8_t* v = payload + (index_stream_bits(grid, k_) + 7) / 8;
  const std::uint8_t* scales = v;
  BitReader codes(v + 4 * chunks);
  // stamp[p] == i + 1 marks position p as already seen in chunk i: no clearing between chunks.
  std::vector<std::uint32_t> stamp(static_cast<std::size_t>(grid.tile_rows * grid.tile_cols), 0);
  std::vector<std::int32_t> pos;
  std::int64_t next_value = 0;
  auto fail = [&](std::int64_t i, const std::string& what) {
    throw Error("[codec " + codec_ + "] malformed payload: " + grid.describe(i) + ": " + what);
  };

  for (std::int64_t i = 0; i < chunks; ++i) {
    const ChunkGrid::Chunk c = grid.chunk(i);
    const std::int64_t n = c.size(), kc = std::min(k_, n);
    const int bits = index_bits(n);
    pos.resize(static_cast<std::size_t>(kc));
    for (std::int64_t j = 0; j < kc; ++j) {
      const std::int64_t p = index_stream.get(bits);
      if (p >= n) {
        fail(i, "index " + std::to_string(p) + " >= chunk size " + std::to_string(n));
      }
      if (stamp[p] == static_cast<std::uint32_t>(i + 1)) {
        fail(i, "index " + std::to_string(p) + " appears twice");
      }
      stamp[p] = static_cast<std::uint32_t>(i + 1);
      pos[j] = static_cast<std::int32_t>(p);
    }
    float lo = 0, hi = 0, scale = 0;
    if (values_ == SparseValues::kTwoBit || values_ == SparseValues::kSign) {
      scale = load_float(scales + 4 * i);
      const double limit = values_ == SparseValues::kTwoBit ? kMaxTwoBitScale : FLT_MAX;
      if (!std::isfinite(scale) || scale < 0 || scale > limit) {
        std::ostringstream s;
        s << "scale " << scale << " is not a finite number in [0, " << limit << "]";
        fail(i, s.str());
      }
      lo = static_cast<float>(kTwoBitLow * scale);
      hi = static_cast<float>(kTwoBitHigh * scale);
    }
    for (std::int64_t j = 0; j < kc; ++j, ++next_value) {
      float x = 0;
      switch (values_) {
        case SparseValues::kFp32:
          x = load_float(v + 4 * next_value);
          break;
        case SparseValues::kFp16: {
          std::uint16_t h;
          std::memcpy(&h, v + 2 * next_value, 2);
          x = static_cast<float>(c10::Half(h, c10::Half::from_bits()));
          break;
        }
        case SparseValues::kTwoBit: {
          const std::uint32_t code = codes.get(2);
          x = (code & 1 ? -1.0f : 1.0f) * (code & 2 ? hi : lo);
          break;
        }
        case SparseValues::kSign:
          x = codes.get(1) ? -scale : scale;
          break;
      }
      if (!std::isfinite(x)) {
        std::ostringstream s;
        s << "value " << x << " at index " << pos[j] << " is not finite";
        fail(i, s.str());
      }
      out[(c.row0 + pos[j] / c.cols) * grid.cols + c.col0 + pos[j] % c.cols] = x;
    }
  }
}

std::vector<SparseChunkCoder::ChunkStats> SparseChunkCoder::chunk_stats(
    const float* data, const ChunkGrid& grid) const {
  const std::int64_t chunks = grid.num_chunks();
  std::vector<ChunkStats> stats(static_cast<std::size_t>(chunks));
  std::vector<float> mag, vals;
  std::vector<std::int32_t> order, kept;
  std::vector<std::uint8_t> is_kept;
  ChunkValues cv;
  for (std::int64_t i = 0; i < chunks; ++i) {
    select(data, grid, i, mag, order, kept);
    ChunkStats& st = stats[i];
    is_kept.assign(mag.size(), 0);
    const ChunkGrid::Chunk c = grid.chunk(i);
    vals.clear();
    double sum = 0;
    for (std::int32_t p : kept) {
      is_kept[p] = 1;
      vals.push_back(data[(c.row0 + p / c.cols) * grid.cols + c.col0 + p % c.cols]);
      st.max_kept = std::max(st.max_kept, static_cast<double>(mag[p]));
      sum += mag[p];
    }
    st.mean_kept = kept.empty() ? 0.0 : sum / static_cast<double>(kept.size());
    for (std::size_t p = 0; p < mag.size(); ++p) {
      if (is_kept[p]) continue;
      st.max_dropped = std::max(st.max_dropped, static_cast<double>(mag[p]));
      st.dropped_sq += static_cast<double>(mag[p]) * mag[p];
    }
    code_chunk(values_, vals.data(), static_cast<std::int64_t>(vals.size()), cv);
    for (std::size_t j = 0; j < vals.size(); ++j) {
      const double e = static_cast<double>(vals[j]) - cv.decoded[j];
      st.value_err_sq += e * e;
    }
  }
  return stats;
}

}  // namespace diloco
