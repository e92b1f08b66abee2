// Bindings of diloco/comm: Group (the wide-area process group) and its options (GroupOptions,
// LinkModel), its byte accounting (CommStats, OpStats) and the byte formulas (collective_bytes).
// Group.create(GroupOptions) is the one rendezvous path: Python reads no environment itself.
#include <diloco/comm/comm_stats.h>
#include <diloco/comm/group.h>
#include <diloco/errors.h>
#include <pybind11/chrono.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <sstream>

#include "bindings.h"

namespace diloco_python {
namespace {

using Release = py::call_guard<py::gil_scoped_release>;

// GroupOptions::timeout in Python: seconds (a float), as torch.distributed's timeouts read.
std::chrono::milliseconds to_timeout(double seconds) {
  if (!(seconds > 0) || !std::isfinite(seconds)) {
    std::ostringstream msg;
    msg << "[Group] timeout must be a positive number of seconds, got " << seconds;
    throw diloco::OptionError(msg.str());
  }
  return std::chrono::milliseconds(static_cast<std::int64_t>(std::llround(seconds * 1000.0)));
}

diloco::Collective collective_from_name(const std::string& name) {
  using diloco::Collective;
  for (Collective c : {Collective::kAllReduce, Collective::kAllGather, Collective::kBroadcast,
                       Collective::kBarrier, Collective::kSend, Collective::kRecv}) {
    if (name == diloco::collective_name(c)) return c;
  }
  throw diloco::OptionError(
      "[collective_bytes] kind must be one of allreduce, allgather, broadcast, barrier, send, "
      "recv; got '" +
      name + "'");
}

}  // namespace

void bind_comm(py::module_& m) {
  py::class_<diloco::OpStats>(m, "OpStats",
                              "Statistics of one operation label: calls, bytes this rank sent and "
                              "received (by the algorithm's cost), and wall seconds.")
      .def_readonly("calls", &diloco::OpStats::calls)
      .def_readonly("bytes_sent", &diloco::OpStats::bytes_sent)
      .def_readonly("bytes_received", &diloco::OpStats::bytes_received)
      .def_readonly("seconds", &diloco::OpStats::seconds)
      .def_readonly("link_seconds", &diloco::OpStats::link_seconds,
                    "emulated link seconds (0 without a link)")
      .def("__repr__", [](const diloco::OpStats& s) {
        std::ostringstream out;
        out << "OpStats(calls=" << s.calls << ", bytes_sent=" << s.bytes_sent
            << ", bytes_received=" << s.bytes_received << ", seconds=" << s.seconds
            << ", link_seconds=" << s.link_seconds << ")";
        return out.str();
      });

  py::class_<diloco::CommStats>(
      m, "CommStats",
      "Byte accounting of a Group, per operation label (\"allreduce:outer_sync\", "
      "\"broadcast:initial_weights\", ...). Bytes are what this rank's collectives send and "
      "receive under the algorithm Gloo runs: ring all-reduce 2(N-1)/N*n, all-gather (N-1)*n, "
      "broadcast (N-1)*n from the root and n into each other rank. str() gives a table.")
      .def_readonly("ops", &diloco::CommStats::ops,
                    "dict: label -> OpStats (a copy taken when stats() was called)")
      .def_property_readonly("bytes_sent", &diloco::CommStats::bytes_sent,
                             "bytes sent by this rank over all operations")
      .def_property_readonly("bytes_received", &diloco::CommStats::bytes_received,
                             "bytes received by this rank over all operations")
      .def_property_readonly("calls", &diloco::CommStats::calls, "collectives issued")
      .def_property_readonly("seconds", &diloco::CommStats::seconds,
                             "wall seconds spent in collectives")
      .def_property_readonly("link_seconds", &diloco::CommStats::link_seconds,
                             "emulated link seconds over all operations (0 without a link)")
      .def("__str__", &diloco::CommStats::to_string)
      .def("__repr__", [](const diloco::CommStats& s) {
        std::ostringstream out;
        out << "CommStats(calls=" << s.calls() << ", bytes_sent=" << s.bytes_sent()
            << ", bytes_received=" << s.bytes_received() << ", seconds=" << s.seconds() << ")";
        return out.str();
      });

  m.def(
      "collective_bytes",
      [](const std::string& kind, std::uint64_t payload_bytes, int world_size, int rank, int root) {
        const auto c = diloco::collective_bytes(collective_from_name(kind), payload_bytes,
                                                world_size, rank, root);
        return py::make_tuple(c.sent, c.received);
      },
      py::arg("kind"), py::arg("payload_bytes"), py::arg("world_size"), py::arg("rank"),
      py::arg("root") = 0,
      "(sent, received): the bytes one rank's collective of `kind` (\"allreduce\", \"allgather\", "
      "\"broadcast\", \"barrier\", \"send\", \"recv\") moves for `payload_bytes` per rank, by the "
      "same formula the Group's statistics use.");

  py::class_<diloco::LinkModel>(
      m, "LinkModel",
      "An emulated wide-area link (diloco/comm/comm_stats.h): every collective takes at least "
      "bytes * 8 / (mbit_per_s * 1e6) + steps * latency_ms / 1e3 seconds. 0 = unlimited.")
      .def(py::init([](double mbit_per_s, double latency_ms) {
             diloco::LinkModel link;
             link.mbit_per_s = mbit_per_s;
             link.latency_ms = latency_ms;
             return link;
           }),
           py::arg("mbit_per_s") = 0.0, py::arg("latency_ms") = 0.0)
      .def_readwrite("mbit_per_s", &diloco::LinkModel::mbit_per_s,
                     "megabits (1e6 bits) per second in each direction, 0 = unlimited")
      .def_readwrite("latency_ms", &diloco::LinkModel::latency_ms,
                     "one-way latency per message step, milliseconds")
      .def("enabled", &diloco::LinkModel::enabled, "whether any delay is emulated")
      .def("validate", &diloco::LinkModel::validate, "Raise OptionError naming a bad field.")
      .def("__repr__", [](const diloco::LinkModel& l) {
        std::ostringstream out;
        out << "LinkModel(mbit_per_s=" << l.mbit_per_s << ", latency_ms=" << l.latency_ms << ")";
        return out.str();
      });

  py::class_<diloco::GroupOptions>(
      m, "GroupOptions",
      "The options of Group.create (diloco::GroupOptions), field for field: master_addr, "
      "master_port, rank, world_size, timeout (seconds), hostname, link (a LinkModel), "
      "join_existing_store, run_key, run_key_file. GroupOptions(**fields) starts from the C++ defaults; read_env() "
      "from the environment. Group.create validates them; validate() does so alone.")
      .def(py::init([](const py::kwargs& fields) {
             diloco::GroupOptions options;
             // Each keyword goes through the field's own setter (and its type conversion).
             py::object view = py::cast(&options, py::return_value_policy::reference);
             for (const auto& [key, value] : fields) {
               const auto name = py::str(key).cast<std::string>();
               if (name.empty() || name[0] == '_' || !py::hasattr(view, name.c_str())) {
                 throw py::type_error("GroupOptions has no field '" + name + "'");
               }
               view.attr(name.c_str()) = value;
             }
             return options;
           }),
           "GroupOptions(**fields): the C++ defaults, with the given fields set.")
      .def_readwrite("master_addr", &diloco::GroupOptions::master_addr,
                     "address of rank 0, which serves the rendezvous store (MASTER_ADDR)")
      .def_readwrite("master_port", &diloco::GroupOptions::master_port,
                     "its port, 1..65535 (MASTER_PORT)")
      .def_readwrite("rank", &diloco::GroupOptions::rank,
                     "this process's rank, 0..world_size-1 (RANK); -1 = not set")
      .def_readwrite("world_size", &diloco::GroupOptions::world_size,
                     "number of processes (WORLD_SIZE); -1 = not set")
      .def_property(
          "timeout",
          [](const diloco::GroupOptions& o) { return double(o.timeout.count()) / 1000.0; },
          [](diloco::GroupOptions& o, double seconds) { o.timeout = to_timeout(seconds); },
          "seconds for the rendezvous and every collective (DILOCO_TIMEOUT_S)")
      .def_readwrite("hostname", &diloco::GroupOptions::hostname,
                     "interface Gloo binds to; \"\" = the one routing to master_addr "
                     "(DILOCO_HOSTNAME)")
      .def_readwrite("link", &diloco::GroupOptions::link,
                     "the emulated link, a LinkModel (DILOCO_LINK_MBPS, DILOCO_LINK_LATENCY_MS)")
      .def_readwrite("join_existing_store", &diloco::GroupOptions::join_existing_store,
                     "join a store someone else serves at master_addr:master_port (torchrun's "
                     "agent: TORCHELASTIC_USE_AGENT_STORE=1 or True) instead of rank 0 serving")
      .def_readwrite("run_key", &diloco::GroupOptions::run_key,
                     "the run key (str or bytes, >= 16 bytes; DILOCO_RUN_KEY): with one, joining "
                     "needs it and every payload is MACed; \"\" = none")
      .def_readwrite("run_key_file", &diloco::GroupOptions::run_key_file,
                     "a file holding the run key, instead of run_key (DILOCO_RUN_KEY_FILE)")
      .def("validate", &diloco::GroupOptions::validate,
           "Raise OptionError naming the first option out of its range.")
      .def_static("from_env", &diloco::GroupOptions::from_env,
                  "From MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE (required) and the optional "
                  "DILOCO_TIMEOUT_S, DILOCO_HOSTNAME, DILOCO_LINK_MBPS, DILOCO_LINK_LATENCY_MS, "
                  "DILOCO_RUN_KEY, DILOCO_RUN_KEY_FILE, TORCHELASTIC_USE_AGENT_STORE, validated. Raises OptionError naming a missing "
                  "or malformed variable.")
      .def_static("read_env", &diloco::GroupOptions::read_env,
                  "The same variables, each optional: unset ones keep the defaults (rank and "
                  "world_size stay -1), nothing validated as a whole; for front ends that take "
                  "some values from arguments (init_process_group). Raises OptionError for a "
                  "malformed variable.")
      .def("__repr__", [](const diloco::GroupOptions& o) {
        std::ostringstream out;
        out << "GroupOptions(master_addr='" << o.master_addr << "', master_port=" << o.master_port
            << ", rank=" << o.rank << ", world_size=" << o.world_size
            << ", timeout=" << double(o.timeout.count()) / 1000.0 << ", hostname='" << o.hostname
            << "', link=LinkModel(mbit_per_s=" << o.link.mbit_per_s
            << ", latency_ms=" << o.link.latency_ms
            << "), join_existing_store=" << (o.join_existing_store ? "True" : "False")
            << ", run_key=" << (o.run_key.empty() ? "''" : "'<hidden>'") << ", run_key_file='"
            << o.run_key_file << "')";
        return out.str();
      });

  py::class_<diloco::Group, std::shared_ptr<diloco::Group>>(
      m, "Group",
      "The wide-area process group: a c10d TCPStore rendezvous and a Gloo process group, with "
      "byte accounting per operation. Build one with diloco.init_process_group().\n\n"
      "Every rank must call the same collectives in the same order with tensors of the same "
      "sizes (c10d's rule). Collectives block until complete and release the GIL meanwhile.")
      .def_static(
          "create",
          [](const diloco::GroupOptions& options) {
            return destroyed_without_gil(diloco::Group::create(options));
          },
          py::arg("options"), Release(),
          "Rendezvous (rank 0 serves the TCPStore at master_addr:master_port, or every rank "
          "joins an existing one with join_existing_store) and connect. The one rendezvous path: "
          "diloco.init_process_group() and from_env() call it. Raises OptionError for a bad "
          "option, Error if the port is in use or the peers do not all arrive within the "
          "timeout.")
      .def_static(
          "from_env", [] { return destroyed_without_gil(diloco::Group::from_env()); }, Release(),
          "Group.create(GroupOptions.from_env()).")
      .def_property_readonly("rank", &diloco::Group::rank, "this process's rank")
      .def_property_readonly("world_size", &diloco::Group::world_size, "number of ranks")
      .def_property_readonly(
          "timeout", [](const diloco::Group& g) { return double(g.timeout().count()) / 1000.0; },
          "rendezvous and collective timeout, seconds")
      .def_property_readonly("link", &diloco::Group::link,
                             "the emulated link (a LinkModel copy; GroupOptions.link)")
      .def("stats", &diloco::Group::stats,
           "A snapshot of the byte accounting (CommStats), per operation label.")
      .def("reset_stats", &diloco::Group::reset_stats, "Zero the statistics.")
      .def(
          "allreduce_sum",
          [](diloco::Group& g, at::Tensor tensor, const std::string& label) {
            g.allreduce_sum(tensor, label);
          },
          py::arg("tensor"), py::arg("label") = "user", Release(),
          "Sum a contiguous tensor in place over all ranks. `label` names it in the statistics.")
      .def(
          "broadcast",
          [](diloco::Group& g, at::Tensor tensor, int root, const std::string& label) {
            g.broadcast(tensor, root, label);
          },
          py::arg("tensor"), py::arg("root") = 0, py::arg("label") = "user", Release(),
          "Overwrite a contiguous tensor on every rank with root's, in place.")
      .def("allgather", &diloco::Group::allgather, py::arg("tensor"), py::arg("label") = "user",
           Release(),
           "Every rank contributes a tensor of the same shape and dtype; returns a list of "
           "world_size tensors, index r holding rank r's.")
      .def("barrier", &diloco::Group::barrier, py::arg("label") = "user", Release(),
           "Block until every rank has reached the barrier.")
      .def("__repr__", [](const diloco::Group& g) {
        return "Group(rank=" + std::to_string(g.rank()) +
               ", world_size=" + std::to_string(g.world_size()) + ")";
      });
}

}  // namespace diloco_python
