#!/usr/bin/env bash
# Replay audits (diloco/audit/audit.h) among 4 real train_lm processes, audit rate 1 (every
# island audited at every outer step, by another island that replays its round bit for bit).
#
#   honest   every audit passes: each rank reports 4 audits per outer step and none failed,
#            nobody is excluded
#   cheats   one island cheats (train_lm --cheat, examples/train_lm/hostile.h): lazy (one inner
#            step in four), noise (noise of its update's norm), scale (its update x2); each is
#            caught at the first outer step, named with the evidence on every rank, and excluded
#   elastic  the same under diloco-run --elastic, with a run key: a lazy island is caught at its
#            first outer step and removed (it stops with "removed from the run", exit code 3);
#            the 3 others form a new epoch, go on auditing each other with none failing, and
#            end on the same global state
# Every static run: all 4 islands end on the same global state (the same "global state sha256").
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
  elastic)
    export DILOCO_RUN_KEY="audit test run key, 16+ bytes"
    timeout 300 "$run" -n 4 --elastic -- "$train_lm" "${common[@]}" \
      --cheat lazy --cheat-rank 2 > "$tmp/elastic.txt" 2>&1 && fail "diloco-run exited 0"
    grep 'audits [0-9]*, failed\|removed from the run' "$tmp/elastic.txt" | sed 's/^/  /'
    grep -q "rank 2 exited with code 3" "$tmp/elastic.txt" || fail "the cheater did not exit 3"
    grep -q "\[rank 2\] train_lm: removed from the run:.*rank 2 (island 2.0) failed its audit" \
      "$tmp/elastic.txt" || fail "the cheater was not told why it was removed"
    grep -q "\[elastic\] island [013].0: epoch 1 formed .* with 3 islands (0.0 1.0 3.0; lost: 2.0)" \
      "$tmp/elastic.txt" || fail "no new epoch without the cheater"
    h=$(grep -o 'global state sha256 [0-9a-f]*' "$tmp/elastic.txt" | awk '{print $4}' | sort -u)
    [ "$(grep -c 'global state sha256' "$tmp/elastic.txt")" = 3 ] || fail "not 3 islands ended"
    [ "$(echo "$h" | wc -l)" = 1 ] || fail "the islands' global states differ: $h"
    for r in 0 1 3; do
      # 4 audits at outer step 1, then 3 at each of the 2 others; only the cheater's failed.
      grep -q "rank $r/4: audits 10, failed 1 |.*| excluded: rank 2 (island 2.0) at outer step 1\$" \
        "$tmp/elastic.txt" || fail "slot $r: not 10 audits with only island 2.0's failing"
    done
    echo "elastic: the lazy island was removed at outer step 1; 3 islands agree: $h"
    ;;
  *) fail "unknown scenario" ;;
esac
echo "audit_test ($scenario): OK"
