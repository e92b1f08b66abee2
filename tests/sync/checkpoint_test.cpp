// Checkpoints: DiLoCo::save/load carry the outer state, the island's weights, its inner
// optimizers' state (AdamW, Muon) and the caller's fields, so that a resumed island continues bit
// for bit; a corrupted or truncated file is an Error naming it; a checkpoint of another
// configuration is an OptionError naming the field; CheckpointDir keeps the newest K and tells
// intact checkpoints from broken ones.
#include <ATen/ATen.h>
#include <torch/torch.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "diloco/diloco.h"
#include "support/catch.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

struct Net : torch::nn::Module {
  Net() {
    fc1 = register_module("fc1", torch::nn::Linear(6, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 3));
  }
  torch::Tensor forward(torch::Tensor x) { return fc2->forward(torch::tanh(fc1->forward(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

// One island: the model, AdamW for the biases and Muon for the matrices, and DiLoCo over them.
struct Island {
  explicit Island(std::shared_ptr<diloco::Group> group, std::int64_t inner_steps = 3) {
    torch::manual_seed(11);
    net = std::make_shared<Net>();
    adamw = std::make_unique<torch::optim::AdamW>(
        std::vector<at::Tensor>{net->fc1->bias, net->fc2->bias}, torch::optim::AdamWOptions(0.01));
    muon = std::make_unique<diloco::Muon>(std::vector<at::Tensor>{net->fc1->weight, net->fc2->weight});
    diloco::DiLoCoOptions o;
    o.inner_steps = inner_steps;
    o.compression = "int8+ef";
    auto tensors = diloco::ModelTensors::of(*net);
    sync = std::make_unique<diloco::DiLoCo>(std::move(tensors), std::move(group), o);
  }
  std::vector<torch::optim::Optimizer*> inner() { return {adamw.get(), muon.get()}; }
  void train_step(int rank, int step) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(100 * rank + step);
    const at::Tensor x = at::randn({8, 6}, gen), y = at::randn({8, 3}, gen);
    adamw->zero_grad();
    muon->zero_grad();
    (net->forward(x) - y).pow(2).mean().backward();
    adamw->step();
    muon->step();
    sync->step();
  }
  std::shared_ptr<Net> net;
  std::unique_ptr<torch::optim::AdamW> adamw;
  std::unique_ptr<diloco::Muon> muon;
  std::unique_ptr<diloco::DiLoCo> sync;
};

std::string temp_dir(const std::string& name) {
  return (fs::temp_directory_path() / ("diloco_ckpt_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

}  // namespace

TEST_CASE("a checkpoint resumes an island bit for bit, inner optimizers included",
          "[checkpoint][diloco][gloo]") {
  constexpr int kWorld = 2;
  std::vector<std::string> sha_continued(kWorld), sha_resumed(kWorld), step_field(kWorld);
  std::vector<bool> params_equal(kWorld);
  diloco_test::run_ranks(kWorld, [&](int rank, std::shared_ptr<diloco::Group> group) {
    const std::string dir = temp_dir("resume" + std::to_string(rank));
    diloco::CheckpointDir checkpoints(dir, 2);
    Island a(group);
    for (int s = 1; s <= 6; ++s) a.train_step(rank, s);
    a.sync->save(checkpoints.path_for(2), a.inner(), {{"step", "6"}});
    for (int s = 7; s <= 12; ++s) a.train_step(rank, s);
    sha_continued[rank] = a.sync->state().sha256();

    Island b(group);
    auto extra = b.sync->load(checkpoints.path_for(2), b.inner());
    step_field[rank] = extra["step"];
    for (int s = 7; s <= 12; ++s) b.train_step(rank, s);
    sha_resumed[rank] = b.sync->state().sha256();
    bool equal = true;
    auto pa = a.net->parameters(), pb = b.net->parameters();
    for (std::size_t i = 0; i < pa.size(); ++i) equal = equal && at::equal(pa[i], pb[i]);
    params_equal[rank] = equal;
    fs::remove_all(dir);
  });
  for (int r = 0; r < kWorld; ++r) {
    INFO("rank " << r);
    CHECK(step_field[r] == "6");
    CHECK(sha_resumed[r] == sha_continued[r]);
    CHECK(params_equal[r]);  // the island's own weights and inner optimizer state too
    CHECK(sha_continued[r] == sha_continued[0]);
  }
}

TEST_CASE("a broken or foreign checkpoint is refused, naming the file or the field",
          "[checkpoint][diloco][gloo]") {
  std::string corrupted, truncated, foreign, not_intact;
  std::vector<std::int64_t> intact, kept;
  diloco_test::run_ranks(1, [&](int, std::shared_ptr<diloco::Group> group) {
    const std::string dir = temp_dir("broken");
    diloco::CheckpointDir checkpoints(dir, 2);
    Island a(group);
    for (int s = 1; s <= 3; ++s) a.train_step(0, s);
    for (std::int64_t step : {1, 2, 3}) a.sync->save(checkpoints.path_for(step), a.inner());
    checkpoints.prune();
    kept = checkpoints.steps();
    // Flip one byte in the middle of checkpoint 3; cut checkpoint 2 in half.
    const std::string p3 = checkpoints.path_for(3), p2 = checkpoints.path_for(2);
    {
      std::fstream f(p3, std::ios::in | std::ios::out | std::ios::binary);
      const auto middle = static_cast<std::streamoff>(fs::file_size(p3) / 2);
      f.seekg(middle);
      const char byte = static_cast<char>(f.get());
      f.seekp(middle);
      f.put(static_cast<char>(~byte));  // always another byte (a fixed one may be the same)
    }
    fs::resize_file(p2, fs::file_size(p2) / 2);
    auto error_of = [&](Island& island, const std::string& path) -> std::string {
      try {
        island.sync->load(path, island.inner());
      } catch (const diloco::Error& e) {
        return e.what();
      }
      return "loaded";
    };
    corrupted = error_of(a, p3);
    truncated = error_of(a, p2);
    std::vector<std::string> problems;
    intact = checkpoints.intact_steps(&problems);
    not_intact = problems.empty() ? "" : problems.front();
    // A good checkpoint of H = 3 loaded under H = 4.
    a.sync->save(checkpoints.path_for(4), a.inner());
    Island other(group, /*inner_steps=*/4);
    try {
      other.sync->load(checkpoints.path_for(4), other.inner());
      foreign = "loaded";
    } catch (const diloco::OptionError& e) {
      foreign = e.what();
    }
    fs::remove_all(dir);
  });
  CHECK(kept == std::vector<std::int64_t>{3, 2});
  CHECK_THAT(corrupted, Contains("ckpt-00000003.pt"));
  CHECK_THAT(truncated, Contains("ckpt-00000002.pt"));
  CHECK(intact.empty());
  CHECK_THAT(not_intact, Contains("ckpt-0000000"));
  CHECK_THAT(foreign, Contains("inner_steps (H)") && Contains("'3'") && Contains("'4'"));
}
