// PowerSGD: rank-r factors with warm-started subspace iteration (see diloco/exchange/powersgd.h).
#include "diloco/exchange/powersgd.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/irange.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <cmath>

#include "diloco/comm/group.h"
#include "diloco/errors.h"

namespace diloco {
namespace {

std::int64_t rows_of(c10::IntArrayRef shape) { return shape[0]; }
std::int64_t cols_of(c10::IntArrayRef shape) {
  return shape[0] == 0 ? 0 : c10::multiply_integers(shape) / shape[0];
}

// Modified Gram-Schmidt on the rows of `pt` (r x n, contiguous): rows become orthonormal; a row
// with no component left (zero or dependent on the earlier ones) becomes zero. The same input
// gives the same output on every rank, which keeps the islands bit-identical.
void orthonormalize_rows(at::Tensor& pt) {
  const auto r = pt.size(0);
  const auto n = pt.size(1);
  float* base = pt.data_ptr<float>();
  for (std::int64_t j = 0; j < r; ++j) {
    float* row = base + j * n;
    for (std::int64_t k = 0; k < j; ++k) {
      const float* prev = base + k * n;
      double dot = 0.0;
      for (std::int64_t t = 0; t < n; ++t) dot += static_cast<double>(prev[t]) * row[t];
      const float d = static_cast<float>(dot);
      for (std::int64_t t = 0; t < n; ++t) row[t] -= d * prev[t];
    }
    double sq = 0.0;
    for (std::int64_t t = 0; t < n; ++t) sq += static_cast<double>(row[t]) * row[t];
    const double norm = std::sqrt(sq);
    // Below this a row is rounding noise of the earlier ones, not a direction of M.
    if (!(norm > 1e-30)) {
      std::fill(row, row + n, 0.0f);
      continue;
    }
    const float inv = static_cast<float>(1.0 / norm);
    for (std::int64_t t = 0; t < n; ++t) row[t] *= inv;
  }
}

}  // namespace

PowerSGD::Options PowerSGD::Options::from_params(CodecParams& params) {
  Options o;
  o.rank = params.get_int("rank", o.rank, 1, 1024);
  o.seed = static_cast<std::uint64_t>(params.get_int("seed", 0, 0, (std::int64_t{1} << 62)));
  return o;
}

PowerSGD::PowerSGD(Options options) : options_(options) {
  if (options_.rank < 1 || options_.rank > 1024) {
    throw OptionError("[codec 'powersgd'] rank must be an integer in [1, 1024], got " +
                      std::to_string(options_.rank));
  }
}

std::string PowerSGD::spec() const {
  std::string s = "powersgd(rank=" + std::to_string(options_.rank) +
                  ",seed=" + std::to_string(options_.seed) + ")";
  return s;
}

bool PowerSGD::factored(c10::IntArrayRef shape) const {
  if (shape.size() < 2) return false;
  const std::int64_t n = rows_of(shape), m = cols_of(shape);
  return n > 0 && m > 0 && options_.rank * (n + m) < n * m;
}

std::int64_t PowerSGD::payload_bytes(const std::vector<at::Tensor>& views) const {
  std::int64_t elements = 0;
  for (const auto& v : views) {
    elements += factored(v.sizes()) ? options_.rank * (rows_of(v.sizes()) + cols_of(v.sizes()))
                                    : v.numel();
  }
  return 4 * elements;
}

void PowerSGD::check_shapes(const std::vector<at::Tensor>& views) {
  if (!shapes_.empty()) {
    bool same = shapes_.size() == views.size();
    for (std::size_t i = 0; same && i < views.size(); ++i) same = views[i].sizes().vec() == shapes_[i];
    if (!same) {
      throw Error("[codec 'powersgd'] the tensors changed since the first outer step (their factors "
                  "and residuals are kept per tensor): pass the same shapes in the same order");
    }
    return;
  }
  for (std::size_t i = 0; i < views.size(); ++i) {
    shapes_.push_back(views[i].sizes().vec());
    if (factored(views[i].sizes())) {
      q_.push_back(at::zeros({cols_of(views[i].sizes()), options_.rank}, at::kFloat));
      redraw_zero_columns(i);
    } else {
      q_.emplace_back();
    }
  }
}

void PowerSGD::redraw_zero_columns(std::size_t i) {
  at::Tensor& q = q_[i];
  const at::Tensor zero = q.abs().sum(0).eq(0);
  if (!zero.any().item<bool>()) return;
  // The same seed on every island: (seed, tensor, outer step) picks the stream.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(options_.seed * 1000003u + i * 7919u +
                                                      static_cast<std::uint64_t>(outer_steps_));
  const at::Tensor fresh = at::randn(q.sizes(), gen, at::TensorOptions().dtype(at::kFloat));
  q.copy_(at::where(zero.unsqueeze(0), fresh, q));
}

PendingExchange PowerSGD::start(Group& group, ExchangeRequest request, CommThread& comm) {
  check_shapes(request.views);
  return start_on_comm_thread(group, std::move(request), comm);
}

void PowerSGD::run(Group& group, const ExchangeRequest& request) {
  const auto& views = request.views;
  const auto& label = request.label;
  const bool ef = !request.subtract_sent.empty();
  const std::int64_t r = options_.rank;
  // Round 1: P_i = M_i Q for factored tensors, the tensor itself for the others.
  std::int64_t round1 = 0, round2 = 0;
  std::vector<std::int64_t> off1(views.size()), off2(views.size());
  for (std::size_t i = 0; i < views.size(); ++i) {
    off1[i] = round1;
    off2[i] = round2;
    if (factored(views[i].sizes())) {
      round1 += rows_of(views[i].sizes()) * r;
      round2 += cols_of(views[i].sizes()) * r;
    } else {
      round1 += views[i].numel();
    }
  }
  auto matrix = [](const at::Tensor& v) { return v.reshape({rows_of(v.sizes()), cols_of(v.sizes())}); };
  at::Tensor p_all = at::empty({round1}, at::kFloat);
  for (std::size_t i = 0; i < views.size(); ++i) {
    if (factored(views[i].sizes())) {
      redraw_zero_columns(i);
      at::Tensor p = p_all.narrow(0, off1[i], rows_of(views[i].sizes()) * r).view({-1, r});
      at::mm_out(p, matrix(views[i]), q_[i]);
    } else {
      p_all.narrow(0, off1[i], views[i].numel()).copy_(views[i].reshape({-1}));
    }
  }
  if (round1 > 0) group.allreduce_sum(p_all, label);

  // Orthonormalize P (identical on every rank), then round 2: Q_i = M_i^T P^.
  at::Tensor q_all = at::empty({round2}, at::kFloat);
  std::vector<at::Tensor> p_hat(views.size());
  for (std::size_t i = 0; i < views.size(); ++i) {
    at::Tensor v = views[i];
    if (!factored(v.sizes())) {
      if (ef) request.subtract_sent[i].zero_();  // sent exactly
      v.copy_(p_all.narrow(0, off1[i], v.numel()).view(v.sizes()));
      continue;
    }
    const std::int64_t n = rows_of(v.sizes()), m = cols_of(v.sizes());
    at::Tensor pt = p_all.narrow(0, off1[i], n * r).view({n, r}).t().contiguous();
    orthonormalize_rows(pt);
    p_hat[i] = pt.t();  // n x r
    at::Tensor q_local = q_all.narrow(0, off2[i], m * r).view({m, r});
    const at::Tensor mat = matrix(v);
    at::mm_out(q_local, mat.t(), p_hat[i]);
    if (ef) {
      // e = M - P^ Q_i^T: what this island's own rank-r contribution leaves out.
      at::Tensor e = request.subtract_sent[i].view({n, m});
      e.addmm_(p_hat[i], q_local.t(), /*beta=*/1, /*alpha=*/-1);
    }
  }
  if (round2 > 0) group.allreduce_sum(q_all, label);

  // The sum over islands, P^ Q^T, written over each factored tensor; Q warm-starts the next step.
  for (std::size_t i = 0; i < views.size(); ++i) {
    if (!p_hat[i].defined()) continue;
    at::Tensor v = views[i];
    const std::int64_t m = cols_of(v.sizes());
    const at::Tensor q_sum = q_all.narrow(0, off2[i], m * r).view({m, r});
    at::Tensor out = v.view({rows_of(v.sizes()), m});
    at::mm_out(out, p_hat[i], q_sum.t());
    q_[i].copy_(q_sum);
  }
  ++outer_steps_;
}

void PowerSGD::save(torch::serialize::OutputArchive& archive) const {
  archive.write("spec", c10::IValue(spec()));
  archive.write("outer_steps", c10::IValue(outer_steps_));
  archive.write("tensors", c10::IValue(static_cast<std::int64_t>(shapes_.size())));
  for (std::size_t i = 0; i < shapes_.size(); ++i) {
    archive.write("shape." + std::to_string(i), c10::IValue(shapes_[i]));
    if (q_[i].defined()) archive.write("q." + std::to_string(i), q_[i]);
  }
}

void PowerSGD::load(torch::serialize::InputArchive& archive) {
  check_saved_spec(archive);
  c10::IValue steps, tensors;
  archive.read("outer_steps", steps);
  archive.read("tensors", tensors);
  std::vector<std::vector<std::int64_t>> shapes;
  std::vector<at::Tensor> q;
  for (std::int64_t i = 0; i < tensors.toInt(); ++i) {
    c10::IValue shape;
    archive.read("shape." + std::to_string(i), shape);
    shapes.push_back(shape.toIntVector());
    at::Tensor qi;
    if (factored(shapes.back())) archive.read("q." + std::to_string(i), qi);
    q.push_back(qi);
  }
  if (!shapes_.empty() && shapes != shapes_) {
    throw Error("[codec 'powersgd'] the saved state is for other tensors than this exchange's");
  }
  outer_steps_ = steps.toInt();
  shapes_ = std::move(shapes);
  q_ = std::move(q);
}

}  // namespace diloco
