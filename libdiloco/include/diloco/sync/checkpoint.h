// Checkpoints of a DiLoCo island: everything it needs to resume bit-exactly.
//
// A checkpoint file holds the outer state (sync/outer_state.h: global weights, outer momentum,
// exchange state, step counters), the island's own weights, the state of its inner optimizers,
// the configuration it was written under (the fields of DiLoCo's fingerprint: H, codec, outer
// optimizer, parameter names and shapes, ...) and the caller's own fields (a data position, an
// RNG state). Format: a LibTorch archive (torch::serialize) whose payload is itself an archive of
// the above, stored as bytes beside its SHA-256 (OpenSSL libcrypto), so that a truncated or
// corrupted file is found before anything of it is used.
//
// Writing is atomic: the bytes go to a temporary file in the same folder, which is fsync'ed and
// renamed over the target (then the folder is fsync'ed); a crash leaves the old file or the new
// one, never half of one. CheckpointDir keeps the last K of a run, named by outer step, and finds
// the newest intact one.
//
// Errors: a file that cannot be read, is truncated or fails its checksum is an Error naming it;
// a checkpoint of another configuration is an OptionError naming the first field that differs
// and both values. Nothing is changed by a load that fails.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace diloco {

// Hex SHA-256 of `size` bytes (libcrypto).
std::string sha256_hex(const void* data, std::size_t size);

// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync of the folder).
// Throws Error naming the path.
void write_file_atomically(const std::string& path, const std::string& bytes);

// A folder of checkpoints, "ckpt-<outer step, 8 digits>.pt", of which the newest `keep` are kept.
class CheckpointDir {
 public:
  // Creates the folder if needed; OptionError for keep < 1 or a folder that cannot be made.
  CheckpointDir(std::string dir, int keep = 3);

  const std::string& dir() const { return dir_; }
  std::string path_for(std::int64_t outer_step) const;
  // The outer steps of the checkpoints present, newest first (names only; not verified).
  std::vector<std::int64_t> steps() const;
  // Those whose checksum verifies, newest first; each one that does not is described in
  // `problems` ("'<path>': <why>"), so that the caller can say which it skipped.
  std::vector<std::int64_t> intact_steps(std::vector<std::string>* problems = nullptr) const;
  // Removes all but the newest `keep` checkpoints (and stray temporary files).
  void prune() const;

 private:
  std::string dir_;
  int keep_;
};

// Throws Error naming `path` when it cannot be read, is truncated, or fails its checksum.
void verify_checkpoint(const std::string& path);

}  // namespace diloco
