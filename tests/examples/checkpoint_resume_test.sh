#!/usr/bin/env bash
# Checkpoints end to end, with real processes: a 2-island train_lm run (streaming, int4 with error
# feedback, Muon islands: every kind of state) is killed with SIGKILL after it wrote checkpoints;
# the newest checkpoint of one rank is then corrupted; the run resumed with --resume must skip it
# (saying so), fall back to the newest one both ranks hold intact, and end with the same
# "global state sha256" as the same run left uninterrupted. Resuming under another H is refused,
# naming the field.
# Usage: checkpoint_resume_test.sh DILOCO_RUN TRAIN_LM   (data from $DILOCO_DATA or data/brown)
set -euo pipefail
run=$1 train_lm=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
data=${DILOCO_DATA:-$root/data/brown}
[ -f "$data/ca01" ] || { echo "checkpoint_resume_test: no Brown corpus in $data"; exit 1; }
tmp=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill -9 -- -"$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

# 300 steps, an outer step every 10; 40 ms of emulated latency per message keeps the run going
# for a while, so that the kill lands mid-run.
flags=(--data "$data" --d-model 64 --layers 1 --heads 2 --seq-len 32 --batch-size 8 --steps 300
       --warmup 10 --eval-every 100 --fragments 2 --overlap-steps 2 --mixing 0.5
       --compress "int4(rounding=stochastic)+ef" --threads 1 --link-latency-ms 40)
h10=(--inner-steps 10)
sha_of() { grep -o 'global state sha256 [0-9a-f]*' "$1" | awk '{print $4}' | sort -u; }

echo "== uninterrupted"
timeout 600 "$run" -n 2 -- "$train_lm" "${flags[@]}" "${h10[@]}" > "$tmp/whole.txt" 2>&1 || { cat "$tmp/whole.txt"; exit 1; }
whole=$(sha_of "$tmp/whole.txt")
[ "$(echo "$whole" | wc -l)" = 1 ] && [ -n "$whole" ] || { echo "ranks disagree or no sha: $whole"; exit 1; }
echo "global state sha256 $whole"

echo "== checkpointing every 2 outer steps, killed with SIGKILL after outer step 8"
setsid "$run" -n 2 -- "$train_lm" "${flags[@]}" "${h10[@]}" --checkpoint-dir "$tmp/ck" --checkpoint-every 2 \
  --keep-checkpoints 3 > "$tmp/killed.txt" 2>&1 &
pid=$!
for _ in $(seq 600); do
  [ -f "$tmp/ck/rank-0/ckpt-00000008.pt" ] && [ -f "$tmp/ck/rank-1/ckpt-00000008.pt" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$tmp/killed.txt"; echo "the run ended before it could be killed"; exit 1; }
  sleep 0.1
done
kill -9 -- -"$pid"
wait "$pid" 2>/dev/null || true
pid=""
! grep -q "global state sha256" "$tmp/killed.txt" || { echo "the run was not killed mid-run"; exit 1; }
ls "$tmp/ck/rank-0" "$tmp/ck/rank-1"
# Only the newest 3 are kept.
[ "$(ls "$tmp/ck/rank-0" | grep -c '^ckpt-')" -le 3 ] || { echo "more than 3 checkpoints kept"; exit 1; }

# Corrupt rank 0's newest checkpoint (one byte in its middle).
newest=$(ls "$tmp/ck/rank-0" | grep '^ckpt-' | sort | tail -1)
size=$(stat -c %s "$tmp/ck/rank-0/$newest")
printf '\xff' | dd of="$tmp/ck/rank-0/$newest" bs=1 seek=$((size / 2)) conv=notrunc status=none
echo "corrupted rank 0's $newest"

echo "== resumed"
timeout 600 "$run" -n 2 -- "$train_lm" "${flags[@]}" "${h10[@]}" --checkpoint-dir "$tmp/ck" --checkpoint-every 2 \
  --resume > "$tmp/resumed.txt" 2>&1 || { cat "$tmp/resumed.txt"; exit 1; }
grep "skipping a checkpoint\|resumed from" "$tmp/resumed.txt"
grep -q "skipping a checkpoint: .*$newest" "$tmp/resumed.txt" || { echo "the corrupted checkpoint was not reported"; exit 1; }
[ "$(grep -c "resumed from" "$tmp/resumed.txt")" = 2 ] || { echo "not every rank resumed"; exit 1; }
grep -q "resumed from .*$newest" "$tmp/resumed.txt" && { echo "resumed from the corrupted checkpoint"; exit 1; }
resumed=$(sha_of "$tmp/resumed.txt")
echo "global state sha256 $resumed (uninterrupted: $whole)"
[ "$resumed" = "$whole" ] || { echo "the resumed run ended elsewhere"; exit 1; }

echo "== resuming under another H is refused"
if timeout 300 "$run" -n 2 -- "$train_lm" "${flags[@]}" --inner-steps 20 --checkpoint-dir "$tmp/ck" \
     --resume > "$tmp/other.txt" 2>&1; then
  echo "a checkpoint of H=10 was loaded under H=20"; exit 1
fi
grep -q "inner_steps (H)" "$tmp/other.txt" || { cat "$tmp/other.txt"; echo "the error does not name H"; exit 1; }
grep -m1 "inner_steps (H)" "$tmp/other.txt"
echo "checkpoint_resume_test: all checks passed"
