#!/usr/bin/env bash
# Configures and builds libdiloco (library, launcher, examples, benchmarks, tests, Python module) in BUILD_DIR
# (default build/ under the repository root). Extra arguments go to cmake's configure step.
# Under CI (CI=true) warnings are errors.
#
# Usage: bash libdiloco/scripts/build.sh [-DOPTION=VALUE ...]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build_dir=${BUILD_DIR:-$root/build}
werror=OFF
[ "${CI:-}" = "true" ] && werror=ON
cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DDILOCO_WERROR=$werror \
  -DDILOCO_BUILD_PYTHON=ON "$@"
cmake --build "$build_dir" -j"$(nproc)"
