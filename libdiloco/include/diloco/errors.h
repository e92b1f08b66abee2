// Exception types of libdiloco.
//
// Two tiers (see STYLE.md): PeerLostError is a recoverable fault that a caller may catch and
// rebuild from (a peer died, the connection broke, a collective timed out). Everything else is an
// invariant or input check and throws diloco::Error (or OptionError for a bad option), whose
// message starts with the operation in brackets, e.g. "[DiLoCo] rank 2: ...".
#pragma once

#include <stdexcept>
#include <string>

namespace diloco {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An option outside its allowed range. The message names the option and the range.
class OptionError : public Error {
 public:
  using Error::Error;
};

// A peer left the wide-area group (process exited, connection closed or timed out). The group is
// unusable afterwards; the caller may build a new one (elastic runs do: diloco/elastic).
class PeerLostError : public Error {
 public:
  // `peer`: the rank (in the group that failed) whose connection broke (closed or reset: the
  // process is gone), when the backend could tell; -1 when it could not, or when the peer only
  // failed to answer (it may be alive, or waiting for another).
  explicit PeerLostError(const std::string& what, int peer = -1) : Error(what), peer_(peer) {}
  int peer() const { return peer_; }

 private:
  int peer_;
};

// A MAC did not match (diloco/comm/auth.h): a payload or store entry forged, tampered with,
// replayed, or made with another run key. `sender()` is the rank the payload claimed to come
// from, -1 for a store entry or when no rank is known.
class AuthenticationError : public Error {
 public:
  explicit AuthenticationError(const std::string& what, int sender = -1)
      : Error(what), sender_(sender) {}
  int sender() const { return sender_; }

 private:
  int sender_;
};

// Elastic runs (diloco/elastic/membership.h): this island was left out of the run's membership
// (it was stopped past the heartbeat timeout, or registered too late for the new epoch, or the
// epoch it was admitted to was abandoned). Its state is stale; start it again to rejoin.
class RemovedError : public Error {
 public:
  using Error::Error;
};

// Elastic runs: an island that came to join found the run over (every member of its newest epoch
// left when done). Nothing is wrong; there is nothing left to do.
class RunFinishedError : public Error {
 public:
  using Error::Error;
};

// Elastic runs: fewer islands remain than min_islands; the run stops on every survivor.
class TooFewIslandsError : public Error {
 public:
  using Error::Error;
};

}  // namespace diloco
