// DCT + top-k codec (see dct.h).
#include "compress/dct.h"

#include <ATen/ATen.h>

#include <cmath>
#include <sstream>

#include "compress/codec_checks.h"
#include "diloco/errors.h"

namespace diloco {

const char* const kDctHelp =
    "dct(chunk=64, k=32, sign=false|true): DeMo/DisTrO, top-k coefficients of an orthonormal "
    "DCT-II per 64x64 tile or 64-run, all-gathered";

namespace {

// Relative slack of the error bound for the float32 rounding of the forward and inverse
// transforms (a few ulps times the tile's norm; measured errors are ~1e-7 of it).
constexpr double kRoundingSlack = 1e-5;

}  // namespace

at::Tensor dct_basis(std::int64_t n) {
  at::Tensor c = at::empty({n, n}, at::kFloat);
  float* p = c.data_ptr<float>();
  const double pi = std::acos(-1.0);
  for (std::int64_t u = 0; u < n; ++u) {
    const double a =
        std::sqrt(2.0 / static_cast<double>(n)) * (u == 0 ? 1.0 / std::sqrt(2.0) : 1.0);
    for (std::int64_t i = 0; i < n; ++i) {
      p[u * n + i] = static_cast<float>(
          a * std::cos(pi * static_cast<double>((2 * i + 1) * u) / (2.0 * static_cast<double>(n))));
    }
  }
  return c;
}

DctCodec::DctCodec(std::int64_t chunk, std::int64_t k, bool sign)
    : chunk_(chunk),
      k_(k),
      sign_(sign),
      coder_("dct", k, sign ? SparseValues::kSign : SparseValues::kFp32) {}

std::string DctCodec::spec() const {
  return "dct(chunk=" + std::to_string(chunk_) + ",k=" + std::to_string(k_) +
         ",sign=" + (sign_ ? "true" : "false") + ")";
}

const at::Tensor& DctCodec::basis(std::int64_t n) const {
  std::lock_guard<std::mutex> lock(basis_mutex_);
  auto it = basis_.find(n);
  if (it == basis_.end()) it = basis_.emplace(n, dct_basis(n)).first;
  // Map nodes never move and are never erased: the reference outlives the lock.
  return it->second;
}

at::Tensor DctCodec::transform(const at::Tensor& x, bool inverse) const {
  check_cpu_float("dct", x, "transform input");
  const ChunkGrid g(x.sizes(), chunk_, chunk_);
  at::Tensor src = x.reshape({g.rows, g.cols});
  at::Tensor dst = at::empty({g.rows, g.cols}, at::kFloat);
  if (x.numel() == 0) return dst.view(x.sizes());
  // The tiles of one size form a strided [rows/h, h, cols/w, w] view of the matrix; permuted to
  // [rows/h, cols/w, h, w] they are a batch that two matmuls transform at once.
  auto region = [&](std::int64_t r0, std::int64_t r1, std::int64_t c0, std::int64_t c1,
                    std::int64_t h, std::int64_t w) {
    if (r1 <= r0 || c1 <= c0) return;
    const std::int64_t nr = (r1 - r0) / h, nc = (c1 - c0) / w;
    auto tiles = [&](const at::Tensor& m) {
      return m.slice(0, r0, r1).slice(1, c0, c1).view({nr, h, nc, w}).permute({0, 2, 1, 3});
    };
    at::Tensor y = tiles(src);
    const at::Tensor& cw = basis(w);
    // forward: C_h X C_w^T; inverse: C_h^T Y C_w. C_1 = [1], so runs skip the row transform.
    if (h > 1) y = at::matmul(inverse ? basis(h).t() : basis(h), y);
    y = at::matmul(y, inverse ? cw : cw.t());
    tiles(dst).copy_(y);
  };
  const std::int64_t th = g.tile_rows, tw = g.tile_cols;
  const std::int64_t fr = g.rows / th * th, fc = g.cols / tw * tw;
  region(0, fr, 0, fc, th, tw);
  region(0, fr, fc, g.cols, th, g.cols - fc);
  region(fr, g.rows, 0, fc, g.rows - fr, tw);
  region(fr, g.rows, fc, g.cols, g.rows - fr, g.cols - fc);
  return dst.view(x.sizes());
}

std::int64_t DctCodec::payload_bytes(c10::IntArrayRef shape) const {
  return coder_.payload_bytes(ChunkGrid(shape, chunk_, chunk_));
}

void DctCodec::encode(const at::Tensor& x, std::uint8_t* out) {
  check_cpu_float("dct", x, "encode input");
  const float* p = x.data_ptr<float>();
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    if (!std::isfinite(p[i])) {
      std::ostringstream s;
      s << "[codec dct] non-finite input " << p[i] << " at element " << i
        << " of a tensor of shape " << x.sizes();
      throw Error(s.str());
    }
  }
  const at::Tensor coef = transform(x, false);
  coder_.encode(coef.data_ptr<float>(), ChunkGrid(x.sizes(), chunk_, chunk_), out);
}

void DctCodec::decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const {
  check_cpu_float("dct", out, "decode output");
  const ChunkGrid grid(out.sizes(), chunk_, chunk_);
  const std::int64_t expected = coder_.payload_bytes(grid);
  if (bytes != expected) {
    std::ostringstream s;
    s << "[codec dct] payload of " << bytes << " bytes for shape " << out.sizes() << ", expected "
      << expected << " (" << spec() << ")";
    throw Error(s.str());
  }
  at::Tensor coef = at::empty(out.sizes(), at::kFloat);
  coder_.decode(payload, bytes, grid, coef.data_ptr<float>());
  out.copy_(transform(coef, true));
  const float* o = out.data_ptr<float>();
  for (std::int64_t i = 0; i < out.numel(); ++i) {
    if (!std::isfinite(o[i])) {
      std::ostringstream s;
      s << "[codec dct] malformed payload: the inverse DCT overflows float32 at element " << i
        << " of a tensor of shape " << out.sizes();
      throw Error(s.str());
    }
  }
}

double DctCodec::error_bound(const at::Tensor& x) const {
  check_cpu_float("dct", x, "error_bound input");
  const ChunkGrid grid(x.sizes(), chunk_, chunk_);
  const at::Tensor coef = transform(x, false);
  const auto stats = coder_.chunk_stats(coef.data_ptr<float>(), grid);
  const float* p = x.data_ptr<float>();
  double bound = 0;
  for (std::int64_t i = 0; i < grid.num_chunks(); ++i) {
    const ChunkGrid::Chunk c = grid.chunk(i);
    double norm_sq = 0;
    for (std::int64_t r = 0; r < c.rows; ++r) {
      const float* row = p + (c.row0 + r) * grid.cols + c.col0;
      for (std::int64_t j = 0; j < c.cols; ++j) norm_sq += static_cast<double>(row[j]) * row[j];
    }
    const auto& st = stats[i];
    bound = std::max(
        bound, std::sqrt(st.dropped_sq + st.value_err_sq) + kRoundingSlack * std::sqrt(norm_sq));
  }
  return bound;
}

std::unique_ptr<Codec> make_dct_codec(CodecParams& params) {
  const std::int64_t chunk = params.get_power_of_two("chunk", 64, 8, 256);
  const std::int64_t k = params.get_int("k", 32, 1, 4096);
  const bool sign = params.get_choice("sign", "false", {"false", "true"}) == "true";
  params.reject_unknown();
  return std::make_unique<DctCodec>(chunk, k, sign);
}

}  // namespace diloco
