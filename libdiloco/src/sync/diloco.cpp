// DiLoCo outer loop (see diloco.h for the terms and the memory layout).
#include "diloco/sync/diloco.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <set>
#include <sstream>

#include "audit/auditor.h"
#include "diloco/comm/auth.h"
#include "diloco/comm/group.h"
#include "diloco/compress/codec_params.h"
#include "diloco/elastic/membership.h"
#include "diloco/errors.h"
#include "diloco/exchange/aggregator.h"
#include "diloco/sync/fingerprint.h"
#include "kernels/cpu_kernels.h"
#include "sync/scoped_timer.h"
#include "sync/state_hash.h"

namespace diloco {
namespace {

// Seconds on the steady clock (ExchangeTiming).
double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The model's own storage can carry the pseudo-gradient when it already has the layout of the
// global weights: float32 on the outer device.
bool in_place_ok(const at::Tensor& flat, const at::Device& outer_device) {
  return flat.scalar_type() == at::kFloat && flat.device() == outer_device;
}

std::string missing_from_optimizer(const FlatParameters& params,
                                   const c10::optional<std::vector<at::Tensor>>& optimized) {
  if (!optimized) return "";
  std::set<const void*> stepped;
  for (const auto& t : *optimized) stepped.insert(t.unsafeGetTensorImpl());
  for (const auto& p : params.parameters()) {
    if (stepped.count(p.tensor.unsafeGetTensorImpl()) == 0) {
      return "parameter '" + p.name +
             "' is not in the inner optimizer's parameter groups (build the optimizer from "
             "model->parameters())";
    }
  }
  return "";
}

ModelTensors with_optimizer(ModelTensors model, const torch::optim::Optimizer& inner) {
  std::vector<at::Tensor> optimized;
  for (const auto& group : inner.param_groups()) {
    for (const auto& p : group.params()) optimized.push_back(p);
  }
  model.optimized = std::move(optimized);
  return model;
}

// The parameters in buckets per (fragment, dtype): options.fragment_of, or the default pattern.
FlatParameters flatten(std::vector<NamedParameter>& parameters, const DiLoCoOptions& options) {
  std::vector<std::int64_t> fragment_of = options.fragment_of;
  if (options.fragments > 1 && fragment_of.empty()) {
    std::vector<std::string> names;
    std::vector<std::int64_t> numels;
    for (const auto& p : parameters) {
      names.push_back(p.name);
      numels.push_back(p.tensor.defined() ? p.tensor.numel() : 0);
    }
    fragment_of = default_fragments(names, numels, options.fragments);
  }
  if (!fragment_of.empty()) {
    if (fragment_of.size() != parameters.size()) {
      throw OptionError("[DiLoCo] fragment_of has " + std::to_string(fragment_of.size()) +
                        " entries but the model has " + std::to_string(parameters.size()) +
                        " parameters");
    }
    std::vector<bool> used(static_cast<std::size_t>(options.fragments), false);
    for (auto f : fragment_of) used[static_cast<std::size_t>(f)] = true;
    for (std::size_t f = 0; f < used.size(); ++f) {
      if (!used[f]) {
        throw OptionError("[DiLoCo] fragment " + std::to_string(f) + " of fragments = " +
                          std::to_string(options.fragments) + " holds no parameter (the model has " +
                          std::to_string(parameters.size()) +
                          " parameters): use fewer fragments or give fragment_of");
      }
    }
  }
  return FlatParameters(std::move(parameters), fragment_of);
}

// Some island's pseudo-gradient was not finite: thrown by the exchange (possibly on the
// communication thread), caught by finish_sync(), which resets the model and rethrows it.
class NonFiniteError : public Error {
 public:
  using Error::Error;
};

// Elastic runs: recoveries in a row (each a new epoch) before a lost peer is given up on.
constexpr int kMaxRecoveries = 8;

std::shared_ptr<Group> group_of(const std::shared_ptr<Membership>& membership) {
  if (!membership) throw OptionError("[DiLoCo] membership must not be null");
  return membership->group();
}

}  // namespace

void DiLoCoOptions::validate() const {
  if (inner_steps < 1) {
    throw OptionError("[DiLoCo] inner_steps (H) must be >= 1, got " + std::to_string(inner_steps));
  }
  outer.validate();
  Exchange::from_spec(compression, aggregator);  // OptionError: the valid codecs, aggregators
  StreamingSchedule(inner_steps, fragments, overlap_steps);  // names P or tau and their range
  if (!(screen_factor == 0.0 || (screen_factor >= 1.0 && screen_factor <= 1e12))) {
    throw OptionError("[DiLoCo] screen_factor must be 0 (off) or in [1, 1e12], got " +
                      exact_decimal(screen_factor));
  }
  if (!(mixing >= 0.0 && mixing <= 1.0)) {  // also rejects nan
    throw OptionError("[DiLoCo] mixing (alpha) must be in [0, 1], got " + exact_decimal(mixing));
  }
  if (!(audit_rate >= 0.0 && audit_rate <= 1.0)) {
    throw OptionError("[DiLoCo] audit_rate must be in [0, 1] (0 = no audits), got " +
                      exact_decimal(audit_rate));
  }
  if (!(audit_tolerance >= 0.0 && audit_tolerance <= 1.0)) {
    throw OptionError("[DiLoCo] audit_tolerance must be in [0, 1] (0 = bit for bit), got " +
                      exact_decimal(audit_tolerance));
  }
  if (audit_rate > 0.0) {
    if (fragments != 1 || overlap_steps != 0 || mixing != 0.0) {
      throw OptionError("[DiLoCo] audits (audit_rate > 0) replay plain DiLoCo rounds: fragments "
                        "(P) must be 1, overlap_steps (tau) 0 and mixing (alpha) 0; got P = " +
                        std::to_string(fragments) + ", tau = " + std::to_string(overlap_steps) +
                        ", alpha = " + exact_decimal(mixing));
    }
    Exchange::from_spec(compression, aggregator, /*gather=*/true);  // refuses powersgd
  }
  for (std::size_t i = 0; i < fragment_of.size(); ++i) {
    if (fragment_of[i] < 0 || fragment_of[i] >= fragments) {
      throw OptionError("[DiLoCo] fragment_of[" + std::to_string(i) + "] must be in [0, fragments = " +
                        std::to_string(fragments) + "), got " + std::to_string(fragment_of[i]));
    }
  }
}

DiLoCo::DiLoCo(torch::nn::Module& model, torch::optim::Optimizer& inner,
               std::shared_ptr<Group> group, DiLoCoOptions options)
    : DiLoCo(with_optimizer(ModelTensors::of(model), inner), std::move(group),
             std::move(options)) {}

DiLoCo::DiLoCo(ModelTensors model, std::shared_ptr<Group> group, DiLoCoOptions options)
    : DiLoCo(std::move(model), std::move(group), std::move(options), nullptr) {}

DiLoCo::DiLoCo(ModelTensors model, std::shared_ptr<Membership> membership, DiLoCoOptions options)
    : DiLoCo(std::move(model), group_of(membership), std::move(options), membership) {}

DiLoCo::DiLoCo(ModelTensors model, std::shared_ptr<Group> group, DiLoCoOptions options,
               std::shared_ptr<Membership> membership)
    : options_((options.validate(), std::move(options))),
      group_(std::move(group)),
      membership_(std::move(membership)),
      params_(flatten(model.parameters, options_)),
      buffers_(std::move(model.buffers)),
      outer_(options_.outer),
      schedule_(options_.inner_steps, options_.fragments, options_.overlap_steps),
      compressed_(options_.compression != "none" ||
                  Aggregator::parse(options_.aggregator).robust() || options_.audit_rate > 0.0),
      comm_(std::make_unique<CommThread>(/*background=*/options_.overlap_steps > 0)),
      started_at_(static_cast<std::size_t>(options_.fragments), -1) {
  if (!group_) throw OptionError("[DiLoCo] group must not be null");
  Aggregator::parse(options_.aggregator).check_islands(group_->world_size());
  exact_sum_ = options_.compression == "none" ||
               Exchange::from_spec(options_.compression)->spec() == "fp32";
  if (membership_ && (options_.fragments != 1 || options_.overlap_steps != 0 ||
                      options_.mixing != 0.0)) {
    throw OptionError("[DiLoCo] elastic runs are plain DiLoCo: fragments (P) must be 1, "
                      "overlap_steps (tau) 0 and mixing (alpha) 0; got P = " +
                      std::to_string(options_.fragments) + ", tau = " +
                      std::to_string(options_.overlap_steps) + ", alpha = " +
                      exact_decimal(options_.mixing));
  }
  const std::string problem = missing_from_optimizer(params_, model.optimized);
  const bool joining = membership_ && membership_->joining();
  if (joining) {
    if (!problem.empty()) throw OptionError("[DiLoCo] " + problem);
  } else {
    agree_on_fingerprint(*group_, "DiLoCo", fingerprint(), problem);
    params_.copy_from_rank0(*group_);
    buffers_.copy_from_rank0(*group_);
  }
  // Compressed exchanges encode and decode on the CPU in float32, so their outer state lives
  // there unless the caller says otherwise.
  const at::Device outer_device = options_.outer_device.value_or(
      compressed_ ? at::Device(at::kCPU) : params_.buckets().front().flat.device());
  if (compressed_ && !outer_device.is_cpu()) {
    throw OptionError("[DiLoCo] compression '" + options_.compression + "' (aggregator " +
                      options_.aggregator +
                      ") runs on the CPU: outer_device must be the CPU or unset (got " +
                      outer_device.str() + ")");
  }
  for (const auto& b : params_.buckets()) {
    at::Tensor g = b.flat.to(outer_device, at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    state_.momentum.push_back(outer_.make_state(g));
    staging_.push_back(in_place_ok(b.flat, outer_device) && !staged() ? at::Tensor()
                                                                       : at::empty_like(g));
    views_.push_back(views_over(staging_.size() - 1));
    state_.exchanges.push_back(Exchange::from_spec(options_.compression, options_.aggregator,
                                                   /*gather=*/options_.audit_rate > 0.0));
    state_.global.push_back(std::move(g));
  }
  if (membership_) {
    fingerprint_text_ = fingerprint().serialize();
    if (joining) {
      // The run's outer state, as rank 0 had it at the boundary this island was admitted at;
      // its own error-feedback residuals start at zero.
      load_state_bytes(membership_->await_admission(fingerprint_text_), /*keep_inner_step=*/false);
      for (auto& exchange : state_.exchanges) exchange->clear_residuals();
    }
  }
}

std::vector<at::Tensor> DiLoCo::views_over(std::size_t i) const {
  const auto& b = params_.buckets()[i];
  const at::Tensor& delta = staging_[i].defined() ? staging_[i] : b.flat;
  std::vector<at::Tensor> views;
  for (std::size_t j = 0; j < b.members.size(); ++j) {
    const auto& p = params_.parameters()[b.members[j]].tensor;
    views.push_back(delta.narrow(0, b.offsets[j], p.numel()).view(p.sizes()));
  }
  return views;
}

// An exchange still in flight writes into buffers this object owns: wait it out (the collective
// timeout bounds the wait) before they go.
DiLoCo::~DiLoCo() {
  wait_in_flight();
  try {
    settle_buffers_digest();
    settle_state_check();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
  }
}

void DiLoCo::wait_in_flight() noexcept {
  // What has not started is dropped (this rank sends nothing more); what runs is waited for.
  comm_->discard_queued();
  // The start job first: one that runs may still be starting the fragment's exchanges.
  try {
    start_job_.wait();
  } catch (const std::exception&) {
  }
  for (auto& p : pending_) {
    try {
      p.exchange.wait();
    } catch (const std::exception&) {
    }
  }
  pending_.clear();
  start_job_ = CommThread::Job();
  comm_->clear_error();
  in_flight_ = -1;
}

Fingerprint DiLoCo::fingerprint() const {
  Fingerprint f = library_fingerprint("DiLoCo");
  f.add("inner_steps (H)", std::to_string(options_.inner_steps));
  f.add("outer lr", exact_decimal(options_.outer.lr));
  f.add("outer momentum", exact_decimal(options_.outer.momentum));
  f.add("outer nesterov", options_.outer.nesterov ? "true" : "false");
  // The spec as the compressor spells it back: every parameter and seed explicit, so that
  // "randomk" and "randomk(seed=7)" differ and "int8" equals "int8(block=256)".
  f.add("compression", options_.compression == "none"
                           ? "none"
                           : Exchange::from_spec(options_.compression)->spec());
  f.add("buffers", to_string(options_.buffers));
  f.add("fragments (P)", std::to_string(options_.fragments));
  f.add("overlap_steps (tau)", std::to_string(options_.overlap_steps));
  f.add("mixing (alpha)", exact_decimal(options_.mixing));
  f.add("compare_states", options_.compare_states ? "true" : "false");
  f.add("screen_factor", exact_decimal(options_.screen_factor));
  f.add("aggregator", Aggregator::parse(options_.aggregator).spec());
  f.add("audit_rate", exact_decimal(options_.audit_rate));
  f.add("audit_tolerance", exact_decimal(options_.audit_tolerance));
  std::string fragment_of;
  for (const auto& b : params_.buckets()) {
    for (auto m : b.members) {
      fragment_of += params_.parameters()[m].name + ":" + std::to_string(b.fragment) + " ";
    }
  }
  f.add("fragment of each parameter", fragment_of);
  for (const auto& [field, value] : options_.agree_on) f.add(field, value);
  params_.describe_into(f);
  buffers_.describe_into(f);
  return f;
}

// Elastic runs stage too: the model keeps the island's progress until the outer step is applied.
bool DiLoCo::staged() const {
  return options_.overlap_steps > 0 || options_.mixing > 0.0 || membership_ != nullptr;
}

bool DiLoCo::step() {
  if (membership_) return elastic_step();
  const std::int64_t t = ++state_.inner_step;
  const std::int64_t finishing = schedule_.finishes_after(t);
  const std::int64_t starting = schedule_.starts_after(t);
  const bool due = (finishing != StreamingSchedule::kNone && finishing == in_flight_) ||
                   starting != StreamingSchedule::kNone;
  if (!due) return false;
  const ScopedTimer syncing(sync_seconds_);
  bool round_done = false;
  // With tau = 0 a fragment finishes after the step it starts; otherwise the one in flight is
  // applied first (tau is below the gap between starts, so it is never the one starting now).
  if (finishing != StreamingSchedule::kNone && finishing == in_flight_ &&
      options_.overlap_steps > 0) {
    finish_sync(finishing);
    round_done = finishing == options_.fragments - 1;
  }
  if (starting != StreamingSchedule::kNone) {
    start_sync(starting);
    if (options_.overlap_steps == 0) {
      finish_sync(starting);
      round_done = starting == options_.fragments - 1;
    }
  }
  if (round_done) end_round();
  return round_done;
}

bool DiLoCo::next_step_would_wait() {
  if (membership_ || in_flight_ < 0 || options_.overlap_steps == 0) return false;
  if (schedule_.finishes_after(state_.inner_step + 1) != in_flight_) return false;
  // The start job (streaming with screening) fills pending_ on the communication thread: read
  // pending_ only once it has run.
  if (!start_job_.ready()) return true;
  for (auto& p : pending_) {
    if (!p.exchange.ready()) return true;
  }
  return false;
}

void DiLoCo::sync() {
  const ScopedTimer syncing(sync_seconds_);
  if (membership_) {
    elastic_outer_step();
    return;
  }
  // A fragment whose exchange started after this very step holds no progress it has not sent:
  // once applied, the island takes the global fragment as it is (identical everywhere) rather
  // than exchanging it again.
  const std::int64_t settled =
      in_flight_ >= 0 && started_at_[static_cast<std::size_t>(in_flight_)] == state_.inner_step
          ? in_flight_
          : -1;
  if (in_flight_ >= 0) finish_sync(in_flight_);
  for (std::int64_t f = 0; f < options_.fragments; ++f) {
    if (f == settled) {
      at::NoGradGuard no_grad;
      auto& buckets = params_.buckets();
      for (std::size_t i = 0; i < buckets.size(); ++i) {
        if (buckets[i].fragment == f) buckets[i].flat.copy_(state_.global[i]);
      }
      continue;
    }
    start_sync(f);
    finish_sync(f);
  }
  end_round();
}

void DiLoCo::end_round() {
  ++state_.outer_step;
  // Buffers that only need their digests compared (integer and bool ones) are compared in the
  // background and settled at the next exchange; averaging floating ones blocks.
  if (buffers_.digest_only(options_.buffers) && group_->world_size() > 1) {
    settle_buffers_digest();
    buffers_digest_ = buffers_.start_digest(*group_);
    return;
  }
  buffers_.sync(*group_, options_.buffers, "DiLoCo outer", state_.outer_step - 1);
}

void DiLoCo::settle_buffers_digest() {
  if (!buffers_digest_) return;
  const std::unique_ptr<ModelBuffers::PendingDigest> pending = std::move(buffers_digest_);
  const ScopedTimer waiting(wait_seconds_);
  buffers_.finish_digest(*group_, *pending);
}

at::Tensor& DiLoCo::delta(std::size_t i) {
  return staging_[i].defined() ? staging_[i] : params_.buckets()[i].flat;
}

void DiLoCo::produce(std::size_t i, std::int64_t offset, std::int64_t length) {
  at::Tensor& local = params_.buckets()[i].flat;
  at::Tensor& d = delta(i);
  at::Tensor seg = d.narrow(0, offset, length);
  bool finite = true;
  if (d.is_same(local) && local.device().is_cpu() && local.scalar_type() == at::kFloat) {
    finite = kernels::pseudo_gradient_inplace(seg.data_ptr<float>(),
                                              state_.global[i].data_ptr<float>() + offset, length);
  } else {
    at::NoGradGuard no_grad;
    at::sub_out(seg, state_.global[i].narrow(0, offset, length),
                local.narrow(0, offset, length).to(seg.options()));
    finite = at::isfinite(seg).all().item<bool>();
  }
  local_finite_[i] = local_finite_[i] && finite;
}

void DiLoCo::check_finite(std::int64_t fragment, bool mine_finite) {
  // One small all-reduce of flags, one per rank. Runs on the communication thread when tau > 0.
  at::Tensor flags = at::zeros({group_->world_size()}, at::kFloat);
  if (!mine_finite) flags[group_->rank()] = 1.0f;
  group_->allreduce_sum(flags, "outer_sync_check");
  std::vector<int> bad;
  for (int r = 0; r < group_->world_size(); ++r) {
    if (flags[r].item<float>() != 0.0f) bad.push_back(r);
  }
  throw_if_not_finite(fragment, bad);
}

void DiLoCo::throw_if_not_finite(std::int64_t fragment, const std::vector<int>& ranks) const {
  if (ranks.empty()) return;
  std::string bad;
  for (int r : ranks) bad += (bad.empty() ? "" : ", ") + std::to_string(r);
  throw NonFiniteError("[DiLoCo outer step " + std::to_string(state_.outer_step + 1) +
                       ", fragment " + std::to_string(fragment) + "] rank " +
                       std::to_string(group_->rank()) + ": the pseudo-gradient of rank(s) " + bad +
                       " holds a NaN or an infinity; nothing was sent, the global weights are "
                       "unchanged and the model was reset to them");
}

void DiLoCo::start_sync(std::int64_t fragment) {
  settle_buffers_digest();
  settle_state_check();
  started_clock_ = steady_seconds();
  const ScopedPayloadContext context({state_.outer_step + 1, fragment});
  auto& buckets = params_.buckets();
  started_at_[static_cast<std::size_t>(fragment)] = state_.inner_step;
  pending_.clear();
  local_finite_.assign(buckets.size(), true);
  in_flight_ = fragment;
  contributors_ = group_->world_size();
  declared_norms_ = -1.0;
  screened_refused_ = 0;
  screened_message_.clear();
  // Exchanges that see each contribution screen what they decode (ContributionScreen); the
  // others screen the norms the islands declare, before anything is sent.
  const bool screen = screens();
  try {
    if (compressed_ || screen) {
      // A codec may not survive a NaN (its scales would be NaN), and screening needs the norm:
      // every bucket's pseudo-gradient is produced first.
      bool finite = true;
      for (std::size_t i = 0; i < buckets.size(); ++i) {
        if (buckets[i].fragment != fragment) continue;
        produce(i, 0, buckets[i].flat.numel());
        finite = finite && local_finite_[i];
      }
      if (options_.audit_rate > 0.0) commit_for_audit(fragment);
      // The islands agree it is finite ahead of the exchanges: the screening's norms say it (a
      // NaN norm), or else a small all-reduce of flags.
      if (screen && comm_->background()) {
        // Streaming (tau > 0): the screening all-gather and the exchanges it lets through run
        // on the communication thread, so that the island trains on while the islands meet.
        // The staging buffers, not the model, are what they read and may zero.
        start_job_ = comm_->submit([this, fragment, finite] {
          screen_contributions(fragment, finite, nullptr);
          start_exchanges(fragment, /*produced=*/true);
        });
        return;
      }
      if (screen) screen_contributions(fragment, finite, &wait_seconds_);
      if (compressed_ && !screen) {
        start_job_ = comm_->submit([this, fragment, finite] { check_finite(fragment, finite); });
      }
    }
    start_exchanges(fragment, compressed_ || screen);
  } catch (...) {
    drain_and_reset();
    throw;
  }
}

void DiLoCo::start_exchanges(std::int64_t fragment, bool produced) {
  auto& buckets = params_.buckets();
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    if (buckets[i].fragment != fragment) continue;
    ExchangeRequest request;
    request.flat = delta(i);
    request.views = views_[i];
    request.label = "outer_sync";
    if (!produced) {
      // Each segment's pseudo-gradient is produced as the exchange reaches it.
      request.produce = [this, i](std::int64_t offset, std::int64_t length) {
        produce(i, offset, length);
      };
    }
    auto verdict = std::make_shared<ContributionScreen>();
    verdict->factor = options_.screen_factor;
    if (auditor_) verdict->excluded = auditor_->excluded_ranks();
    request.screen = verdict;
    PendingExchange exchange = state_.exchanges[i]->start(*group_, std::move(request), *comm_);
    pending_.push_back({i, std::move(exchange), std::move(verdict)});
  }
}

void DiLoCo::finish_sync(std::int64_t fragment) {
  const ScopedPayloadContext context({state_.outer_step + 1, fragment});
  // Everything of the fragment arrives before anything is applied: a peer lost in flight leaves
  // the global weights as they were, never half a fragment applied.
  const double due = steady_seconds();
  try {
    const ScopedTimer waiting(wait_seconds_);
    start_job_.wait();
    for (auto& p : pending_) state_.exchanges[p.bucket]->finish(p.exchange);
  } catch (...) {
    drain_and_reset();
    throw;
  }
  const ExchangeTiming timing{state_.outer_step + 1, fragment,
                              started_at_[static_cast<std::size_t>(fragment)], started_clock_,
                              due, steady_seconds()};
  start_job_ = CommThread::Job();
  in_flight_ = -1;
  // The screening's refusals (possibly made on the communication thread) count from here.
  refused_ += screened_refused_;
  if (!screened_message_.empty()) last_screening_ = screened_message_;
  check_declared_norms(fragment);
  // The sums are bit-identical on every rank, so every rank applies exactly the same update,
  // and skips exactly the same non-finite blocks, without another collective.
  auto& buckets = params_.buckets();
  const double alpha = options_.mixing;
  std::int64_t bad_bucket = -1, bad_index = -1;
  // The state comparison's hash is taken as the outer step writes the state, block by block
  // while each is still in cache, rather than in a pass of its own afterwards.
  std::optional<StateHasher> hasher;
  if (options_.compare_states) hasher.emplace(state_.outer_step + 1, fragment);
  for (auto& p : pending_) {
    at::NoGradGuard no_grad;
    const std::size_t i = p.bucket;
    const bool sees = state_.exchanges[i]->sees_contributions();
    if (sees) report_refusals(fragment, i, *p.screen);
    const double scale = p.screen->averaged ? 1.0
                         : sees             ? 1.0 / p.screen->contributors
                                            : 1.0 / contributors_;
    at::Tensor& summed = delta(i);
    at::Tensor& model = buckets[i].flat;
    // Streaming: the model trained on while the exchange travelled, so the new global weights go
    // to the staging buffer first and are mixed into the model below.
    at::Tensor& write_back = staged() ? summed : model;
    const std::int64_t bad = outer_.step(state_.global[i], state_.momentum[i], summed, scale,
                                         write_back, hasher ? hasher->visitor() : nullptr);
    if (staged()) {
      if (alpha == 0.0) {
        model.copy_(state_.global[i]);
      } else {
        model.mul_(alpha).add_(state_.global[i].to(model.options()), 1.0 - alpha);
      }
    }
    if (bad >= 0 && bad_bucket < 0) {
      bad_bucket = static_cast<std::int64_t>(i);
      bad_index = bad;
    }
  }
  pending_.clear();
  if (hasher && bad_bucket < 0) {
    const auto [high, low] = hasher->digest();
    state_hash_ = StateHash{high, low, state_.outer_step + 1, fragment};
  }
  // Elastic runs audit and compare once the outer step is committed (elastic_outer_step).
  if (auditor_ && !membership_ && bad_bucket < 0) {
    auditor_->audit(*group_, state_.global, state_.inner_step);
  }
  // With screening the comparison rides on the next exchange's screening all-gather.
  if (options_.compare_states && !membership_ && bad_bucket < 0 && !screens()) {
    start_state_check();
  }
  if (bad_bucket >= 0) {
    const auto i = static_cast<std::size_t>(bad_bucket);
    std::ostringstream m;
    m << "[DiLoCo outer step " << state_.outer_step + 1 << ", fragment " << fragment << "] rank "
      << group_->rank() << ": the summed pseudo-gradient is NaN or infinite in parameter '"
      << params_.name_at(i, bad_index) << "' (this rank's own was "
      << (local_finite_[i] ? "finite, so another rank sent it" : "not finite")
      << "); no non-finite value entered the global weights: the blocks holding one were left "
         "unchanged, identically on every rank, and the model holds the global weights";
    if (staged()) reset_model_to_global();
    throw Error(m.str());
  }
  // Last: the fragment is applied, whatever the observer does.
  if (exchange_observer_) exchange_observer_(timing);
}

void DiLoCo::enable_audits(AuditHooks hooks) {
  if (options_.audit_rate <= 0.0) {
    throw OptionError("[DiLoCo] enable_audits: audits are off (options.audit_rate is 0)");
  }
  check_nothing_in_flight("enable_audits");
  if (membership_ && !hooks.stream_of) {
    throw OptionError("[DiLoCo] enable_audits: an elastic run needs AuditHooks::stream_of (each "
                      "island's data stream from its name: ranks change with the epochs)");
  }
  auditor_ = std::make_unique<Auditor>(std::move(hooks), options_.audit_rate,
                                       options_.audit_tolerance, params_, group_->world_size());
  auditor_->begin_round(state_.global, state_.inner_step);
}

AuditStats DiLoCo::audits() const { return auditor_ ? auditor_->stats() : AuditStats{}; }

void DiLoCo::commit_for_audit(std::int64_t fragment) {
  if (!auditor_) {
    throw OptionError("[DiLoCo] audit_rate is " + exact_decimal(options_.audit_rate) +
                      " but no audit hooks were given: call enable_audits() before the first "
                      "outer step");
  }
  std::vector<at::Tensor> mine;
  const auto& buckets = params_.buckets();
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    if (buckets[i].fragment == fragment) mine.push_back(delta(i));
  }
  auditor_->commit(*group_, state_.outer_step + 1, state_.inner_step, mine,
                   membership_ ? membership_->members() : std::vector<std::string>{});
}

void DiLoCo::screen_contributions(std::int64_t fragment, bool mine_finite, double* waited) {
  auto& buckets = params_.buckets();
  double squares = 0.0;
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    if (buckets[i].fragment != fragment) continue;
    const double n = l2_norm(delta(i));
    squares += n * n;
  }
  const double mine = mine_finite ? std::sqrt(squares) : std::nan("");
  // One row per island: its norm (the double's bits), and in static runs comparing states the
  // last outer step's state hash (outer step, fragment, 128 bits; -1, -1, 0, 0 when there is
  // none to compare), so that the comparison needs no collective of its own.
  const bool carries_hash = options_.compare_states && !membership_;
  std::int64_t bits = 0;
  std::memcpy(&bits, &mine, sizeof mine);
  at::Tensor row = at::full({1}, bits, at::kLong);
  if (carries_hash) row = at::cat({row, take_state_row()});
  std::vector<at::Tensor> all;
  {
    const auto start = std::chrono::steady_clock::now();
    all = group_->allgather(row, "outer_sync_screen");
    if (waited != nullptr) *waited += seconds_since(start);
  }
  if (carries_hash) {
    std::vector<at::Tensor> hashes;
    for (const auto& t : all) hashes.push_back(t.narrow(0, 1, 4));
    compare_state_rows(hashes);
  }
  std::vector<double> norms, finite_norms;
  std::vector<int> not_finite;
  for (const auto& t : all) {
    double norm = 0.0;
    const std::int64_t word = t[0].item<std::int64_t>();
    std::memcpy(&norm, &word, sizeof norm);
    norms.push_back(norm);
    if (std::isfinite(norms.back())) {
      finite_norms.push_back(norms.back());
    } else {
      not_finite.push_back(static_cast<int>(norms.size()) - 1);
    }
  }
  // A pseudo-gradient holding a NaN or an infinity (its island declares a NaN norm): compressed
  // exchanges stop here, as the finiteness check does without screening; the uncompressed sum
  // carries it to the outer step, which leaves its blocks unchanged and names the parameter.
  if (compressed_) throw_if_not_finite(fragment, not_finite);
  if (finite_norms.empty()) return;
  std::sort(finite_norms.begin(), finite_norms.end());
  const std::size_t k = finite_norms.size();
  const double median = k % 2 == 1 ? finite_norms[k / 2]
                                   : 0.5 * (finite_norms[k / 2 - 1] + finite_norms[k / 2]);
  std::vector<int> refused;
  double declared = 0.0;
  for (int r = 0; r < static_cast<int>(norms.size()); ++r) {
    if (std::isfinite(norms[r]) && norms[r] > options_.screen_factor * median) {
      refused.push_back(r);
    } else {
      declared += norms[r];
    }
  }
  declared_norms_ = declared;
  if (refused.empty()) return;
  contributors_ = group_->world_size() - static_cast<int>(refused.size());
  screened_refused_ = static_cast<std::int64_t>(refused.size());
  std::ostringstream m;
  m << "[DiLoCo outer step " << state_.outer_step + 1 << ", fragment " << fragment << "] rank "
    << group_->rank() << ": refused the pseudo-gradient of rank(s) ";
  for (std::size_t j = 0; j < refused.size(); ++j) {
    m << (j ? ", " : "") << refused[j] << " (norm " << norms[static_cast<std::size_t>(refused[j])]
      << ")";
  }
  m << ": above screen_factor " << options_.screen_factor << " x the median norm " << median
    << "; the outer step averages the other " << contributors_ << " islands";
  screened_message_ = m.str();
  std::fprintf(stderr, "%s\n", screened_message_.c_str());
  if (std::find(refused.begin(), refused.end(), group_->rank()) != refused.end()) {
    at::NoGradGuard no_grad;
    for (std::size_t i = 0; i < buckets.size(); ++i) {
      if (buckets[i].fragment == fragment) delta(i).zero_();
    }
  }
}

void DiLoCo::check_declared_norms(std::int64_t fragment) {
  // An uncompressed sum of honest contributions is no longer than the sum of their norms
  // (triangle inequality; float32 rounding adds far less than the margin). Compressed sums carry
  // quantization error and error feedback's residuals, so only none and fp32 are bound this way.
  if (declared_norms_ < 0.0 || !exact_sum_) return;
  double squares = 0.0;
  for (auto& p : pending_) {
    const double n = l2_norm(delta(p.bucket));
    squares += n * n;
  }
  const double summed = std::sqrt(squares);
  if (!std::isfinite(summed) || summed <= declared_norms_ * (1.0 + 1e-4) + 1e-30) return;
  std::ostringstream m;
  m << "[DiLoCo outer step " << state_.outer_step + 1 << ", fragment " << fragment << "] rank "
    << group_->rank() << ": the summed pseudo-gradient's norm " << summed
    << " exceeds the sum of the norms the contributing islands declared, " << declared_norms_
    << ": an island sent other than what it declared (the all-reduce sums in flight, so which "
       "one cannot be told: a robust aggregator gathers and names it); nothing was applied, "
       "identically on every rank, and the model holds the global weights";
  pending_.clear();
  reset_model_to_global();
  throw Error(m.str());
}

void DiLoCo::report_refusals(std::int64_t fragment, std::size_t bucket,
                             const ContributionScreen& screen) {
  if (screen.refused.empty()) return;
  refused_ += static_cast<std::int64_t>(screen.refused.size());
  std::ostringstream m;
  m << "[DiLoCo outer step " << state_.outer_step + 1 << ", fragment " << fragment << "] rank "
    << group_->rank() << ": refused the contribution of " << screen.reasons;
  if (params_.buckets().size() > 1) m << " in parameter bucket " << bucket;
  m << "; the outer step combines the other " << screen.contributors << " islands' ("
    << Aggregator::parse(options_.aggregator).spec() << ")";
  last_screening_ = m.str();
  std::fprintf(stderr, "%s\n", last_screening_.c_str());
}

void DiLoCo::start_state_check() {
  settle_state_check();  // one in flight at a time
  auto check = std::make_unique<StateCheck>();
  check->mine = take_state_row();
  check->collective = group_->allgather_async(check->mine, check->hashes, "state_check");
  state_check_ = std::move(check);
}

void DiLoCo::settle_state_check() {
  if (!state_check_) return;
  const std::unique_ptr<StateCheck> check = std::move(state_check_);
  {
    const ScopedTimer waiting(wait_seconds_);
    check->collective.wait();
  }
  compare_state_rows(check->hashes);
}

void DiLoCo::check_state() {
  // A screening running on the communication thread takes the pending hash itself.
  if (in_flight_ >= 0) start_job_.wait();
  settle_buffers_digest();
  if (membership_ || !options_.compare_states) return;
  // start_state_check() settles the comparison in flight first. Always a collective, with or
  // without a hash left to compare (a rank that has none, e.g. after a load_state() of its own,
  // is then named by the others rather than left waiting).
  start_state_check();
  settle_state_check();
}

at::Tensor DiLoCo::take_state_row() {
  const StateHash h = state_hash_.value_or(StateHash{0, 0, -1, -1});
  state_hash_.reset();
  return at::tensor({h.outer_step, h.fragment, static_cast<std::int64_t>(h.high),
                     static_cast<std::int64_t>(h.low)},
                    at::kLong);
}

bool DiLoCo::screens() const {
  return options_.screen_factor > 0.0 && group_->world_size() >= 3 &&
         !state_.exchanges.front()->sees_contributions();
}

void DiLoCo::compare_state_rows(const std::vector<at::Tensor>& all) {
  // The majority's row (a strict majority, or none).
  const int n = static_cast<int>(all.size());
  const auto same = [&](int a, int b) { return at::equal(all[a], all[b]); };
  int majority = -1;
  for (int r = 0; r < n && majority < 0; ++r) {
    int votes = 0;
    for (int q = 0; q < n; ++q) votes += same(r, q) ? 1 : 0;
    if (2 * votes > n) majority = r;
  }
  std::vector<int> differing;
  for (int r = 0; r < n; ++r) {
    if (majority < 0 || !same(r, majority)) differing.push_back(r);
  }
  if (differing.empty()) return;
  const auto hex = [&](int r) {
    if (all[r][0].item<std::int64_t>() < 0) return std::string("none");
    char text[40];
    std::snprintf(text, sizeof text, "%016llx%016llx",
                  static_cast<unsigned long long>(all[r][2].item<std::int64_t>()),
                  static_cast<unsigned long long>(all[r][3].item<std::int64_t>()));
    return std::string(text);
  };
  // The outer step and fragment compared: the majority's (a rank without a hash has -1), else
  // this rank's.
  const at::Tensor& named = all[majority >= 0 ? majority : group_->rank()];
  std::ostringstream m;
  m << "[DiLoCo outer step " << named[0].item<std::int64_t>() << ", fragment "
    << named[1].item<std::int64_t>() << "] rank " << group_->rank()
    << ": the islands' global states differ after the outer step: ";
  if (majority < 0) {
    m << "no majority (";
    for (int r = 0; r < n; ++r) m << (r ? ", " : "") << "rank " << r << " " << hex(r);
    m << ")";
    throw Error(m.str());
  }
  m << "rank(s) ";
  for (std::size_t k = 0; k < differing.size(); ++k) m << (k ? ", " : "") << differing[k];
  m << " disagree with the majority (state hash " << hex(majority) << "; theirs ";
  for (std::size_t k = 0; k < differing.size(); ++k) m << (k ? ", " : "") << hex(differing[k]);
  m << ")";
  const bool mine_differs =
      std::find(differing.begin(), differing.end(), group_->rank()) != differing.end();
  if (!membership_) throw Error(m.str());
  if (mine_differs) {
    throw RemovedError(m.str() + "; this island leaves the run (started again, it rejoins with "
                       "the run's state)");
  }
  // The majority drops them now rather than at their next collective.
  for (int r : differing) membership_->report_failure(m.str(), r);
  throw PeerLostError(m.str(), differing.front());
}

void DiLoCo::drain_and_reset() {
  // Wait out whatever is still in flight (it fails fast once a peer is gone) so that no
  // collective writes into the model after we reset it. Elastic runs keep the island's progress
  // (the model was not the exchange's buffer) for the outer step they redo.
  wait_in_flight();
  if (!membership_) reset_model_to_global();
}

bool DiLoCo::elastic_step() {
  const std::int64_t t = ++state_.inner_step;
  const ScopedTimer syncing(sync_seconds_);
  // A peer was lost while this island computed: the others are forming a new epoch now.
  if (membership_->failed()) recover();
  if (schedule_.starts_after(t) == StreamingSchedule::kNone) return false;
  elastic_outer_step();
  return true;
}

void DiLoCo::elastic_outer_step() {
  const std::int64_t target = state_.outer_step + 1;
  for (int attempt = 1;; ++attempt) {
    try {
      // The audits and the state comparison after the step belong to it too.
      const ScopedPayloadContext context({target, 0});
      membership_->before_exchange();
      if (state_.outer_step < target) {
        exchange_snapshot_ = snapshot_exchanges();
        start_sync(0);
        finish_sync(0);
        exchange_snapshot_.clear();
        ++state_.outer_step;
        if (auditor_) elastic_audit();
        if (options_.compare_states) {
          start_state_check();
          settle_state_check();
        }
      }
      buffers_.sync(*group_, options_.buffers, "DiLoCo outer", state_.outer_step - 1);
      membership_->at_boundary(state_.outer_step, fingerprint_text_,
                               [this] { return state_bytes(); });
      return;
    } catch (const PeerLostError& e) {
      if (attempt >= kMaxRecoveries) throw;
      membership_->report_failure(e.what(), e.peer());
      // An island that receives the step from a survivor that completed it is done with it;
      // that survivor went on training and takes no part in this boundary's work.
      if (recover() && state_.outer_step >= target) return;
    }
  }
}

void DiLoCo::elastic_audit() {
  try {
    auditor_->audit(*group_, state_.global, state_.inner_step);
  } catch (const PeerLostError&) {
    // The outer step is committed; its audits are abandoned, and the next round starts here.
    auditor_->begin_round(state_.global, state_.inner_step);
    throw;
  }
  // Islands that failed a commitment or an audit at this outer step are removed: the store
  // remembers them (no epoch takes them back), and the others form a new epoch without them.
  const AuditStats& audits = auditor_->stats();
  if (audits.excluded.size() <= removals_) return;
  const std::size_t first = removals_;
  removals_ = audits.excluded.size();
  // Each island removed with its own failed audit's report.
  for (std::size_t k = first; k < audits.excluded.size(); ++k) {
    if (audits.excluded[k] == group_->rank()) {
      throw RemovedError(audits.excluded_reasons[k] + "; this island leaves the run");
    }
  }
  for (std::size_t k = first; k < audits.excluded.size(); ++k) {
    membership_->remove({audits.excluded_names[k]}, audits.excluded_reasons[k]);
    membership_->report_failure(audits.excluded_reasons[k], audits.excluded[k]);
  }
  throw PeerLostError(audits.excluded_reasons[first], audits.excluded[first]);
}

bool DiLoCo::recover() {
  // Reached from an outer step or between inner steps: the same context on every survivor.
  const ScopedPayloadContext context({});
  wait_in_flight();
  if (!exchange_snapshot_.empty()) {
    restore_exchanges(exchange_snapshot_);
    exchange_snapshot_.clear();
  }
  renew_staging();
  for (int attempt = 1;; ++attempt) {
    try {
      membership_->reform();
      const bool behind = align_state();
      // This island's round restarts from the state it received.
      if (behind && auditor_) auditor_->begin_round(state_.global, state_.inner_step);
      return behind;
    } catch (const PeerLostError& e) {
      if (attempt >= kMaxRecoveries) throw;
      membership_->report_failure(e.what(), e.peer());
    }
  }
}

void DiLoCo::renew_staging() {
  // The abandoned group's collectives may still write into the old buffers (a stopped peer that
  // resumes completes them): they are left to it.
  for (std::size_t i = 0; i < staging_.size(); ++i) {
    if (!staging_[i].defined()) continue;
    staging_[i] = at::empty_like(staging_[i]);
    views_[i] = views_over(i);
  }
}

bool DiLoCo::align_state() {
  // Survivors agree on the newest committed outer state: one may have completed the last outer
  // step while another's failed. The newest is sent, in one broadcast, to those without it.
  const auto steps = group_->allgather(at::full({1}, state_.outer_step, at::kLong),
                                       "elastic_outer_step");
  std::int64_t newest = state_.outer_step;
  int source = group_->rank();
  for (int r = 0; r < static_cast<int>(steps.size()); ++r) {
    const auto s = steps[static_cast<std::size_t>(r)].item<std::int64_t>();
    if (s > newest || (s == newest && r < source)) {
      newest = s;
      source = r;
    }
  }
  bool behind_anyone = false;
  for (const auto& s : steps) behind_anyone = behind_anyone || s.item<std::int64_t>() != newest;
  if (!behind_anyone) return false;
  const bool mine = group_->rank() == source;
  const std::string bytes = mine ? state_bytes() : std::string();
  at::Tensor length = at::full({1}, static_cast<std::int64_t>(bytes.size()), at::kLong);
  group_->broadcast(length, source, "elastic_state.length");
  at::Tensor buffer = at::empty({length.item<std::int64_t>()}, at::kByte);
  if (mine) std::memcpy(buffer.data_ptr<std::uint8_t>(), bytes.data(), bytes.size());
  group_->broadcast(buffer, source, "elastic_state");
  if (state_.outer_step == newest) return false;
  load_state_bytes(std::string(reinterpret_cast<const char*>(buffer.data_ptr<std::uint8_t>()),
                               static_cast<std::size_t>(buffer.numel())),
                   /*keep_inner_step=*/true);
  return true;
}

std::string DiLoCo::state_bytes() const {
  torch::serialize::OutputArchive archive;
  state_.save(archive);
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

void DiLoCo::load_state_bytes(const std::string& bytes, bool keep_inner_step) {
  std::istringstream in(bytes);
  torch::serialize::InputArchive archive;
  archive.load_from(in);
  const std::int64_t inner = state_.inner_step;
  state_.load(archive);
  if (keep_inner_step) state_.inner_step = inner;
  reset_model_to_global();
}

std::string DiLoCo::snapshot_exchanges() const {
  torch::serialize::OutputArchive archive;
  for (std::size_t i = 0; i < state_.exchanges.size(); ++i) {
    torch::serialize::OutputArchive exchange;
    state_.exchanges[i]->save(exchange);
    archive.write("exchange." + std::to_string(i), exchange);
  }
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

void DiLoCo::restore_exchanges(const std::string& bytes) {
  std::istringstream in(bytes);
  torch::serialize::InputArchive archive;
  archive.load_from(in);
  for (std::size_t i = 0; i < state_.exchanges.size(); ++i) {
    torch::serialize::InputArchive exchange;
    archive.read("exchange." + std::to_string(i), exchange);
    state_.exchanges[i]->load(exchange);
  }
}

void DiLoCo::reset_model_to_global() {
  at::NoGradGuard no_grad;
  auto& buckets = params_.buckets();
  for (std::size_t i = 0; i < buckets.size(); ++i) buckets[i].flat.copy_(state_.global[i]);
}

void DiLoCo::check_nothing_in_flight(const char* what) const {
  if (in_flight_ >= 0) {
    throw Error(std::string("[DiLoCo] ") + what + ": fragment " + std::to_string(in_flight_) +
                "'s exchange is in flight (its result belongs to the state); call it after a "
                "step() that returned true, or after sync()");
  }
}

void DiLoCo::save_state(const std::string& path) const {
  check_nothing_in_flight("save_state");
  state_.save(path);
}

void DiLoCo::load_state(const std::string& path) {
  check_nothing_in_flight("load_state");
  state_.load(path);
  state_hash_.reset();  // the state it described is gone
  reset_model_to_global();
  if (auditor_) auditor_->begin_round(state_.global, state_.inner_step);
}

SyncStats DiLoCo::stats() const {
  return make_sync_stats(*group_, state_.inner_step, state_.outer_step, sync_seconds_,
                         wait_seconds_);
}

}  // namespace diloco
