"""python_overhead.py: what the Python bindings cost on top of the C++ core, side by side in one
run on the same model.

  1. step() between syncs: the time of one outer.step() call that does not sync, called from
     Python, against the same calls from a C++ loop (target: under 5 us from Python);
  2. sync: the wall time of one outer step (a float32 ring all-reduce of the model plus the outer
     Nesterov update) driven from Python against the same sync driven from C++, interleaved (and
     alternating which goes first) so that both see the same load (target: Python within 1.05x of C++).

It is not a benchmark of the sync itself (benchmarks/run_outer_sync.sh is).

Usage (the script starts its own ranks over loopback unless RANK is set, as under torchrun):
  PYTHONPATH=build/python python3 benchmarks/python_overhead.py [--ranks 2] [--params 4000000]
  python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/python_overhead.py
Writes a JSON summary with --out FILE (rank 0).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

import diloco


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="processes to start (without torchrun)")
    p.add_argument("--params", type=int, default=4_000_000, help="model parameters (float32)")
    p.add_argument("--steps", type=int, default=200_000, help="step() calls timed per side")
    p.add_argument("--syncs", type=int, default=20, help="syncs timed per side")
    p.add_argument("--out", default="", help="write the results as JSON to this file")
    return p.parse_args()


def launch(args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(args.ranks):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(args.ranks), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable] + sys.argv, env=env))
    return max(p.wait() for p in procs)


def model_of(params):
    # A few matrices of about params/4 elements each: the size matters, not the architecture.
    side = int((params / 4) ** 0.5)
    return torch.nn.Sequential(*[torch.nn.Linear(side, side, bias=False) for _ in range(4)])


def main():
    args = parse()
    if "RANK" not in os.environ:
        return launch(args)
    torch.set_num_threads(1)
    group = diloco.init_process_group()
    model = model_of(args.params)
    n = sum(p.numel() for p in model.parameters())
    inner = torch.optim.SGD(model.parameters(), lr=0.0)
    # inner_steps far above the number of calls: step() never syncs while it is timed.
    outer = diloco.DiLoCo(model, inner, group, inner_steps=10**12)

    # 1. step() between syncs. Python: a plain loop calling the bound method.
    step = outer.step
    group.barrier("bench")
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    python_step = (time.perf_counter() - start) / args.steps
    empty_start = time.perf_counter()
    for _ in range(args.steps):
        pass
    loop_only = (time.perf_counter() - empty_start) / args.steps
    cpp_step = outer._time_steps(args.steps) / args.steps

    # 2. syncs, interleaved: Python-driven, then C++-driven, per round.
    python_sync, cpp_sync = [], []
    outer.sync()  # warm-up: first-touch of the buffers and Gloo's connections
    def python_driven():
        group.barrier("bench")
        start = time.perf_counter()
        outer.sync()
        python_sync.append(time.perf_counter() - start)

    def cpp_driven():
        group.barrier("bench")
        cpp_sync.extend(outer._time_syncs(1))

    for round_ in range(args.syncs):
        # Alternate which goes first, so that neither always follows the other.
        for run in ((python_driven, cpp_driven) if round_ % 2 == 0 else (cpp_driven, python_driven)):
            run()

    if group.rank == 0:
        result = {
            "ranks": group.world_size,
            "parameters": n,
            "step_us_python": python_step * 1e6,
            "step_us_python_minus_loop": (python_step - loop_only) * 1e6,
            "step_us_cpp": cpp_step * 1e6,
            "sync_ms_python_median": statistics.median(python_sync) * 1e3,
            "sync_ms_cpp_median": statistics.median(cpp_sync) * 1e3,
            "sync_ratio_python_over_cpp": statistics.median(python_sync)
            / statistics.median(cpp_sync),
            "sync_ms_python_all": [t * 1e3 for t in python_sync],
            "sync_ms_cpp_all": [t * 1e3 for t in cpp_sync],
        }
        print("python_overhead: %d ranks, %s parameters" % (group.world_size, format(n, ",")))
        print("  step() between syncs: %.3f us from Python (%.3f us without the loop itself), "
              "%.3f us from C++" % (result["step_us_python"],
                                     result["step_us_python_minus_loop"], result["step_us_cpp"]))
        print("  sync, median of %d: %.2f ms from Python, %.2f ms from C++: ratio %.3f"
              % (args.syncs, result["sync_ms_python_median"], result["sync_ms_cpp_median"],
                 result["sync_ratio_python_over_cpp"]))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
