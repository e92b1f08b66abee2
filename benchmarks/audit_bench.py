#!/usr/bin/env python3
"""Audit benchmark: how fast replay audits catch a cheating island, what they cost, and whether
honest islands ever fail one (diloco/audit/audit.h).

What it runs
------------
`train_lm` with 4 islands (DiLoCo, a small model, --outer-steps outer steps of H inner steps),
under `diloco-run`, one run at a time:

1. a baseline without audits (--audit-rate 0);
2. --honest runs with --audit-rate P (default 0.25) and no cheater: every failed audit there is a
   false positive;
3. --runs runs per cheat with --audit-rate P and rank 1 cheating (train_lm --cheat): lazy (one
   inner step in four), noise (noise of its update's norm in place of it), scale (its update x2).

Reported (printed, and written to OUT/audit.json, OUT/audit.md, OUT/audit.png):

- detection: for each cheat, the runs in which the cheater was excluded within the run's outer
  steps, and the outer step it was caught at; the fraction caught within 20 outer steps, beside
  1 - (1 - P)^20, the probability that a given island is audited at least once in 20 outer steps
  (what the detection rate is when every audit of a cheater fails, as every one did here);
- false positives: failed audits in the honest runs (target 0);
- compute overhead: inner steps replayed by auditors / inner steps trained, and the auditors'
  replay time / the islands' training time (target about P), and the wall-clock time of an
  audited honest run beside the baseline's (side by side, same machine, same moment);
- bytes: what an audited honest run sent per island beside the baseline (the gathered exchange,
  the commitments and the start states sent to auditors).

How to run
----------
    python3 benchmarks/audit_bench.py --build build-dev            # about 10 minutes on 2 cores
    python3 benchmarks/audit_bench.py --runs 10 --outer-steps 20   # the full detection table

Exit code: 0 when every run finished (whether the targets were met or not), 1 otherwise.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

CHEATS = ["lazy", "noise", "scale"]
ISLANDS = 4


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build", default="build")
    p.add_argument("--data", default="data/brown")
    p.add_argument("--out", default="benchmarks/results/audit")
    p.add_argument("--audit-rate", type=float, default=0.25)
    p.add_argument("--outer-steps", type=int, default=20)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--runs", type=int, default=3, help="runs per cheat")
    p.add_argument("--honest", type=int, default=2, help="honest audited runs")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--report-only", help="recompute the table and plot from an audit.json")
    return p.parse_args()


def run_islands(a, extra):
    """One 4-island run; returns its per-rank figures."""
    steps = a.outer_steps * a.inner_steps
    cmd = [os.path.join(a.build, "libdiloco", "diloco-run"), "-n", str(ISLANDS), "--",
           os.path.join(a.build, "examples", "train_lm"), "--data", a.data, "--mode", "diloco",
           "--d-model", str(a.d_model), "--layers", "1", "--heads", "2", "--seq-len", "32",
           "--batch-size", "8", "--steps", str(steps), "--inner-steps", str(a.inner_steps),
           "--warmup", "5", "--eval-batches", "4", "--eval-every", str(steps), "--threads", "1",
           "--timeout-s", "120"] + extra
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    wall = time.time() - start
    out = res.stdout + res.stderr
    if res.returncode != 0:
        print(out[-3000:])
        raise RuntimeError(f"run failed ({res.returncode}): {' '.join(extra)}")
    ranks = {}
    for m in re.finditer(r"rank (\d+)/\d+: bytes_sent (\d+) .*compute ([0-9.]+) s of ([0-9.]+) s "
                         r"training", out):
        ranks[int(m.group(1))] = dict(bytes_sent=int(m.group(2)), compute_s=float(m.group(3)),
                                      train_s=float(m.group(4)))
    for m in re.finditer(r"rank (\d+)/\d+: audits (\d+), failed (\d+) \| replayed (\d+) inner "
                         r"steps in ([0-9.]+) s .*\| audits of each island: ([0-9 ]+) \| "
                         r"excluded: (.*)", out):
        r = ranks.setdefault(int(m.group(1)), {})
        r.update(audits=int(m.group(2)), failed=int(m.group(3)), replayed=int(m.group(4)),
                 replay_s=float(m.group(5)), audits_of=[int(x) for x in m.group(6).split()],
                 excluded=m.group(7).strip())
    hashes = set(re.findall(r"global state sha256 ([0-9a-f]+)", out))
    return dict(args=extra, wall_s=wall, ranks=ranks, agree=len(hashes) == 1, steps=steps)


def caught_at(run):
    """The outer step rank 1 was excluded at, as rank 0 reports it, or None."""
    m = re.search(r"rank 1 at outer step (\d+)", run["ranks"].get(0, {}).get("excluded", ""))
    return int(m.group(1)) if m else None


def summarize(a, result):
    p, n = a.audit_rate, a.outer_steps
    s = dict(audit_rate=p, outer_steps=n, expected_within_20=1 - (1 - p) ** 20)
    s["cheats"] = {}
    caught_20 = total = 0
    for cheat in CHEATS:
        steps = [caught_at(r) for r in result["cheats"][cheat]]
        s["cheats"][cheat] = dict(runs=len(steps), caught=sum(x is not None for x in steps),
                                  caught_at=steps)
        caught_20 += sum(x is not None and x <= 20 for x in steps)
        total += len(steps)
    s["caught_within_20"] = caught_20 / total if total else None
    # Audits of a cheater it passed: all its audits but the one that excluded it (none after).
    s["cheater_audits_passed"] = sum(
        r["ranks"][0]["audits_of"][1] - (1 if caught_at(r) is not None else 0)
        for c in CHEATS for r in result["cheats"][c])
    s["cheater_audits"] = sum(r["ranks"][0]["audits_of"][1]
                              for c in CHEATS for r in result["cheats"][c])
    honest = result["honest"]
    s["false_positives"] = sum(r["ranks"][0].get("failed", 0) for r in honest)
    s["honest_audits"] = sum(r["ranks"][0].get("audits", 0) for r in honest)
    trained = sum(r["steps"] * ISLANDS for r in honest)
    replayed = sum(x.get("replayed", 0) for r in honest for x in r["ranks"].values())
    replay_s = sum(x.get("replay_s", 0.0) for r in honest for x in r["ranks"].values())
    train_s = sum(x.get("train_s", 0.0) for r in honest for x in r["ranks"].values())
    s["replayed_fraction"] = replayed / trained if trained else None
    s["replay_time_fraction"] = replay_s / train_s if train_s else None
    base = result["baseline"]
    s["wall_ratio"] = (sum(r["wall_s"] for r in honest) / len(honest)) / base["wall_s"]
    mean_bytes = lambda r: sum(x["bytes_sent"] for x in r["ranks"].values()) / len(r["ranks"])
    s["bytes_ratio"] = (sum(mean_bytes(r) for r in honest) / len(honest)) / mean_bytes(base)
    s["all_agree"] = all(r["agree"] for r in [base] + honest +
                         [x for c in CHEATS for x in result["cheats"][c]])
    return s


def markdown(s):
    L = [f"Audit rate {s['audit_rate']}, 4 islands, {s['outer_steps']} outer steps per run.", "",
         "| cheat | runs | caught | caught at outer step |", "|---|---|---|---|"]
    for cheat in CHEATS:
        c = s["cheats"][cheat]
        at = ", ".join("-" if x is None else str(x) for x in c["caught_at"])
        L.append(f"| {cheat} | {c['runs']} | {c['caught']} | {at} |")
    L += ["", "| measure | value | target |", "|---|---|---|",
          f"| cheaters caught within 20 outer steps | {s['caught_within_20']:.3f} | >= 0.99 |",
          f"| audits of cheaters that passed | {s['cheater_audits_passed']} of "
          f"{s['cheater_audits']} | 0 |",
          f"| P(an island is audited within 20 outer steps) = 1 - (1 - p)^20 | "
          f"{s['expected_within_20']:.4f} | |",
          f"| false positives (failed audits of honest islands) | {s['false_positives']} of "
          f"{s['honest_audits']} audits | 0 |",
          f"| inner steps replayed / trained | {s['replayed_fraction']:.3f} | about p = "
          f"{s['audit_rate']} |",
          f"| replay time / training time | {s['replay_time_fraction']:.3f} | about p |",
          f"| wall-clock, audited honest run / no audits | {s['wall_ratio']:.2f}x | |",
          f"| bytes sent per island, audited / no audits | {s['bytes_ratio']:.2f}x | |",
          f"| every run's islands on one global state | {s['all_agree']} | True |", ""]
    return "\n".join(L)


def plot(result, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        alt = "/usr/bin/python3"
        if os.path.realpath(sys.executable) != os.path.realpath(alt) and os.path.exists(alt):
            json_path = os.path.join(os.path.dirname(png), "audit.json")
            res = subprocess.run([alt, os.path.abspath(__file__), "--report-only", json_path,
                                  "--out", os.path.dirname(png)], capture_output=True, text=True)
            if res.returncode == 0:
                print(f"plotted with {alt} (matplotlib is missing from {sys.executable})")
                return
        print("matplotlib is not installed: audit.png skipped (apt-get install "
              "python3-matplotlib)")
        return
    s = result["summary"]
    p, n = s["audit_rate"], s["outer_steps"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = list(range(1, n + 1))
    ax.plot(xs, [1 - (1 - p) ** k for k in xs], color="gray", label=f"1 - (1 - {p})^k")
    steps = sorted(x for c in CHEATS for x in s["cheats"][c]["caught_at"] if x is not None)
    total = sum(s["cheats"][c]["runs"] for c in CHEATS)
    if total:
        ax.step(xs, [sum(x <= k for x in steps) / total for k in xs], where="post",
                color="tab:red", label=f"cheaters caught by outer step k ({total} runs)")
    ax.axhline(0.99, color="tab:green", linestyle="--", alpha=0.6, label="target 0.99 at k = 20")
    ax.set_xlabel("outer step k")
    ax.set_ylabel("fraction caught")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("replay audits: cheating islands caught")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def write(a, result):
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "audit.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result["summary"])
    with open(os.path.join(a.out, "audit.md"), "w") as f:
        f.write(md)
    print(md)
    plot(result, os.path.join(a.out, "audit.png"))
    print(f"wrote audit.json, audit.md, audit.png in {a.out}")


def main():
    a = parse_args()
    if a.report_only:
        result = json.load(open(a.report_only))
        for run in [result["baseline"]] + result["honest"] + [
                r for c in CHEATS for r in result["cheats"][c]]:
            run["ranks"] = {int(k): v for k, v in run["ranks"].items()}  # JSON keys are text
        a.audit_rate, a.outer_steps = result["config"]["audit_rate"], result["config"]["outer_steps"]
        result["summary"] = summarize(a, result)
        write(a, result)
        return 0
    result = dict(config=vars(a), cheats={c: [] for c in CHEATS}, honest=[])
    rate = ["--audit-rate", str(a.audit_rate)]
    try:
        print("baseline (no audits) ...", flush=True)
        result["baseline"] = run_islands(a, [])
        for k in range(a.honest):
            print(f"honest, audited ({k + 1}/{a.honest}) ...", flush=True)
            result["honest"].append(run_islands(a, rate))
        for cheat in CHEATS:
            for k in range(a.runs):
                run = run_islands(a, rate + ["--cheat", cheat, "--cheat-rank", "1"])
                result["cheats"][cheat].append(run)
                print(f"cheat {cheat} ({k + 1}/{a.runs}): caught at outer step "
                      f"{caught_at(run)}", flush=True)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"audit_bench: {e}")
        return 1
    result["summary"] = summarize(a, result)
    write(a, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
