#!/usr/bin/env python3
"""reference_diloco.py: a plain-PyTorch DiLoCo (Douillard et al. 2023, arXiv 2311.08105, Alg. 1),
held out from the library, on train_lm's model and data, to check train_lm against.

Nothing of libdiloco is used: torch.distributed over Gloo, one process per island (launched here
with torch.multiprocessing), AdamW inner optimizer with linear warmup and cosine decay to 10%,
betas (0.9, 0.95), and `torch.optim.SGD(lr, momentum, nesterov=True)` as the outer optimizer, fed
the islands' averaged pseudo-gradient Delta = theta_global - mean_i(theta_i) as its gradient.
The model is examples/python/gpt.py's and the data examples/python/corpus.py's (the same bytes and
split as train_lm; batches drawn from (seed, rank) by torch generators).

Modes: single (one island), dp (gradients all-reduced every step), diloco (sync every H steps).

For DiLoCo it measures, at every outer step (printed per outer step with --verbose, summarised in
the JSON):
  drift      mean over islands of ||theta_i - theta_global|| / ||theta_global|| at the end of the
             outer phase (before the sync)
  delta      ||Delta||, the averaged pseudo-gradient's norm
  agreement  ||Delta||^2 / mean_i ||Delta_i||^2: 1 when the islands moved alike, 1/k when their
             moves were orthogonal (averaging then shrinks the step by sqrt(k))
  update     ||theta_global_new - theta_global_old||, the outer step actually taken, and its ratio
             to ||Delta|| (what Nesterov momentum 0.9 at lr 0.7 makes of the pseudo-gradient:
             up to lr * (1 + m / (1 - m)) = 7x when successive Deltas agree)
  cos_prev   cosine between successive Deltas (momentum helps when it is positive)

Prints one JSON object on stdout: the final validation loss of the global model and the summary.

Usage (from the repository root, Debian's interpreter):
  /usr/bin/python3 benchmarks/reference_diloco.py --mode diloco --inner-steps 20 --clip 1.0 \
      --init default --steps 2000
  /usr/bin/python3 benchmarks/reference_diloco.py --mode single --steps 2000
"""
import argparse
import json
import math
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "python"))

from corpus import ByteCorpus, load_corpus, make_generator  # noqa: E402
from gpt import GPT, language_model_loss  # noqa: E402


def parse_flags(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["single", "dp", "diloco"], default="diloco")
    p.add_argument("--islands", type=int, default=4, help="processes (ignored by single)")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "brown"))
    p.add_argument("--steps", type=int, default=2000, help="inner steps per island")
    p.add_argument("--inner-steps", type=int, default=20, help="H")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--decay-matrices-only", action="store_true",
                   help="no weight decay on biases and LayerNorm gains (train_lm's grouping); "
                        "default: AdamW's decay on every parameter")
    p.add_argument("--clip", type=float, default=0.0,
                   help="clip the global gradient norm to this before each inner step (0 = off)")
    p.add_argument("--init", choices=["gpt2", "default"], default="default",
                   help="gpt2: N(0, 0.02); default: PyTorch's module defaults")
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--verbose", action="store_true", help="one line per outer step on stderr")
    p.add_argument("--out", help="also write the full result, every outer step's figures "
                                 "included, to this JSON file")
    f = p.parse_args(argv)
    if f.clip < 0:
        p.error("--clip must be >= 0 (0 = off)")
    if f.mode == "single":
        f.islands = 1
    return f


def learning_rate(f, step):
    """Step 0-based: linear warmup, then cosine decay to 10% of --lr at the last step."""
    if step < f.warmup:
        return f.lr * (step + 1) / f.warmup
    progress = min(1.0, (step - f.warmup) / max(1, f.steps - f.warmup))
    return f.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def worker(rank, f, port, result_path):
    torch.set_num_threads(f.threads)
    k = f.islands
    if f.mode != "single":
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=k)
    corpus = ByteCorpus(load_corpus(f.data), f.seq_len, f.batch_size)
    torch.manual_seed(f.seed)
    model = GPT(d_model=f.d_model, layers=f.layers, heads=f.heads, seq_len=f.seq_len,
                init=f.init)
    params = list(model.parameters())
    if f.mode != "single":  # every island starts from rank 0's model
        for p in params:
            dist.broadcast(p.data, 0)
    if f.decay_matrices_only:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": f.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": params, "weight_decay": f.weight_decay}]
    inner = torch.optim.AdamW(groups, lr=f.lr, betas=(0.9, 0.95))

    if f.mode == "diloco":
        global_params = [p.detach().clone() for p in params]
        outer = torch.optim.SGD(global_params, lr=f.outer_lr, momentum=f.outer_momentum,
                                nesterov=True)
    validation = corpus.validation_batches(f.eval_batches, f.seed)

    def evaluate():
        model.eval()
        with torch.no_grad():
            loss = sum(language_model_loss(model, x, y).item() for x, y in validation)
        model.train()
        return loss / len(validation)

    outer_log = []
    prev_delta = None

    def outer_step(step):
        nonlocal prev_delta
        with torch.no_grad():
            old = flat(global_params)
            own = [g - p for g, p in zip(global_params, params)]  # this island's Delta_i
            own_sq = float(flat(own).pow(2).sum())
            drift = math.sqrt(own_sq) / float(old.norm())
            stats = torch.tensor([drift, own_sq])
            dist.all_reduce(stats)
            for d in own:
                dist.all_reduce(d)
                d /= k
            for g, d in zip(global_params, own):
                g.grad = d
            outer.step()
            outer.zero_grad(set_to_none=True)
            new = flat(global_params)
            delta = flat(own)
            for p, g in zip(params, global_params):
                p.copy_(g)
            delta_norm = float(delta.norm())
            update_norm = float((new - old).norm())
            phase = grad_norms[-f.inner_steps:]
            entry = {
                "step": step,
                "train_loss": sum(phase_losses) / max(1, len(phase_losses)),
                "grad_norm_mean": sum(phase) / max(1, len(phase)),
                "grad_norm_max": max(phase) if phase else None,
                # The phase's first inner step, right after the previous outer step moved theta:
                "grad_norm_first": phase[0] if phase else None,
                "grad_norm_rest": sum(phase[1:]) / max(1, len(phase) - 1),
                "drift": float(stats[0]) / k,
                "delta": delta_norm,
                "agreement": delta_norm ** 2 / (float(stats[1]) / k),
                "update": update_norm,
                "update_over_delta": update_norm / max(delta_norm, 1e-30),
                "cos_prev": (float(torch.dot(delta, prev_delta) /
                                   (delta.norm() * prev_delta.norm() + 1e-30))
                             if prev_delta is not None else None),
            }
            prev_delta = delta
        phase_losses.clear()
        outer_log.append(entry)
        if rank == 0 and f.verbose:
            print("outer %3d step %5d | train %.3f | grad norm %.2f (max %.1f, first %.1f) | drift %.4f | |Delta| %.3f | agreement %.3f | |update| "
                  "%.3f (%.2fx) | cos_prev %s" % (
                      len(outer_log), step, entry["train_loss"], entry["grad_norm_mean"],
                      entry["grad_norm_max"], entry["grad_norm_first"], entry["drift"], entry["delta"], entry["agreement"],
                      entry["update"], entry["update_over_delta"],
                      "-" if entry["cos_prev"] is None else "%.3f" % entry["cos_prev"]),
                  file=sys.stderr, flush=True)

    generator = make_generator(f.seed, rank)
    grad_norms = []  # rank 0's, before clipping
    phase_losses = []
    clipped = 0
    start = time.time()
    model.train()
    for step in range(1, f.steps + 1):
        for g in inner.param_groups:
            g["lr"] = learning_rate(f, step - 1)
        x, y = corpus.train_batch(generator)
        loss = language_model_loss(model, x, y)
        inner.zero_grad(set_to_none=True)
        loss.backward()
        if f.mode == "dp":
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= k
        if f.clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, f.clip))
            clipped += norm > f.clip
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in params])))
        grad_norms.append(norm)
        phase_losses.append(loss.item())
        inner.step()
        if f.mode == "diloco" and (step % f.inner_steps == 0 or step == f.steps):
            outer_step(step)
        if f.mode != "diloco" and step % 50 == 0:
            window = grad_norms[-50:]
            outer_log.append({"step": step, "train_loss": sum(phase_losses) / len(phase_losses),
                              "grad_norm_mean": sum(window) / 50, "grad_norm_max": max(window)})
            phase_losses.clear()
        if rank == 0 and f.verbose and step % 250 == 0:
            print("step %d loss %.3f (%.1f s)" % (step, loss.item(), time.time() - start),
                  file=sys.stderr, flush=True)

    val = evaluate()
    if rank == 0:
        n = len(grad_norms)
        quarter = max(1, n // 4)
        result = {
            "mode": f.mode, "islands": k, "steps": f.steps,
            "inner_steps": f.inner_steps if f.mode == "diloco" else None,
            "init": f.init, "clip": f.clip, "lr": f.lr, "weight_decay": f.weight_decay,
            "decay_matrices_only": f.decay_matrices_only, "seed": f.seed,
            "outer_lr": f.outer_lr if f.mode == "diloco" else None,
            "outer_momentum": f.outer_momentum if f.mode == "diloco" else None,
            "val_loss": val, "wall_s": time.time() - start,
            "grad_norm_mean_first_quarter": sum(grad_norms[:quarter]) / quarter,
            "grad_norm_mean_last_quarter": sum(grad_norms[-quarter:]) / quarter,
            "grad_norm_max": max(grad_norms),
            "clipped_fraction": clipped / n,
        }
        if outer_log and f.mode == "diloco":
            def mean(key, rows):
                vals = [r[key] for r in rows if r[key] is not None]
                return sum(vals) / len(vals) if vals else None
            third = max(1, len(outer_log) // 3)
            parts = {"first_third": outer_log[:third],
                     "middle_third": outer_log[third:2 * third] or outer_log[:third],
                     "last_third": outer_log[2 * third:] or outer_log[-third:]}
            result["outer"] = {
                name: {key: mean(key, rows) for key in
                       ("train_loss", "grad_norm_first", "grad_norm_rest", "drift", "delta",
                        "agreement", "update", "update_over_delta", "cos_prev")}
                for name, rows in parts.items()}
        result["outer_steps"] = outer_log  # single and dp: every 50 steps' loss and grad norm
        with open(result_path, "w") as out:
            json.dump(result, out)
    if f.mode != "single":
        dist.barrier()
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    f = parse_flags(argv)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        if f.mode == "single":
            worker(0, f, 0, path)
        else:
            mp.spawn(worker, args=(f, free_port(), path), nprocs=f.islands, join=True)
        with open(path) as r:
            result = json.load(r)
    if f.out:
        with open(f.out, "w") as out:
            json.dump(result, out, indent=1)
    result.pop("outer_steps", None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
