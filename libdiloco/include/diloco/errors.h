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
// unusable afterwards; the caller may build a new one.
class PeerLostError : public Error {
 public:
  using Error::Error;
};

}  // namespace diloco
