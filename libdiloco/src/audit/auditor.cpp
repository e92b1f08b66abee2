// The audit protocol (see auditor.h and diloco/audit/audit.h).
#include "audit/auditor.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <openssl/rand.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <sstream>

#include "diloco/comm/group.h"
#include "diloco/errors.h"
#include "diloco/exchange/aggregator.h"

namespace diloco {
namespace {

// Point-to-point tags of the start-state transfers: two per audited island.
constexpr int kTransferTag = 1 << 20;

std::string bytes_of(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<std::size_t>(c.nbytes()));
}

at::Tensor tensor_of(const std::string& bytes) {
  at::Tensor t = at::empty({static_cast<std::int64_t>(bytes.size())}, at::kByte);
  if (!bytes.empty()) std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  return t;
}

std::vector<NamedParameter> checked_replica(std::vector<NamedParameter>& replica) {
  if (replica.empty()) {
    throw OptionError(
        "[audit] AuditHooks::replica is empty: audits replay the rounds on a "
        "replica of the model (a second model of the same architecture)");
  }
  return std::move(replica);
}

}  // namespace

Auditor::Auditor(AuditHooks hooks, double rate, double tolerance, const FlatParameters& model,
                 int islands)
    : hooks_(std::move(hooks)),
      rate_(rate),
      tolerance_(tolerance),
      replica_(checked_replica(hooks_.replica)),
      excluded_(static_cast<std::size_t>(islands), false) {
  stats_.audits_of.assign(static_cast<std::size_t>(islands), 0);
  if (!hooks_.inner_state) throw OptionError("[audit] AuditHooks::inner_state is not set");
  if (!hooks_.inner_digest) throw OptionError("[audit] AuditHooks::inner_digest is not set");
  if (!hooks_.replay) throw OptionError("[audit] AuditHooks::replay is not set");
  const auto& mine = model.buckets();
  const auto& theirs = replica_.buckets();
  bool same = mine.size() == theirs.size();
  for (std::size_t b = 0; same && b < mine.size(); ++b) {
    same = mine[b].flat.numel() == theirs[b].flat.numel() &&
           mine[b].flat.scalar_type() == theirs[b].flat.scalar_type();
  }
  for (std::size_t p = 0; same && p < model.parameters().size(); ++p) {
    same = p < replica_.parameters().size() &&
           model.parameters()[p].name == replica_.parameters()[p].name &&
           model.parameters()[p].tensor.sizes() == replica_.parameters()[p].tensor.sizes();
  }
  if (!same || model.parameters().size() != replica_.parameters().size()) {
    throw OptionError(
        "[audit] AuditHooks::replica must hold the model's parameters (names, "
        "shapes, dtypes, order): the model has " +
        std::to_string(model.parameters().size()) + " parameters, the replica " +
        std::to_string(replica_.parameters().size()) + ", and they differ");
  }
  for (std::size_t b = 0; b < theirs.size(); ++b) {
    if (theirs[b].flat.device() != mine[b].flat.device()) {
      throw OptionError("[audit] the replica must live on the model's device (" +
                        mine[b].flat.device().str() + "), got " + theirs[b].flat.device().str());
    }
  }
}

void Auditor::begin_round(const std::vector<at::Tensor>& global, std::int64_t first_step) {
  keep_start(global, hooks_.inner_state(), hooks_.inner_digest(), first_step);
}

void Auditor::keep_start(const std::vector<at::Tensor>& global, std::string state,
                         const Digest& digest, std::int64_t first_step) {
  start_global_.clear();
  for (const auto& g : global) start_global_.push_back(g.to(at::kFloat, false, /*copy=*/true));
  start_state_ = std::move(state);
  start_digest_ = digest;
  first_step_ = first_step;
}

std::int64_t Auditor::delta_bytes() const {
  std::int64_t bytes = 0;
  for (const auto& g : start_global_) bytes += g.numel() * 4;
  return bytes;
}

std::string Auditor::who(int island) const {
  std::string out = "rank " + std::to_string(island);
  if (named_) out += " (island " + names_[static_cast<std::size_t>(island)] + ")";
  return out;
}

std::vector<int> Auditor::excluded_ranks() const {
  std::vector<int> ranks;
  for (std::size_t r = 0; r < excluded_.size(); ++r) {
    if (excluded_[r]) ranks.push_back(static_cast<int>(r));
  }
  return ranks;
}

void Auditor::fail(int island, std::int64_t outer_step, const std::string& report) {
  ++stats_.failed;
  if (!excluded_[static_cast<std::size_t>(island)]) {
    excluded_[static_cast<std::size_t>(island)] = true;
    stats_.excluded.push_back(island);
    stats_.excluded_names.push_back(names_[static_cast<std::size_t>(island)]);
    stats_.excluded_at.push_back(outer_step);
    stats_.excluded_reasons.push_back(report);
  }
  stats_.last_failure = report;
  std::fprintf(stderr, "%s\n", report.c_str());
}

void Auditor::commit(Group& group, std::int64_t outer_step, std::int64_t inner_step,
                     const std::vector<at::Tensor>& pseudo_gradients,
                     const std::vector<std::string>& names) {
  const int n = group.world_size();
  const int rank = group.rank();
  named_ = !names.empty();
  if (named_ && static_cast<int>(names.size()) != n) {
    throw Error("[audit] " + std::to_string(names.size()) + " island names for a group of " +
                std::to_string(n));
  }
  names_ = names;
  for (int r = 0; !named_ && r < n; ++r) names_.push_back(std::to_string(r));
  excluded_.assign(static_cast<std::size_t>(n), false);
  const auto& gone = stats_.excluded_names;  // across groups: names, not ranks
  for (int r = 0; r < n; ++r) {
    excluded_[static_cast<std::size_t>(r)] =
        std::find(gone.begin(), gone.end(), names_[static_cast<std::size_t>(r)]) != gone.end();
  }
  if (stats_.audits_of.size() < static_cast<std::size_t>(n)) {
    stats_.audits_of.resize(static_cast<std::size_t>(n), 0);
  }
  end_state_ = hooks_.inner_state();
  Digest nonce{};
  if (RAND_bytes(nonce.data(), static_cast<int>(nonce.size())) != 1) {
    throw Error("[audit] libcrypto's RAND_bytes failed");
  }
  Commitment mine;
  mine.outer_step = outer_step;
  mine.island = rank;
  mine.first_step = first_step_;
  mine.steps = inner_step - first_step_;
  mine.data_seed = hooks_.data_seed;
  mine.start_state = start_digest_;
  mine.end_state = hooks_.inner_digest();
  mine.pseudo_gradient = sha256_of(pseudo_gradients);
  mine.nonce = sha256(nonce.data(), nonce.size());
  sent_.clear();
  if (tolerance_ > 0.0) {
    for (const auto& d : pseudo_gradients) sent_.push_back(d.to(at::kCPU, at::kFloat, false, true));
  }

  const auto all = group.allgather(tensor_of(mine.serialize()), "audit_commit");
  commitments_.assign(static_cast<std::size_t>(n), Commitment{});
  const std::string where =
      "[DiLoCo outer step " + std::to_string(outer_step) + "] rank " + std::to_string(rank) + ": ";
  for (int r = 0; r < n; ++r) {
    Commitment& c = commitments_[static_cast<std::size_t>(r)];
    c = Commitment::parse(bytes_of(all[static_cast<std::size_t>(r)]), r);
    if (excluded_[static_cast<std::size_t>(r)]) continue;
    const auto before = previous_.find(names_[static_cast<std::size_t>(r)]);
    std::string wrong;
    if (c.island != r || c.outer_step != outer_step || c.first_step != mine.first_step ||
        c.steps != mine.steps) {
      wrong = "its commitment claims another round than this one (" + c.describe() + ")";
    } else if (c.data_seed != hooks_.data_seed) {
      wrong = "it claims data seed " + std::to_string(c.data_seed) + ", the run's is " +
              std::to_string(hooks_.data_seed);
    } else if (before != previous_.end() && c.start_state != before->second.end_state) {
      wrong = "it starts the round from inner-optimizer state " +
              to_hex(c.start_state).substr(0, 16) +
              ", not the end state it committed at outer step " +
              std::to_string(before->second.outer_step) + " (" +
              to_hex(before->second.end_state).substr(0, 16) + ")";
    }
    if (!wrong.empty()) {
      fail(r, outer_step,
           where + who(r) + " failed its commitment: " + wrong +
               "; it is excluded from this and every later outer step");
    }
  }

  const auto nonces =
      group.allgather(tensor_of(std::string(nonce.begin(), nonce.end())), "audit_reveal");
  std::vector<std::string> revealed_by(static_cast<std::size_t>(n));
  for (int r = 0; r < n; ++r) {
    const std::string& revealed = revealed_by[static_cast<std::size_t>(r)] =
        bytes_of(nonces[static_cast<std::size_t>(r)]);
    if (excluded_[static_cast<std::size_t>(r)]) continue;
    if (sha256(revealed.data(), revealed.size()) !=
        commitments_[static_cast<std::size_t>(r)].nonce) {
      fail(r, outer_step,
           where + who(r) +
               " revealed a nonce that does not hash to its "
               "commitment (" +
               to_hex(commitments_[static_cast<std::size_t>(r)].nonce).substr(0, 16) +
               "); it is excluded from this and every later outer step");
    }
  }
  // Only nonces that matched their commitments count: an excluded island's nonce is unchecked,
  // and could have been chosen after seeing the others'.
  std::string seed_input = std::to_string(outer_step);
  for (int r = 0; r < n; ++r) {
    if (!excluded_[static_cast<std::size_t>(r)])
      seed_input += revealed_by[static_cast<std::size_t>(r)];
  }
  auditor_of_ = select_audits(sha256(seed_input.data(), seed_input.size()), n, rate_, excluded_);
}

Auditor::Verdict Auditor::replay(int island, const std::string& message) {
  const Commitment& c = commitments_[static_cast<std::size_t>(island)];
  Verdict v;
  v.island = island;
  const std::size_t sent_bytes = tolerance_ > 0.0 ? static_cast<std::size_t>(delta_bytes()) : 0;
  if (message.size() < sent_bytes) {
    v.evidence = "it sent " + std::to_string(message.size()) +
                 " bytes, fewer than its "
                 "pseudo-gradient's " +
                 std::to_string(sent_bytes);
    return v;
  }
  AuditTask task;
  task.island = island;
  task.stream = hooks_.stream_of ? hooks_.stream_of(names_[static_cast<std::size_t>(island)])
                                 : island;
  task.first_step = c.first_step;
  task.steps = c.steps;
  task.data_seed = c.data_seed;
  task.inner_state = message.substr(0, message.size() - sent_bytes);
  std::vector<at::Tensor> sent;
  if (sent_bytes > 0) {
    std::int64_t at_byte = static_cast<std::int64_t>(task.inner_state.size());
    for (const auto& g : start_global_) {
      at::Tensor d = at::empty({g.numel()}, at::kFloat);
      std::memcpy(d.data_ptr(), message.data() + at_byte, static_cast<std::size_t>(g.numel() * 4));
      at_byte += g.numel() * 4;
      sent.push_back(d);
    }
    if (sha256_of(sent) != c.pseudo_gradient) {
      v.evidence = "the pseudo-gradient it sent for the audit is not the one it committed";
      return v;
    }
  }
  {
    at::NoGradGuard no_grad;
    for (std::size_t b = 0; b < start_global_.size(); ++b) {
      replica_.buckets()[b].flat.copy_(start_global_[b]);
    }
  }
  const auto started = std::chrono::steady_clock::now();
  ReplayDigests digests;
  try {
    digests = hooks_.replay(task);
  } catch (const std::exception& e) {
    v.evidence = std::string("the replay failed: ") + e.what();
    return v;
  }
  if (digests.start != c.start_state) {
    v.evidence = "the start state it sent (digest " + to_hex(digests.start).substr(0, 16) +
                 ") is not the one it committed (" + to_hex(c.start_state).substr(0, 16) + ")";
    return v;
  }
  stats_.replayed_steps += c.steps;
  stats_.replay_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  std::vector<at::Tensor> replayed;
  {
    at::NoGradGuard no_grad;
    for (std::size_t b = 0; b < start_global_.size(); ++b) {
      const at::Tensor local = replica_.buckets()[b].flat.to(at::kCPU, at::kFloat);
      replayed.push_back(start_global_[b].cpu() - local);
    }
  }
  const Digest pg = sha256_of(replayed);
  const Digest end_digest = digests.end;
  std::ostringstream m;
  m.precision(3);
  if (tolerance_ > 0.0) {
    double diff = 0.0, norm = 0.0;
    for (std::size_t b = 0; b < replayed.size(); ++b) {
      const double d = l2_norm(replayed[b] - sent[b]);
      const double s = l2_norm(sent[b]);
      diff += d * d;
      norm += s * s;
    }
    const double difference = norm > 0.0 ? std::sqrt(diff / norm) : (diff > 0.0 ? INFINITY : 0.0);
    v.passed = difference <= tolerance_;
    m << "replayed pseudo-gradient differs from the one sent by " << difference
      << " of its norm (tolerance " << tolerance_ << ")";
  } else {
    v.passed = pg == c.pseudo_gradient && end_digest == c.end_state;
    m << "replayed pseudo-gradient " << to_hex(pg).substr(0, 16) << " (committed "
      << to_hex(c.pseudo_gradient).substr(0, 16) << "), end state "
      << to_hex(end_digest).substr(0, 16) << " (committed " << to_hex(c.end_state).substr(0, 16)
      << ")";
  }
  v.evidence = m.str();
  return v;
}

void Auditor::audit(Group& group, const std::vector<at::Tensor>& global, std::int64_t inner_step) {
  const int n = group.world_size();
  const int rank = group.rank();
  // Transfers: every audited island sends its start state (and, with a tolerance, its
  // pseudo-gradient) to its auditor; lengths first.
  std::vector<PendingCollective> sends;
  std::vector<at::Tensor> keep;
  std::vector<std::pair<int, at::Tensor>> lengths;  // audited island, its length (auditor side)
  for (int i = 0; i < n; ++i) {
    const int a = auditor_of_[static_cast<std::size_t>(i)];
    if (a < 0) continue;
    ++stats_.audits;
    if (rank == i) {
      std::string message = start_state_;
      for (const auto& d : sent_) message += bytes_of(d);
      at::Tensor length = at::full({1}, static_cast<std::int64_t>(message.size()), at::kLong);
      at::Tensor bytes = tensor_of(message);
      sends.push_back(group.send_async(length, a, kTransferTag + 2 * i, "audit_transfer"));
      sends.push_back(group.send_async(bytes, a, kTransferTag + 2 * i + 1, "audit_transfer"));
      keep.push_back(length);
      keep.push_back(bytes);
    }
    if (rank == a) {
      at::Tensor length = at::zeros({1}, at::kLong);
      group.recv_async(length, i, kTransferTag + 2 * i, "audit_transfer").wait();
      lengths.emplace_back(i, length);
    }
  }
  std::vector<Verdict> verdicts;
  // What an honest island can send: about its auditor's own start state, plus the
  // pseudo-gradient. Anything far larger is refused unread.
  const std::int64_t bound =
      16 * (static_cast<std::int64_t>(start_state_.size()) + delta_bytes()) + (1 << 20);
  std::vector<std::pair<int, at::Tensor>> messages;
  std::vector<PendingCollective> receives;
  for (auto& [i, length] : lengths) {
    const std::int64_t size = length.item<std::int64_t>();
    if (size < 0 || size > bound) {
      Verdict v;
      v.island = i;
      v.evidence = "it announced a start state of " + std::to_string(size) +
                   " bytes, outside [0, " + std::to_string(bound) + "]";
      verdicts.push_back(v);
      continue;
    }
    at::Tensor bytes = at::empty({size}, at::kByte);
    receives.push_back(group.recv_async(bytes, i, kTransferTag + 2 * i + 1, "audit_transfer"));
    messages.emplace_back(i, bytes);
  }
  for (auto& r : receives) r.wait();
  for (auto& s : sends) s.wait();
  for (auto& [i, bytes] : messages) verdicts.push_back(replay(i, bytes_of(bytes)));

  // Verdicts: "island passed evidence" lines, all-gathered.
  std::string mine;
  for (const auto& v : verdicts) {
    std::string evidence = v.evidence;
    for (char& ch : evidence) {
      if (ch == '\n') ch = ' ';
    }
    mine += std::to_string(v.island) + " " + (v.passed ? "1" : "0") + " " + evidence + "\n";
  }
  const auto all = group.allgather_bytes(mine, "audit_verdict");
  for (int i = 0; i < n; ++i) {
    const int a = auditor_of_[static_cast<std::size_t>(i)];
    if (a < 0) continue;
    std::istringstream lines(all[static_cast<std::size_t>(a)]);
    std::string line;
    bool found = false, passed = false;
    std::string evidence;
    while (std::getline(lines, line)) {
      std::istringstream fields(line);
      int island = -1, ok = 0;
      if (!(fields >> island >> ok) || island != i) continue;
      std::getline(fields >> std::ws, evidence);
      found = true;
      passed = ok == 1;
    }
    const Commitment& c = commitments_[static_cast<std::size_t>(i)];
    std::ostringstream m;
    m << "[DiLoCo outer step " << c.outer_step << "] rank " << rank << ": ";
    if (!found) {
      m << "auditor " << who(a) << " gave no verdict on " << who(i)
        << " (counted as not audited)";
      std::fprintf(stderr, "%s\n", m.str().c_str());
      --stats_.audits;
      continue;
    }
    ++stats_.audits_of[static_cast<std::size_t>(i)];
    if (passed) continue;
    m << who(i) << " failed its audit by " << who(a) << ": " << evidence
      << "; commitment: " << c.describe() << "; it is excluded from every later outer step";
    fail(i, c.outer_step, m.str());
  }

  // The next round starts from the new global weights and the state this island committed as
  // its end state (the inner optimizer has not stepped since).
  keep_start(global, std::move(end_state_), commitments_[static_cast<std::size_t>(rank)].end_state,
             inner_step);
  sent_.clear();
  // The chain: each island's next start state must be the end state it committed now.
  for (int r = 0; r < n; ++r) {
    previous_[names_[static_cast<std::size_t>(r)]] = commitments_[static_cast<std::size_t>(r)];
  }
}

}  // namespace diloco
