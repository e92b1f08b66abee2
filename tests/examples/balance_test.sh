#!/usr/bin/env bash
# Islands of different speeds (train_lm --balance-speed, diloco::SpeedBalancer): of 2 real
# train_lm islands, rank 1 computes 1.6x slower (--straggle 1.6, an island on slower hardware).
# Unbalanced, rank 0 waits for it at every exchange; balanced, rank 0 takes larger batches and
# waits less, rank 1 keeps --batch-size, and both still end on the same global state. The
# unbalanced run's exchange log (--exchange-log) attributes rank 0's waiting to rank 1. Streaming
# with --fill-waits, rank 0 adds batches to its due steps instead of waiting.
# Usage: balance_test.sh DILOCO_RUN TRAIN_LM   (data from $DILOCO_DATA or data/brown)
set -euo pipefail
run=$1 train_lm=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
data=${DILOCO_DATA:-$root/data/brown}
[ -f "$data/ca01" ] || { echo "balance_test: no Brown corpus in $data"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "balance_test: FAIL: $*"; exit 1; }

# 15 windows of H = 20 steps; each island on a core of its own.
common=(--data "$data" --mode diloco --d-model 32 --layers 1 --heads 2 --seq-len 32
        --batch-size 16 --steps 300 --inner-steps 20 --warmup 10 --eval-every 300
        --threads 1 --timeout-s 120 --straggle 1.6 --straggle-rank 1)

islands() {  # NAME TRAIN_LM_ARGS...: 2 islands, the log in $tmp/NAME.txt
  local name=$1
  shift
  timeout 300 "$run" -n 2 --bind-cores -- "$train_lm" "${common[@]}" "$@" \
    > "$tmp/$name.txt" 2>&1 ||
    { tail -n 40 "$tmp/$name.txt"; fail "$name: the run failed"; }
  local h
  h=$(grep -o 'global state sha256 [0-9a-f]*' "$tmp/$name.txt" | awk '{print $4}' | sort -u)
  [ "$(grep -c 'global state sha256' "$tmp/$name.txt")" = 2 ] || fail "$name: not 2 islands ended"
  [ "$(echo "$h" | wc -l)" = 1 ] || fail "$name: the islands' global states differ: $h"
  grep -E "utilization|balanced" "$tmp/$name.txt"
}
waiting() {  # NAME RANK: the percent of training the rank waited for exchanges
  local pattern="waiting for exchanges [0-9.]* s (\([0-9.]*\)% of training)"
  sed -n "s/.*rank $2\/2: bytes_sent.*$pattern.*/\1/p" "$tmp/$1.txt"
}
balanced() {  # NAME RANK FIELD: the mean batch (1) or the final factor (2) of the rank
  local pattern="balanced batches: \([0-9.]*\) sequences a step on average .*, factor \([0-9.]*\)"
  sed -n "s/.*rank $2\/2: $pattern at the end.*/\\$3/p" "$tmp/$1.txt"
}

echo "== unbalanced"
islands plain --exchange-log "$tmp/exchanges.{island}.jsonl"
echo "== balanced"
islands balanced --balance-speed
grep -q "balanced batches" "$tmp/plain.txt" && fail "an unbalanced run reported balanced batches"

# The exchange log splits rank 0's waiting: nearly all of it is for rank 1, which starts each
# exchange 0.6x its compute later; on loopback, little is left for the link.
waited_s() {  # NAME RANK: the seconds the rank waited for exchanges, as train_lm prints them
  sed -n "s/.*rank $2\/2: bytes_sent.*waiting for exchanges \([0-9.]*\) s.*/\1/p" "$tmp/$1.txt"
}
/usr/bin/python3 "$root/benchmarks/exchange_log.py" "$tmp/exchanges.0.jsonl" \
  "$tmp/exchanges.1.jsonl" > "$tmp/split.txt"
cat "$tmp/split.txt"
/usr/bin/python3 - "$tmp/split.txt" "$(waited_s plain 0)" <<'PY'
import json, sys
rank0, rank1 = [json.loads(line) for line in open(sys.argv[1])]
printed = float(sys.argv[2])
# 15 windows of 20 steps: 14 exchanges in training, the last one in the end-of-run sync.
assert rank0["exchanges"] == rank1["exchanges"] == 14, (rank0, rank1)
# The log's waiting is train_lm's (which also counts the short waits on state comparisons).
# The margins are absolute as well as relative: on a fast host rank 0 waits only about 0.5 s in
# all, while a host's jitter is tens of milliseconds whatever the speed.
assert abs(rank0["waited_s"] - printed) <= 0.1 * printed + 0.05, (rank0, printed)
assert rank0["island_s"] > 0.8 * rank0["waited_s"], rank0
assert rank0["link_s"] < 0.2 * rank0["waited_s"], rank0
# Rank 1 is the slower: it hardly waits for rank 0.
assert rank1["island_s"] < 0.1 * rank0["island_s"] + 0.05, (rank0, rank1)
print("exchange log: rank 0 waited %.2f s, %.2f s of it for rank 1, %.3f s for the link"
      % (rank0["waited_s"], rank0["island_s"], rank0["link_s"]))
PY

/usr/bin/python3 - "$(waiting plain 0)" "$(waiting balanced 0)" "$(balanced balanced 0 1)" \
  "$(balanced balanced 0 2)" "$(balanced balanced 1 1)" "$(balanced balanced 1 2)" <<'PY'
import sys
wait_plain, wait_balanced, batch0, factor0, batch1, factor1 = map(float, sys.argv[1:])
print(f"rank 0 waits {wait_plain:.1f}% unbalanced, {wait_balanced:.1f}% balanced; mean batch "
      f"rank 0 {batch0:.2f} (factor {factor0:.3f}), rank 1 {batch1:.2f} (factor {factor1:.3f})")
# Rank 1 computes 1.6x as long: unbalanced, rank 0 waits about 0.6 / 1.6 of its training (37%);
# on a host whose other tenants slow rank 0's core too, it has measured as little as 13%.
assert wait_plain > 10, wait_plain
# Balanced, the faster island trains on more sequences a step, the slower keeps about its own.
assert factor0 > 1.25 and batch0 > 18, (batch0, factor0)
assert batch1 < 17 and factor1 < factor0, (batch1, factor1)
# And it waits less: its extra samples fill part of the wait (the batch grows over the first
# windows, so part of it is still waited).
assert wait_balanced < 0.8 * wait_plain, (wait_plain, wait_balanced)
print("balance_test: passed")
PY

echo "== filled: streaming (P = 2, tau = 3), the faster island adds batches while it would wait"
islands filled --fragments 2 --overlap-steps 3 --fill-waits --fill-max-batches 64
grep -q "filled waits" "$tmp/plain.txt" && fail "a run without --fill-waits reported filled waits"
grep "filled waits" "$tmp/filled.txt"
filled() {  # NAME RANK FIELD: the batches added (1) or the mean sequences a step (2)
  local pattern="filled waits: \([0-9]*\) batches added .*, \([0-9.]*\) sequences a step"
  sed -n "s/.*rank $2\/2: $pattern.*/\\$3/p" "$tmp/$1.txt"
}
utilization() {  # NAME RANK
  sed -n "s/.*rank $2\/2: bytes_sent.*utilization \([0-9.]*\).*/\1/p" "$tmp/$1.txt"
}
/usr/bin/python3 - "$(waiting plain 0)" "$(waiting filled 0)" "$(filled filled 0 1)" \
  "$(filled filled 0 2)" "$(filled filled 1 2)" "$(utilization filled 0)" <<'PY'
import sys
wait_plain, wait_filled, added0, batch0, batch1, util0 = map(float, sys.argv[1:])
print(f"rank 0 waits {wait_plain:.1f}% unfilled, {wait_filled:.1f}% filled, utilization "
      f"{util0:.3f}; {added0:.0f} batches added, mean sequences a step rank 0 {batch0:.2f}, "
      f"rank 1 {batch1:.2f}")
# Rank 1 computes 1.6x as long: rank 0 fills the difference, about 0.6 x 16 more sequences a
# step, instead of waiting for it.
assert wait_filled < 5 and wait_filled < 0.25 * wait_plain, (wait_plain, wait_filled)
assert util0 > 0.9, util0
assert added0 > 0 and batch0 > 20, (added0, batch0)
# The slower island is the one waited for: it adds little.
assert batch1 < 18, batch1
print("filled: passed")
PY

echo "== refused combinations, each naming the option"
refused() {  # refused MESSAGE FLAGS...: train_lm exits non-zero, printing MESSAGE
  local message=$1; shift
  if "$train_lm" --data "$data" "$@" >"$tmp/refused.txt" 2>&1; then
    fail "train_lm accepted $*"
  fi
  grep -qF -- "$message" "$tmp/refused.txt" ||
    { cat "$tmp/refused.txt"; fail "no '$message' for $*"; }
}
refused "--balance-speed: balances DiLoCo islands (--mode diloco)" --mode dp --balance-speed
refused "--balance-speed: does not combine with --audit-rate" --balance-speed --audit-rate 0.5
refused "--balance-max-factor: needs --balance-speed" --balance-max-factor 2
refused "--balance-max-factor: Value 0.5 not in range 1" --balance-speed --balance-max-factor 0.5
refused "--straggle: Value 0.5 not in range 1" --straggle 0.5
refused "--exchange-log: must hold {island}" --exchange-log "$tmp/x.jsonl"
refused "--exchange-log: logs DiLoCo's exchanges (--mode diloco)" --mode dp \
  --exchange-log "$tmp/x.{island}.jsonl"
refused "--fill-waits: fills the overlap of streaming DiLoCo" --mode dp --fill-waits
refused "--fill-waits: fills the overlap of streaming DiLoCo" --fragments 2 --fill-waits
refused "--fill-waits: does not combine with --audit-rate" --fragments 2 --overlap-steps 1 \
  --fill-waits --audit-rate 0.5
refused "--fill-max-batches: needs --fill-waits" --fill-max-batches 2
refused "--fill-max-batches: Value 0 not in range 1" --fragments 2 --overlap-steps 1 \
  --fill-waits --fill-max-batches 0
echo "balance_test: all passed"
