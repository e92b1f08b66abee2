#!/usr/bin/env bash
# One hostile island among 4 real train_lm processes (train_lm --hostile, examples/train_lm/
# hostile.h), and what the library must do about it.
#
#   robust   with trimmed_mean, median and norm_clip, each against a different hostile island
#            (huge values, random payload bytes, a flipped, scaled or stale pseudo-gradient), the
#            final validation loss is within 2% of an all-honest run with the mean
#   mean     with the default mean, the screening keeps the global weights finite and names the
#            hostile rank on every rank: huge values (refused by the norms the islands declare)
#            and random payload bytes under a gathered codec (refused by what they decode to);
#            random bytes in an fp32 all-reduce (summed in flight) stop the run on every rank
#            with an error, nothing applied
# Every run: all 4 islands end on the same global state (the same "global state sha256").
#
# Usage: hostile_test.sh SCENARIO DILOCO_RUN TRAIN_LM   (data from $DILOCO_DATA or data/brown)
set -euo pipefail
scenario=$1 run=$2 train_lm=$3
root=$(cd "$(dirname "$0")/../.." && pwd)
data=${DILOCO_DATA:-$root/data/brown}
[ -f "$data/ca01" ] || { echo "hostile_test: no Brown corpus in $data"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A small model trained briefly: 6 outer steps of H = 20.
common=(--data "$data" --mode diloco --d-model 48 --layers 1 --heads 2 --seq-len 32
        --batch-size 8 --steps 120 --inner-steps 20 --warmup 10 --eval-batches 8 --threads 1
        --timeout-s 60)

fail() { echo "hostile_test ($scenario): FAIL: $*"; exit 1; }
# Runs 4 islands; the log goes to $tmp/$1.txt. Sets $loss (the final validation loss).
islands() {  # NAME TRAIN_LM_ARGS...
  local name=$1
  shift
  timeout 300 "$run" -n 4 -- "$train_lm" "${common[@]}" "$@" > "$tmp/$name.txt" 2>&1 ||
    { tail -n 40 "$tmp/$name.txt"; fail "$name: the run failed"; }
  local h
  h=$(grep -o 'global state sha256 [0-9a-f]*' "$tmp/$name.txt" | awk '{print $4}' | sort -u)
  [ "$(grep -c 'global state sha256' "$tmp/$name.txt")" = 4 ] || fail "$name: not 4 islands ended"
  [ "$(echo "$h" | wc -l)" = 1 ] || fail "$name: the islands' global states differ: $h"
  loss=$(sed -n 's/.*validation loss .* at the start -> \([0-9.a-z]*\) at the end.*/\1/p' \
    "$tmp/$name.txt")
  [ -n "$loss" ] || fail "$name: no final validation loss"
  python3 -c "import math,sys; sys.exit(0 if math.isfinite(float('$loss')) else 1)" ||
    fail "$name: the final validation loss is $loss"
}
# Every rank named the hostile rank 1 (stderr of each island; the launcher prefixes the rank).
named_on_every_rank() {  # NAME WHAT
  local r
  for r in 0 1 2 3; do
    grep -q "] rank $r: refused the $2 rank.* 1 " "$tmp/$1.txt" ||
      grep -q "] rank $r: refused the $2 rank 1 " "$tmp/$1.txt" ||
      { grep -m3 refused "$tmp/$1.txt" || true; fail "$1: rank $r did not name the hostile rank 1"; }
  done
}

case $scenario in
  robust)
    islands honest
    honest=$loss
    echo "all honest, mean: final validation loss $honest"
    for c in "median huge none" "trimmed_mean(trim=1) flip none" "norm_clip scale none" \
             "median random fp32" "trimmed_mean(trim=1) stale none" "norm_clip random fp32"; do
      read -r aggregator kind codec <<< "$c"
      islands "$kind-$aggregator" --aggregator "$aggregator" --hostile "$kind" --hostile-rank 1 \
        --compress "$codec"
      ratio=$(python3 -c "print(f'{float(\"$loss\") / float(\"$honest\"):.4f}')")
      echo "hostile $kind, $aggregator ($codec): final validation loss $loss ($ratio x honest)"
      python3 -c "import sys; sys.exit(0 if float('$ratio') <= 1.02 else 1)" ||
        fail "$kind under $aggregator: $loss is more than 2% above the honest run's $honest"
    done
    ;;
  mean)
    islands huge-mean --hostile huge --hostile-rank 1
    echo "hostile huge, mean: final validation loss $loss"
    named_on_every_rank huge-mean "pseudo-gradient of"
    islands random-mean --hostile random --hostile-rank 1 --compress sign
    echo "hostile random bytes, mean (sign): final validation loss $loss"
    named_on_every_rank random-mean "contribution of"
    # Summed in flight (fp32 all-reduce), no single payload can be seen: the outer step whose sum
    # no honest islands could have produced is refused on every rank, and the run stops with an
    # error rather than apply it.
    if timeout 300 "$run" -n 4 -- "$train_lm" "${common[@]}" --hostile random --hostile-rank 1 \
        --compress fp32 > "$tmp/random-summed.txt" 2>&1; then
      fail "random bytes in an fp32 all-reduce: the run should have stopped"
    fi
    for r in 0 1 2 3; do
      # Which check fires depends on the bytes: a sum longer than the declared norms allow, a sum
      # that overflowed (the codec's decoder), or one holding a NaN.
      grep -Eq "\[rank $r\] .*(the summed pseudo-gradient('s norm .* exceeds the sum of the norms| is NaN or infinite)|malformed payload: element .* is not finite)" \
        "$tmp/random-summed.txt" || { tail -n 20 "$tmp/random-summed.txt"; fail "rank $r: no such error"; }
    done
    echo "hostile random bytes, mean (fp32 all-reduce): stopped on every rank, nothing applied"
    ;;
  *) fail "unknown scenario" ;;
esac
echo "hostile_test ($scenario): OK"
