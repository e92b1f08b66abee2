#!/usr/bin/env bash
# Elastic runs end to end, with real processes on loopback: train_lm islands under
# `diloco-run --elastic` (which serves the store from diloco-coordinator), faults injected from
# outside, and the one thing that must hold through all of them: every island that finishes prints
# the same "global state sha256".
#
# Scenarios (one per ctest entry):
#   kill      kill -9 a random one of 4 islands at a random moment, during an exchange (the emulated
#             link makes each exchange last about a second) and, in a second run, between outer
#             steps; the survivors finish and agree
#   restart   kill -9 a random island; diloco-run --max-restarts starts it again and it rejoins;
#             another island is killed while the first is being admitted (its state published,
#             its first outer step not reached) and rejoins too: all 4 finish and agree
#   stop      SIGSTOP one island: the others form a new epoch within heartbeat_timeout + 2 s and go
#             on; on SIGCONT it is told it was removed (exit code 3)
#   join      a fifth island joins mid-run and ends bit-identical to the others; a misconfigured one
#             is refused naming the field; one killed while being admitted does not stop the run
#   min       2 islands with --min-islands 2: losing one stops the survivor with a clear error
#   keyed     a run with a run key (DILOCO_RUN_KEY): processes with no key, or another, fail on
#             their own naming why while the run goes on; a killed island restarted with the key
#             rejoins (its admission, state transfer and every epoch's payloads authenticated):
#             all 4 finish and agree
#
# Usage: elastic_test.sh SCENARIO DILOCO_RUN TRAIN_LM   (data from $DILOCO_DATA or data/brown)
set -euo pipefail
scenario=$1 run=$2 train_lm=$3
root=$(cd "$(dirname "$0")/../.." && pwd)
data=${DILOCO_DATA:-$root/data/brown}
[ -f "$data/ca01" ] || { echo "elastic_test: no Brown corpus in $data"; exit 1; }
tmp=$(mktemp -d)
launcher=""
cleanup() {
  if [ -n "$launcher" ]; then kill -9 -- -"$launcher" 2>/dev/null || true; fi
  pkill -9 -f "$tmp/" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

# A small model: the runs are about the membership, not the loss. --metrics names the run's temp
# folder so that cleanup() finds every island of it.
heartbeat=3
model=(--data "$data" --d-model 32 --layers 1 --heads 2 --seq-len 32 --batch-size 4 --warmup 5
       --eval-batches 1 --threads 1 --heartbeat-timeout-s "$heartbeat" --timeout-s 30
       --metrics "$tmp/metrics-{island}.jsonl")

fail() { echo "elastic_test ($scenario): FAIL: $*"; for f in "$tmp"/*.txt; do echo "--- $f"; tail -n 30 "$f"; done; exit 1; }
now() { date +%s.%N; }
# The distinct hashes in a log, and how many islands printed one.
hashes() { grep -o 'global state sha256 [0-9a-f]*' "$1" | awk '{print $4}' | sort -u; }
count() { grep -c 'global state sha256 [0-9a-f]*' "$1" || true; }
expect_agree() {  # LOG ISLANDS
  local h
  h=$(hashes "$1")
  [ -n "$h" ] || fail "no island finished in $1"
  [ "$(echo "$h" | wc -l)" = 1 ] || fail "islands disagree: $h"
  [ "$(count "$1")" = "$2" ] || fail "expected $2 islands to finish, $(count "$1") did"
  echo "  $2 islands agree: global state sha256 $h"
}
# Starts diloco-run in its own process group; the log goes to $tmp/$1.txt.
launch() {  # NAME DILOCO_RUN_ARGS... -- TRAIN_LM_ARGS...
  local name=$1
  shift
  setsid "$run" "$@" > "$tmp/$name.txt" 2>&1 &
  launcher=$!
}
finish() {  # NAME: waits for the launcher (bounded), returns its exit code in $rc
  rc=0
  for _ in $(seq 1800); do kill -0 "$launcher" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$launcher" 2>/dev/null && fail "$1: still running after 180 s"
  wait "$launcher" || rc=$?
  launcher=""
}
# The pid of the train_lm process of slot $1 (its environment says RANK).
island_pid() {
  local p
  for p in $(pgrep -f "$train_lm" || true); do
    if tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "RANK=$1" &&
       tr '\0' '\n' < "/proc/$p/cmdline" 2>/dev/null | grep -q "$tmp/"; then
      echo "$p"
      return
    fi
  done
}
wait_for_line() {  # FILE REGEX SECONDS
  for _ in $(seq $(( $3 * 10 ))); do grep -Eq "$2" "$1" && return 0; sleep 0.1; done
  fail "no line matching '$2' in $1 within $3 s"
}

case "$scenario" in
kill)
  for where in exchange between; do
    if [ "$where" = exchange ]; then
      extra=(--steps 300 --inner-steps 10 --link-latency-ms 150)  # ~1 s exchanges, 0.1 s of steps
    else
      extra=(--steps 400 --inner-steps 50)
    fi
    victim=$(( RANDOM % 4 ))
    echo "== kill -9 island $victim at a random moment ($where outer steps)"
    launch "kill-$where" -n 4 --elastic -- "$train_lm" "${model[@]}" "${extra[@]}"
    wait_for_line "$tmp/kill-$where.txt" "step [0-9]+/[0-9]+ outer 2 " 120
    sleep "0.$(( RANDOM % 10 ))"
    kill -9 "$(island_pid "$victim")"
    finish "kill-$where"
    [ "$rc" = 137 ] || fail "diloco-run should report the killed island (137), got $rc"
    grep -E "\[elastic\].*epoch [0-9]+ formed" "$tmp/kill-$where.txt" | head -n 1
    expect_agree "$tmp/kill-$where.txt" 3
  done
  ;;
restart)
  victim=$(( RANDOM % 4 ))
  second=$(( (victim + 1 + RANDOM % 3) % 4 ))
  echo "== kill -9 island $victim; diloco-run starts it again and it rejoins; island $second is" \
       "killed while $victim.1 is being admitted, and rejoins too"
  launch restart -n 4 --max-restarts 1 --restart-delay 0 -- "$train_lm" "${model[@]}" --steps 1000 --inner-steps 50
  wait_for_line "$tmp/restart.txt" "step [0-9]+/[0-9]+ outer 2 " 120
  sleep "0.$(( RANDOM % 10 ))"
  kill -9 "$(island_pid "$victim")"
  # Between its admission (the state published for it) and its first outer step.
  wait_for_line "$tmp/restart.txt" "island $victim.1 \(slot $victim\): admitted at step" 120
  kill -9 "$(island_pid "$second")"
  finish restart
  [ "$rc" = 0 ] || fail "diloco-run exited $rc"
  grep -q "island $second.1 (slot $second): admitted at step" "$tmp/restart.txt" || fail "island $second.1 was not admitted"
  grep -E "admitted at step|\[elastic\].*formed" "$tmp/restart.txt" | sort -u | head -n 8
  expect_agree "$tmp/restart.txt" 4
  ;;
stop)
  victim=$(( 1 + RANDOM % 3 ))
  echo "== SIGSTOP island $victim"
  launch stop -n 4 --elastic -- "$train_lm" "${model[@]}" --steps 500 --inner-steps 20
  wait_for_line "$tmp/stop.txt" "step [0-9]+/[0-9]+ outer 2 " 120
  pid=$(island_pid "$victim")
  kill -STOP "$pid"
  stopped_at=$(now)
  wait_for_line "$tmp/stop.txt" "\[elastic\].*epoch [0-9]+ formed.*lost: $victim.0" $(( heartbeat + 30 ))
  took=$(awk -v a="$(now)" -v b="$stopped_at" 'BEGIN { printf "%.2f", a - b }')
  echo "  the others formed a new epoch ${took} s after the SIGSTOP (heartbeat_timeout ${heartbeat} s)"
  awk -v t="$took" -v h="$heartbeat" 'BEGIN { exit !(t <= h + 2) }' || fail "took ${took} s, more than heartbeat_timeout + 2 s"
  sleep 1
  kill -CONT "$pid"
  finish stop
  grep -q "\[rank $victim\] train_lm: removed from the run" "$tmp/stop.txt" ||
    fail "island $victim was not told it was removed"
  grep -q "rank $victim exited with code 3" "$tmp/stop.txt" || fail "island $victim did not exit with code 3"
  expect_agree "$tmp/stop.txt" 3
  ;;
join)
  port=$(( 20000 + RANDOM % 20000 ))
  steps=1500
  echo "== a fifth island joins mid-run; a misconfigured one is refused; one killed while admitted"
  launch join -n 4 --elastic --master-port "$port" -- "$train_lm" "${model[@]}" --steps $steps --inner-steps 50
  wait_for_line "$tmp/join.txt" "step [0-9]+/[0-9]+ outer 2 " 120
  joiner=(env MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" WORLD_SIZE=4 DILOCO_ELASTIC=1)
  # The fifth island, and one that is killed right after its admission (before its first
  # exchange, while the members wait for it at the next outer step).
  "${joiner[@]}" RANK=4 "$train_lm" "${model[@]}" --steps $steps --inner-steps 50 > "$tmp/fifth.txt" 2>&1 &
  fifth=$!
  "${joiner[@]}" RANK=5 "$train_lm" "${model[@]}" --steps $steps --inner-steps 50 > "$tmp/killed-joiner.txt" 2>&1 &
  doomed=$!
  # Another outer learning rate: refused, naming the field; the run goes on.
  "${joiner[@]}" RANK=6 "$train_lm" "${model[@]}" --steps $steps --inner-steps 50 --outer-lr 0.5 \
    > "$tmp/misconfigured.txt" 2>&1 && fail "a misconfigured joiner was admitted"
  grep -q "not admitted: outer lr is '1' in the run but '0.5'" "$tmp/misconfigured.txt" ||
    fail "the refusal does not name the field"
  grep "not admitted" "$tmp/misconfigured.txt"
  wait_for_line "$tmp/killed-joiner.txt" "admitted at step" 60
  kill -9 "$doomed"
  wait "$doomed" 2>/dev/null || true
  wait "$fifth" || fail "the fifth island failed"
  finish join
  [ "$rc" = 0 ] || fail "diloco-run exited $rc"
  grep "admitted at step" "$tmp/fifth.txt"
  at=$(grep -o "admitted at step [0-9]*" "$tmp/fifth.txt" | awk '{print $4}')
  (( at <= steps - 3 * 50 )) || fail "the fifth island was admitted at step $at: too late to take part in 3 outer steps"
  grep -E "\[elastic\].*lost: 5\.0" "$tmp/join.txt" | head -n 1 || fail "the killed joiner was not dropped"
  cat "$tmp/fifth.txt" >> "$tmp/join.txt"
  expect_agree "$tmp/join.txt" 5
  ;;
min)
  echo "== 2 islands, --min-islands 2: losing one stops the other"
  launch min -n 2 --elastic -- "$train_lm" "${model[@]}" --steps 400 --inner-steps 20 --min-islands 2
  wait_for_line "$tmp/min.txt" "step [0-9]+/[0-9]+ outer 2 " 120
  started=$(now)
  kill -9 "$(island_pid 1)"
  finish min
  took=$(awk -v a="$(now)" -v b="$started" 'BEGIN { printf "%.2f", a - b }')
  [ "$rc" != 0 ] || fail "diloco-run exited 0"
  grep -q "only 1 island(s) remain (0.0; lost: 1.0), below min_islands = 2" "$tmp/min.txt" ||
    fail "no clear error naming min_islands"
  grep "below min_islands" "$tmp/min.txt" | head -n 1
  echo "  stopped ${took} s after the loss"
  ;;
keyed)
  port=$(( 20000 + RANDOM % 20000 ))
  victim=$(( RANDOM % 4 ))
  echo "== a keyed run: keyless and wrong-key processes are refused; island $victim is killed and" \
       "rejoins with the key"
  export DILOCO_RUN_KEY="elastic test run key, 16+ bytes"
  # Long enough to outlive two intruder processes' start-up on a loaded machine.
  launch keyed -n 4 --max-restarts 1 --restart-delay 0 --master-port "$port" -- \
    "$train_lm" "${model[@]}" --steps 3000 --inner-steps 50
  unset DILOCO_RUN_KEY
  wait_for_line "$tmp/keyed.txt" "step [0-9]+/[0-9]+ outer 2 " 120
  intruder=(env MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" WORLD_SIZE=4 DILOCO_ELASTIC=1 RANK=4
            "$train_lm" "${model[@]}" --steps 3000 --inner-steps 50)
  "${intruder[@]}" > "$tmp/keyless.txt" 2>&1 && fail "a process without the key joined"
  grep -q "requires a run key and this process has none" "$tmp/keyless.txt" ||
    fail "the keyless process's error does not say why"
  DILOCO_RUN_KEY="another key, 16+ bytes long" "${intruder[@]}" > "$tmp/wrong-key.txt" 2>&1 &&
    fail "a process with another key joined"
  grep -q "run key does not match the run's" "$tmp/wrong-key.txt" ||
    fail "the wrong-key process's error does not say why"
  grep -h "run key" "$tmp/keyless.txt" "$tmp/wrong-key.txt" | sed 's/^/  /'
  kill -9 "$(island_pid "$victim")"
  finish keyed
  [ "$rc" = 0 ] || fail "diloco-run exited $rc"
  grep -q "island $victim.1 (slot $victim): admitted at step" "$tmp/keyed.txt" ||
    fail "island $victim.1 was not admitted"
  grep -E "admitted at step|\[elastic\].*formed" "$tmp/keyed.txt" | sort -u | head -n 4
  expect_agree "$tmp/keyed.txt" 4
  ;;
*)
  echo "unknown scenario '$scenario'"
  exit 2
  ;;
esac
echo "elastic_test ($scenario): OK"
