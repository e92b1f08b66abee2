// The library's version and the version of what it puts on the wire. Islands compare both at
// construction (sync/fingerprint.h): an island built from another release, or speaking another
// payload format, is refused by name instead of exchanging bytes the others misread.
#pragma once

#define DILOCO_VERSION_MAJOR 0
#define DILOCO_VERSION_MINOR 2
#define DILOCO_VERSION_PATCH 0
#define DILOCO_VERSION "0.2.0"  // CMakeLists.txt's project(VERSION) matches

namespace diloco {

// Bumped whenever a payload layout, an exchange's message order or a collective's shape changes.
inline constexpr int kWireFormatVersion = 2;

}  // namespace diloco
