#!/usr/bin/env bash
# Installs the build tree into a temporary prefix, then configures, builds and runs an outside
# project that uses find_package(diloco) and links diloco::diloco.
# Usage: install_test.sh BUILD_DIR
set -euo pipefail
build_dir=$1
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build_dir" --prefix "$tmp/prefix" >/dev/null
find "$tmp/prefix" -name dilocoConfig.cmake | grep -q . || { echo "no package config installed"; exit 1; }
test -x "$tmp/prefix/bin/diloco-run" || { echo "diloco-run not installed"; exit 1; }
test -x "$tmp/prefix/bin/diloco-coordinator" || { echo "diloco-coordinator not installed"; exit 1; }
cmake -S "$here/consumer" -B "$tmp/build" -DCMAKE_PREFIX_PATH="$tmp/prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$tmp/build" >/dev/null
"$tmp/build/consumer" | tee "$tmp/out.txt"
grep -q "outer steps 1" "$tmp/out.txt"
echo "install_test: find_package(diloco) consumer built and ran"
