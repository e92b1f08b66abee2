#!/usr/bin/env bash
# netns_link.sh: run islands over a real rate-limited link and check the library's byte
# accounting against the network interfaces' own counters.
#
# Each island is a process in its own network namespace with one veth interface (MTU 9000 by
# default, so TCP/IP headers are under 1% of the bytes), joined to the others by a Linux bridge
# that lives in a namespace of its own. `tc ... tbf` limits every island's uplink (the veth
# egress inside the island) to --rate Mbit/s; the ring algorithms Gloo uses never make an island
# receive faster than one peer sends, so the uplink is the link. netem (delay) is not used: it is
# not available on every kernel; latency emulation is the library's (DILOCO_LINK_LATENCY_MS).
#
# The ranks are started with torchrun's variables (MASTER_ADDR = island 0's address, MASTER_PORT,
# RANK, WORLD_SIZE). The program must print, per rank, the line train_lm prints at the end:
#   rank R/N: bytes_sent B bytes_received B | ...
# The interface counters (/sys/class/net/veth0/statistics inside each namespace) are read just
# before the ranks start and after they exit. They include what the library does not count: the
# rendezvous (TCPStore) and Gloo's connection setup (a few kB), TCP/IP and Ethernet headers and
# the ACKs an island sends for what it receives. The comparison prints the raw difference and a
# payload estimate (tx bytes minus 66 header bytes per packet: Ethernet 14 + IPv4 20 + TCP 20 +
# timestamps 12); --max-diff-pct fails the run when the raw difference of any island exceeds it.
#
# With --compare-emulation the same program then runs again, every rank on the loopback of one
# more namespace with the library's emulated link at the same rate (DILOCO_LINK_MBPS), and both
# wall times are printed.
#
# Everything lives in namespaces created here (named dl<pid>-*), with addresses in 10.77.0.0/24;
# nothing is changed in the calling namespace, and a trap removes the namespaces (and with them
# the bridge and the veths) on any exit. Needs root. Exit codes: 0 ok, 1 a check or the program
# failed, 2 usage, 77 cannot run here (not root, or no network namespaces).
#
# Usage:
#   sudo bash benchmarks/netns_link.sh [-n ISLANDS] [--rate MBIT] [--mtu BYTES] [--timeout S]
#        [--max-diff-pct P] [--compare-emulation] [--json FILE] [--logs DIR] -- PROGRAM ARGS...
# Example (2 islands of train_lm, data-parallel, at 100 Mbit/s):
#   sudo bash benchmarks/netns_link.sh -n 2 --rate 100 --max-diff-pct 2 -- \
#     build/examples/train_lm --data data/brown --mode dp --steps 50
set -euo pipefail

islands=2 rate=100 mtu=9000 timeout_s=300 max_diff= compare=0 json= logs=
usage() { sed -n '/^# Usage:/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    -n) islands=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --mtu) mtu=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --max-diff-pct) max_diff=$2; shift 2 ;;
    --compare-emulation) compare=1; shift ;;
    --json) json=$2; shift 2 ;;
    --logs) logs=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "netns_link: unknown option '$1'" >&2; usage ;;
  esac
done
[ $# -ge 1 ] || { echo "netns_link: no program given (... -- PROGRAM ARGS)" >&2; usage; }
[[ $islands =~ ^[0-9]+$ ]] && [ "$islands" -ge 2 ] && [ "$islands" -le 200 ] ||
  { echo "netns_link: -n must be in [2, 200], got '$islands'" >&2; exit 2; }
[[ $rate =~ ^[0-9]+([.][0-9]+)?$ ]] && awk -v r="$rate" 'BEGIN{exit !(r > 0 && r <= 100000)}' ||
  { echo "netns_link: --rate must be Mbit/s in (0, 100000], got '$rate'" >&2; exit 2; }
[[ $mtu =~ ^[0-9]+$ ]] && [ "$mtu" -ge 1280 ] && [ "$mtu" -le 65000 ] ||
  { echo "netns_link: --mtu must be in [1280, 65000], got '$mtu'" >&2; exit 2; }
[[ $timeout_s =~ ^[0-9]+$ ]] && [ "$timeout_s" -ge 1 ] ||
  { echo "netns_link: --timeout must be a positive number of seconds" >&2; exit 2; }

if [ "$(id -u)" != 0 ]; then
  echo "netns_link: needs root (it creates network namespaces, veth pairs, a bridge and tc qdiscs); run it with sudo" >&2
  exit 77
fi
for tool in ip tc timeout awk; do
  command -v $tool >/dev/null || { echo "netns_link: '$tool' not found" >&2; exit 77; }
done

tag="dl$$"
wan="$tag-wan"
namespaces=()
pids=()
work=$(mktemp -d)
cleanup() {
  local pid ns
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  if [ -n "$logs" ]; then mkdir -p "$logs" && cp "$work"/*.log "$logs"/ 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ns_add() {
  ip netns add "$1" 2>"$work/netns.err" || {
    echo "netns_link: 'ip netns add' failed: $(cat "$work/netns.err")" >&2
    exit 77
  }
  namespaces+=("$1")
  ip -n "$1" link set lo up
}

address() { echo "10.77.0.$((10 + $1))"; }
# tbf: burst of 10 ms at the rate (at least two 64 kB GSO packets, so none is split or dropped
# for size), and a queue deep enough that TCP (whose per-socket queue TSQ bounds) never loses a
# packet: a retransmission would count twice on the interface.
burst=$(awk -v r="$rate" 'BEGIN{b = r * 1e6 / 8 / 100; if (b < 131072) b = 131072; printf "%d", b}')
limit=$((64 * 1024 * 1024))

ns_add "$wan"
ip -n "$wan" link add br0 type bridge
ip -n "$wan" link set br0 mtu "$mtu" up
for ((i = 0; i < islands; i++)); do
  ns="$tag-i$i"
  ns_add "$ns"
  # No IPv6 chatter on the counted interface; no return to slow start after each compute phase
  # (the setting long-lived bulk connections use; the emulated link has no slow start either).
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 \
    net.ipv6.conf.default.disable_ipv6=1 net.ipv4.tcp_slow_start_after_idle=0
  ip -n "$ns" link add veth0 mtu "$mtu" type veth peer name "p$i" netns "$wan"
  ip -n "$wan" link set "p$i" mtu "$mtu" master br0 up
  ip -n "$ns" addr add "$(address "$i")/24" dev veth0
  ip -n "$ns" link set veth0 up
  tc -n "$ns" qdisc add dev veth0 root tbf rate "${rate}mbit" burst "$burst" limit "$limit"
done
# The bridge forwards once it has seen the ports up; wait until every island reaches island 0.
for ((i = 1; i < islands; i++)); do
  ok=0
  for _ in $(seq 50); do
    # Nothing listens on port 9 (discard): a refused connection proves the path works.
    probe=$(ip netns exec "$tag-i$i" timeout 1 bash -c "exec 3<>/dev/tcp/$(address 0)/9" 2>&1 || true)
    if [[ $probe == *refused* ]]; then ok=1; break; fi
    sleep 0.1
  done
  [ $ok = 1 ] || { echo "netns_link: island $i cannot reach island 0 over the bridge" >&2; exit 1; }
done

counter() { ip netns exec "$1" cat "/sys/class/net/veth0/statistics/$2"; }
retrans() { ip netns exec "$1" awk '/^Tcp:/ { if (h) { for (i = 1; i <= NF; i++) if (n[i] == "RetransSegs") print $i } else { h = 1; for (i = 1; i <= NF; i++) n[i] = $i } }' /proc/net/snmp; }

# Runs the program on every island; $1 names the run, $2 is "netns" or "emulated".
run_ranks() {
  local name=$1 how=$2 i ns addr start end rc=0
  shift 2
  pids=()
  start=$(date +%s.%N)
  for ((i = 0; i < islands; i++)); do
    if [ "$how" = netns ]; then
      ns="$tag-i$i" addr=$(address 0)
      ip netns exec "$ns" env MASTER_ADDR="$addr" MASTER_PORT=29500 RANK=$i WORLD_SIZE=$islands \
        LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 DILOCO_LINK_MBPS= DILOCO_LINK_LATENCY_MS= \
        timeout -k 5 "$timeout_s" "$@" >"$work/$name.rank$i.log" 2>&1 &
    else
      ip netns exec "$tag-emu" env MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 RANK=$i \
        WORLD_SIZE=$islands LOCAL_RANK=$i LOCAL_WORLD_SIZE=$islands DILOCO_LINK_MBPS="$rate" \
        DILOCO_LINK_LATENCY_MS=0 timeout -k 5 "$timeout_s" "$@" >"$work/$name.rank$i.log" 2>&1 &
    fi
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  pids=()
  end=$(date +%s.%N)
  wall=$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.2f", b - a}')
  if [ $rc != 0 ]; then
    echo "netns_link: the $name run failed (exit $rc); its output:" >&2
    tail -n 20 "$work/$name".rank*.log >&2
    exit 1
  fi
}

declare -a tx0 pk0 rt0
for ((i = 0; i < islands; i++)); do
  tx0[i]=$(counter "$tag-i$i" tx_bytes) pk0[i]=$(counter "$tag-i$i" tx_packets) rt0[i]=$(retrans "$tag-i$i")
done
echo "netns_link: $islands islands, uplinks shaped to $rate Mbit/s (tbf burst $burst B), MTU $mtu"
run_ranks netns netns "$@"
netns_wall=$wall

printf '%-6s %16s %16s %8s %16s %8s %10s %8s\n' island "library sent" "veth tx bytes" diff \
  "tx - headers" diff "tx packets" retrans
worst=0 rows=""
for ((i = 0; i < islands; i++)); do
  ns="$tag-i$i"
  tx=$(( $(counter "$ns" tx_bytes) - tx0[i] ))
  pk=$(( $(counter "$ns" tx_packets) - pk0[i] ))
  rt=$(( $(retrans "$ns") - rt0[i] ))
  lib=$(sed -n "s/.*rank $i\/$islands: bytes_sent \([0-9]*\) .*/\1/p" "$work/netns.rank$i.log" | tail -1)
  [ -n "$lib" ] || { echo "netns_link: rank $i printed no 'rank $i/$islands: bytes_sent N' line" >&2; exit 1; }
  [ "$lib" -gt 0 ] || { echo "netns_link: rank $i sent no bytes by its own count" >&2; exit 1; }
  payload=$((tx - 66 * pk))
  d_raw=$(awk -v t="$tx" -v l="$lib" 'BEGIN{printf "%.3f", 100 * (t - l) / l}')
  d_pay=$(awk -v t="$payload" -v l="$lib" 'BEGIN{printf "%.3f", 100 * (t - l) / l}')
  printf '%-6s %16d %16d %7s%% %16d %7s%% %10d %8d\n' "$i" "$lib" "$tx" "$d_raw" "$payload" "$d_pay" "$pk" "$rt"
  worst=$(awk -v w="$worst" -v d="$d_raw" 'BEGIN{d = d < 0 ? -d : d; print (d > w ? d : w)}')
  rows+="${rows:+,}{\"island\":$i,\"library_bytes_sent\":$lib,\"veth_tx_bytes\":$tx,\"veth_tx_packets\":$pk,\"tcp_retransmits\":$rt,\"diff_pct\":$d_raw,\"payload_diff_pct\":$d_pay}"
done
echo "netns_link: largest difference between the library's count and the interface's: $worst%"
echo "netns_link: wall time over the shaped link: $netns_wall s"
grep -h "done, " "$work/netns.rank0.log" | sed 's/^/  rank 0: /' || true

emulated_wall=null
if [ $compare = 1 ]; then
  ns_add "$tag-emu"
  run_ranks emulated emulated "$@"
  emulated_wall=$wall
  echo "netns_link: wall time with the library's emulated link at $rate Mbit/s on loopback: $emulated_wall s"
  grep -h "done, " "$work/emulated.rank0.log" | sed 's/^/  rank 0: /' || true
fi

if [ -n "$json" ]; then
  printf '{"islands":%d,"rate_mbit":%s,"mtu":%d,"max_abs_diff_pct":%s,"netns_wall_s":%s,"emulated_wall_s":%s,"per_island":[%s]}\n' \
    "$islands" "$rate" "$mtu" "$worst" "$netns_wall" "$emulated_wall" "$rows" >"$json"
fi
if [ -n "$max_diff" ] && awk -v w="$worst" -v m="$max_diff" 'BEGIN{exit !(w > m)}'; then
  echo "netns_link: FAILED: the counts differ by $worst%, more than $max_diff%" >&2
  exit 1
fi
exit 0
