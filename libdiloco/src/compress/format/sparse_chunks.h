// The chunked sparse payload format: how per-chunk top-k (topk.h) and DCT top-k (dct.h) tile a
// tensor, select what each chunk keeps and lay the kept positions and values out in bytes. A
// format, not a codec: the codecs choose k, the tiles and how values travel, and call this.
//
// Chunks. A tensor of dim >= 2 is viewed as a matrix of size(0) rows and numel/size(0) columns
// and tiled into chunk x chunk tiles, row-major over the tile grid; the tiles of the last tile row
// and column are smaller when the sizes are not multiples of `chunk`. A tensor of dim < 2 (0-d
// included, as one element) is cut into runs of vector_chunk elements, the last one shorter. The
// position of an entry inside a tile of w columns is local_row * w + local_col.
//
// Selection. Chunk c has n_c elements and keeps k_c = min(k, n_c) of them: the largest |x|,
// ties going to the lower position (a strict total order, so the kept set is unique).
//
// Payload, in this order (a "bit stream" is little-endian: the first field occupies the lowest
// bits of the first byte; fields cross byte boundaries; the last byte is zero-padded):
//   indices  one bit stream of all chunks' kept positions, chunk by chunk, each chunk's in
//            ascending order, b_c = ceil(log2(n_c)) bits each (12 for 64x64, 0 for n_c = 1);
//   values   in the same order as the indices, by `values`:
//            fp32  K little-endian IEEE float32;
//            fp16  K little-endian IEEE binary16, round to nearest even, |v| saturated at 65504;
//            2bit  C float32 chunk scales s_c, then a bit stream of K 2-bit codes. Code bit 0 is
//                  the sign (1 = negative), bit 1 the magnitude (0 = low, 1 = high); decoded
//                  magnitudes are (2/3)s_c (low) and (4/3)s_c (high), i.e. the symmetric levels
//                  {-2,-1,+1,+2}(2/3)s_c. With m_c = mean |kept| the encoder sends "high" for
//                  |v| >= m_c and picks s_c = k_c m_c / ((2/3) n_low + (4/3) n_high), so that the
//                  decoded magnitudes add up to the kept ones: the quantizer does not shrink or
//                  inflate the chunk's L1 mass (s_c = m_c when the kept values split evenly).
// with C chunks, K = sum_c k_c, B = sum_c k_c b_c:
//   payload_bytes = ceil(B/8) + { 4K | 2K | 4C + ceil(2K/8) }     (fp32 | fp16 | 2bit).
// 1024x1024 at the defaults (64x64 tiles, k=64): C=256, K=16384, B=196608 -> 24576 + 65536 =
// 90112 bytes (0.6875 bits per parameter, 46.5x below fp32); values=2bit: 24576 + 1024 + 4096 =
// 29696 bytes (0.227 bits per parameter, 141x).
//
// Decode writes zeros everywhere but the kept positions and throws diloco::Error for a payload of
// the wrong size, an index >= n_c, an index repeated within a chunk, a non-finite value or a
// negative or non-finite scale (`out` is then unspecified). Encode throws for non-finite input.
//
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>
#include <vector>

namespace diloco {

// Largest fp16 magnitude; larger fp16 values saturate rather than become inf.
inline constexpr float kHalfMax = 65504.0f;

// The tiling of one tensor: a rows x cols row-major matrix cut into tile_rows x tile_cols tiles.
struct ChunkGrid {
  // dim >= 2: size(0) x rest in matrix_tile^2 tiles; dim < 2: 1 x numel in 1 x vector_tile runs.
  ChunkGrid(c10::IntArrayRef shape, std::int64_t matrix_tile, std::int64_t vector_tile);

  struct Chunk {
    std::int64_t row0, col0, rows, cols;
    std::int64_t size() const { return rows * cols; }
  };
  std::int64_t grid_rows() const { return (rows + tile_rows - 1) / tile_rows; }
  std::int64_t grid_cols() const { return (cols + tile_cols - 1) / tile_cols; }
  std::int64_t num_chunks() const { return rows * cols == 0 ? 0 : grid_rows() * grid_cols(); }
  Chunk chunk(std::int64_t i) const;
  std::string describe(std::int64_t i) const;  // "chunk 3 of 16 (rows 0..63, cols 192..255)"

  std::int64_t rows = 0, cols = 0, tile_rows = 1, tile_cols = 1;
};

// How the kept values travel; kSign (dct's sign=true) sends C float32 chunk scales
// s_c = mean |kept| and then a bit stream of K sign bits (1 = negative); decoded values are
// +-s_c, zero counting as positive.
enum class SparseValues { kFp32, kFp16, kTwoBit, kSign };

// Selection, payload size, encode and decode of the chunked sparse format on a row-major float
// matrix laid out as the grid says. Stateless; `codec` names the codec in error messages.
class SparseChunkCoder {
 public:
  SparseChunkCoder(std::string codec, std::int64_t k, SparseValues values);

  std::int64_t payload_bytes(const ChunkGrid& grid) const;
  // Throws diloco::Error for a non-finite entry (the codec's input or its DCT coefficients).
  void encode(const float* data, const ChunkGrid& grid, std::uint8_t* out) const;
  // Zero-fills `out` (grid.rows * grid.cols floats) and scatters the kept values into it.
  void decode(const std::uint8_t* payload, std::int64_t bytes, const ChunkGrid& grid,
              float* out) const;

  // What encode() does to one chunk, for error bounds: the largest dropped |x|, the sum of the
  // dropped squares, the largest kept |x| (M), the mean kept |x| (m), and the sum over kept
  // entries of the squared value error that the chosen SparseValues makes.
  struct ChunkStats {
    double max_dropped = 0, dropped_sq = 0, max_kept = 0, mean_kept = 0, value_err_sq = 0;
  };
  std::vector<ChunkStats> chunk_stats(const float* data, const ChunkGrid& grid) const;

  std::int64_t k() const { return k_; }
  SparseValues values() const { return values_; }

 private:
  // Fills `kept` with the chunk's kept positions, ascending; `mag` and `order` are scratch.
  void select(const float* data, const ChunkGrid& grid, std::int64_t i, std::vector<float>& mag,
              std::vector<std::int32_t>& order, std::vector<std::int32_t>& kept) const;

  std::string codec_;
  std::int64_t k_;
  SparseValues values_;
};

// Bits of one index into a chunk of n elements: ceil(log2(n)), 0 for n <= 1.
int index_bits(std::int64_t n);

}  // namespace diloco
