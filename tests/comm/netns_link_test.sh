#!/usr/bin/env bash
# The byte accounting against a real link: 2 islands of train_lm (data parallel, a gradient
# all-reduce every step) in their own network namespaces over a bridge, uplinks shaped to
# 200 Mbit/s with tc tbf. Every island's veth must have sent within 2% of the bytes the library
# says it sent. Skipped (exit 77, ctest's SKIP_RETURN_CODE) when not root or when network
# namespaces cannot be created here.
# Usage: netns_link_test.sh TRAIN_LM
set -euo pipefail
train_lm=$1
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ "$(id -u)" != 0 ]; then
  echo "netns_link_test: SKIPPED: needs root for network namespaces, veth pairs and tc"
  exit 77
fi
probe="dlprobe$$"
if ! ip netns add "$probe" 2>/dev/null; then
  echo "netns_link_test: SKIPPED: 'ip netns add' fails here (no network namespaces)"
  exit 77
fi
ip netns del "$probe"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A plain-text corpus from the repository's own prose: no download needed.
cat "$root"/README.md "$root"/libdiloco/docs/*.md >"$tmp/text.txt"

# ~250k parameters: 1 MB per all-reduce per island, 40 steps, ~1.7 s on the shaped link.
timeout 240 bash "$root/benchmarks/netns_link.sh" -n 2 --rate 200 --timeout 180 \
  --max-diff-pct 2 --json "$tmp/result.json" -- \
  "$train_lm" --data "$tmp/text.txt" --mode dp --steps 40 --eval-every 40 --eval-batches 2 \
  --timeout-s 60
cat "$tmp/result.json"
/usr/bin/python3 - "$tmp/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["islands"] == 2 and len(r["per_island"]) == 2, r
for row in r["per_island"]:
    # A data-parallel run of 40 steps sends tens of MB: a count near zero would compare badly
    # but prove nothing.
    assert row["library_bytes_sent"] > 10_000_000, row
    assert abs(row["diff_pct"]) <= 2.0, row
    assert row["veth_tx_bytes"] >= row["library_bytes_sent"], row  # headers only add
print("netns_link_test: the library's bytes match the interfaces' counters within "
      f"{r['max_abs_diff_pct']}%")
PY
