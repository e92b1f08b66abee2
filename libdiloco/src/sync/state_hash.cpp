// XXH3-128 from xxHash (libxxhash-dev). On x86-64 builds that found the library, its dispatcher
// picks the widest vector unit the CPU has (AVX-512, AVX2, else SSE2): the hash is on the outer
// step's critical path, and with SSE2 alone it took about 2% of a loopback sync of the example
// model. Elsewhere the header-only XXH3 (no library to link).
#include "sync/state_hash.h"

#ifdef DILOCO_XXH3_DISPATCH
#include <xxhash.h>
#include <xxh_x86dispatch.h>  // XXH3_128bits_update -> XXH3_128bits_update_dispatch
#else
#define XXH_INLINE_ALL
#include <xxhash.h>
#endif

#include "diloco/errors.h"

namespace diloco {

struct StateHasher::State {
  XXH3_state_t* xxh = nullptr;
};

StateHasher::StateHasher(std::int64_t outer_step, std::int64_t fragment)
    : state_(std::make_unique<State>()) {
  state_->xxh = XXH3_createState();
  if (state_->xxh == nullptr) throw Error("[DiLoCo] out of memory for the state hash");
  XXH3_128bits_reset(state_->xxh);
  const std::int64_t counters[2] = {outer_step, fragment};
  XXH3_128bits_update(state_->xxh, counters, sizeof counters);
  visit_ = [xxh = state_->xxh](const float* data, std::int64_t n) {
    XXH3_128bits_update(xxh, data, static_cast<std::size_t>(n) * sizeof(float));
  };
}

StateHasher::~StateHasher() { XXH3_freeState(state_->xxh); }

std::pair<std::uint64_t, std::uint64_t> StateHasher::digest() const {
  const XXH128_hash_t h = XXH3_128bits_digest(state_->xxh);
  return {h.high64, h.low64};
}

}  // namespace diloco
