// The audit protocol of one island across outer steps (diloco/audit/audit.h), driven by DiLoCo:
//   begin_round()  the round's start: its global weights and inner-optimizer state are kept;
//   commit()       before the exchange: commitments and nonces all-gathered and checked, the
//                  audits of this outer step drawn (excluded_ranks(): the islands left out);
//   audit()        after the outer step: start states sent to the auditors, rounds replayed,
//                  verdicts all-gathered; a failure excludes the island; then the next round
//                  begins.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "diloco/audit/audit.h"
#include "diloco/sync/parameters.h"

namespace diloco {

class Group;

class Auditor {
 public:
  // `model` is the island's own FlatParameters: the replica is laid out like it. Throws
  // OptionError for hooks without a function or a replica that differs from the model.
  Auditor(AuditHooks hooks, double rate, double tolerance, const FlatParameters& model,
          int islands);

  void begin_round(const std::vector<at::Tensor>& global, std::int64_t first_step);
  // Collective (two all-gathers). `pseudo_gradients` per bucket, as about to be sent. `names`:
  // the islands' names in rank order (an elastic run's members), or empty in a static group
  // (the ranks are the names). May be called again for the same outer step in a new group (an
  // elastic run redoing a step): the chain of states is checked against the last audited step.
  void commit(Group& group, std::int64_t outer_step, std::int64_t inner_step,
              const std::vector<at::Tensor>& pseudo_gradients,
              const std::vector<std::string>& names = {});
  // Collective (point to point, then one all-gather); then begins the next round from `global`.
  void audit(Group& group, const std::vector<at::Tensor>& global, std::int64_t inner_step);

  const AuditStats& stats() const { return stats_; }
  // The ranks of the current group whose contributions are left out (excluded islands).
  std::vector<int> excluded_ranks() const;

 private:
  struct Verdict {
    int island = -1;
    bool passed = false;
    std::string evidence;  // one line
  };
  Verdict replay(int island, const std::string& message);
  // The round's start: its global weights, and this island's inner-optimizer state and digest.
  void keep_start(const std::vector<at::Tensor>& global, std::string state, const Digest& digest,
                  std::int64_t first_step);
  // Bytes of a float32 pseudo-gradient of the whole model.
  std::int64_t delta_bytes() const;
  void fail(int island, std::int64_t outer_step, const std::string& report);
  // "rank 2", or in an elastic run "rank 2 (island 3.1)".
  std::string who(int island) const;

  AuditHooks hooks_;
  double rate_;
  double tolerance_;
  FlatParameters replica_;
  std::vector<bool> excluded_;             // by rank in the current group
  std::vector<std::string> names_;        // the current group's islands, in rank order
  bool named_ = false;                    // names_ came from a membership
  AuditStats stats_;
  // The round in progress.
  std::vector<at::Tensor> start_global_;  // per bucket, float32
  std::string start_state_;               // this island's inner-optimizer state at its start
  Digest start_digest_{};
  std::int64_t first_step_ = 0;
  // Between commit() and audit().
  std::string end_state_;
  std::vector<at::Tensor> sent_;         // this island's pseudo-gradient (tolerance mode)
  std::vector<Commitment> commitments_;         // this outer step's, by rank
  std::map<std::string, Commitment> previous_;  // the last audited step's, by name (the chain)
  std::vector<int> auditor_of_;          // select_audits
};

}  // namespace diloco
