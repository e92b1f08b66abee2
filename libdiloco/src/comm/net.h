// Small socket helpers shared by the library, the launcher (which does not link LibTorch) and the
// tests: no c10d, no Gloo, only POSIX sockets.
#pragma once

#include <string>
#include <vector>

namespace diloco {
namespace net {

// A TCP port on 127.0.0.1 that was free when we looked (bound to port 0 and released). Free when
// we look, not guaranteed a moment later: the same race torchrun accepts. Throws
// std::system_error when no socket can be bound.
int free_local_port();

// The address of this host's interface that routes to `peer` (a connected UDP socket sends
// nothing), so that a listener binds where the peer can reach it. Throws std::invalid_argument
// naming `peer` when it does not resolve, with the resolver's reason.
std::string local_address_towards(const std::string& peer);

// The local ports of this process's TCP sockets (listening and connected, IPv4 and IPv6), read
// from /proc (Linux); empty where /proc cannot be read. A lost connection is printed by Gloo
// with the peer's port; the peer's list of its own ports says which peer that was.
std::vector<int> own_tcp_ports();

}  // namespace net
}  // namespace diloco
