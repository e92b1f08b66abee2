#!/usr/bin/env bash
# The main job: installs, builds, fetches the Brown corpus and trains the example byte-level
# language model on 4 islands of this machine with DiLoCo (H=50), printing progress and a summary
# (final validation loss, bytes each island sent, the bytes data-parallel training would send).
#
# Usage: bash libdiloco/scripts/main_job.sh [extra train_lm flags]
#   ISLANDS=8 bash libdiloco/scripts/main_job.sh --steps 1200
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bash "$root/libdiloco/scripts/install_deps.sh"
bash "$root/libdiloco/scripts/build.sh" -DDILOCO_BUILD_TESTS=OFF
bash "$root/libdiloco/scripts/fetch_data.sh"
build_dir=${BUILD_DIR:-$root/build}
mkdir -p "$root/results"
cd "$root"
exec "$build_dir/libdiloco/diloco-run" -n "${ISLANDS:-4}" -- \
  "$build_dir/examples/train_lm" --data "$root/data/brown" --mode diloco \
  --metrics "$root/results/main_job_metrics.jsonl" "$@"
