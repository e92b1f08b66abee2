// Bindings of diloco/comm: Group (the wide-area process group), its byte accounting (CommStats,
// OpStats) and the byte formulas (collective_bytes).
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

std::chrono::milliseconds to_timeout(double seconds) {
  if (!(seconds > 0) || !std::isfinite(seconds)) {
    std::ostringstream msg;
    msg << "[Group] timeout must be a positive number of seconds, got " << seconds;
    throw diloco::OptionError(msg.str());
  }
  return std::chrono::milliseconds(static_cast<std::int64_t>(std::llround(seconds * 1000.0)));
}

// The last reference to a Group may be dropped while this thread holds the GIL (the Python object
// is collected). Destroying it joins c10d's Gloo worker threads, which may themselves need the GIL
// to release tensors that Python objects own: so the Group is destroyed with the GIL released.
std::shared_ptr<diloco::Group> destroyed_without_gil(std::shared_ptr<diloco::Group> group) {
  diloco::Group* raw = group.get();
  return std::shared_ptr<diloco::Group>(raw, [owner = std::move(group)](diloco::Group*) mutable {
    if (PyGILState_Check()) {
      py::gil_scoped_release release;
      owner.reset();
    } else {
      owner.reset();
    }
  });
}

std::shared_ptr<diloco::Group> create_group(const std::string& master_addr, int master_port,
                                            int rank, int world_size, double timeout_s,
                                            const std::string& hostname, bool join_existing_store) {
  diloco::GroupOptions options;
  options.master_addr = master_addr;
  options.master_port = master_port;
  options.rank = rank;
  options.world_size = world_size;
  options.timeout = to_timeout(timeout_s);
  options.hostname = hostname;
  options.join_existing_store = join_existing_store;
  return destroyed_without_gil(diloco::Group::create(options));
}

diloco::Collective collective_from_name(const std::string& name) {
  using diloco::Collective;
  for (Collective c : {Collective::kAllReduce, Collective::kAllGather, Collective::kBroadcast,
                       Collective::kBarrier, Collective::kSend, Collective::kRecv}) {
    if (name == diloco::collective_name(c)) return c;
  }
  throw diloco::OptionError(
      "[collective_bytes] kind must be one of allreduce, allgather, broadcast, barrier, send, "
      "recv; got '" + name + "'");
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
      .def("__repr__", [](const diloco::OpStats& s) {
        std::ostringstream out;
        out << "OpStats(calls=" << s.calls << ", bytes_sent=" << s.bytes_sent
            << ", bytes_received=" << s.bytes_received << ", seconds=" << s.seconds << ")";
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

  py::class_<diloco::Group, std::shared_ptr<diloco::Group>>(
      m, "Group",
      "The wide-area process group: a c10d TCPStore rendezvous and a Gloo process group, with "
      "byte accounting per operation. Build one with diloco.init_process_group().\n\n"
      "Every rank must call the same collectives in the same order with tensors of the same "
      "sizes (c10d's rule). Collectives block until complete and release the GIL meanwhile.")
      .def_static(
          "create",
          [](const std::string& master_addr, int master_port, int rank, int world_size,
             double timeout_s, const std::string& hostname) {
            return create_group(master_addr, master_port, rank, world_size, timeout_s, hostname,
                                /*join_existing_store=*/false);
          },
          py::arg("master_addr"), py::arg("master_port"), py::arg("rank"), py::arg("world_size"),
          py::arg("timeout_s") = 60.0, py::arg("hostname") = "", Release(),
          "Rendezvous (rank 0 hosts the TCPStore at master_addr:master_port) and connect. Raises "
          "OptionError for a bad option, Error if the port is in use or the peers do not all "
          "arrive within the timeout.")
      .def_static(
          "_connect_to_store",
          [](const std::string& master_addr, int master_port, int rank, int world_size,
             double timeout_s, const std::string& hostname) {
            return create_group(master_addr, master_port, rank, world_size, timeout_s, hostname,
                                /*join_existing_store=*/true);
          },
          py::arg("master_addr"), py::arg("master_port"), py::arg("rank"), py::arg("world_size"),
          py::arg("timeout_s"), py::arg("hostname"), Release(),
          "Connect as a client of a store served by the launcher (torchrun's agent store) "
          "instead of having rank 0 serve one; init_process_group() does this under torchrun. "
          "`hostname` must be this rank's address towards the others.")
      .def_static(
          "from_env", [] { return destroyed_without_gil(diloco::Group::from_env()); }, Release(),
                  "Group.create() from MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE (torchrun's "
                  "variables) and the optional DILOCO_TIMEOUT_S.")
      .def_property_readonly("rank", &diloco::Group::rank, "this process's rank")
      .def_property_readonly("world_size", &diloco::Group::world_size, "number of ranks")
      .def_property_readonly(
          "timeout", [](const diloco::Group& g) { return double(g.timeout().count()) / 1000.0; },
          "rendezvous and collective timeout, seconds")
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
