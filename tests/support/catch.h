// Catch2 for the test files. Include this instead of <catch2/catch.hpp>.
//
// LibTorch logs through glog, which defines a CHECK macro of its own. Whichever header comes
// last wins: when a LibTorch header first pulls glog in after catch.hpp, every CHECK in the file
// is glog's, and a failing one aborts the whole test binary without Catch's report (no INFO
// context, no other test cases run). Including glog first, through c10's logging, makes
// catch.hpp's definitions the ones that stay (glog's header is include-guarded).
#pragma once

#include <c10/util/Logging.h>

#include <catch2/catch.hpp>
