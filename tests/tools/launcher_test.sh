#!/usr/bin/env bash
# End-to-end checks of the diloco-run launcher: the environment it gives each rank, the output
# prefixing, failure propagation, signal forwarding, --timeout and command-line validation; then
# elastic mode (restarts, the coordinator it starts and stops, --coordinator) and
# diloco-coordinator's own checks. The ranks are bash and coreutils programs, never a training
# job; only diloco-coordinator links LibTorch.
#
# Usage: launcher_test.sh PATH/TO/diloco-run [PATH/TO/diloco-coordinator]
#   (default: the diloco-coordinator next to diloco-run, which is where diloco-run looks first)
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 PATH/TO/diloco-run [PATH/TO/diloco-coordinator]" >&2
  exit 2
fi
run=$1
coordinator=${2:-$(dirname "$run")/diloco-coordinator}
for program in "$run" "$coordinator"; do
  [[ -x $program ]] || { echo "launcher_test: FAIL: '$program' is not an executable file" >&2; exit 1; }
done
# diloco-run finds the coordinator next to itself, else on PATH: make the one under test win.
PATH="$(cd "$(dirname "$coordinator")" && pwd):$PATH"

work=$(mktemp -d)
launcher_pid=
coordinator_pid=
# SIGKILL to a launcher left running by a failed check also takes its ranks (PR_SET_PDEATHSIG).
cleanup() {
  if [[ -n $launcher_pid ]]; then kill -KILL "$launcher_pid" 2>/dev/null || true; fi
  if [[ -n $coordinator_pid ]]; then kill -KILL "$coordinator_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# Every launcher call goes through coreutils' timeout so that a launcher that hangs fails the
# test instead of blocking ctest forever.
readonly kGuardSeconds=10

check() { printf 'launcher_test: checking %s\n' "$*"; }
fail() {
  printf 'launcher_test: FAIL: %s\n' "$*" >&2
  for f in "$work"/out "$work"/err; do
    if [[ -s $f ]]; then printf -- '--- %s ---\n' "${f##*/}" >&2; head -n 40 "$f" >&2; fi
  done
  exit 1
}
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# Runs the launcher with stdout/stderr captured in $work/out and $work/err; sets $rc and
# $elapsed_ms without tripping `set -e` on the non-zero exits some checks expect.
launch() { launch_program "$run" "$@"; }
launch_program() {  # PROGRAM ARGS...
  local program=$1 start
  shift
  start=$(now_ms)
  rc=0
  timeout "$kGuardSeconds" "$program" "$@" >"$work/out" 2>"$work/err" || rc=$?
  elapsed_ms=$(( $(now_ms) - start ))
  if [[ $rc -eq 124 && $elapsed_ms -ge $(( kGuardSeconds * 1000 )) ]]; then
    fail "${program##*/} $1 $2 ... still running after ${kGuardSeconds} s (stopped by the test's guard)"
  fi
}
expect_rc() { [[ $rc -eq $1 ]] || fail "$2: expected exit code $1, got $rc"; }
expect_line() {  # FILE REGEX WHAT
  grep -Eq -- "$2" "$1" || fail "$3: no line in ${1##*/} matches '$2'"
}
expect_fast() {  # WHAT
  [[ $elapsed_ms -lt 5000 ]] || fail "$1: took ${elapsed_ms} ms, expected well under 5 s"
}
# Waits up to 5 s for the background process PID to exit and sets $rc to its exit code.
wait_for_exit() {  # PID WHAT
  local deadline=$(( $(now_ms) + 5000 ))
  while kill -0 "$1" 2>/dev/null; do
    [[ $(now_ms) -lt $deadline ]] || fail "$2 still running 5 s after being signalled"
    sleep 0.05
  done
  rc=0
  wait "$1" || rc=$?
}
# Whether something accepts TCP connections on 127.0.0.1:PORT (bash's /dev/tcp, no netcat).
accepts_tcp() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# The port of the coordinator diloco-run started, from its `[coordinator] ... serving` line.
coordinator_port() {
  sed -n 's/^\[coordinator\] diloco-coordinator: serving the store at [^ ]*:\([0-9][0-9]*\)$/\1/p' \
    "$work/out"
}
wait_for_files() {  # SECONDS FILE...
  local deadline=$(( $(now_ms) + $1 * 1000 )) f
  shift
  for f in "$@"; do
    while [[ ! -e $f ]]; do
      [[ $(now_ms) -lt $deadline ]] || fail "timed out waiting for $f"
      sleep 0.05
    done
  done
}

print_env='echo "env $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $GROUP_RANK $MASTER_ADDR'
print_env+=' $MASTER_PORT ${LAUNCHER_TEST_INHERITED:-unset}"'

# ------------------------------------------------------------------------------------------------
check "the environment of -n 3 (RANK, WORLD_SIZE, LOCAL_RANK, ..., one numeric MASTER_PORT)"
# A stale RANK in the caller's environment must be replaced, other variables inherited.
RANK=99 LAUNCHER_TEST_INHERITED=yes launch -n 3 -- bash -c "$print_env"
expect_rc 0 "-n 3 printing its environment"
for r in 0 1 2; do
  count=$(grep -Ec "^\[rank $r\] env $r 3 $r 3 0 127\.0\.0\.1 [0-9]+ yes$" "$work/out" || true)
  [[ $count -eq 1 ]] ||
    fail "rank $r: expected one line 'env $r 3 $r 3 0 127.0.0.1 PORT yes', got $count"
done
[[ $(wc -l <"$work/out") -eq 3 ]] || fail "expected exactly 3 output lines"
ports=$(awk '{print $(NF-1)}' "$work/out" | sort -u)
[[ $(wc -l <<<"$ports") -eq 1 ]] || fail "ranks disagree on MASTER_PORT: $(echo $ports)"
[[ $ports -ge 1 && $ports -le 65535 ]] || fail "MASTER_PORT $ports is not in 1..65535"

check "the environment of node 1 of 2 (--nnodes/--node-rank/--master-addr/--master-port)"
launch -n 2 --nnodes 2 --node-rank 1 --master-addr 10.1.2.3 --master-port 29555 -- \
  bash -c "$print_env"
expect_rc 0 "node 1 of 2 printing its environment"
expect_line "$work/out" '^\[rank 2\] env 2 4 0 2 1 10\.1\.2\.3 29555 ' "node 1, local rank 0"
expect_line "$work/out" '^\[rank 3\] env 3 4 1 2 1 10\.1\.2\.3 29555 ' "node 1, local rank 1"

# ------------------------------------------------------------------------------------------------
check "output lines get '[rank R] ', stdout to stdout and stderr to stderr"
launch -n 2 -- bash -c '
  printf "one-$RANK\ntwo-$RANK\n"; echo "err-$RANK" >&2; printf "partial-$RANK"'
expect_rc 0 "-n 2 writing to stdout and stderr"
for r in 0 1; do
  for word in one two partial; do
    expect_line "$work/out" "^\[rank $r\] $word-$r\$" "stdout of rank $r"
  done
  expect_line "$work/err" "^\[rank $r\] err-$r\$" "stderr of rank $r"
done
! grep -q err- "$work/out" || fail "stderr lines showed up on stdout"
! grep -q -e one- -e partial- "$work/err" || fail "stdout lines showed up on stderr"

check "--no-prefix leaves output lines as they are"
launch -n 2 --no-prefix -- bash -c 'echo "plain-$RANK"'
expect_rc 0 "--no-prefix"
expect_line "$work/out" '^plain-0$' "--no-prefix, rank 0"
expect_line "$work/out" '^plain-1$' "--no-prefix, rank 1"

# ------------------------------------------------------------------------------------------------
check "--bind-cores pins local rank R to the R-th allowed CPU (modulo their count)"
allowed=$(sed -n "s/^Cpus_allowed_list:[[:space:]]*//p" /proc/$$/status)
cpus=()
for range in ${allowed//,/ }; do
  if [[ $range == *-* ]]; then cpus+=($(seq "${range%-*}" "${range#*-}")); else cpus+=("$range"); fi
done
launch -n 3 --bind-cores -- bash -c 'echo "cpus $RANK $(sed -n "s/^Cpus_allowed_list:[[:space:]]*//p" /proc/self/status)"'
expect_rc 0 "-n 3 --bind-cores"
for r in 0 1 2; do
  expect_line "$work/out" "^\[rank $r\] cpus $r ${cpus[$(( r % ${#cpus[@]} ))]}\$" "rank $r's CPU"
done
launch -n 2 -- bash -c 'echo "cpus $RANK $(sed -n "s/^Cpus_allowed_list:[[:space:]]*//p" /proc/self/status)"'
expect_line "$work/out" "^\[rank 1\] cpus 1 $allowed\$" "without --bind-cores, rank 1 keeps every CPU"

# ------------------------------------------------------------------------------------------------
check "a rank exiting with 3 makes diloco-run exit 3 and stops a rank sleeping 60 s"
launch -n 2 -- bash -c '
  if [[ $RANK == 1 ]]; then
    while [[ ! -s "'"$work"'/sleeper.pid" ]]; do sleep 0.02; done
    exit 3
  fi
  echo $$ >"'"$work"'/sleeper.pid.tmp"; mv "'"$work"'/sleeper.pid.tmp" "'"$work"'/sleeper.pid"
  exec sleep 60'
expect_rc 3 "rank 1 exiting with 3"
expect_fast "stopping the sleeping rank"
expect_line "$work/err" 'rank 1 exited with code 3' "the failure report"
sleeper=$(cat "$work/sleeper.pid")
! kill -0 "$sleeper" 2>/dev/null || fail "the sleeping rank (pid $sleeper) is still alive"

check "a rank killed by SIGKILL makes diloco-run exit 137"
launch -n 2 -- bash -c 'if [[ $RANK == 0 ]]; then kill -KILL $$; fi; exec sleep 60'
expect_rc 137 "rank 0 killed by SIGKILL"
expect_fast "stopping the sleeping rank"
expect_line "$work/err" 'rank 0 killed by signal 9' "the failure report"

check "a rank ignoring SIGTERM is SIGKILLed after --kill-after"
# Rank 0 fails only once rank 1 ignores SIGTERM, or the SIGTERM could beat the trap.
launch -n 2 --kill-after 0.5 -- bash -c '
  if [[ $RANK == 0 ]]; then
    while [[ ! -e "'"$work"'/ignoring" ]]; do sleep 0.02; done
    exit 4
  fi
  trap "" TERM; touch "'"$work"'/ignoring"; while :; do sleep 0.05; done'
expect_rc 4 "rank 0 exiting with 4"
expect_fast "SIGKILL after --kill-after 0.5"
expect_line "$work/err" 'sending SIGKILL' "the SIGKILL report"

# ------------------------------------------------------------------------------------------------
check "SIGTERM sent to diloco-run reaches every rank"
rm -f "$work"/ready.* "$work"/term.*
"$run" -n 2 -- bash -c '
  trap "echo term >\"'"$work"'/term.\$RANK\"; exit 0" TERM
  touch "'"$work"'/ready.$RANK"
  while :; do sleep 0.05; done' >"$work/out" 2>"$work/err" &
launcher_pid=$!
wait_for_files 5 "$work/ready.0" "$work/ready.1"
kill -TERM "$launcher_pid"
wait_for_exit "$launcher_pid" "diloco-run"
launcher_pid=
expect_rc 143 "diloco-run after SIGTERM"
[[ -e $work/term.0 && -e $work/term.1 ]] || fail "not every rank ran its TERM trap"

# ------------------------------------------------------------------------------------------------
check "--timeout 1 stops a 30 s run with exit code 124"
launch -n 2 --timeout 1 -- sleep 30
expect_rc 124 "--timeout 1"
expect_fast "--timeout 1"
expect_line "$work/err" 'timed out' "the timeout report"

# ------------------------------------------------------------------------------------------------
check "-n 0 is rejected, naming the option"
launch -n 0 -- true
[[ $rc -ne 0 ]] || fail "-n 0 exited 0"
expect_line "$work/err" 'nproc-per-node.*1\.\.1024' "the -n 0 error"

check "a missing PROGRAM is rejected"
launch -n 2 --
[[ $rc -ne 0 ]] || fail "a missing PROGRAM exited 0"
expect_line "$work/err" 'missing PROGRAM' "the missing-program error"

check "--node-rank outside [0, nnodes) and a bad --master-port are rejected"
launch -n 1 --nnodes 2 --node-rank 2 --master-port 29555 -- true
[[ $rc -ne 0 ]] || fail "--node-rank 2 of --nnodes 2 exited 0"
expect_line "$work/err" '--node-rank' "the --node-rank error"
launch -n 1 --nnodes 2 -- true
[[ $rc -ne 0 ]] || fail "--nnodes 2 without --master-port exited 0"
expect_line "$work/err" '--master-port' "the missing --master-port error"
launch -n 1 --master-port 70000 -- true
[[ $rc -ne 0 ]] || fail "--master-port 70000 exited 0"
expect_line "$work/err" '--master-port.*65535' "the --master-port range error"

check "a program that cannot be executed gives exit code 127"
printf '#!/bin/sh\necho should-not-run\n' >"$work/not-executable"
chmod 644 "$work/not-executable"
launch -n 2 -- "$work/not-executable"
expect_rc 127 "a non-executable PROGRAM"
expect_line "$work/err" "cannot execute '.*not-executable'" "the exec error"
launch -n 2 -- "$work/does-not-exist"
expect_rc 127 "a missing PROGRAM file"

check "--help has a Usage: line and a multi-host example"
launch --help
expect_rc 0 "--help"
expect_line "$work/out" '^Usage: ' "--help"
expect_line "$work/out" '--nnodes 2 --node-rank 1' "--help's multi-host example"
for option in --elastic --max-restarts --restart-delay --coordinator; do
  expect_line "$work/out" "^ +$option " "--help's line for $option"
done

# ------------------------------------------------------------------------------------------------
# Elastic mode. Every launch below starts a diloco-coordinator unless --coordinator names one.

check "elastic: a rank failing on its first start is restarted with DILOCO_RESTART=1; exit 0"
# Each run says whether something accepted a TCP connection at MASTER_ADDR:MASTER_PORT.
launch -n 2 --max-restarts 2 --restart-delay 0.1 -- bash -c '
  store=down
  if (exec 3<>"/dev/tcp/$MASTER_ADDR/$MASTER_PORT") 2>/dev/null; then store=up; fi
  echo "elastic $RANK $DILOCO_RESTART $DILOCO_ELASTIC $TORCHELASTIC_USE_AGENT_STORE $MASTER_ADDR $MASTER_PORT $store"
  [[ $RANK != 1 || $DILOCO_RESTART -ge 1 ]] || exit 3'
expect_rc 0 "rank 1 failing once under --max-restarts 2"
port=$(coordinator_port)
[[ -n $port ]] || fail "no '[coordinator] diloco-coordinator: serving the store at HOST:PORT' line"
expect_line "$work/out" "^\[rank 0\] elastic 0 0 1 True 127\.0\.0\.1 $port up\$" "rank 0's environment"
expect_line "$work/out" "^\[rank 1\] elastic 1 0 1 True 127\.0\.0\.1 $port up\$" "rank 1's first start"
expect_line "$work/out" "^\[rank 1\] elastic 1 1 1 True 127\.0\.0\.1 $port up\$" "rank 1's restart"
[[ $(grep -c '^\[rank 0\] elastic' "$work/out") -eq 1 ]] || fail "rank 0 exited 0 and was restarted"
[[ $(grep -c '^\[rank 1\] elastic' "$work/out") -eq 2 ]] || fail "rank 1 did not run exactly twice"
expect_line "$work/err" \
  '^diloco-run: rank 1 exited with code 3; restarting it \(restart 1 of 2\) in 0\.1 s$' \
  "the restart report"
expect_line "$work/err" '^diloco-run: rank 1: restart 1 of 2 \(DILOCO_RESTART=1\)$' \
  "the restart's first line"
expect_line "$work/err" '^\[coordinator\] diloco-coordinator: received SIGTERM' \
  "the coordinator stopped by SIGTERM at the end"
! accepts_tcp "$port" || fail "something still listens on the coordinator's port $port"

check "elastic: a rank that SIGKILLs itself on its first start is restarted"
launch -n 2 --max-restarts 1 --restart-delay 0 -- bash -c '
  [[ $RANK != 0 || $DILOCO_RESTART -ge 1 ]] || kill -KILL $$
  echo "run $RANK $DILOCO_RESTART"'
expect_rc 0 "rank 0 SIGKILLed once under --max-restarts 1"
expect_line "$work/err" \
  'rank 0 killed by signal 9 \(SIGKILL\); restarting it \(restart 1 of 1\) in 0 s' \
  "the restart report"
expect_line "$work/out" '^\[rank 0\] run 0 1$' "rank 0's restart"
expect_line "$work/out" '^\[rank 1\] run 1 0$' "rank 1's only run"

check "elastic: out of restarts, a rank stays down, the others finish, its code is the exit code"
launch -n 3 --max-restarts 1 --restart-delay 0 -- bash -c '
  if [[ $RANK == 1 ]]; then touch "'"$work"'/failed.$DILOCO_RESTART"; exit 5; fi
  while [[ ! -e "'"$work"'/failed.1" ]]; do sleep 0.02; done
  sleep 0.5
  echo "finished $RANK"'
expect_rc 5 "rank 1 always exiting with 5 under --max-restarts 1"
expect_fast "rank 1 failing twice"
expect_line "$work/err" '^diloco-run: rank 1 exited with code 5; restarting it \(restart 1 of 1\)' \
  "the first failure's report"
expect_line "$work/err" \
  '^diloco-run: rank 1 exited with code 5; no restarts left \(1 used\), the other ranks go on$' \
  "the no-restarts-left report"
expect_line "$work/err" 'exiting with code 5 of rank 1' "the report of the exit code's origin"
for r in 0 2; do
  expect_line "$work/out" "^\[rank $r\] finished $r\$" "rank $r running to completion"
done
! grep -q 'stopping the other ranks' "$work/err" || fail "elastic mode stopped the other ranks"

check "--elastic without restarts: a failed rank stops no other and is not restarted"
launch -n 2 --elastic -- bash -c '
  if [[ $RANK == 1 ]]; then echo "start $DILOCO_RESTART"; touch "'"$work"'/failing"; exit 7; fi
  while [[ ! -e "'"$work"'/failing" ]]; do sleep 0.02; done
  sleep 0.5
  echo "finished $RANK"'
expect_rc 7 "rank 1 exiting with 7 under --elastic"
expect_line "$work/err" \
  '^diloco-run: rank 1 exited with code 7; not restarted \(--max-restarts 0\), the other ranks go on$' \
  "the failure report"
expect_line "$work/out" '^\[rank 0\] finished 0$' "rank 0 running to completion"
[[ $(grep -c '^\[rank 1\] start' "$work/out") -eq 1 ]] || fail "rank 1 did not run exactly once"

check "elastic: SIGTERM to diloco-run stops the ranks and the coordinator, and restarts none"
rm -f "$work"/ready.* "$work"/term.*
# The ranks exit 1 on SIGTERM, which would be restarted if it were not diloco-run's own doing.
"$run" -n 2 --max-restarts 3 --restart-delay 0 -- bash -c '
  trap "echo term >\"'"$work"'/term.\$RANK.\$DILOCO_RESTART\"; exit 1" TERM
  touch "'"$work"'/ready.$RANK"
  while :; do sleep 0.05; done' >"$work/out" 2>"$work/err" &
launcher_pid=$!
wait_for_files 5 "$work/ready.0" "$work/ready.1"
kill -TERM "$launcher_pid"
wait_for_exit "$launcher_pid" "diloco-run --max-restarts 3"
launcher_pid=
expect_rc 143 "elastic diloco-run after SIGTERM"
[[ -e $work/term.0.0 && -e $work/term.1.0 ]] || fail "not every rank ran its TERM trap"
! grep -q 'restarting it' "$work/err" || fail "a rank was restarted after diloco-run got SIGTERM"
expect_line "$work/err" '^\[coordinator\] diloco-coordinator: received SIGTERM' \
  "the coordinator stopped by SIGTERM"
port=$(coordinator_port)
[[ -n $port ]] || fail "no '[coordinator] ... serving the store' line"
! accepts_tcp "$port" || fail "something still listens on the coordinator's port $port"

check "elastic: --timeout 1 bounds a rank that keeps failing and being restarted"
launch -n 2 --max-restarts 1000 --restart-delay 0.05 --timeout 1 -- bash -c 'sleep 0.05; exit 1'
expect_rc 124 "--timeout 1 with restarts"
expect_fast "--timeout 1 with restarts"
expect_line "$work/err" 'timed out' "the timeout report"

check "elastic: the coordinator dying during the run stops the ranks with exit code 1"
# Rank 0 kills its sibling, the coordinator (a child of diloco-run, so of the rank's parent);
# the anchored pattern keeps the rank's own command line, which contains the name, out.
launch -n 2 --max-restarts 3 -- bash -c '
  if [[ $RANK == 0 ]]; then kill -KILL $(pgrep -P $PPID -f "^[^ ]*/diloco-coordinator "); fi
  exec sleep 30'
expect_rc 1 "the coordinator SIGKILLed during the run"
expect_fast "stopping the ranks after losing the coordinator"
expect_line "$work/err" 'the coordinator killed by signal 9 \(SIGKILL\) during the run; stopping' \
  "the report of the coordinator's death"
! grep -q 'restarting it' "$work/err" || fail "a rank was restarted without a coordinator"

check "elastic mode with no diloco-coordinator next to diloco-run or on PATH exits 127, naming it"
mkdir "$work/alone"
cp "$run" "$work/alone/diloco-run"
PATH=/usr/bin:/bin launch_program "$work/alone/diloco-run" -n 1 --elastic -- true
expect_rc 127 "a missing diloco-coordinator"
expect_line "$work/err" "cannot execute the coordinator 'diloco-coordinator'" "the exec error"

check "bad elastic options are rejected, naming the option and its range"
launch -n 1 --max-restarts -1 -- true
expect_rc 2 "--max-restarts -1"
expect_line "$work/err" '--max-restarts must be in 0\.\.[0-9]+, got -1' "the --max-restarts error"
launch -n 1 --restart-delay -1 -- true
expect_rc 2 "--restart-delay -1"
expect_line "$work/err" '--restart-delay must be in 0\.\.3600 seconds, got -1' \
  "the --restart-delay error"
for bad in localhost localhost: :29500 localhost:0 localhost:70000 localhost:http; do
  launch -n 1 --coordinator "$bad" -- true
  expect_rc 2 "--coordinator $bad"
  expect_line "$work/err" "--coordinator must be HOST:PORT with PORT in 1\.\.65535, got '$bad'" \
    "the --coordinator $bad error"
done
launch -n 1 --elastic --nnodes 2 --master-port 29555 -- true
expect_rc 2 "--elastic --nnodes 2 without --coordinator"
expect_line "$work/err" 'need --coordinator HOST:PORT' "the multi-host elastic error"
launch -n 1 --coordinator 127.0.0.1:29555 --master-port 29555 -- true
expect_rc 2 "--coordinator with --master-port"
expect_line "$work/err" '--coordinator HOST:PORT replaces --master-addr/--master-port' \
  "the --coordinator/--master-port error"

# ------------------------------------------------------------------------------------------------
# diloco-coordinator on its own, and diloco-run --coordinator

check "diloco-coordinator --ready-file, and diloco-run --coordinator using it (starting none)"
launch -n 1 -- bash -c 'echo "$MASTER_PORT"'  # a port that was free a moment ago
free_port=$(sed -n 's/^\[rank 0\] //p' "$work/out")
"$coordinator" --port "$free_port" --ready-file "$work/coordinator.port" \
  >"$work/coordinator.out" 2>"$work/coordinator.err" &
coordinator_pid=$!
wait_for_files 10 "$work/coordinator.port"
[[ $(cat "$work/coordinator.port") == "$free_port" ]] ||
  fail "--ready-file holds '$(cat "$work/coordinator.port")', expected $free_port"
expect_line "$work/coordinator.out" \
  "^diloco-coordinator: serving the store at 0\.0\.0\.0:$free_port\$" "the coordinator's line"
accepts_tcp "$free_port" || fail "nothing accepts connections on the coordinator's port $free_port"
launch -n 2 --coordinator "127.0.0.1:$free_port" -- bash -c '
  echo "elastic $RANK $DILOCO_RESTART $DILOCO_ELASTIC $TORCHELASTIC_USE_AGENT_STORE $MASTER_ADDR $MASTER_PORT"'
expect_rc 0 "-n 2 --coordinator 127.0.0.1:$free_port"
for r in 0 1; do
  expect_line "$work/out" "^\[rank $r\] elastic $r 0 1 True 127\.0\.0\.1 $free_port\$" \
    "rank $r's environment under --coordinator"
done
! grep -q '^\[coordinator\]' "$work/out" "$work/err" ||
  fail "diloco-run started a coordinator of its own despite --coordinator"
accepts_tcp "$free_port" || fail "diloco-run stopped a coordinator it did not start"

check "diloco-coordinator on a port in use fails fast, naming the port"
launch_program "$coordinator" --port "$free_port"
expect_rc 1 "diloco-coordinator --port $free_port (in use)"
expect_fast "diloco-coordinator on a port in use"
expect_line "$work/err" "port $free_port: the port is in use" "the port-in-use error"

check "diloco-run --elastic whose coordinator cannot start exits 1 before starting any rank"
launch -n 1 --elastic --master-port "$free_port" -- bash -c 'echo rank-started'
expect_rc 1 "--elastic --master-port $free_port (in use)"
expect_fast "a coordinator that cannot start"
expect_line "$work/err" "^\[coordinator\] diloco-coordinator: cannot serve the store on port $free_port" \
  "the coordinator's own error, prefixed"
expect_line "$work/err" 'the coordinator exited with code 1 before it served the store' \
  "diloco-run's report"
! grep -q rank-started "$work/out" || fail "a rank started without a coordinator"

check "diloco-coordinator exits 0 on SIGTERM and stops listening"
kill -TERM "$coordinator_pid"
wait_for_exit "$coordinator_pid" "diloco-coordinator"
coordinator_pid=
expect_rc 0 "diloco-coordinator after SIGTERM"
! accepts_tcp "$free_port" || fail "something still listens on $free_port after the coordinator exited"

check "diloco-coordinator: a missing or bad --port is rejected, naming the range"
for bad in 0 70000; do
  launch_program "$coordinator" --port "$bad"
  expect_rc 2 "diloco-coordinator --port $bad"
  expect_line "$work/err" "--port must be in 1\.\.65535, got $bad" "the --port $bad error"
done
launch_program "$coordinator"
expect_rc 2 "diloco-coordinator without --port"
expect_line "$work/err" '--port is required' "the missing --port error"

echo "launcher_test: all checks passed"
