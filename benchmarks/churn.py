#!/usr/bin/env python3
"""Churn benchmark for elastic DiLoCo: islands killed or stopped at random while a run trains.

What it measures
----------------
Two runs of `train_lm` (DiLoCo, 4 islands, same steps / H / model / seed) under
`diloco-run --max-restarts <large> --restart-delay 1`:

1. a fault-free baseline;
2. the churn run: every U(min-gap, max-gap) seconds a random island that is a member of the
   run is either killed (SIGKILL) or stopped (SIGSTOP, then SIGCONT after the heartbeat timeout
   plus a few seconds, so that it learns it was removed, exits with code 3 and is restarted by the
   launcher). Kill vs stop is drawn with --kill-prob. A new fault is never injected while the
   previous one is still recovering (the membership has not re-formed yet, or a stopped island
   has not exited yet), and none in the last --quiet-tail (15%) of the steps, so that the run
   ends with every island back.

Reported (printed, and written to OUT/churn.json, OUT/churn.md, OUT/churn.png):

- faults injected (killed / stopped) and recoveries (new membership epochs formed after a
  failure; an epoch that no injected fault explains is listed as unexplained);
- hangs: the run did not finish within a generous bound (2.5 x the baseline + 60 s), or an island
  was still running 30 s after the run's last outer step (--end-grace-s), or a stopped island was
  still running 15 s past the collective timeout after its SIGCONT (--stuck-after-s; the
  benchmark then records its threads' stacks in the logs and kills it, so that the launcher
  restarts it and the run goes on);
- for stopped islands, the time from SIGCONT until the island exits (told it was removed); one
  slower than 5 s has its threads' waits recorded from /proc in the logs;
- recovery time, median and max, separately for killed and stopped islands: from the injection
  to the next completed outer step (the progress line that the epoch's rank 0 prints) after the
  new epoch formed. Also the time to the `epoch formed` line alone, and the time until the
  restarted island was admitted again and an outer step completed with all 4 islands;
- outer steps of the run vs the baseline's (elastic DiLoCo keeps the count: a step interrupted by
  a fault is redone by the survivors), and the island-rounds of work discarded: the sum over outer
  steps of (4 - islands that took part);
- final validation loss vs the fault-free run's (relative difference);
- whether every island that finished printed the same `global state sha256`, and how many
  finished.

Targets (pass/miss): 0 hangs, 0 disagreements, median recovery <= 3 s for killed islands, final
loss within 2% of the fault-free run. The recovery time includes the rest of the interrupted
inner-step interval (the survivors notice a killed island at the latest in the next outer
step's exchange), so it grows with H and the time per inner step.

The common clock is this script's: each line of the launcher's output is stamped with its arrival
time. Raw logs (stamped) and the islands' metrics files go to OUT/logs/, which git ignores.
The launcher and trainer binaries are copied to a temporary directory first, so a concurrent
rebuild of the build directory cannot swap them under a restarted island.

How to run
----------
    python3 benchmarks/churn.py --quick --build build-dev    # 4-10 minutes on 2 cores
    python3 benchmarks/churn.py --build build                # full mode, about 30 minutes

Defaults: --build build, --data data/brown, --out benchmarks/results/churn,
--heartbeat-timeout-s 5, --collective-timeout-s 30 (train_lm --timeout-s; its default, 120 s,
is what a stall that no heartbeat cuts short lasts). --quick: d_model 64, 2 layers, 1000 steps,
H = 25, faults every U(8, 20) s. Full: the default train_lm model (d_model 96, 2 layers),
4000 steps, H = 25, faults every U(20, 60) s. Every size can be overridden (--steps,
--inner-steps, --d-model, --layers, --min-gap, --max-gap, --kill-prob, --fault-seed, --timeout).
--skip-baseline OLD/churn.json reuses an earlier baseline (e.g. `--kill-prob 0 --min-gap 8
--max-gap 12 --skip-baseline ...` for a run of stops alone); --report-only OUT/churn.json
recomputes the table and the plot from an earlier run.

The PNG needs matplotlib; when the running interpreter lacks it, /usr/bin/python3 is tried
(`--plot-only OUT/churn.json`), and otherwise the plot is skipped with a message.

Exit code: 0 when both runs finished (whether the targets were met or not), 1 otherwise.
"""

import argparse
import datetime
import hashlib
import json
import os
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ISLANDS = 4

# Lines of the launcher's output (diloco-run prefixes each island line with "[rank R] ").
RE_PREFIX = re.compile(r"^\[rank (\d+)\] (.*)$")
RE_PROGRESS = re.compile(
    r"^step (\d+)/(\d+) outer (\d+) \| (\d+) islands? \(epoch (\d+)\)"
    r"(?: \| train (\S+))? \| val (\S+)")
RE_FORMED = re.compile(
    r"^\[elastic\] island (\S+): epoch (\d+) formed in ([\d.]+) s with (\d+) islands "
    r"\(([^;]*); lost: ([^)]*)\) after epoch (\d+) failed: (.*)$")
RE_ADMITTED = re.compile(
    r"^island (\S+) \(slot (\d+)\): admitted at step (\d+) \(outer step (\d+)\)")
RE_REMOVED = re.compile(r"^train_lm: removed from the run: (.*)$")
RE_NOTHING = re.compile(r"^train_lm: nothing to do: (.*)$")
RE_SHA = re.compile(r"^rank (\d+)/(\d+): global state sha256 ([0-9a-f]+)")
RE_LAUNCHER_RANK = re.compile(r"^diloco-run: rank (\d+) (.*)$")
RE_RESTARTING = re.compile(r"restarting it \(restart (\d+) of (\d+)\)")


def now():
    return time.monotonic()


# ---------------------------------------------------------------------------------------------
# processes


def _pids_where(field, value):
    """PIDs whose /proc/PID/stat field (0 = state, 1 = ppid, 3 = session id; counted after the
    command name) equals value."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[field]) == value:
                out.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return out


def proc_children(ppid):
    """PIDs of ppid's children, from /proc."""
    return _pids_where(1, ppid)


def proc_session_members(sid):
    """PIDs of the processes in session sid, from /proc."""
    return _pids_where(3, sid)


def proc_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def proc_env(pid, name):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(name.encode() + b"="):
                    return item.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return None


def proc_threads(pid):
    """Each thread of pid: name, kernel wait channel, system call (number and arguments) and
    kernel stack, read from /proc without disturbing it. Returns (list, text)."""
    threads = []
    try:
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            info = {"tid": int(tid)}
            for key in ("comm", "wchan", "syscall", "stack"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/{key}") as fh:
                        info[key] = fh.read().strip()
                except OSError:
                    pass
            threads.append(info)
    except OSError:
        pass
    text = "\n".join(
        f"thread {t['tid']} {t.get('comm', '?')}: wchan {t.get('wchan', '?')}, "
        f"syscall {t.get('syscall', '?')}"
        + (("\n    " + t["stack"].replace("\n", "\n    ")) if t.get("stack") else "")
        for t in threads)
    return threads, text


def proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class Launch:
    """One diloco-run invocation: its output stamped on arrival, its processes bounded."""

    def __init__(self, name, cmd, log_dir, t0=None):
        self.name = name
        self.cmd = cmd
        self.q = queue.Queue()
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.log.write("# " + " ".join(cmd) + "\n")
        self.t0 = now() if t0 is None else t0
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.sid = self.proc.pid  # start_new_session: the launcher leads its own session
        self.readers = []
        for stream, tag in ((self.proc.stdout, "out"), (self.proc.stderr, "err")):
            th = threading.Thread(target=self._read, args=(stream, tag), daemon=True)
            th.start()
            self.readers.append(th)

    def _read(self, stream, tag):
        for raw in iter(stream.readline, b""):
            t = now()
            line = raw.decode(errors="replace").rstrip("\n")
            self.q.put((t, tag, line))
        self.q.put((now(), tag, None))

    def rel(self, t):
        return t - self.t0

    def write_log(self, t, tag, line):
        self.log.write(f"[{self.rel(t):9.3f} {tag}] {line}\n")

    def islands(self):
        """{slot: pid} of the running train_lm processes (the coordinator is a child too)."""
        out = {}
        for pid in proc_children(self.proc.pid):
            if "train_lm" not in proc_cmdline(pid):
                continue
            rank = proc_env(pid, "RANK")
            if rank is not None and rank.isdigit():
                out[int(rank)] = pid
        return out

    def kill_all(self, grace=5.0):
        """SIGCONT + SIGTERM the launcher, then SIGKILL whatever is left of its session."""
        # The ranks run in process groups of their own, but in the launcher's session.
        for pid in proc_session_members(self.sid):
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        for pid in proc_session_members(self.sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def close(self):
        self.kill_all(grace=2.0)
        for th in self.readers:
            th.join(timeout=2)
        # drain what is left into the log
        while True:
            try:
                t, tag, line = self.q.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.write_log(t, tag, line)
        self.log.close()


# ---------------------------------------------------------------------------------------------
# what a run printed


class RunState:
    def __init__(self, launch, steps):
        self.launch = launch
        self.steps = steps
        self.progress = []       # dicts: t, step, outer, islands, epoch, train, val, rank
        self.formed = []         # dicts: t, island, epoch, secs, n, members, lost, failed, why
        self.admitted = []       # dicts: t, island, slot, step, outer
        self.removed = []        # dicts: t, slot, why
        self.nothing = []        # dicts: t, slot, why (started after the run was over)
        self.exits = []          # dicts: t, slot, how, restart
        self.sha = {}            # slot -> dict(t, group_rank, n, hex)
        self.restarts = {s: 0 for s in range(ISLANDS)}
        self.other_errors = []   # lines that look like errors
        self.eofs = 0
        self.last_line_t = None

    def feed(self, t, tag, line):
        """Parses one line; returns a list of (kind, dict) events for the caller."""
        self.last_line_t = t
        ev = []
        m = RE_PREFIX.match(line)
        if m:
            slot = int(m.group(1))
            body = m.group(2)
            p = RE_PROGRESS.match(body)
            if p:
                d = dict(t=t, rank=slot, step=int(p.group(1)), outer=int(p.group(3)),
                         islands=int(p.group(4)), epoch=int(p.group(5)),
                         train=_float(p.group(6)), val=_float(p.group(7)))
                self.progress.append(d)
                ev.append(("progress", d))
                return ev
            f = RE_FORMED.match(body)
            if f:
                d = dict(t=t, rank=slot, island=f.group(1), epoch=int(f.group(2)),
                         secs=float(f.group(3)), n=int(f.group(4)),
                         members=f.group(5).split(), lost=f.group(6).split(),
                         failed=int(f.group(7)), why=f.group(8))
                self.formed.append(d)
                ev.append(("formed", d))
                return ev
            a = RE_ADMITTED.match(body)
            if a:
                d = dict(t=t, island=a.group(1), slot=int(a.group(2)), step=int(a.group(3)),
                         outer=int(a.group(4)))
                self.admitted.append(d)
                ev.append(("admitted", d))
                return ev
            r = RE_REMOVED.match(body)
            if r:
                d = dict(t=t, slot=slot, why=r.group(1))
                self.removed.append(d)
                ev.append(("removed", d))
                return ev
            n = RE_NOTHING.match(body)
            if n:
                d = dict(t=t, slot=slot, why=n.group(1))
                self.nothing.append(d)
                ev.append(("nothing", d))
                return ev
            s = RE_SHA.match(body)
            if s:
                d = dict(t=t, slot=slot, group_rank=int(s.group(1)), n=int(s.group(2)),
                         hex=s.group(3))
                self.sha[slot] = d
                ev.append(("sha", d))
                return ev
            low = body.lower()
            if "error" in low or "giving up" in low or "lost a peer" in low:
                d = dict(t=t, slot=slot, line=body)
                self.other_errors.append(d)
                ev.append(("error", d))
            return ev
        m = RE_LAUNCHER_RANK.match(line)
        if m:
            slot = int(m.group(1))
            how = m.group(2)
            rs = RE_RESTARTING.search(how)
            d = dict(t=t, slot=slot, how=how, restart=int(rs.group(1)) if rs else None)
            if rs:
                self.restarts[slot] = int(rs.group(1))
            self.exits.append(d)
            ev.append(("exit", d))
            return ev
        if line.startswith("diloco-run:"):
            ev.append(("launcher", dict(t=t, line=line)))
        return ev

    def last_progress(self):
        return self.progress[-1] if self.progress else None

    def final_val(self):
        finals = [p for p in self.progress if p["step"] == self.steps]
        return finals[-1]["val"] if finals else None

    def per_outer(self):
        """The last progress line of every outer step (outer >= 1)."""
        by = {}
        for p in self.progress:
            if p["outer"] >= 1:
                by[p["outer"]] = p
        return by


def _float(x):
    if x is None:
        return None
    try:
        return float(x)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# the benchmark


def fmt(x, nd=2, unit=""):
    if x is None:
        return "n/a"
    return f"{x:.{nd}f}{unit}"


def build_cmd(bins, a, metrics_pattern, timeout_s):
    return [
        bins["run"], "-n", str(ISLANDS), "--max-restarts", str(a.max_restarts),
        "--restart-delay", "1", "--timeout", str(int(timeout_s)), "--kill-after", "5",
        "--", bins["train"], "--data", a.data, "--steps", str(a.steps),
        "--inner-steps", str(a.inner_steps), "--d-model", str(a.d_model),
        "--layers", str(a.layers), "--seed", str(a.seed),
        "--heartbeat-timeout-s", str(a.heartbeat_timeout_s), "--metrics", metrics_pattern,
    ] + (["--timeout-s", str(a.collective_timeout_s)] if a.collective_timeout_s else [])


class Bench:
    def __init__(self, a, bins, logs):
        self.a = a
        self.bins = bins
        self.logs = logs
        self.launch = None
        self.t_script = now()

    def say(self, msg):
        print(f"[{now() - self.t_script:7.1f}s] {msg}", flush=True)

    # -- one run --------------------------------------------------------------------------------

    def run(self, name, bound_s, faults_on):
        a = self.a
        mdir = os.path.join(self.logs, f"{name}-metrics")
        os.makedirs(mdir, exist_ok=True)
        for fn in os.listdir(mdir):
            os.remove(os.path.join(mdir, fn))
        cmd = build_cmd(self.bins, a, os.path.join(mdir, "island-{island}.jsonl"), bound_s + 30)
        self.launch = L = Launch(name, cmd, self.logs)
        st = RunState(L, a.steps)
        rng = random.Random(a.fault_seed)
        faults = []
        cur = None                 # the fault that is recovering
        next_at = None             # when the next fault is due (monotonic)
        deadline = L.t0 + bound_s
        hang = None
        eofs = 0
        unexplained = []
        started = None
        last_print_outer = -1

        def draw_gap():
            return rng.uniform(a.min_gap, a.max_gap)

        def rel(t):
            return None if t is None else round(L.rel(t), 3)

        while True:
            try:
                t, tag, line = L.q.get(timeout=0.1)
            except queue.Empty:
                t, tag, line = None, None, None
            if line is None and tag is not None:
                eofs += 1
            elif line is not None:
                L.write_log(t, tag, line)
                for kind, d in st.feed(t, tag, line):
                    if kind == "progress":
                        if started is None:
                            started = d["t"]
                            if faults_on:
                                next_at = started + draw_gap()
                        if d["outer"] >= last_print_outer + 10 or d["step"] == a.steps:
                            last_print_outer = d["outer"]
                            self.say(f"{name}: step {d['step']}/{a.steps} outer {d['outer']} | "
                                     f"{d['islands']} islands (epoch {d['epoch']}) | "
                                     f"val {d['val']:.3f}")
                        if cur and cur.get("t_formed") and not cur.get("t_recovered") \
                                and d["epoch"] >= cur["epoch"]:
                            cur["t_recovered"] = d["t"]
                            cur["recovery_s"] = round(d["t"] - cur["t_inject"], 3)
                            cur["recovered_outer"] = d["outer"]
                            cur["recovered_islands"] = d["islands"]
                            self.say(f"  recovered: outer step {d['outer']} completed with "
                                     f"{d['islands']} islands, {cur['recovery_s']:.2f} s after "
                                     f"the {cur['kind']}")
                        for f in faults:
                            if f.get("t_admitted") and not f.get("t_rejoined") \
                                    and d["t"] > f["t_admitted"] and d["islands"] == ISLANDS:
                                f["t_rejoined"] = d["t"]
                                f["rejoin_s"] = round(d["t"] - f["t_inject"], 3)
                    elif kind == "formed":
                        # The survivors each print it; the first one counts.
                        mine = None
                        for f in faults:
                            if f.get("t_formed") is None and any(
                                    x.split(".")[0] == str(f["slot"]) for x in d["lost"]):
                                mine = f
                                break
                        if mine is not None:
                            mine["t_formed"] = d["t"]
                            mine["epoch"] = d["epoch"]
                            mine["formed_in_s"] = d["secs"]
                            mine["detect_s"] = round(d["t"] - mine["t_inject"], 3)
                            mine["lost"] = d["lost"]
                            mine["why"] = d["why"]
                            self.say(f"  epoch {d['epoch']} formed with {d['n']} islands "
                                     f"(lost {' '.join(d['lost'])}) "
                                     f"{mine['detect_s']:.2f} s after the {mine['kind']} "
                                     f"(reform took {d['secs']:.2f} s)")
                        elif not any(f.get("epoch") == d["epoch"] for f in faults) and not any(
                                u["epoch"] == d["epoch"] for u in unexplained):
                            u = dict(t=rel(d["t"]), epoch=d["epoch"], lost=d["lost"],
                                     members=d["members"], why=d["why"], line=line)
                            unexplained.append(u)
                            self.say(f"  !! epoch {d['epoch']} formed without an injected "
                                     f"fault: lost {d['lost']}: {d['why']}")
                    elif kind == "admitted":
                        for f in faults:
                            if f["slot"] == d["slot"] and not f.get("t_admitted") \
                                    and f.get("t_exit"):
                                f["t_admitted"] = d["t"]
                                f["admitted_island"] = d["island"]
                                f["admit_s"] = round(d["t"] - f["t_inject"], 3)
                                self.say(f"  island {d['island']} admitted at step {d['step']} "
                                         f"(outer {d['outer']}), {f['admit_s']:.1f} s after "
                                         f"the {f['kind']}")
                                break
                    elif kind == "removed":
                        for f in faults:
                            if f["slot"] == d["slot"] and f["kind"] == "stop" \
                                    and not f.get("t_removed_msg"):
                                f["t_removed_msg"] = d["t"]
                                f["removed_msg"] = d["why"]
                    elif kind == "exit":
                        for f in faults:
                            if f["slot"] == d["slot"] and not f.get("t_exit"):
                                f["t_exit"] = d["t"]
                                f["exit"] = d["how"]
                                extra = ""
                                if f.get("t_cont"):
                                    f["cont_to_exit_s"] = round(d["t"] - f["t_cont"], 3)
                                    extra = f" ({f['cont_to_exit_s']:.1f} s after SIGCONT)"
                                self.say(f"  launcher: rank {d['slot']} {d['how']}{extra}")
                                break
                        else:
                            self.say(f"  launcher (no fault of ours): rank {d['slot']} "
                                     f"{d['how']}")
                    elif kind == "nothing":
                        self.say(f"  island of slot {d['slot']}: nothing to do: {d['why']}")
                    elif kind == "error":
                        self.say(f"  island {d['slot']}: {d['line']}")
                    elif kind == "launcher":
                        self.say(f"  {d['line']}")

            tn = now()
            # the stopped island is resumed after the heartbeat timeout plus a few seconds
            if cur and cur["kind"] == "stop" and not cur.get("t_cont") \
                    and tn >= cur["t_inject"] + a.heartbeat_timeout_s + a.cont_after_s:
                try:
                    os.kill(cur["pid"], signal.SIGCONT)
                except OSError:
                    pass
                cur["t_cont"] = tn
                self.say(f"  SIGCONT island {cur['island']} (pid {cur['pid']})")
            # a resumed island slow to exit: what it waits in, from /proc (once)
            if cur and cur["kind"] == "stop" and cur.get("t_cont") and not cur.get("t_exit") \
                    and not cur.get("slow_snapshot") and tn - cur["t_cont"] > a.slow_exit_s:
                _, text = proc_threads(cur["pid"])
                spath = os.path.join(self.logs, f"{name}-slow-{cur['island']}.txt")
                with open(spath, "w") as f:
                    f.write(f"island {cur['island']} pid {cur['pid']}, {a.slow_exit_s:.0f} s "
                            f"after SIGCONT\n{text}\n")
                cur["slow_snapshot"] = os.path.relpath(spath)
                self.say(f"  island {cur['island']} has not exited {a.slow_exit_s:.0f} s after "
                         f"SIGCONT: its threads' waits in {spath}")
            # a resumed island that does not exit is stuck: counted as a hang, then killed so that
            # the launcher restarts it and the run goes on
            if cur and cur["kind"] == "stop" and cur.get("t_cont") and not cur.get("t_exit") \
                    and not cur.get("stuck") and tn - cur["t_cont"] > a.stuck_after_s:
                cur["stuck"] = True
                self.say(f"  !! island {cur['island']} has not exited {a.stuck_after_s:.0f} s "
                         f"after SIGCONT (counted as a hang); kill -9 so that it is restarted")
                cur["stacks"] = self.dump_stacks(cur["pid"], f"{name}-stuck-{cur['island']}")
                tn = now()
                cur["t_unstuck"] = tn
                try:
                    os.kill(cur["pid"], signal.SIGKILL)
                except OSError:
                    pass
            # recovered enough for the next fault?
            if cur:
                done = cur.get("t_formed") and cur.get("t_recovered") and (
                    cur["kind"] == "kill" or cur.get("t_exit"))
                if done:
                    cur = None
                elif tn - cur["t_inject"] > a.recovery_bound_s and not cur.get("unrecovered"):
                    cur["unrecovered"] = True
                    missing = [w for k, w in (("t_formed", "no new epoch"),
                                              ("t_recovered", "no outer step since"),
                                              ("t_exit", "the island has not exited"))
                               if not cur.get(k) and (k != "t_exit" or cur["kind"] == "stop")]
                    self.say(f"  !! {a.recovery_bound_s:.0f} s after the {cur['kind']} of island "
                             f"{cur['island']}: {', '.join(missing)}; no more faults")
            # inject
            if faults_on and next_at is not None and cur is None and tn >= next_at:
                lp = st.last_progress()
                if lp and lp["step"] >= (1 - a.quiet_tail) * a.steps:
                    next_at = None
                    self.say(f"  last {a.quiet_tail:.0%} of the run: no more faults")
                else:
                    victim = self.pick_victim(st, faults, rng)
                    if victim is None:
                        next_at = tn + 1.0
                    else:
                        slot, pid = victim
                        kind = "kill" if rng.random() < a.kill_prob else "stop"
                        island = f"{slot}.{st.restarts[slot]}"
                        sig = signal.SIGKILL if kind == "kill" else signal.SIGSTOP
                        try:
                            os.kill(pid, sig)
                            t_inj = now()
                            cur = dict(n=len(faults) + 1, kind=kind, slot=slot, island=island,
                                       pid=pid, t_inject=t_inj,
                                       step_at=lp["step"] if lp else None)
                            faults.append(cur)
                            self.say(f"fault {cur['n']}: "
                                     f"{'kill -9' if kind == 'kill' else 'SIGSTOP'} island "
                                     f"{island} (slot {slot}, pid {pid}) at step ~{cur['step_at']}")
                        except OSError as e:
                            self.say(f"  could not signal pid {pid}: {e}")
                        next_at = now() + draw_gap()
            # the end
            if L.proc.poll() is not None and eofs >= 2 and L.q.empty():
                break
            lp = st.last_progress()
            t_final = lp["t"] if lp and lp["step"] == a.steps else None
            if t_final is not None and tn - t_final > a.end_grace_s and L.proc.poll() is None:
                still = L.islands()
                hang = dict(kind=f"islands still running {a.end_grace_s:.0f} s after the run's "
                            "last outer step", slots=sorted(still), t=rel(tn))
                self.say(f"!! hang: {hang['kind']}: slots {hang['slots']}")
                break
            if tn > deadline:
                still = L.islands()
                stopped = [s for s, p in still.items() if proc_state(p) == "T"]
                hang = dict(kind=f"run not finished after {bound_s:.0f} s", slots=sorted(still),
                            stopped_slots=stopped, t=rel(tn),
                            last_step=lp["step"] if lp else None,
                            since_last_progress_s=round(tn - lp["t"], 1) if lp else None)
                self.say(f"!! hang: {hang['kind']}; islands still running: {hang['slots']}; "
                         f"last progress line: step {hang['last_step']}, "
                         f"{hang['since_last_progress_s']} s ago")
                break

        if cur and cur["kind"] == "stop" and not cur.get("t_cont"):
            try:
                os.kill(cur["pid"], signal.SIGCONT)
            except OSError:
                pass
        L.close()
        code = L.proc.returncode
        t_end = now()
        self.launch = None
        self.say(f"{name}: launcher exited with {code} after {L.rel(t_end):.1f} s")

        for f in faults:
            for k in list(f):
                if k.startswith("t_") and f[k] is not None:
                    f[k] = rel(f[k])
        metrics = read_metrics(mdir)
        return dict(
            name=name, cmd=cmd, exit_code=code, duration_s=round(L.rel(t_end), 3),
            hang=hang, progress=[dict(p, t=rel(p["t"])) for p in st.progress],
            formed=[dict(x, t=rel(x["t"])) for x in st.formed],
            admitted=[dict(x, t=rel(x["t"])) for x in st.admitted],
            removed=[dict(x, t=rel(x["t"])) for x in st.removed],
            late_joiners=[dict(x, t=rel(x["t"])) for x in st.nothing],
            exits=[dict(x, t=rel(x["t"])) for x in st.exits],
            sha={str(k): dict(v, t=rel(v["t"])) for k, v in st.sha.items()},
            errors=[dict(x, t=rel(x["t"])) for x in st.other_errors],
            restarts=st.restarts, faults=faults, unexplained_epochs=unexplained,
            final_val=st.final_val(),
            per_outer={k: v["islands"] for k, v in st.per_outer().items()},
            metrics_files={k: len(v) for k, v in metrics.items()},
            metrics_last=metrics_last(metrics),
            log=os.path.relpath(L.log_path),
        )

    def dump_stacks(self, pid, tag):
        """What a stuck island's threads wait in: first from /proc (which leaves them be), then
        every thread's backtrace with gdb when it is installed (attaching interrupts the
        threads' system calls, which may wake the island up: the /proc view comes first)."""
        path = os.path.join(self.logs, f"{tag}.txt")
        threads, proc_view = proc_threads(pid)
        gdb = shutil.which("gdb")
        if not gdb:
            with open(path, "w") as f:
                f.write("/proc view (gdb not installed)\n" + proc_view + "\n")
            return dict(file=os.path.relpath(path), diloco_frames=[],
                        threads=[dict(tid=t["tid"], comm=t.get("comm"), wchan=t.get("wchan"),
                                      syscall=(t.get("syscall") or "").split(" ")[0])
                                 for t in threads])
        try:
            res = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-ex",
                                  "thread apply all bt"], capture_output=True, text=True,
                                 timeout=60)
            text = res.stdout + res.stderr
        except (OSError, subprocess.TimeoutExpired) as e:
            text = f"gdb failed: {e}"
        with open(path, "w") as f:
            f.write("/proc view, before gdb attached\n" + proc_view + "\n\ngdb\n" + text)
        # the library's frames, innermost first, to keep in churn.json
        frames = [ln.split(" in ", 1)[-1].split(" (")[0].strip() for ln in text.splitlines()
                  if ln.startswith("#") and "diloco" in ln]
        self.say(f"  stacks of island pid {pid} in {path}")
        return dict(file=os.path.relpath(path), diloco_frames=frames[:40],
                    threads=[dict(tid=t["tid"], comm=t.get("comm"), wchan=t.get("wchan"),
                                  syscall=(t.get("syscall") or "").split(" ")[0])
                             for t in threads])

    def pick_victim(self, st, faults, rng):
        """A running island that takes part in the run (a restarted one only after it was
        admitted and two outer steps completed since)."""
        running = self.launch.islands()
        ok = []
        for slot, pid in sorted(running.items()):
            if proc_state(pid) in (None, "T", "t", "Z"):
                continue
            if st.restarts[slot] > 0:
                adm = [x for x in st.admitted if x["slot"] == slot
                       and x["island"] == f"{slot}.{st.restarts[slot]}"]
                if not adm:
                    continue
                after = [p for p in st.progress if p["t"] > adm[-1]["t"]]
                if len(after) < 2:
                    continue
            ok.append((slot, pid))
        return rng.choice(ok) if ok else None


# ---------------------------------------------------------------------------------------------
# summary, table, plot


def read_metrics(mdir):
    metrics = {}
    for fn in sorted(os.listdir(mdir)):
        with open(os.path.join(mdir, fn)) as fh:
            metrics[fn] = [json.loads(x) for x in fh if x.strip()]
    return metrics


def metrics_last(metrics):
    """The last line of every island's metrics file: its step and validation loss."""
    return {k: dict(step=v[-1].get("step"), val_loss=v[-1].get("val_loss"))
            for k, v in metrics.items() if v}


def exact_final_val(run, steps):
    """The final validation loss to full precision, from the metrics of the islands that
    finished (they agree); the progress line's 3 decimals otherwise."""
    vals = [m["val_loss"] for m in run.get("metrics_last", {}).values() if m["step"] == steps]
    return vals[0] if vals else run["final_val"]


def median(xs):
    return statistics.median(xs) if xs else None


def summarize(a, base, churn):
    faults = churn["faults"]
    killed = [f for f in faults if f["kind"] == "kill"]
    stopped = [f for f in faults if f["kind"] == "stop"]
    rec_k = [f["recovery_s"] for f in killed if f.get("recovery_s") is not None]
    rec_s = [f["recovery_s"] for f in stopped if f.get("recovery_s") is not None]
    det_k = [f["detect_s"] for f in killed if f.get("detect_s") is not None]
    det_s = [f["detect_s"] for f in stopped if f.get("detect_s") is not None]
    rej = [f["rejoin_s"] for f in faults if f.get("rejoin_s") is not None]
    c2e = [f["cont_to_exit_s"] for f in stopped
           if f.get("cont_to_exit_s") is not None and not f.get("stuck")]
    epochs = sorted({x["epoch"] for x in churn["formed"]})
    stuck = [f["n"] for f in faults if f.get("stuck")]
    run_hangs = sum(1 for r in (base, churn) if r["hang"])
    hangs = run_hangs + len(stuck)
    shas = {}
    for slot, d in churn["sha"].items():
        shas.setdefault(d["hex"], []).append(slot)
    majority = max(shas.values(), key=len) if shas else []
    disagreements = sum(len(v) for v in shas.values()) - len(majority)
    base_outer = max(base["per_outer"], key=int) if base["per_outer"] else None
    churn_outer = max(churn["per_outer"], key=int) if churn["per_outer"] else None
    missing_rounds = sum(ISLANDS - n for n in churn["per_outer"].values())
    outer_without_line = None
    if churn_outer is not None:
        outer_without_line = int(churn_outer) - len(churn["per_outer"])
    rel = None
    base_val, churn_val = exact_final_val(base, a.steps), exact_final_val(churn, a.steps)
    if base_val and churn_val:
        rel = 100.0 * (churn_val - base_val) / base_val
    s = dict(
        faults=len(faults), killed=len(killed), stopped=len(stopped),
        recoveries=len(epochs), epochs_formed=epochs,
        unrecovered_faults=[f["n"] for f in faults if f.get("recovery_s") is None],
        not_rejoined=[f["n"] for f in faults if f.get("t_admitted") is None],
        unexplained_epochs=len(churn["unexplained_epochs"]),
        hangs=hangs, run_hangs=run_hangs, stuck_islands=stuck,
        hang_details=[r["hang"] for r in (base, churn) if r["hang"]],
        recovery_killed_median_s=median(rec_k), recovery_killed_max_s=max(rec_k, default=None),
        recovery_stopped_median_s=median(rec_s), recovery_stopped_max_s=max(rec_s, default=None),
        epoch_formed_killed_median_s=median(det_k),
        epoch_formed_stopped_median_s=median(det_s),
        rejoin_median_s=median(rej), rejoin_max_s=max(rej, default=None),
        stopped_cont_to_exit_median_s=median(c2e),
        stopped_cont_to_exit_max_s=max(c2e, default=None),
        stopped_slow_exits=sum(1 for x in c2e if x > getattr(a, "slow_exit_s", 5.0)),
        outer_steps_baseline=int(base_outer) if base_outer else None,
        outer_steps_churn=int(churn_outer) if churn_outer else None,
        outer_steps_lost=(int(base_outer) - int(churn_outer))
        if base_outer and churn_outer else None,
        outer_steps_without_progress_line=outer_without_line,
        island_rounds_discarded=missing_rounds,
        island_rounds_total=ISLANDS * int(churn_outer) if churn_outer else None,
        final_val_baseline=base_val, final_val_churn=churn_val,
        final_val_rel_diff_pct=rel,
        finished=len(churn["sha"]), sha_disagreements=disagreements,
        late_joiners=[x["slot"] for x in churn.get("late_joiners", [])],
        sha_values=shas,
        duration_baseline_s=base["duration_s"], duration_churn_s=churn["duration_s"],
        exit_code_baseline=base["exit_code"], exit_code_churn=churn["exit_code"],
    )
    s["targets"] = [
        dict(name="hangs", target="0", measured=str(hangs), met=hangs == 0),
        dict(name="sha256 disagreements", target="0",
             measured=f"{disagreements} ({len(churn['sha'])} of {ISLANDS} slots finished)",
             met=disagreements == 0 and len(churn["sha"]) > 0),
        dict(name="median recovery, killed islands", target="<= 3 s",
             measured=fmt(s["recovery_killed_median_s"], 2, " s"),
             met=s["recovery_killed_median_s"] is not None
             and s["recovery_killed_median_s"] <= 3.0),
        dict(name="final val loss vs fault-free", target="within 2%",
             measured=(f"{rel:+.2f}%" if rel is not None else "n/a"),
             met=rel is not None and abs(rel) <= 2.0),
    ]
    return s


def markdown(a, s, base, churn):
    L = []
    L.append(f"Churn run: {ISLANDS} islands, {a.steps} steps, H = {a.inner_steps}, "
             f"d_model {a.d_model}, {a.layers} layers, heartbeat timeout "
             f"{a.heartbeat_timeout_s} s, collective timeout "
             f"{a.collective_timeout_s or 120} s, faults every U({a.min_gap:g}, {a.max_gap:g}) s "
             f"(kill probability {a.kill_prob:g}, none in the last {a.quiet_tail:.0%}), "
             f"fault seed {a.fault_seed}.")
    L.append("")
    if getattr(a, "binaries", None):
        trainer = [v for k, v in a.binaries.items() if k.endswith("train_lm")]
        L.append(f"Run {a.started} at HEAD {a.git_head} (the tree may have had uncommitted "
                 f"changes); train_lm built {trainer[0]['built'] if trainer else '?'}.")
        L.append("")
    if s.get("load_average_start") and s.get("load_average_end"):
        L.append(f"Load average of the machine (1, 5, 15 min) at the start: "
                 f"{', '.join(f'{x:.1f}' for x in s['load_average_start'])}; at the end: "
                 f"{', '.join(f'{x:.1f}' for x in s['load_average_end'])} "
                 f"({os.cpu_count()} cores).")
        L.append("")
    L.append("| measure | churn run | fault-free |")
    L.append("|---|---|---|")
    L.append(f"| faults injected (killed / stopped) | {s['faults']} "
             f"({s['killed']} / {s['stopped']}) | 0 |")
    L.append(f"| recoveries (new epochs formed) | {s['recoveries']}"
             + (f", {s['unexplained_epochs']} without an injected fault"
                if s["unexplained_epochs"] else "") + " | 0 |")
    L.append(f"| hangs: run not finished or an island left running at the end / resumed "
             f"island stuck (did not exit {a.stuck_after_s:.0f} s after SIGCONT) | "
             f"{1 if churn['hang'] else 0} / {len(s['stuck_islands'])} | "
             f"{1 if base['hang'] else 0} / 0 |")
    L.append(f"| recovery, killed: median / max | {fmt(s['recovery_killed_median_s'], 2, ' s')}"
             f" / {fmt(s['recovery_killed_max_s'], 2, ' s')} | |")
    L.append(f"| recovery, stopped: median / max | "
             f"{fmt(s['recovery_stopped_median_s'], 2, ' s')} / "
             f"{fmt(s['recovery_stopped_max_s'], 2, ' s')} | |")
    L.append(f"| fault → epoch formed, median (killed / stopped) | "
             f"{fmt(s['epoch_formed_killed_median_s'], 2, ' s')} / "
             f"{fmt(s['epoch_formed_stopped_median_s'], 2, ' s')} | |")
    L.append(f"| stopped island: SIGCONT → exit (told it was removed), median / max | "
             f"{fmt(s['stopped_cont_to_exit_median_s'], 1, ' s')} / "
             f"{fmt(s['stopped_cont_to_exit_max_s'], 1, ' s')}"
             f" ({s['stopped_slow_exits']} over {getattr(a, 'slow_exit_s', 5.0):g} s) | |")
    L.append(f"| fault → back to {ISLANDS} islands, median / max | "
             f"{fmt(s['rejoin_median_s'], 1, ' s')} / {fmt(s['rejoin_max_s'], 1, ' s')} | |")
    L.append(f"| outer steps | {s['outer_steps_churn']} | {s['outer_steps_baseline']} |")
    L.append(f"| island-rounds discarded (Σ {ISLANDS} − islands per outer step) | "
             f"{s['island_rounds_discarded']} of {s['island_rounds_total']} | 0 |")
    L.append(f"| final validation loss | {fmt(s['final_val_churn'], 4)} | "
             f"{fmt(s['final_val_baseline'], 4)} |")
    late = (f" ({len(s['late_joiners'])} restarted after the run was over: nothing to do)"
            if s.get("late_joiners") else "")
    L.append(f"| islands finished / sha256 disagreements | {s['finished']}{late} / "
             f"{s['sha_disagreements']} | {len(base['sha'])} / "
             f"{len(set(d['hex'] for d in base['sha'].values())) - 1 if base['sha'] else 'n/a'} |")
    L.append(f"| wall time | {fmt(s['duration_churn_s'], 1, ' s')} | "
             f"{fmt(s['duration_baseline_s'], 1, ' s')} |")
    L.append("")
    L.append("| target | measured | met? |")
    L.append("|---|---|---|")
    for t in s["targets"]:
        L.append(f"| {t['name']} {t['target']} | {t['measured']} | "
                 f"{'yes' if t['met'] else 'no'} |")
    L.append("")
    L.append("Faults (times in s from the churn run's launch; recovery = fault → next completed "
             "outer step after the new epoch formed):")
    L.append("")
    L.append("| # | fault | island | at | step | epoch formed after | recovery | "
             f"exited | admitted again | back to {ISLANDS} |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for f in churn["faults"]:
        def d(key):
            v = f.get(key)
            return "—" if v is None else f"{v - f['t_inject']:.2f}"
        kind = f["kind"] + (" (stuck: killed)" if f.get("stuck") else "")
        L.append(f"| {f['n']} | {kind} | {f['island']} | {f['t_inject']:.1f} | "
                 f"{f.get('step_at')} | {d('t_formed')} | {fmt(f.get('recovery_s'))} | "
                 f"{d('t_exit')} | {d('t_admitted')} | {d('t_rejoined')} |")
    L.append("")
    return "\n".join(L)


def plot(json_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.load(open(json_path))
    base, churn = r["baseline"], r["churn"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True,
                                   gridspec_kw=dict(height_ratios=[1, 1.4]))
    # membership over time: progress lines (islands that took part in each outer step) and the
    # new epochs formed after failures
    pts, top = [], 0
    for p in churn["progress"]:
        # a stopped island's delayed line for an outer step the run has passed is left out
        if p["outer"] >= max(1, top):
            pts.append((p["t"], p["islands"]))
            top = p["outer"]
    pts += [(x["t"], x["n"]) for x in churn["formed"]]
    pts.sort()
    if pts:
        ax1.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:blue",
                 label="islands in the membership")
    labelled = set()
    for f in churn["faults"]:
        kill = f["kind"] == "kill"
        color = "tab:red" if kill else "tab:orange"
        lab = "kill -9" if kill else "SIGSTOP (→ SIGCONT)"
        ax1.axvline(f["t_inject"], color=color, linestyle="--", alpha=0.8,
                    label=None if lab in labelled else lab)
        labelled.add(lab)
        if not kill and f.get("t_cont"):
            ax1.axvspan(f["t_inject"], f["t_cont"], color=color, alpha=0.15)
        if f.get("t_unstuck"):
            ax1.plot([f["t_unstuck"]], [ISLANDS - 2.2], marker="X", color="black",
                     label=None if "stuck" in labelled else "stuck after SIGCONT: killed")
            labelled.add("stuck")
        if f.get("t_admitted"):
            ax1.plot([f["t_admitted"]], [ISLANDS + 0.15], marker="v", color="tab:green",
                     label=None if "adm" in labelled else "restarted island admitted")
            labelled.add("adm")
    ax1.set_ylim(ISLANDS - 2.5, ISLANDS + 0.5)
    ax1.set_yticks(range(ISLANDS - 2, ISLANDS + 1))
    ax1.set_ylabel("islands")
    ax1.legend(loc="lower left", fontsize=8)
    ax1.set_title(f"churn: {r['summary']['faults']} faults ({r['summary']['killed']} killed, "
                  f"{r['summary']['stopped']} stopped), {ISLANDS} islands, "
                  f"{r['config']['steps']} steps, H = {r['config']['inner_steps']}")
    for run, color, lab in ((churn, "tab:blue", "churn"), (base, "gray", "fault-free")):
        ps = [p for p in run["progress"] if p["outer"] >= 1]
        if ps:
            word = "final" if ps[-1]["step"] == r["config"]["steps"] else "last"
            ax2.plot([p["t"] for p in ps], [p["val"] for p in ps], color=color,
                     label=f"{lab} ({word} {ps[-1]['val']:.3f} at step {ps[-1]['step']})")
    for f in churn["faults"]:
        ax2.axvline(f["t_inject"], color="tab:red" if f["kind"] == "kill" else "tab:orange",
                    linestyle="--", alpha=0.3)
    vals = [p["val"] for p in churn["progress"] + base["progress"] if p["outer"] >= 1]
    if vals:
        lo = min(vals)
        ordered = sorted(vals)
        hi = ordered[int(0.9 * (len(ordered) - 1))]
        ax2.set_ylim(lo - 0.05 * (hi - lo + 0.1), hi + 0.3 * (hi - lo + 0.1))
    ax2.set_xlabel("seconds since the launch (each run's own)")
    ax2.set_ylabel("validation loss")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def make_plot(json_path, png_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        alt = "/usr/bin/python3"
        if os.path.realpath(sys.executable) != os.path.realpath(alt) and os.path.exists(alt) \
                and subprocess.run([alt, "-c", "import matplotlib"],
                                   capture_output=True).returncode == 0:
            print(f"matplotlib is missing from {sys.executable}; plotting with {alt}")
            res = subprocess.run([alt, os.path.abspath(__file__), "--plot-only", json_path,
                                  "--png", png_path])
            return res.returncode == 0
        print("matplotlib is not installed: churn.png skipped "
              "(apt-get install python3-matplotlib, or pip install matplotlib)")
        return False
    plot(json_path, png_path)
    return True


def write_results(a, result, out):
    s, base, churn = result["summary"], result["baseline"], result["churn"]
    jpath = os.path.join(out, "churn.json")
    with open(jpath, "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(a, s, base, churn)
    with open(os.path.join(out, "churn.md"), "w") as f:
        f.write(md)
    print()
    print(md)
    for t in s["targets"]:
        print(f"{'PASS' if t['met'] else 'MISS'}  {t['name']} {t['target']}: {t['measured']}")
    if s["unrecovered_faults"]:
        print(f"faults without a recovery: {s['unrecovered_faults']}")
    if s["not_rejoined"]:
        print(f"faults whose island was not admitted again: {s['not_rejoined']}")
    make_plot(jpath, os.path.join(out, "churn.png"))
    print(f"wrote churn.json, churn.md, churn.png in {out}")


def report_only(path, out):
    """Recomputes the summary, the table and the plot from an earlier churn.json."""
    result = json.load(open(path))
    a = argparse.Namespace(**result["config"])
    logs = os.path.join(os.path.dirname(os.path.abspath(path)), "logs")
    for name in ("baseline", "churn"):
        mdir = os.path.join(logs, f"{name}-metrics")
        if os.path.isdir(mdir):
            result[name]["metrics_last"] = metrics_last(read_metrics(mdir))
            result[name].pop("metrics_final_val", None)
    s = summarize(a, result["baseline"], result["churn"])
    for k in ("load_average_start", "load_average_end"):
        s[k] = result["summary"].get(k)
    result["summary"] = s
    write_results(a, result, out or os.path.dirname(os.path.abspath(path)))
    return 0


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="at most 10 minutes instead of ~30")
    ap.add_argument("--build", default="build", help="CMake build directory (default build)")
    ap.add_argument("--data", default="data/brown")
    ap.add_argument("--out", default=None, help="default benchmarks/results/churn")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--inner-steps", type=int)
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="train_lm --seed (both runs)")
    ap.add_argument("--heartbeat-timeout-s", type=int, default=5)
    ap.add_argument("--collective-timeout-s", type=int, default=30,
                    help="train_lm --timeout-s: the collective and Gloo rendezvous timeout, "
                    "which bounds the stalls that heartbeats do not cut short (0 = train_lm's "
                    "default, 120 s)")
    ap.add_argument("--min-gap", type=float)
    ap.add_argument("--max-gap", type=float)
    ap.add_argument("--kill-prob", type=float, default=0.5,
                    help="probability that a fault is a kill -9 rather than a SIGSTOP")
    ap.add_argument("--cont-after-s", type=float, default=3.0,
                    help="SIGCONT a stopped island this long after the heartbeat timeout")
    ap.add_argument("--quiet-tail", type=float, default=0.15,
                    help="no faults in this last fraction of the steps")
    ap.add_argument("--fault-seed", type=int, default=1)
    ap.add_argument("--stuck-after-s", type=float,
                    help="a stopped island still running this long after SIGCONT is stuck: "
                    "counted as a hang, and killed so that the run goes on (default: the "
                    "collective timeout + 15 s, since a resumed island may wait that long in "
                    "its collective before it learns it was removed)")
    ap.add_argument("--slow-exit-s", type=float, default=5.0,
                    help="record what a resumed island waits in when it has not exited this "
                    "long after SIGCONT (from /proc, in the logs)")
    ap.add_argument("--end-grace-s", type=float, default=30.0,
                    help="an island still running this long after the last outer step is a hang")
    ap.add_argument("--max-restarts", type=int, default=1000)
    ap.add_argument("--recovery-bound-s", type=float, default=60.0,
                    help="a fault not recovered after this long stops the injection")
    ap.add_argument("--timeout", type=float, help="overall bound in seconds "
                    "(default 580 with --quick, 2700 otherwise)")
    ap.add_argument("--skip-baseline", metavar="JSON",
                    help="reuse the baseline of an earlier churn.json (for debugging)")
    ap.add_argument("--report-only", metavar="JSON",
                    help="no runs: recompute churn.md, churn.json's summary and churn.png from "
                    "an earlier churn.json")
    ap.add_argument("--plot-only", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--png", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.plot_only:
        plot(a.plot_only, a.png or os.path.join(os.path.dirname(a.plot_only), "churn.png"))
        return 0
    if a.report_only:
        return report_only(a.report_only, a.out)

    q = a.quick
    a.steps = a.steps or (1000 if q else 4000)
    a.inner_steps = a.inner_steps or 25
    a.d_model = a.d_model or (64 if q else 96)
    a.min_gap = a.min_gap if a.min_gap is not None else (8.0 if q else 20.0)
    a.max_gap = a.max_gap if a.max_gap is not None else (20.0 if q else 60.0)
    a.timeout = a.timeout or (580.0 if q else 2700.0)
    if a.stuck_after_s is None:
        a.stuck_after_s = (a.collective_timeout_s or 120) + 15.0
    if a.max_gap < a.min_gap:
        ap.error("--max-gap is below --min-gap")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = a.out or os.path.join(repo, "benchmarks", "results", "churn")
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, ".gitignore"), "w") as f:
        f.write("# raw logs of benchmarks/churn.py: not kept in git\n*\n")

    src = {"run": os.path.join(a.build, "libdiloco", "diloco-run"),
           "coordinator": os.path.join(a.build, "libdiloco", "diloco-coordinator"),
           "train": os.path.join(a.build, "examples", "train_lm")}
    for k, p in src.items():
        if not os.access(p, os.X_OK):
            print(f"churn.py: {p} not found or not executable (build first, or pass --build)",
                  file=sys.stderr)
            return 1
    if not os.path.exists(a.data):
        print(f"churn.py: --data {a.data} not found", file=sys.stderr)
        return 1

    tmp = tempfile.mkdtemp(prefix="diloco-churn-")
    bins = {}
    provenance = {}
    for k, p in src.items():
        with open(p, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()[:16]
        mtime = datetime.datetime.fromtimestamp(os.path.getmtime(p), datetime.timezone.utc)
        provenance[p] = dict(sha256_16=digest, built=mtime.isoformat(timespec="seconds"))
        # diloco-run looks for diloco-coordinator next to itself
        dst = os.path.join(tmp, os.path.basename(p))
        shutil.copy2(p, dst)
        bins[k] = dst

    bench = Bench(a, bins, logs)
    t_end = bench.t_script + a.timeout

    def on_term(signum, frame):
        raise KeyboardInterrupt

    # Also SIGINT: a shell starts background jobs with it ignored, and Python keeps that.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_term)
    a.binaries = provenance
    a.started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        a.git_head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        a.git_head = None
    config = {k: v for k, v in vars(a).items() if k not in ("plot_only", "png")}
    rc = 0
    load_start = os.getloadavg()
    try:
        bench.say(f"churn benchmark: {ISLANDS} islands, {a.steps} steps, H = {a.inner_steps}, "
                  f"d_model {a.d_model}, {a.layers} layers, heartbeat timeout "
                  f"{a.heartbeat_timeout_s} s, overall bound {a.timeout:.0f} s; logs in {logs}")
        if a.skip_baseline:
            base = json.load(open(a.skip_baseline))["baseline"]
            bench.say(f"baseline reused from {a.skip_baseline}")
        else:
            # The baseline has to leave room for the churn run.
            bound = max(60.0, (t_end - now()) * 0.45)
            bench.say(f"fault-free baseline (bound {bound:.0f} s)")
            base = bench.run("baseline", bound, faults_on=False)
        bound = min(2.5 * base["duration_s"] + 60.0, t_end - now() - 15.0)
        if bound < 30:
            raise RuntimeError("no time left for the churn run")
        bench.say(f"churn run (bound {bound:.0f} s)")
        churn = bench.run("churn", bound, faults_on=True)

        s = summarize(a, base, churn)
        s["load_average_start"] = load_start
        s["load_average_end"] = os.getloadavg()
        result = dict(config=config, summary=s, baseline=base, churn=churn,
                      events=sorted(
                          [dict(kind=f["kind"], t=f["t_inject"], n=f["n"], island=f["island"],
                                t_cont=f.get("t_cont")) for f in churn["faults"]]
                          + [dict(kind="epoch_formed", t=x["t"], epoch=x["epoch"], n=x["n"],
                                  lost=x["lost"], by=x["island"]) for x in churn["formed"]]
                          + [dict(kind="admitted", t=x["t"], island=x["island"], step=x["step"])
                             for x in churn["admitted"]]
                          + [dict(kind="removed", t=x["t"], slot=x["slot"], why=x["why"])
                             for x in churn["removed"]]
                          + [dict(kind="exit", t=x["t"], slot=x["slot"], how=x["how"])
                             for x in churn["exits"]],
                          key=lambda e: e["t"]))
        write_results(a, result, out)
        print(f"raw logs in {logs}")
        if base["exit_code"] != 0 or churn["exit_code"] != 0 or base["hang"] or churn["hang"]:
            rc = 1
    except KeyboardInterrupt:
        print("churn.py: interrupted; stopping the run", file=sys.stderr)
        rc = 130
    finally:
        if bench.launch is not None:
            bench.launch.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
