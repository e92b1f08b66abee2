#!/usr/bin/env bash
# Runs outer_sync_bench on N local ranks (default 4) and writes results/outer_sync.{json,csv,md,png}.
# Usage: bash benchmarks/run_outer_sync.sh [N] [extra outer_sync_bench flags]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build_dir=${BUILD_DIR:-$root/build}
n=${1:-4}
shift || true
mkdir -p "$root/results"
"$build_dir/libdiloco/diloco-run" -n "$n" -- "$build_dir/benchmarks/outer_sync_bench" \
  --out "$root/results/outer_sync" "$@"
/usr/bin/python3 "$root/benchmarks/plot_outer_sync.py" "$root/results/outer_sync.json" \
  "$root/results/outer_sync.png"
echo "results in $root/results/outer_sync.{json,csv,md,png}"
