#!/usr/bin/env bash
# End-to-end: the examples train for real. 4 islands of train_lm (DiLoCo, H=25) on the Brown
# corpus for 250 steps must bring the validation loss well below its start, sync exactly
# steps/H times, and account the bytes of every outer sync; `minimal` must run on 2 islands; a
# replicated warm start must leave the islands with rank 0's weights to the bit and send nothing.
# Usage: train_lm_test.sh DILOCO_RUN TRAIN_LM MINIMAL   (data from $DILOCO_DATA or data/brown)
set -euo pipefail
run=$1 train_lm=$2 minimal=$3
root=$(cd "$(dirname "$0")/../.." && pwd)
data=${DILOCO_DATA:-$root/data/brown}
[ -f "$data/ca01" ] || { echo "train_lm_test: no Brown corpus in $data (run libdiloco/scripts/fetch_data.sh)"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== minimal on 2 islands"
timeout 300 "$run" -n 2 -- "$minimal" | tee "$tmp/minimal.txt"

echo "== train_lm, 4 islands, DiLoCo H=25, 250 steps"
timeout 800 "$run" -n 4 -- "$train_lm" --data "$data" --mode diloco --steps 250 --inner-steps 25 \
  --warmup 25 --metrics "$tmp/metrics.jsonl" | tee "$tmp/train.txt"

/usr/bin/python3 - "$tmp/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
first, last = rows[0], rows[-1]
print(f"validation loss {first['val_loss']:.3f} -> {last['val_loss']:.3f} over {last['step']} steps,"
      f" {last['outer_step']} outer steps, {last['bytes_sent']} bytes sent by rank 0")
assert last["world_size"] == 4, last
assert last["step"] == 250 and last["outer_step"] == 10, last
# ln(256) = 5.55 is the loss of a uniform guess; well below the start means < 60% of it.
assert last["val_loss"] < 0.6 * first["val_loss"], (first["val_loss"], last["val_loss"])
# Each outer sync is one ring all-reduce of the float32 parameters, 2(N-1)/N * 4 * P bytes, plus
# the buffers' check: the model's only buffer is its causal mask (bool), so an all-gather of an
# 8-byte digest, (N-1) * 8 bytes, and nothing else while the islands' masks agree; before it the
# contributions' screening: an all-gather of an 8-byte norm and the state comparison's 32-byte
# row riding on it (outer step, fragment and the 128-bit hash of the global state after the last
# outer step; "none" at the first), (N-1) * 40 bytes. The last outer step's comparison
# (check_state, its own all-gather) comes after the last metrics line.
steps = last["outer_step"]
per_sync = (last["bytes_sent"] - first["bytes_sent"]) / steps
expect = 2 * 3 * 4 * last["parameters"] // 4 + 3 * 8 + 3 * 40
assert abs(per_sync - expect) <= 8, (per_sync, expect)
print("train_lm_test: DiLoCo checks passed")
PY

echo "== train_lm refuses warm-start flags it would otherwise ignore, naming them"
refused() {  # refused MESSAGE FLAGS...: train_lm exits non-zero, printing MESSAGE
  local message=$1; shift
  if "$train_lm" --data "$data" "$@" >"$tmp/refused.txt" 2>&1; then
    echo "train_lm_test: train_lm accepted $*"; exit 1
  fi
  grep -qF -- "$message" "$tmp/refused.txt" \
    || { echo "train_lm_test: no '$message' for $*:"; cat "$tmp/refused.txt"; exit 1; }
}
refused "--warm-start-steps: is for --mode diloco" --mode single --warm-start-steps 5
refused "--warm-start-steps: is for --mode diloco" --mode dp --warm-start-steps 5
refused "--warm-start: needs --warm-start-steps N" --warm-start replicated

echo "== train_lm, 2 islands, DiLoCo H=20 after a replicated warm start of 20 steps"
timeout 300 "$run" -n 2 -- "$train_lm" --data "$data" --mode diloco --steps 60 --inner-steps 20 \
  --warm-start-steps 20 --warm-start replicated --warmup 5 --d-model 32 --layers 1 --heads 2 \
  --seq-len 32 --batch-size 4 --eval-batches 4 --metrics "$tmp/warm.jsonl" | tee "$tmp/warm.txt"
# Both islands trained rank 0's batches from the same weights: DiLoCo's start (which broadcasts
# rank 0's weights) finds them equal on every rank.
[ "$(grep -c "replicated warm start of 20 steps: this island's weights equal rank 0's" "$tmp/warm.txt")" = 2 ] \
  || { echo "train_lm_test: the islands' weights differed after the replicated warm start"; exit 1; }
/usr/bin/python3 - "$tmp/warm.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by_step = {r["step"]: r for r in rows}
assert by_step[60]["outer_step"] == 2, rows
# Outer steps at 40 and 60: DiLoCo counts its steps from the warm start's end.
exchange = by_step[60]["bytes_received"] - by_step[40]["bytes_received"]
assert exchange > 2 * 4 * by_step[60]["parameters"] // 2 - 1, exchange
# Rank 0 received, by step 40, one exchange and DiLoCo's start-up check (about 2 kB), nothing
# for the 20 warm-start steps (data-parallel would have received an exchange's size per step).
before = by_step[40]["bytes_received"] - exchange
print(f"rank 0 received {before} bytes besides the exchanges (start-up check), one exchange "
      f"{exchange} bytes")
assert 0 < before < 4096, before
assert by_step[60]["val_loss"] < 0.6 * by_step[0]["val_loss"], rows
print("train_lm_test: all checks passed")
PY
