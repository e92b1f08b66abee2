#!/usr/bin/env python3
"""Split the islands' waiting for exchanges into waiting for a slower island and for the link.

Reads the files of `train_lm --exchange-log PATH` (one per island, PATH's {island} replaced by
the rank): one JSON object per exchange, with `started`, `due` and `done` in seconds on the
steady clock, which the processes of one machine share. An exchange completes only once every
island has started it. For island i and exchange k, with S_k the latest start over the islands:

    waited            max(0, done_ik - due_ik)
    for the link      max(0, done_ik - max(due_ik, S_k))   (every island had started it)
    for an island     waited - for the link                (some island had not started it yet)

"For the link" is the transfer and the exchange's own work (encoding, the ring's requantizing)
that the overlap did not hide. Only meaningful for islands on one machine (one clock). The
exchanges of the end-of-run sync (`end_of_run`) are left out, as train_lm leaves them out of
its training time and its "waiting for exchanges".

Usage: exchange_log.py FILE...   (prints one JSON object per file: seconds and exchanges)
"""
import json
import sys


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def split_waiting(logs):
    """logs: one list of records per island. Returns, per island, a dict with the seconds
    waited, waited for the link and waited for a slower island, and the exchanges counted
    (those every island logged)."""
    keyed = [{(r["outer_step"], r["fragment"]): r for r in log if not r.get("end_of_run")}
             for log in logs]
    common = set(keyed[0]).intersection(*keyed[1:]) if keyed else set()
    out = []
    for mine in keyed:
        waited = link = 0.0
        for key in common:
            r = mine[key]
            last_start = max(k[key]["started"] for k in keyed)
            waited += max(0.0, r["done"] - r["due"])
            link += max(0.0, r["done"] - max(r["due"], last_start))
        out.append({"exchanges": len(common), "waited_s": waited, "link_s": link,
                    "island_s": waited - link})
    return out


def main(paths):
    if not paths:
        sys.exit(__doc__)
    for path, split in zip(paths, split_waiting([read(p) for p in paths])):
        print(json.dumps(dict(file=path, **split)))


if __name__ == "__main__":
    main(sys.argv[1:])
