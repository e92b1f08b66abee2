#!/usr/bin/env bash
# End-to-end checks of the diloco-run launcher: the environment it gives each rank, the output
# prefixing, failure propagation, signal forwarding, --timeout and command-line validation.
# It starts only bash and coreutils programs, never a training job, so it needs no LibTorch.
#
# Usage: launcher_test.sh PATH/TO/diloco-run
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 PATH/TO/diloco-run" >&2
  exit 2
fi
run=$1
[[ -x $run ]] || { echo "launcher_test: FAIL: '$run' is not an executable file" >&2; exit 1; }

work=$(mktemp -d)
launcher_pid=
# SIGKILL to a launcher left running by a failed check also takes its ranks (PR_SET_PDEATHSIG).
cleanup() {
  if [[ -n $launcher_pid ]]; then kill -KILL "$launcher_pid" 2>/dev/null || true; fi
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
launch() {
  local start
  start=$(now_ms)
  rc=0
  timeout "$kGuardSeconds" "$run" "$@" >"$work/out" 2>"$work/err" || rc=$?
  elapsed_ms=$(( $(now_ms) - start ))
  if [[ $rc -eq 124 && $elapsed_ms -ge $(( kGuardSeconds * 1000 )) ]]; then
    fail "diloco-run $1 $2 ... still running after ${kGuardSeconds} s (stopped by the test's guard)"
  fi
}
expect_rc() { [[ $rc -eq $1 ]] || fail "$2: expected exit code $1, got $rc"; }
expect_line() {  # FILE REGEX WHAT
  grep -Eq -- "$2" "$1" || fail "$3: no line in ${1##*/} matches '$2'"
}
expect_fast() {  # WHAT
  [[ $elapsed_ms -lt 5000 ]] || fail "$1: took ${elapsed_ms} ms, expected well under 5 s"
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
deadline=$(( $(now_ms) + 5000 ))
while kill -0 "$launcher_pid" 2>/dev/null; do
  [[ $(now_ms) -lt $deadline ]] || fail "diloco-run still running 5 s after SIGTERM"
  sleep 0.05
done
rc=0
wait "$launcher_pid" || rc=$?
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

echo "launcher_test: all checks passed"
