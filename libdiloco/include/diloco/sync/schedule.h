// Streaming DiLoCo's schedule (Douillard et al. 2025, arXiv 2501.18512, §2): which fragment of
// the model starts its exchange, and which one is applied, after each inner step. Pure: no
// tensors, no collectives, so it is the same on every island by construction.
//
// Terms: H inner steps per outer step of a fragment; P fragments (disjoint sets of parameters);
// overlap tau: a fragment's exchange starts after inner step t and its averaged pseudo-gradient
// is applied after inner step t + tau, the island training on meanwhile.
// Fragment p (0-based) starts after inner steps t = o_p, o_p + H, o_p + 2H, ..., where
//   o_p = floor((p + 1) * H / P),
// so the starts are staggered by H/P, the last fragment starts after step H as a non-streaming
// DiLoCo step does, and no two fragments start after the same step (o_p strictly increases as
// long as P <= H). With tau < H/P (the smallest gap between starts; 0 <= tau < min gap) at most
// one exchange is in flight at a time. P = 1, tau = 0 is DiLoCo: the whole model every H steps.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace diloco {

class StreamingSchedule {
 public:
  static constexpr std::int64_t kNone = -1;

  // Throws OptionError naming inner_steps (H >= 1), fragments (P in [1, H]) or overlap_steps
  // (tau in [0, smallest gap between starts), the gap printed).
  StreamingSchedule(std::int64_t inner_steps, std::int64_t fragments, std::int64_t overlap_steps);

  std::int64_t inner_steps() const { return h_; }
  std::int64_t fragments() const { return p_; }
  std::int64_t overlap_steps() const { return tau_; }
  // o_p above.
  std::int64_t offset(std::int64_t fragment) const;

  // After inner step `step` (1-based): the fragment whose exchange starts, or kNone.
  std::int64_t starts_after(std::int64_t step) const;
  // After inner step `step`: the fragment whose exchange is applied (it started tau steps
  // earlier), or kNone. With tau = 0 it is the fragment that starts after the same step.
  std::int64_t finishes_after(std::int64_t step) const;

 private:
  std::int64_t h_, p_, tau_;
};

// The default fragment of each parameter (Streaming DiLoCo's strided pattern): a parameter whose
// qualified name holds a block index ("blocks.3.attn.weight": the first all-digit component)
// goes to fragment index % P; the others (embeddings, head, final norm), taken in order, are
// dealt round-robin so that each fragment gets its share of them.
std::vector<std::int64_t> strided_fragments(const std::vector<std::string>& names,
                                            std::int64_t fragments);

// Size-balanced fragments: parameters, largest first, each to the fragment holding the fewest
// elements so far (ties: the lowest index). Deterministic, so the same on every island.
std::vector<std::int64_t> balanced_fragments(const std::vector<std::int64_t>& numels,
                                             std::int64_t fragments);

// DiLoCo's default: strided_fragments when the names hold at least P distinct block indices
// (each fragment then gets whole blocks), balanced_fragments otherwise (a model with fewer blocks
// than fragments would leave some fragments with only an embedding or a norm).
std::vector<std::int64_t> default_fragments(const std::vector<std::string>& names,
                                            const std::vector<std::int64_t>& numels,
                                            std::int64_t fragments);

}  // namespace diloco
