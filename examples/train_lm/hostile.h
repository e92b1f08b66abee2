// Hostile islands, for the tests and benchmarks of the library's screening and robust
// aggregators (train_lm --hostile KIND --hostile-rank R): what one dishonest or broken island can
// send in place of its pseudo-gradient. Never part of a real run.
//
//   huge    its weights jump by 1e30 before each outer step (a pseudo-gradient of -1e30 everywhere)
//   flip    its pseudo-gradient negated (the island trains toward the opposite of its data)
//   scale   its pseudo-gradient times 10
//   stale   the pseudo-gradient it sent at the previous outer step, again (the first is honest)
//   random  random bytes in place of its payload, of the right size (a registered codec that
//           wraps the run's; needs --compress with a codec, so that every island's exchange
//           issues the same collectives)
// The first four change the island's model right before the step that sends it; the library
// sees an island whose training went wrong. "random" is below the codec, past every check an
// island makes of its own pseudo-gradient.
//
// Cheats, for the tests and benchmark of the audits (train_lm --cheat KIND --cheat-rank R): an
// island that claims work it did not do, with updates that look honest to the screening.
//   lazy    it runs one inner step in four (the loop skips the others) and sends what it got
//   noise   Gaussian noise with its honest pseudo-gradient's norm in place of it
//   scale   its pseudo-gradient times 2 (more pull on the average than its work earned)
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace diloco {
class DiLoCo;
}

namespace train_lm {

class HostileIsland {
 public:
  static const std::vector<std::string>& kinds();
  static const std::vector<std::string>& cheat_kinds();
  // The compression spec the hostile island runs: the run's, or for "random" a codec that sends
  // random bytes shaped like the run's payloads (registered on first use).
  static std::string compression_for(const std::string& kind, const std::string& compression);

  // `kind` from kinds(), or "noise" and "scale" as cheats (scale x2 instead of x10); "lazy" is
  // the loop's and changes nothing here.
  HostileIsland(std::string kind, std::uint64_t seed, bool cheat = false);
  // Right before the DiLoCo step that sends the pseudo-gradient (global - local): sets the
  // model's weights so that it is the hostile one.
  void before_outer_step(const diloco::DiLoCo& sync);

 private:
  std::string kind_;
  double scale_;
  std::mt19937_64 noise_;
  std::vector<at::Tensor> previous_;  // stale: the pseudo-gradient sent last time, per bucket
};

}  // namespace train_lm
