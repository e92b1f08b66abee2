#!/usr/bin/env bash
# The test command: installs the dependencies, builds everything, fetches the data and runs the
# whole suite with ctest (Catch2 tests, the launcher test, the example's end-to-end training).
#
# Usage: bash libdiloco/scripts/run_tests.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bash "$root/libdiloco/scripts/install_deps.sh"
# Whatever configured the build folder before (the main job turns the tests off), the test command
# builds everything: tests, examples, benchmarks and the Python module.
bash "$root/libdiloco/scripts/build.sh" -DDILOCO_BUILD_TESTS=ON -DDILOCO_BUILD_EXAMPLES=ON \
  -DDILOCO_BUILD_BENCHMARKS=ON -DDILOCO_BUILD_PYTHON=ON
bash "$root/libdiloco/scripts/fetch_data.sh"
build_dir=${BUILD_DIR:-$root/build}
cd "$build_dir"
# Tests that start processes listen on loopback ports; run one at a time on small machines.
ctest --output-on-failure --timeout 900 -j1 --no-tests=error
