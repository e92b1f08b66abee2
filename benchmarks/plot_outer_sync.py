#!/usr/bin/python3
"""Plots outer_sync_bench results: per-round time of a bare Gloo all-reduce against DiLoCo's
outer sync of the same size. Usage: plot_outer_sync.py RESULTS.json OUT.png"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    r = json.load(open(src))
    rounds = range(1, len(r["bare_allreduce_s"]) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rounds, [s * 1e3 for s in r["bare_allreduce_s"]], "o-", label="bare Gloo all-reduce")
    ax.plot(rounds, [s * 1e3 for s in r["bare_segmented_allreduce_s"]], "s--",
            label="bare Gloo all-reduce, segmented")
    ax.plot(rounds, [s * 1e3 for s in r["diloco_sync_s"]], "^-", label="DiLoCo outer sync")
    ax.set_xlabel("round")
    ax.set_ylabel("wall time (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{r['params'] / 1e6:.0f}M float32 parameters, {r['world_size']} ranks: "
                 f"sync / all-reduce = {r['sync_ratio']:.2f}x (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
