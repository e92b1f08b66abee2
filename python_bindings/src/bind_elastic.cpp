// Bindings of diloco/elastic: Membership (who is in an elastic run, agreed through the
// coordinator's store) and its options (ElasticOptions). DiLoCo takes a Membership in place of a
// Group (bind_sync.cpp); diloco.join_elastic() (diloco/_api.py) reads the launcher's environment
// through ElasticOptions.read_env() and calls Membership.join.
//
// Durations are seconds (floats) in Python, as the Group's timeout is.
#include <diloco/comm/group.h>
#include <diloco/elastic/membership.h>
#include <diloco/errors.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <sstream>
#include <string>

#include "bindings.h"

namespace diloco_python {
namespace {

using Release = py::call_guard<py::gil_scoped_release>;
using std::chrono::milliseconds;

milliseconds to_duration(const char* name, double seconds) {
  if (!(seconds > 0) || !std::isfinite(seconds) || seconds > 1e9) {
    std::ostringstream msg;
    msg << "[elastic] " << name << " must be a positive number of seconds, got " << seconds;
    throw diloco::OptionError(msg.str());
  }
  return milliseconds(static_cast<std::int64_t>(std::llround(seconds * 1000.0)));
}

double to_seconds(milliseconds d) { return double(d.count()) / 1000.0; }

milliseconds interval_for(milliseconds heartbeat_timeout) {
  return diloco::ElasticOptions::interval_for(heartbeat_timeout);
}

diloco::ElasticOptions read_env() { return diloco::ElasticOptions::read_env(); }

std::string repr(const diloco::ElasticOptions& o) {
  std::ostringstream out;
  out << "ElasticOptions(store_addr='" << o.store_addr << "', store_port=" << o.store_port
      << ", slot=" << o.slot << ", world_size=" << o.world_size
      << ", min_islands=" << o.min_islands
      << ", heartbeat_interval=" << to_seconds(o.heartbeat_interval)
      << ", heartbeat_timeout=" << to_seconds(o.heartbeat_timeout)
      << ", timeout=" << to_seconds(o.timeout)
      << ", rendezvous_timeout=" << to_seconds(o.rendezvous_timeout) << ", hostname='"
      << o.hostname << "', link=LinkModel(mbit_per_s=" << o.link.mbit_per_s
      << ", latency_ms=" << o.link.latency_ms << "), run_key="
      << (o.run_key.empty() ? "''" : "'<hidden>'") << ", run_key_file='" << o.run_key_file
      << "')";
  return out.str();
}

// Membership::join with the GIL released (it waits for the other islands of the first epoch),
// then the Python handle of its group, made once.
std::shared_ptr<PyMembership> join(const diloco::ElasticOptions& options) {
  std::shared_ptr<diloco::Membership> membership;
  {
    py::gil_scoped_release release;
    membership = diloco::Membership::join(options);
  }
  auto out = std::make_shared<PyMembership>();
  out->group = destroyed_without_gil(membership->group());
  out->impl = destroyed_without_gil(std::move(membership));
  out->group_object = py::cast(out->group);
  return out;
}

}  // namespace

void bind_elastic(py::module_& m) {
  const diloco::ElasticOptions defaults;

  py::class_<diloco::ElasticOptions>(
      m, "ElasticOptions",
      "The options of an elastic run's Membership (diloco::ElasticOptions), field for field: "
      "store_addr, store_port, slot, world_size, min_islands, heartbeat_interval, "
      "heartbeat_timeout, timeout, rendezvous_timeout (seconds), hostname, link (a LinkModel), "
      "run_key, run_key_file. "
      "ElasticOptions(**fields) starts from the C++ defaults; read_env() and from_env() from the "
      "launcher's environment. Membership.join validates them; validate() does so alone.")
      .def(py::init([](const py::kwargs& fields) {
             diloco::ElasticOptions options;
             py::object view = py::cast(&options, py::return_value_policy::reference);
             for (const auto& [key, value] : fields) {
               const auto name = py::str(key).cast<std::string>();
               if (name.empty() || name[0] == '_' || !py::hasattr(view, name.c_str())) {
                 throw py::type_error("ElasticOptions has no field '" + name + "'");
               }
               view.attr(name.c_str()) = value;
             }
             return options;
           }),
           "ElasticOptions(**fields): the C++ defaults, with the given fields set.")
      .def_readwrite("store_addr", &diloco::ElasticOptions::store_addr,
                     "where the coordinator serves the run's store (MASTER_ADDR)")
      .def_readwrite("store_port", &diloco::ElasticOptions::store_port,
                     "its port, 1..65535 (MASTER_PORT)")
      .def_readwrite("slot", &diloco::ElasticOptions::slot,
                     "the island's slot (RANK): slots 0..world_size-1 start the run together; a "
                     "slot started again, or one >= world_size, joins; -1 = not set")
      .def_readwrite("world_size", &diloco::ElasticOptions::world_size,
                     "islands the run starts with (WORLD_SIZE); -1 = not set")
      .def_readwrite("min_islands", &diloco::ElasticOptions::min_islands,
                     "the run stops with TooFewIslandsError below it; in [1, world_size] "
                     "(DILOCO_MIN_ISLANDS)")
      .def_property(
          "heartbeat_interval",
          [](const diloco::ElasticOptions& o) { return to_seconds(o.heartbeat_interval); },
          [](diloco::ElasticOptions& o, double s) {
            o.heartbeat_interval = to_duration("heartbeat_interval", s);
          },
          "seconds between an island's heartbeats (>= 0.01)")
      .def_property(
          "heartbeat_timeout",
          [](const diloco::ElasticOptions& o) { return to_seconds(o.heartbeat_timeout); },
          [](diloco::ElasticOptions& o, double s) {
            o.heartbeat_timeout = to_duration("heartbeat_timeout", s);
          },
          "seconds of silence after which a member is declared lost, >= 2 x heartbeat_interval "
          "(DILOCO_HEARTBEAT_TIMEOUT_S)")
      .def_property(
          "timeout", [](const diloco::ElasticOptions& o) { return to_seconds(o.timeout); },
          [](diloco::ElasticOptions& o, double s) { o.timeout = to_duration("timeout", s); },
          "seconds for one collective, and for connecting an epoch's group; above "
          "heartbeat_timeout (DILOCO_TIMEOUT_S)")
      .def_property(
          "rendezvous_timeout",
          [](const diloco::ElasticOptions& o) { return to_seconds(o.rendezvous_timeout); },
          [](diloco::ElasticOptions& o, double s) {
            o.rendezvous_timeout = to_duration("rendezvous_timeout", s);
          },
          "seconds the first islands wait for each other, and a joiner to be admitted; >= "
          "timeout (DILOCO_RENDEZVOUS_TIMEOUT_S)")
      .def_readwrite("hostname", &diloco::ElasticOptions::hostname,
                     "interface Gloo binds to; \"\" = the one routing to store_addr "
                     "(DILOCO_HOSTNAME)")
      .def_readwrite("link", &diloco::ElasticOptions::link,
                     "the emulated link, a LinkModel (DILOCO_LINK_MBPS, DILOCO_LINK_LATENCY_MS)")
      .def_readwrite("run_key", &diloco::ElasticOptions::run_key,
                     "the run key (str or bytes, >= 16 bytes; DILOCO_RUN_KEY): with one, only "
                     "islands holding it join, the store's values and every payload are MACed; "
                     "\"\" = none")
      .def_readwrite("run_key_file", &diloco::ElasticOptions::run_key_file,
                     "a file holding the run key, instead of run_key (DILOCO_RUN_KEY_FILE)")
      .def("validate", &diloco::ElasticOptions::validate,
           "Raise OptionError naming the first option out of its range (the timeouts must be "
           "ordered heartbeat_interval < heartbeat_timeout < timeout <= rendezvous_timeout).")
      .def_static("from_env", &diloco::ElasticOptions::from_env,
                  "The C++ library's reading: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE "
                  "(required), DILOCO_MIN_ISLANDS, DILOCO_HEARTBEAT_TIMEOUT_S, DILOCO_TIMEOUT_S, "
                  "DILOCO_RENDEZVOUS_TIMEOUT_S, DILOCO_HOSTNAME, DILOCO_LINK_MBPS, "
                  "DILOCO_LINK_LATENCY_MS, DILOCO_RUN_KEY, DILOCO_RUN_KEY_FILE (optional), validated. "
                  "Raises OptionError naming a "
                  "missing or malformed variable.")
      .def_static("read_env", &read_env,
                  "The same variables, each optional: unset ones keep the defaults (slot and "
                  "world_size stay -1), nothing validated as a whole; the heartbeat interval "
                  "is a fifth of the heartbeat timeout, at most 1 s. For front ends that take "
                  "some values from arguments (join_elastic). Raises OptionError for a malformed "
                  "variable.")
      .def("__repr__", &repr);

  py::class_<PyMembership, std::shared_ptr<PyMembership>>(
      m, "Membership",
      "Who is in an elastic run (diloco::Membership): the islands of the current membership "
      "epoch, agreed through the store a coordinator (diloco-coordinator, which diloco-run "
      "--elastic starts) serves. Build one with diloco.join_elastic() or Membership.join(), and "
      "pass it to diloco.DiLoCo in place of a Group: the run then survives lost, stopped and "
      "restarted islands (see diloco.DiLoCo).")
      .def_static("join", &join, py::arg("options"),
                  "Join the run with these ElasticOptions (see the keyword form).")
      .def_static(
          "join",
          [](const std::string& store_addr, int store_port, int slot, int world_size,
             int min_islands, double heartbeat_timeout, double timeout, double rendezvous_timeout,
             const std::string& hostname, double link_mbps, double link_latency_ms,
             std::optional<double> heartbeat_interval) {
            diloco::ElasticOptions o;
            o.store_addr = store_addr;
            o.store_port = store_port;
            o.slot = slot;
            o.world_size = world_size;
            o.min_islands = min_islands;
            o.heartbeat_timeout = to_duration("heartbeat_timeout", heartbeat_timeout);
            o.heartbeat_interval = heartbeat_interval
                                       ? to_duration("heartbeat_interval", *heartbeat_interval)
                                       : interval_for(o.heartbeat_timeout);
            o.timeout = to_duration("timeout", timeout);
            o.rendezvous_timeout = to_duration("rendezvous_timeout", rendezvous_timeout);
            o.hostname = hostname;
            o.link.mbit_per_s = link_mbps;
            o.link.latency_ms = link_latency_ms;
            return join(o);
          },
          py::kw_only(), py::arg("store_addr") = defaults.store_addr,
          py::arg("store_port") = defaults.store_port, py::arg("slot") = defaults.slot,
          py::arg("world_size") = defaults.world_size,
          py::arg("min_islands") = defaults.min_islands,
          py::arg("heartbeat_timeout") = to_seconds(defaults.heartbeat_timeout),
          py::arg("timeout") = to_seconds(defaults.timeout),
          py::arg("rendezvous_timeout") = to_seconds(defaults.rendezvous_timeout),
          py::arg("hostname") = defaults.hostname,
          py::arg("link_mbps") = defaults.link.mbit_per_s,
          py::arg("link_latency_ms") = defaults.link.latency_ms,
          py::arg("heartbeat_interval") = py::none(),
          "Connect to the coordinator's store at store_addr:store_port (three connections) and "
          "start the heartbeat. An island of the first epoch (slots 0..world_size-1, first "
          "start) waits up to rendezvous_timeout for the others and connects the epoch's group; "
          "any other island registers as a joiner and returns at once (joining is True until "
          "DiLoCo's constructor admits it). Durations in seconds; heartbeat_interval None = a "
          "fifth of heartbeat_timeout, at most 1 s. The GIL is released meanwhile.\n\n"
          "Raises OptionError naming an option out of its range, Error when no coordinator "
          "answers within `timeout` or the first islands do not all arrive.")
      .def_property_readonly(
          "island", [](const PyMembership& p) { return p.impl->island(); },
          "this island's name, \"<slot>.<incarnation>\": slot 2's first process is \"2.0\", its "
          "first restart \"2.1\"")
      .def_property_readonly(
          "joining", [](const PyMembership& p) { return p.impl->joining(); },
          "True for an island that joins a run in progress, until DiLoCo admits it")
      .def_property_readonly(
          "epoch", [](const PyMembership& p) { return p.impl->epoch(); },
          "the current membership epoch (-1 while joining)")
      .def_property_readonly(
          "members", [](const PyMembership& p) { return p.impl->members(); },
          "the islands of the current epoch, in rank order")
      .def_property_readonly(
          "group", [](const PyMembership& p) { return p.group_object; },
          "the diloco.Group the run's collectives go over: the same object throughout (each "
          "epoch replaces its backend; its rank and world_size follow the epoch, its statistics "
          "carry on)")
      .def_property_readonly(
          "epochs_joined", [](const PyMembership& p) { return p.impl->epochs_joined(); },
          "membership epochs this island went through, counting the first")
      .def_property_readonly(
          "options", [](const PyMembership& p) { return p.impl->options(); },
          "the ElasticOptions it joined with (a copy)")
      .def(
          "leave", [](PyMembership& p) { p.impl->leave(); }, Release(),
          "Leave the run on purpose (training is done), after the last collective: the others "
          "do not count this island's silence as a loss. Stops the heartbeat.")
      .def("__repr__", [](const PyMembership& p) {
        std::ostringstream out;
        out << "Membership(island='" << p.impl->island() << "', epoch=" << p.impl->epoch()
            << ", members=[";
        const auto members = p.impl->members();
        for (std::size_t i = 0; i < members.size(); ++i) {
          out << (i ? ", " : "") << "'" << members[i] << "'";
        }
        out << "], joining=" << (p.impl->joining() ? "True" : "False") << ")";
        return out.str();
      });
}

}  // namespace diloco_python
