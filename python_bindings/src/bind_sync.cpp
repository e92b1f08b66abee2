// Bindings of diloco/sync: DiLoCo and DataParallel over named tensors (diloco::ModelTensors:
// parameters, buffers, and the tensors the inner optimizer steps), and SyncStats.
//
// The tensors are the caller's own (the torch.nn.Parameter objects of a Python model): the
// library rebinds their storage into flat buffers with Tensor::set_data, which changes the very
// TensorImpl the Python objects wrap, so the model, its optimizer and the library share memory
// with no copies. The Python package (diloco/_api.py) builds the arguments from a torch.nn.Module
// (named_parameters, named_buffers) and a torch.optim optimizer (its param_groups' tensors).
#include <diloco/audit/audit.h>
#include <diloco/elastic/membership.h>
#include <diloco/errors.h>
#include <diloco/sync/buffers.h>
#include <diloco/sync/data_parallel.h>
#include <diloco/sync/diloco.h>
#include <diloco/sync/speed_balancer.h>
#include <diloco/sync/parameters.h>
#include <diloco/sync/sync_stats.h>
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "bindings.h"

namespace diloco_python {
namespace {

using Release = py::call_guard<py::gil_scoped_release>;
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

std::vector<diloco::NamedParameter> to_named(NamedTensors tensors) {
  std::vector<diloco::NamedParameter> out;
  out.reserve(tensors.size());
  for (auto& [name, tensor] : tensors) out.push_back({std::move(name), std::move(tensor)});
  return out;
}

using Fields = std::vector<std::pair<std::string, std::string>>;

// What the Python wrappers hand over: the module's parameters and buffers, and the tensors the
// user's torch.optim optimizer steps (None when the caller steps them itself). The library checks
// inside its collective model check that every parameter is among them, so a parameter missing
// on one rank raises the same error on every rank instead of leaving the others waiting.
diloco::ModelTensors model_tensors(NamedTensors parameters, NamedTensors buffers,
                                   std::optional<std::vector<at::Tensor>> optimized) {
  diloco::ModelTensors model;
  model.parameters = to_named(std::move(parameters));
  model.buffers = to_named(std::move(buffers));
  if (optimized) model.optimized = std::move(*optimized);
  return model;
}

// DiLoCo plus the Group's Python handle, so that `outer.group is pg`. Elastic runs: built over a
// Membership (the membership's group; `outer.group is membership.group`), which it keeps alive.
// Holds no Python object: it is built and may be destroyed with the GIL released.
class PyDiLoCo {
 public:
  PyDiLoCo(diloco::ModelTensors model, std::shared_ptr<diloco::Group> group,
           diloco::DiLoCoOptions options)
      : group_(group),
        impl_(std::make_unique<diloco::DiLoCo>(std::move(model), std::move(group),
                                               std::move(options))) {}
  PyDiLoCo(diloco::ModelTensors model, std::shared_ptr<diloco::Membership> membership,
           std::shared_ptr<diloco::Group> group, diloco::DiLoCoOptions options)
      : group_(std::move(group)),
        membership_(membership),
        impl_(std::make_unique<diloco::DiLoCo>(std::move(model), std::move(membership),
                                               std::move(options))) {}

  diloco::DiLoCo& impl() { return *impl_; }
  const diloco::DiLoCo& impl() const { return *impl_; }
  const std::shared_ptr<diloco::Group>& group() const { return group_; }
  bool elastic() const { return membership_ != nullptr; }

 private:
  std::shared_ptr<diloco::Group> group_;
  std::shared_ptr<diloco::Membership> membership_;  // elastic runs only
  std::unique_ptr<diloco::DiLoCo> impl_;
};

// A Python callable kept by C++ code that may drop it without the GIL (DiLoCo is destroyed with
// the GIL released): the last reference takes the GIL to release it.
std::shared_ptr<py::function> keep(py::function f) {
  return std::shared_ptr<py::function>(new py::function(std::move(f)), [](py::function* p) {
    py::gil_scoped_acquire gil;
    delete p;
  });
}

diloco::Digest to_digest(const py::bytes& b, const char* what) {
  const std::string s = b;
  if (s.size() != 32) {
    throw diloco::OptionError(std::string("[audit] ") + what + " must return 32 bytes (a SHA-256), "
                              "got " + std::to_string(s.size()));
  }
  diloco::Digest d{};
  std::copy(s.begin(), s.end(), d.begin());
  return d;
}

// The audit hooks from Python callables (diloco.DiLoCo.enable_audits builds them from torch
// optimizers). DiLoCo calls them inside step(), which runs with the GIL released: each takes it.
diloco::AuditHooks python_audit_hooks(py::function inner_state, py::function inner_digest,
                                      NamedTensors replica, py::function replay,
                                      std::int64_t data_seed, py::object stream_of) {
  diloco::AuditHooks hooks;
  hooks.data_seed = data_seed;
  if (!stream_of.is_none()) {
    auto of = keep(stream_of.cast<py::function>());
    hooks.stream_of = [of](const std::string& island) {
      py::gil_scoped_acquire gil;
      return (*of)(island).cast<std::int64_t>();
    };
  }
  hooks.replica = to_named(std::move(replica));
  auto state = keep(std::move(inner_state));
  auto digest = keep(std::move(inner_digest));
  auto run = keep(std::move(replay));
  hooks.inner_state = [state] {
    py::gil_scoped_acquire gil;
    return std::string(py::bytes((*state)()));
  };
  hooks.inner_digest = [digest] {
    py::gil_scoped_acquire gil;
    return to_digest(py::bytes((*digest)()), "inner_digest()");
  };
  hooks.replay = [run](const diloco::AuditTask& task) {
    py::gil_scoped_acquire gil;
    py::tuple out = (*run)(task.stream, task.first_step, task.steps, task.data_seed,
                           py::bytes(task.inner_state));
    if (out.size() != 2) {
      throw diloco::OptionError("[audit] replay() must return (start digest, end digest)");
    }
    diloco::ReplayDigests d;
    d.start = to_digest(out[0].cast<py::bytes>(), "replay()'s start digest");
    d.end = to_digest(out[1].cast<py::bytes>(), "replay()'s end digest");
    return d;
  };
  return hooks;
}

// DataParallel plus its group and buffer mode (the C++ class keeps its options private).
class PyDataParallel {
 public:
  PyDataParallel(diloco::ModelTensors model, std::shared_ptr<diloco::Group> group,
                 diloco::DataParallelOptions options)
      : group_(group),
        buffers_(options.buffers),
        impl_(std::make_unique<diloco::DataParallel>(std::move(model), std::move(group),
                                                     std::move(options))) {}

  diloco::DataParallel& impl() { return *impl_; }
  const diloco::DataParallel& impl() const { return *impl_; }
  const std::shared_ptr<diloco::Group>& group() const { return group_; }
  diloco::BufferSync buffers() const { return buffers_; }

 private:
  std::shared_ptr<diloco::Group> group_;
  diloco::BufferSync buffers_;
  std::unique_ptr<diloco::DataParallel> impl_;
};

diloco::DiLoCoOptions make_options(std::int64_t inner_steps, double outer_lr, double outer_momentum,
                                   bool nesterov, const std::optional<std::string>& outer_device,
                                   const std::string& compression, const std::string& buffers,
                                   Fields agree_on) {
  diloco::DiLoCoOptions options;
  options.inner_steps = inner_steps;
  options.outer.lr = outer_lr;
  options.outer.momentum = outer_momentum;
  options.outer.nesterov = nesterov;
  options.compression = compression;
  options.buffers = diloco::parse_buffer_sync(buffers);
  options.agree_on = std::move(agree_on);
  if (outer_device) {
    try {
      options.outer_device = c10::Device(*outer_device);
    } catch (const c10::Error& e) {
      throw diloco::OptionError(
          "[DiLoCo] outer_device '" + *outer_device +
          "' is not a device (expected e.g. 'cpu' or 'cuda:0'): " + e.what_without_backtrace());
    }
  }
  return options;
}

std::string repr(const diloco::SyncStats& s) {
  std::ostringstream out;
  out << "SyncStats(inner_steps=" << s.inner_steps << ", outer_steps=" << s.outer_steps
      << ", sync_seconds=" << s.sync_seconds << ", wait_seconds=" << s.wait_seconds
      << ", bytes_sent=" << s.bytes_sent
      << ", bytes_received=" << s.bytes_received << ")";
  return out.str();
}

std::vector<std::string> names_of(const diloco::FlatParameters& params) {
  std::vector<std::string> names;
  for (const auto& p : params.parameters()) names.push_back(p.name);
  return names;
}

std::vector<at::Tensor> flats_of(const diloco::FlatParameters& params) {
  std::vector<at::Tensor> flats;
  for (const auto& b : params.buckets()) flats.push_back(b.flat);
  return flats;
}

}  // namespace

void bind_sync(py::module_& m) {
  py::class_<diloco::AuditStats>(
      m, "AuditStats",
      "What an island's audits came to: audits (run anywhere in the group), failed, audits_of "
      "(per rank, its audits so far), "
      "replayed_steps and replay_seconds (this island's replays as an auditor), excluded (the "
      "ranks excluded, in order) with excluded_names, excluded_at (the outer step of each) and "
      "excluded_reasons (the failed audit's report that excluded each), last_failure (the last "
      "failed audit's report, with its evidence).")
      .def_readonly("audits", &diloco::AuditStats::audits)
      .def_readonly("failed", &diloco::AuditStats::failed)
      .def_readonly("audits_of", &diloco::AuditStats::audits_of)
      .def_readonly("replayed_steps", &diloco::AuditStats::replayed_steps)
      .def_readonly("replay_seconds", &diloco::AuditStats::replay_seconds)
      .def_readonly("excluded", &diloco::AuditStats::excluded)
      .def_readonly("excluded_names", &diloco::AuditStats::excluded_names)
      .def_readonly("excluded_at", &diloco::AuditStats::excluded_at)
      .def_readonly("last_failure", &diloco::AuditStats::last_failure)
      .def_readonly("excluded_reasons", &diloco::AuditStats::excluded_reasons)
      .def("__repr__", [](const diloco::AuditStats& a) {
        std::ostringstream out;
        out << "AuditStats(audits=" << a.audits << ", failed=" << a.failed
            << ", replayed_steps=" << a.replayed_steps << ", excluded=[";
        for (std::size_t k = 0; k < a.excluded.size(); ++k) out << (k ? ", " : "") << a.excluded[k];
        out << "])";
        return out.str();
      });

  py::class_<diloco::ExchangeTiming>(
      m, "ExchangeTiming",
      "When one fragment's exchange started, was due and completed on this island (seconds on "
      "the steady clock, which the processes of one machine share): what an island waits after "
      "every island has started an exchange is the link's, before that a slower island's "
      "(DiLoCo.on_exchange; benchmarks/exchange_log.py).")
      .def_readonly("outer_step", &diloco::ExchangeTiming::outer_step)
      .def_readonly("fragment", &diloco::ExchangeTiming::fragment)
      .def_readonly("inner_step", &diloco::ExchangeTiming::inner_step)
      .def_readonly("started", &diloco::ExchangeTiming::started)
      .def_readonly("due", &diloco::ExchangeTiming::due)
      .def_readonly("done", &diloco::ExchangeTiming::done);

  py::class_<diloco::SyncStats>(
      m, "SyncStats",
      "What a synchronizer reports: inner_steps (step() calls), outer_steps (completed syncs), "
      "sync_seconds (wall time inside syncs, compute and communication), wait_seconds (of "
      "that, the time blocked until exchanges completed: the link and the other islands), "
      "bytes_sent and "
      "bytes_received (by this rank, all collectives of its group).")
      .def_readonly("inner_steps", &diloco::SyncStats::inner_steps)
      .def_readonly("outer_steps", &diloco::SyncStats::outer_steps)
      .def_readonly("sync_seconds", &diloco::SyncStats::sync_seconds)
      .def_readonly("wait_seconds", &diloco::SyncStats::wait_seconds)
      .def_readonly("bytes_sent", &diloco::SyncStats::bytes_sent)
      .def_readonly("bytes_received", &diloco::SyncStats::bytes_received)
      .def(
          "_asdict",
          [](const diloco::SyncStats& s) {
            py::dict d;
            d["inner_steps"] = s.inner_steps;
            d["outer_steps"] = s.outer_steps;
            d["sync_seconds"] = s.sync_seconds;
            d["wait_seconds"] = s.wait_seconds;
            d["bytes_sent"] = s.bytes_sent;
            d["bytes_received"] = s.bytes_received;
            return d;
          },
          "The fields as a dict.")
      .def("__repr__", &repr);

  py::class_<diloco::SpeedBalancer>(
      m, "SpeedBalancer",
      "Islands of different speeds: a faster island takes larger batches instead of waiting for "
      "the slowest at every exchange (diloco/sync/speed_balancer.h). After each window of inner "
      "steps, observe(compute_seconds, wait_seconds) with the window's compute time and "
      "SyncStats.wait_seconds' growth; next_batch() is the batch of each inner step: base_batch "
      "times factor, rounded with error diffusion. With m the least wait / compute of the last "
      "`memory` windows, factor *= ((1 + m) / (1 + target_wait)) ** gain, or *= 1 - shrink after "
      "`memory` windows of waiting at most target_wait, within [1, max_factor].")
      .def(py::init([](std::int64_t base_batch, double target_wait, std::int64_t memory,
                       double shrink, double max_factor, double gain) {
             diloco::SpeedBalancerOptions o;
             o.target_wait = target_wait;
             o.memory = memory;
             o.shrink = shrink;
             o.max_factor = max_factor;
             o.gain = gain;
             return diloco::SpeedBalancer(base_batch, o);
           }),
           py::arg("base_batch"), py::kw_only(),
           py::arg("target_wait") = diloco::SpeedBalancerOptions{}.target_wait,
           py::arg("memory") = diloco::SpeedBalancerOptions{}.memory,
           py::arg("shrink") = diloco::SpeedBalancerOptions{}.shrink,
           py::arg("max_factor") = diloco::SpeedBalancerOptions{}.max_factor,
           py::arg("gain") = diloco::SpeedBalancerOptions{}.gain)
      .def_static("memory_for", &diloco::SpeedBalancer::memory_for, py::arg("islands"),
                  "The memory for this many islands: max(4, 3 * (islands - 1)), so that equal "
                  "islands' jitter does not ratchet their batches up.")
      .def("next_batch", &diloco::SpeedBalancer::next_batch, "The batch of the next inner step.")
      .def("observe", &diloco::SpeedBalancer::observe, py::arg("compute_seconds"),
           py::arg("wait_seconds"), "One window's compute and waiting, in seconds.")
      .def_property_readonly("factor", &diloco::SpeedBalancer::factor)
      .def_property_readonly("base_batch", &diloco::SpeedBalancer::base_batch);

  py::class_<PyDiLoCo>(
      m, "DiLoCo",
      "The C++ DiLoCo synchronizer over named tensors. Use diloco.DiLoCo, which builds it from "
      "a torch.nn.Module and a torch.optim optimizer.")
      .def(py::init([](NamedTensors parameters, NamedTensors buffers,
                       std::optional<std::vector<at::Tensor>> optimized,
                       std::variant<std::shared_ptr<diloco::Group>, std::shared_ptr<PyMembership>>
                           group_or_membership,
                       std::int64_t inner_steps, double outer_lr, double outer_momentum, bool nesterov,
                       std::optional<std::string> outer_device, std::string compression,
                       std::string buffer_sync, Fields agree_on, std::int64_t fragments,
                       std::int64_t overlap_steps, double mixing,
                       std::vector<std::int64_t> fragment_of, std::string aggregator,
                       double screen_factor, bool compare_states, double audit_rate,
                       double audit_tolerance) {
             auto model =
                 model_tensors(std::move(parameters), std::move(buffers), std::move(optimized));
             auto options = make_options(inner_steps, outer_lr, outer_momentum, nesterov,
                                         outer_device, compression, buffer_sync,
                                         std::move(agree_on));
             options.fragments = fragments;
             options.overlap_steps = overlap_steps;
             options.mixing = mixing;
             options.fragment_of = std::move(fragment_of);
             options.aggregator = std::move(aggregator);
             options.screen_factor = screen_factor;
             options.compare_states = compare_states;
             options.audit_rate = audit_rate;
             options.audit_tolerance = audit_tolerance;
             if (auto* group = std::get_if<std::shared_ptr<diloco::Group>>(&group_or_membership)) {
               return std::make_unique<PyDiLoCo>(std::move(model), std::move(*group),
                                                 std::move(options));
             }
             const auto& membership = std::get<std::shared_ptr<PyMembership>>(group_or_membership);
             if (!membership) throw diloco::OptionError("[DiLoCo] membership must not be None");
             return std::make_unique<PyDiLoCo>(std::move(model), membership->impl,
                                               membership->group, std::move(options));
           }),
           py::arg("parameters"), py::arg("buffers"), py::arg("optimized"), py::arg("group"),
           py::arg("inner_steps") = 500, py::arg("outer_lr") = 0.7, py::arg("outer_momentum") = 0.9,
           py::arg("nesterov") = true, py::arg("outer_device") = py::none(),
           py::arg("compression") = "none", py::arg("buffer_sync") = "average",
           py::arg("agree_on") = Fields{}, py::arg("fragments") = 1,
           py::arg("overlap_steps") = 0, py::arg("mixing") = 0.0,
           py::arg("fragment_of") = std::vector<std::int64_t>{}, py::arg("aggregator") = "mean",
           py::arg("screen_factor") = 100.0, py::arg("compare_states") = true,
           py::arg("audit_rate") = 0.0, py::arg("audit_tolerance") = 0.0, Release(),
           "A collective: checks that every rank has the same configuration and parameters "
           "(names, shapes, dtypes) and that each parameter is in `optimized` (unless None), "
           "then copies rank 0's parameters and buffers to every rank. `group` may be a "
           "Membership (an elastic run): an island joining a run in progress then waits here "
           "to be admitted and receives the run's outer state. The GIL is released.")
      .def(
          "next_step_would_wait", [](PyDiLoCo& d) { return d.impl().next_step_would_wait(); },
          "Whether the next step() applies an exchange that has not arrived yet and would so "
          "block (streaming with overlap_steps > 0: the fragment in flight is due after the next "
          "inner step). Never blocks. Fill that time with work instead of waiting: train_lm.py "
          "--fill-waits adds batches to that inner step's gradient. False when nothing is due "
          "next, without overlap, in elastic runs, and when the exchange failed (step() raises).")
      .def(
          "step", [](PyDiLoCo& d) { return d.impl().step(); }, Release(),
          "Call after each inner optimizer step. Every inner_steps-th call runs an outer step "
          "(a collective: all ranks call step() the same number of times) and returns True; "
          "the others return False at once.\n\n"
          "Raises PeerLostError if a peer is lost (the model then holds this rank's global "
          "weights), and Error if any rank's pseudo-gradient holds a NaN or an infinity (no "
          "non-finite value enters the global weights; the model is set to them).\n\n"
          "Elastic runs (built over a Membership): a lost or stopped peer is survived (the "
          "survivors form a new epoch and redo the outer step); RemovedError when this island "
          "was left out of the run, TooFewIslandsError below min_islands, PeerLostError only "
          "after repeated failures.")
      .def(
          "enable_audits",
          [](PyDiLoCo& d, py::function inner_state, py::function inner_digest,
             NamedTensors replica, py::function replay, std::int64_t data_seed,
             py::object stream_of) {
            auto hooks =
                python_audit_hooks(std::move(inner_state), std::move(inner_digest),
                                   std::move(replica), std::move(replay), data_seed, stream_of);
            py::gil_scoped_release release;
            d.impl().enable_audits(std::move(hooks));
          },
          py::arg("inner_state"), py::arg("inner_digest"), py::arg("replica"), py::arg("replay"),
          py::arg("data_seed") = 0, py::arg("stream_of") = py::none(),
          "Audits (audit_rate > 0; diloco/audit/audit.h): inner_state() -> bytes of this "
          "island's inner-optimizer state; inner_digest() -> its 32-byte SHA-256 by content; "
          "replica: (name, tensor) pairs of a second model; replay(stream, first_step, steps, "
          "data_seed, state) -> (start digest, end digest): loads `state` into the replica's "
          "optimizer and runs those inner steps of the island whose data stream is `stream` (its "
          "rank, or stream_of(its name) in an elastic run) on the replica. stream_of(name) -> "
          "int: required in elastic runs. "
          "diloco.DiLoCo.enable_audits builds them from torch optimizers.")
      .def(
          "audits", [](const PyDiLoCo& d) { return d.impl().audits(); },
          "AuditStats: audits run in the group, failed, this island's replays, the islands "
          "excluded and when")
      .def_property_readonly(
          "audit_rate", [](const PyDiLoCo& d) { return d.impl().options().audit_rate; },
          "the probability that an island is audited at an outer step (0 = no audits)")
      .def_property_readonly(
          "audit_tolerance", [](const PyDiLoCo& d) { return d.impl().options().audit_tolerance; },
          "0: replays must match bit for bit; else the relative difference accepted")
      .def(
          "sync", [](PyDiLoCo& d) { d.impl().sync(); }, Release(),
          "Run an outer step now, whatever the inner step count (all ranks together), e.g. to "
          "end training on the global weights.")
      .def(
          "check_state", [](PyDiLoCo& d) { d.impl().check_state(); }, Release(),
          "compare_states: compare the last outer step's global state now if it was not compared "
          "yet (all ranks together). The comparison after an outer step otherwise rides on the "
          "next exchange's screening; call this once after the last outer step.")
      .def(
          "_time_syncs",
          [](PyDiLoCo& d, int count) {
            std::vector<double> seconds;
            for (int i = 0; i < count; ++i) {
              const auto start = std::chrono::steady_clock::now();
              d.impl().sync();
              seconds.push_back(
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
            }
            return seconds;
          },
          py::arg("count"), Release(),
          "Benchmarking aid: run `count` syncs from a C++ loop (all ranks together) and return "
          "each one's wall seconds, timed in C++: the reference for the same syncs driven from "
          "Python.")
      .def(
          "_time_steps",
          [](PyDiLoCo& d, std::int64_t count) {
            const auto start = std::chrono::steady_clock::now();
            for (std::int64_t i = 0; i < count; ++i) d.impl().step();
            return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          },
          py::arg("count"), Release(),
          "Benchmarking aid: call step() `count` times from a C++ loop and return the total "
          "wall seconds (use inner_steps larger than count to time steps without a sync).")
      .def(
          "stats", [](const PyDiLoCo& d) { return d.impl().stats(); },
          "SyncStats: inner and outer steps, seconds in syncs, bytes sent and received.")
      .def(
          "on_exchange",
          [](PyDiLoCo& d, std::function<void(const diloco::ExchangeTiming&)> observer) {
            d.impl().on_exchange(std::move(observer));
          },
          py::arg("observer"),
          "Call observer(ExchangeTiming) after each exchange's outer step is applied (None: "
          "stop). An exception it raises comes out of step() or sync(), the fragment applied.")
      .def(
          "save_state", [](const PyDiLoCo& d, const std::string& path) { d.impl().save_state(path); },
          py::arg("path"), Release(),
          "Write the outer state (global weights, outer momentum, error-feedback residuals and "
          "other exchange state, step counters) to `path` in LibTorch's format. Only between "
          "exchanges (after step() returned True); raises Error while one is in flight.")
      .def(
          "state_sha256", [](const PyDiLoCo& d) { return d.impl().state().sha256(); },
          "Hex SHA-256 of the global weights, outer momentum and step counters "
          "(OuterState::sha256): the same on every island after an outer step or a sync(), and "
          "after a bit-exact resume.")
      .def(
          "load_state", [](PyDiLoCo& d, const std::string& path) { d.impl().load_state(path); },
          py::arg("path"), Release(),
          "Read an outer state written by save_state and set the model to its global weights. "
          "OptionError names the field when it does not fit this run (shapes, compression, "
          "momentum).")
      .def_property_readonly(
          "group", [](const PyDiLoCo& d) { return d.group(); },
          "the Group the syncs run over (an elastic run's: the membership's group)")
      .def_property_readonly(
          "elastic", [](const PyDiLoCo& d) { return d.elastic(); },
          "whether it was built over a Membership (an elastic run)")
      .def_property_readonly(
          "inner_steps", [](const PyDiLoCo& d) { return d.impl().options().inner_steps; },
          "H: inner steps between outer steps")
      .def_property_readonly(
          "outer_lr", [](const PyDiLoCo& d) { return d.impl().options().outer.lr; },
          "learning rate of the outer SGD")
      .def_property_readonly(
          "outer_momentum", [](const PyDiLoCo& d) { return d.impl().options().outer.momentum; },
          "momentum of the outer SGD")
      .def_property_readonly(
          "nesterov", [](const PyDiLoCo& d) { return d.impl().options().outer.nesterov; },
          "whether the outer momentum is Nesterov's")
      .def_property_readonly(
          "fragments", [](const PyDiLoCo& d) { return d.impl().options().fragments; },
          "P: streaming fragments (1 = the whole model at once)")
      .def_property_readonly(
          "overlap_steps", [](const PyDiLoCo& d) { return d.impl().options().overlap_steps; },
          "tau: inner steps an exchange travels while the island trains on")
      .def_property_readonly(
          "mixing", [](const PyDiLoCo& d) { return d.impl().options().mixing; },
          "alpha: the island's share when its fragment is merged with the global one")
      .def_property_readonly(
          "compression", [](const PyDiLoCo& d) { return d.impl().options().compression; },
          "the compressor spec pseudo-gradients are sent with")
      .def_property_readonly(
          "aggregator", [](const PyDiLoCo& d) { return d.impl().options().aggregator; },
          "how the islands' pseudo-gradients are combined: mean, trimmed_mean(trim=K), median, "
          "norm_clip(k=C)")
      .def_property_readonly(
          "screen_factor", [](const PyDiLoCo& d) { return d.impl().options().screen_factor; },
          "a pseudo-gradient above this many times the median norm is refused (0 = off)")
      .def_property_readonly(
          "compare_states", [](const PyDiLoCo& d) { return d.impl().options().compare_states; },
          "whether the islands compare a hash of the global state after every outer step")
      .def_property_readonly(
          "refused_contributions",
          [](const PyDiLoCo& d) { return d.impl().refused_contributions(); },
          "contributions the screening refused so far")
      .def_property_readonly(
          "last_screening", [](const PyDiLoCo& d) { return d.impl().last_screening(); },
          "the last refusal, as named on stderr ('' if none)")
      .def_property_readonly(
          "buffers",
          [](const PyDiLoCo& d) {
            return std::string(diloco::to_string(d.impl().options().buffers));
          },
          "how module buffers are synchronized at every outer step: 'average', 'rank0' or "
          "'local'")
      .def_property_readonly(
          "outer_device",
          [](const PyDiLoCo& d) { return d.impl().global_weights().front().device().str(); },
          "where the global weights and the outer momentum live")
      .def(
          "parameter_names", [](const PyDiLoCo& d) { return names_of(d.impl().parameters()); },
          "The synchronized parameters' names, in the order the library holds them.")
      .def(
          "buffer_names",
          [](const PyDiLoCo& d) {
            std::vector<std::string> names;
            for (const auto& b : d.impl().buffers().buffers()) names.push_back(b.name);
            return names;
          },
          "The synchronized buffers' names (BatchNorm statistics, ...).")
      .def(
          "flat_parameters", [](const PyDiLoCo& d) { return flats_of(d.impl().parameters()); },
          "The model's storage: one flat tensor per dtype bucket, which every parameter is a "
          "view of (shared memory, not a copy).")
      .def(
          "global_weights",
          [](const PyDiLoCo& d) {
            std::vector<at::Tensor> copies;
            for (const auto& g : d.impl().global_weights()) copies.push_back(g.clone());
            return copies;
          },
          "Copies of the global weights, one flat float32 tensor per bucket.");

  py::class_<PyDataParallel>(
      m, "DataParallel",
      "The C++ data-parallel synchronizer over named tensors. Use diloco.DataParallel, which "
      "builds it from a torch.nn.Module.")
      .def(py::init([](NamedTensors parameters, NamedTensors buffers,
                       std::shared_ptr<diloco::Group> group, std::string buffer_sync,
                       Fields agree_on) {
             diloco::DataParallelOptions options;
             options.buffers = diloco::parse_buffer_sync(buffer_sync);
             options.agree_on = std::move(agree_on);
             return std::make_unique<PyDataParallel>(
                 model_tensors(std::move(parameters), std::move(buffers), std::nullopt),
                 std::move(group), std::move(options));
           }),
           py::arg("parameters"), py::arg("buffers"), py::arg("group"),
           py::arg("buffer_sync") = "average", py::arg("agree_on") = Fields{}, Release(),
           "A collective: checks that every rank has the same configuration and parameters, "
           "then copies rank 0's parameters and buffers to every rank.")
      .def(
          "sync_gradients", [](PyDataParallel& d) { d.impl().sync_gradients(); }, Release(),
          "Call after backward() and before the optimizer step: every .grad becomes the mean "
          "over ranks (one all-reduce of one flat buffer), and the buffers are synchronized as "
          "`buffers` says. Raises Error on every rank if any rank's gradient holds a NaN or an "
          "infinity.")
      .def(
          "stats", [](const PyDataParallel& d) { return d.impl().stats(); },
          "SyncStats: steps, seconds in gradient syncs, bytes sent and received.")
      .def_property_readonly(
          "group", [](const PyDataParallel& d) { return d.group(); },
          "the Group the gradient syncs run over")
      .def_property_readonly(
          "buffers",
          [](const PyDataParallel& d) { return std::string(diloco::to_string(d.buffers())); },
          "how module buffers are synchronized at every gradient sync: 'average', 'rank0' or "
          "'local'");
}

}  // namespace diloco_python
