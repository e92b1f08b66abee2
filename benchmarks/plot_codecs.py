#!/usr/bin/python3
"""Plots codec_bench results: throughput (% of memcpy) and bytes per parameter per codec.
Usage: plot_codecs.py RESULTS.json OUT.png"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    r = json.load(open(src))
    labels = [c["codec"] for c in r["codecs"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5))
    a.barh(labels, [c["pct_memcpy"] for c in r["codecs"]])
    a.axvline(25, color="red", linestyle="--", label="target: 25% of memcpy")
    a.set_xlabel(f"encode+decode speed, % of memcpy ({r['memcpy_gbs']:.1f} GB/s)")
    a.legend()
    b.barh(labels, [c["bytes_per_param"] for c in r["codecs"]])
    b.set_xscale("log")
    b.set_xlabel("bytes per parameter on the wire (log)")
    b.set_yticklabels([])
    fig.suptitle(f"codecs on a {r['rows']}x{r['cols']} float32 matrix, one thread")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
