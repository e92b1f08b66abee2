"""A Python island for the multi-process tests, started by the tests with torchrun's variables
(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE). Its twin in C++ is cpp_peer.cpp: both read the same
JSON config and write the same files, so the tests compare their results byte for byte.

Usage: worker.py CONFIG.json OUTDIR
Tasks (config["tasks"], run in this order in one process):
  train   the example's GPT (tiny), inner SGD, DiLoCo; writes rank<R>.bin (the final parameters,
          float32, in the library's order), rank<R>.json (stats, losses) and, with
          config["trace"], rank<R>.trace.pt (per outer step: local weights before, global after).
  bytes   for each spec in config["specs"]: DiLoCo over fixed tensors, one outer step; writes the
          byte accounting per operation label of that step to rank<R>.json under "bytes".
  batchnorm  a small CNN with BatchNorm, DiLoCo with config["buffers"], each rank on data of its
          own (and r extra forward passes on rank r, so num_batches_tracked differs too); writes
          rank<R>.bn.pt: the buffers after construction, then per outer step the buffers just
          before it and just after it, and the parameters after it.
  streaming  Streaming DiLoCo (config["streaming"]: H, P, tau, alpha, steps) on named tensors
          with a deterministic inner step (SGD on 0.5 * |theta - target(rank, step)|^2); writes
          rank<R>.streaming.pt: the global weights after every step and the final local weights.
  construct  DiLoCo on a tiny model with config["options"] updated by config["per_rank"][rank]
          (to make islands disagree); writes the error (type, message, seconds the constructor
          took) to rank<R>.json, then raises it again: the process exits non-zero.
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "examples", "python"))
import diloco  # noqa: E402
from gpt import GPT, language_model_loss  # noqa: E402


def flat_copy(outer):
    return torch.cat([t.detach().reshape(-1).clone() for t in outer.flat_parameters()])


def train(config, group, out):
    rank = group.rank
    torch.manual_seed(config["seed"])
    m = config["model"]
    model = GPT(d_model=m["d_model"], layers=m["layers"], heads=m["heads"], seq_len=m["seq_len"])
    inner = torch.optim.SGD(model.parameters(), lr=config["lr"])
    outer = diloco.DiLoCo(model, inner, group, inner_steps=config["inner_steps"],
                          outer_lr=config["outer_lr"], outer_momentum=config["outer_momentum"],
                          nesterov=True, compression=config.get("compression", "none"),
                          aggregator=config.get("aggregator", "mean"))
    initial = flat_copy(outer)
    torch.manual_seed(config["seed"] * 1000 + 1 + rank)
    trace = []
    losses = []
    for step in range(1, config["steps"] + 1):
        tokens = torch.randint(0, config["symbols"], (config["batch"], m["seq_len"] + 1))
        inputs = tokens[:, :-1].contiguous()
        targets = tokens[:, 1:].contiguous()
        loss = language_model_loss(model, inputs, targets)
        inner.zero_grad()
        loss.backward()
        inner.step()
        losses.append(loss.item())
        local = flat_copy(outer) if config.get("trace") else None
        if outer.step() and local is not None:
            trace.append((local, flat_copy(outer)))
    if config["steps"] % config["inner_steps"]:
        outer.sync()
    flat_copy(outer).numpy().tofile(os.path.join(out, "rank%d.bin" % rank))
    if config.get("trace"):
        torch.save({"initial": initial, "steps": trace}, os.path.join(out, "rank%d.trace.pt" % rank))
    stats = outer.stats()
    return {"names": outer.parameter_names(), "losses": losses, "stats": stats._asdict()}


def bytes_task(config, group):
    result = {}
    shapes = config["shapes"]
    for spec in config["specs"]:
        torch.manual_seed(1 + group.rank)
        tensors = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
        named = [("t%d" % i, t) for i, t in enumerate(tensors)]
        outer = diloco.DiLoCo(named, None, group, inner_steps=1, compression=spec)
        with torch.no_grad():
            for t in tensors:
                t.add_(torch.randn(t.shape) * 0.01)
        group.reset_stats()
        outer.step()
        ops = group.stats().ops
        result[spec] = {label: [s.calls, s.bytes_sent, s.bytes_received]
                        for label, s in ops.items()}
    return result


def batchnorm_task(config, group, out):
    rank = group.rank
    torch.manual_seed(config["seed"])
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
    with torch.no_grad():  # different buffers on every rank before construction
        model[1].running_mean.fill_(float(rank))
    inner = torch.optim.SGD(model.parameters(), lr=config["lr"])
    outer = diloco.DiLoCo(model, inner, group, inner_steps=config["inner_steps"],
                          buffers=config["buffers"])

    def buffers():
        return {name: b.detach().clone() for name, b in model.named_buffers()}

    def parameters():
        return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

    initial = buffers()
    generator = torch.Generator().manual_seed(config["seed"] * 1000 + 1 + rank)

    def batch():
        x = torch.randn(8, 1, 6, 6, generator=generator) * (1 + rank) + rank
        return x, torch.randint(0, 3, (8,), generator=generator)

    for _ in range(rank):  # rank r: r more batches through BatchNorm than rank 0
        model(batch()[0])
    steps = []
    for step in range(1, config["steps"] + 1):
        x, y = batch()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        inner.zero_grad()
        loss.backward()
        inner.step()
        before = buffers()
        if outer.step():
            steps.append({"before": before, "after": buffers(), "parameters": parameters()})
    torch.save({"initial": initial, "steps": steps, "buffer_names": outer.buffer_names(),
                "mode": outer.buffers}, os.path.join(out, "rank%d.bn.pt" % rank))
    return {"outer_steps": outer.stats().outer_steps}


def streaming_target(shape, rank, step, index):
    """The inner step's target: the same function in the worker and in the test's reference."""
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + index)
    return torch.randn(shape, generator=g)


STREAMING_SHAPES = {"blocks.0.w": (6, 5), "blocks.1.w": (6, 5), "blocks.0.b": (7,),
                    "blocks.1.b": (7,)}


def streaming_initial():
    g = torch.Generator().manual_seed(77)
    return {name: torch.randn(shape, generator=g) for name, shape in STREAMING_SHAPES.items()}


def streaming_task(config, group, out):
    c = config["streaming"]
    tensors = streaming_initial()
    outer = diloco.DiLoCo(tensors, None, group, inner_steps=c["H"], fragments=c["P"],
                          overlap_steps=c["tau"], mixing=c["alpha"],
                          fragment_of=c["fragment_of"], outer_lr=c["outer_lr"],
                          outer_momentum=c["outer_momentum"])
    exchanges = []
    outer.on_exchange(lambda e: exchanges.append(
        [e.outer_step, e.fragment, e.inner_step, e.started, e.due, e.done]))
    names = list(tensors)
    # One dtype, so one bucket per fragment, in fragment order, each holding its parameters in
    # model order: that is how the global weights split back into parameters.
    layout = sorted(range(len(names)), key=lambda i: (c["fragment_of"][i], i))
    globals_after = []
    for step in range(1, c["steps"] + 1):
        with torch.no_grad():
            for i, name in enumerate(names):
                t = tensors[name]
                t.sub_(c["lr"] * (t - streaming_target(t.shape, group.rank, step, i)))
        outer.step()
        flat = torch.cat(outer.global_weights())
        per_name, at = {}, 0
        for i in layout:
            n = tensors[names[i]].numel()
            per_name[names[i]] = flat[at:at + n].view(tensors[names[i]].shape).clone()
            at += n
        globals_after.append(per_name)
    torch.save({"global": globals_after, "local": {n: t.clone() for n, t in tensors.items()}},
               os.path.join(out, "rank%d.streaming.pt" % group.rank))
    return {"outer_steps": outer.stats().outer_steps, "exchanges": exchanges}


def construct_task(config, group, out):
    options = dict(config["options"], **config["per_rank"].get(str(group.rank), {}))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    start = time.monotonic()
    try:
        diloco.DiLoCo(model, inner, group, **options)
    except Exception as e:
        with open(os.path.join(out, "rank%d.json" % group.rank), "w") as f:
            json.dump({"type": type(e).__name__, "message": str(e),
                       "seconds": time.monotonic() - start}, f)
        raise
    return {"constructed": True}


def main():
    with open(sys.argv[1]) as f:
        config = json.load(f)
    out = sys.argv[2]
    torch.set_num_threads(1)
    group = diloco.init_process_group(timeout=config.get("timeout_s", 60))
    result = {}
    if "train" in config["tasks"]:
        result.update(train(config, group, out))
    if "bytes" in config["tasks"]:
        result["bytes"] = bytes_task(config, group)
    if "batchnorm" in config["tasks"]:
        result.update(batchnorm_task(config, group, out))
    if "streaming" in config["tasks"]:
        result.update(streaming_task(config, group, out))
    if "construct" in config["tasks"]:
        result.update(construct_task(config, group, out))
    result["language"] = "python"
    with open(os.path.join(out, "rank%d.json" % group.rank), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
