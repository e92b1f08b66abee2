#!/usr/bin/env bash
# Replay audits (diloco/audit/audit.h) among 4 real train_lm processes, audit rate 1 (every
# island audited at every outer step, by another island that replays its round bit for bit).
#
#   honest   every audit passes: each rank reports 4 audits per outer step and none failed,
#            nobody is excluded
#   cheats   one island cheats (train_lm --cheat, examples/train_lm/hostile.h): lazy (one inner
#            step in four), noise (noise of its update's norm), scale (its update x2); each is
#            caught at the first outer step, named with the evidence on every rank, and excluded
# Every run: all 4 islands end on the same global state (the same "global state sha256").
#
# Usage: audit_test.sh SCENARIO DILOCO_RUN TRAIN_LM   (data from $DILOCO_DATA or data/brown)
set -euo pipefail
scenario=$1 run=$2 train_lm=$3
root=$(cd "$(dirname "$0")/../.." && pwd)
data=${DILOCO_DATA:-$root/data/brown}
[ -f "$data/ca01" ] || { echo "audit_test: no Brown corpus in $data"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A small model trained briefly: 3 outer steps of H = 10.
common=(--data "$data" --mode diloco --d-model 32 --layers 1 --heads 2 --seq-len 32
        --batch-size 8 --steps 30 --inner-steps 10 --warmup 5 --eval-batches 4 --threads 1
        --timeout-s 60 --audit-rate 1)

fail() { echo "audit_test ($scenario): FAIL: $*"; exit 1; }
islands() {  # NAME TRAIN_LM_ARGS...
  local name=$1
  shift
  timeout 300 "$run" -n 4 -- "$train_lm" "${common[@]}" "$@" > "$tmp/$name.txt" 2>&1 ||
    { tail -n 40 "$tmp/$name.txt"; fail "$name: the run failed"; }
  local h
  h=$(grep -o 'global state sha256 [0-9a-f]*' "$tmp/$name.txt" | awk '{print $4}' | sort -u)
  [ "$(grep -c 'global state sha256' "$tmp/$name.txt")" = 4 ] || fail "$name: not 4 islands ended"
  [ "$(echo "$h" | wc -l)" = 1 ] || fail "$name: the islands' global states differ: $h"
  grep 'audits [0-9]*, failed' "$tmp/$name.txt" | sed 's/^/  /'
}

case $scenario in
  honest)
    islands honest
    for r in 0 1 2 3; do
      grep -q "rank $r/4: audits 12, failed 0 | replayed [0-9]* inner steps.*| excluded: none" \
        "$tmp/honest.txt" || fail "rank $r: not 12 audits passed with nobody excluded"
    done
    if grep -q "failed its" "$tmp/honest.txt"; then
      grep -m3 "failed its" "$tmp/honest.txt"
      fail "an honest island failed an audit"
    fi
    ;;
  cheats)
    for cheat in lazy noise scale; do
      islands "$cheat" --cheat "$cheat" --cheat-rank 1
      for r in 0 1 2 3; do
        grep -q "rank $r/4: audits [0-9]*, failed 1 |.*| excluded: rank 1 at outer step 1\$" \
          "$tmp/$cheat.txt" || fail "$cheat: rank $r did not exclude rank 1 at outer step 1"
        grep -q "\[DiLoCo outer step 1\] rank $r: rank 1 failed its audit by rank [023]: replayed pseudo-gradient [0-9a-f]* (committed [0-9a-f]*)" \
          "$tmp/$cheat.txt" || fail "$cheat: rank $r did not report rank 1's failed audit with the evidence"
      done
      echo "cheat $cheat: caught at outer step 1, named on all 4 ranks"
    done
    ;;
  *) fail "unknown scenario" ;;
esac
echo "audit_test ($scenario): OK"
