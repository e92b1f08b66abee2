// A C++ island for the Python bindings' tests: the twin of worker.py. It reads the same JSON
// config, runs the same task with the C++ API directly (train_lm's GPT, torch::optim::SGD,
// diloco::DiLoCo over torch::nn::Module) and writes the same files, so that a run of C++ islands,
// a run of Python islands, and a mixed run can be compared byte for byte.
//
// Usage: cpp_peer CONFIG.json OUTDIR   (with MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE set)
#include <diloco/diloco.h>
#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model.h"

namespace {

using nlohmann::json;

at::Tensor flat_copy(const diloco::DiLoCo& sync) {
  std::vector<at::Tensor> parts;
  for (const auto& b : sync.parameters().buckets()) parts.push_back(b.flat.detach().reshape(-1));
  return torch::cat(parts).clone();
}

json train(const json& config, const std::shared_ptr<diloco::Group>& group,
           const std::string& out) {
  const int rank = group->rank();
  const std::int64_t seed = config["seed"];
  const auto& m = config["model"];
  torch::manual_seed(static_cast<std::uint64_t>(seed));
  train_lm::GptConfig gpt;
  gpt.d_model = m["d_model"];
  gpt.layers = m["layers"];
  gpt.heads = m["heads"];
  gpt.seq_len = m["seq_len"];
  train_lm::Gpt model(gpt);
  torch::optim::SGD inner(model->parameters(), torch::optim::SGDOptions(config["lr"].get<double>()));
  diloco::DiLoCoOptions options;
  options.inner_steps = config["inner_steps"];
  options.outer.lr = config["outer_lr"];
  options.outer.momentum = config["outer_momentum"];
  options.outer.nesterov = true;
  options.compression = config.value("compression", std::string("none"));
  diloco::DiLoCo sync(*model, inner, group, options);

  torch::manual_seed(static_cast<std::uint64_t>(seed * 1000 + 1 + rank));
  const std::int64_t steps = config["steps"];
  const std::int64_t batch = config["batch"];
  std::vector<double> losses;
  for (std::int64_t step = 1; step <= steps; ++step) {
    auto tokens = torch::randint(0, config["symbols"].get<std::int64_t>(), {batch, gpt.seq_len + 1}, torch::kLong);
    auto inputs = tokens.slice(1, 0, gpt.seq_len).contiguous();
    auto targets = tokens.slice(1, 1, gpt.seq_len + 1).contiguous();
    auto loss = train_lm::language_model_loss(model, inputs, targets);
    inner.zero_grad();
    loss.backward();
    inner.step();
    losses.push_back(loss.item<double>());
    sync.step();
  }
  if (steps % options.inner_steps != 0) sync.sync();
  at::Tensor flat = flat_copy(sync);
  std::ofstream bin(out + "/rank" + std::to_string(rank) + ".bin", std::ios::binary);
  bin.write(reinterpret_cast<const char*>(flat.data_ptr<float>()),
            static_cast<std::streamsize>(flat.numel() * sizeof(float)));
  std::vector<std::string> names;
  for (const auto& p : sync.parameters().parameters()) names.push_back(p.name);
  const auto s = sync.stats();
  return {{"names", names},
          {"losses", losses},
          {"stats",
           {{"inner_steps", s.inner_steps},
            {"outer_steps", s.outer_steps},
            {"sync_seconds", s.sync_seconds},
            {"bytes_sent", s.bytes_sent},
            {"bytes_received", s.bytes_received}}}};
}

json bytes_task(const json& config, const std::shared_ptr<diloco::Group>& group) {
  json result = json::object();
  for (const std::string spec : config["specs"]) {
    torch::manual_seed(static_cast<std::uint64_t>(1 + group->rank()));
    std::vector<diloco::NamedParameter> named;
    std::vector<at::Tensor> tensors;
    int i = 0;
    for (const auto& shape : config["shapes"]) {
      auto t = torch::randn(shape.get<std::vector<std::int64_t>>()).set_requires_grad(true);
      tensors.push_back(t);
      named.push_back({"t" + std::to_string(i++), t});
    }
    diloco::DiLoCoOptions options;
    options.inner_steps = 1;
    options.compression = spec;
    diloco::DiLoCo sync(diloco::ModelTensors{named, {}, c10::nullopt}, group, options);
    {
      torch::NoGradGuard no_grad;
      for (auto& t : tensors) t.add_(torch::randn(t.sizes()) * 0.01);
    }
    group->reset_stats();
    sync.step();
    json ops = json::object();
    for (const auto& [label, s] : group->stats().ops) {
      ops[label] = {s.calls, s.bytes_sent, s.bytes_received};
    }
    result[spec] = ops;
  }
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: cpp_peer CONFIG.json OUTDIR\n");
    return 2;
  }
  try {
    at::set_num_threads(1);
    json config = json::parse(std::ifstream(argv[1]));
    auto options = diloco::GroupOptions::from_env();
    options.timeout = std::chrono::milliseconds(
        static_cast<std::int64_t>(config.value("timeout_s", 60.0) * 1000));
    auto group = diloco::Group::create(options);
    json result = json::object();
    for (const std::string task : config["tasks"]) {
      if (task == "train") result.update(train(config, group, argv[2]));
      if (task == "bytes") result["bytes"] = bytes_task(config, group);
    }
    result["language"] = "c++";
    std::ofstream(std::string(argv[2]) + "/rank" + std::to_string(group->rank()) + ".json")
        << result.dump();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cpp_peer: error: %s\n", e.what());
    return 1;
  }
}
