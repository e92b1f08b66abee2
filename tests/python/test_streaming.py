"""Streaming DiLoCo on real processes (Python islands, loopback Gloo) against a plain-PyTorch
reference of the algorithm written here: fragments synchronized every H steps at offsets
floor((p + 1) H / P), each exchange applied tau steps after it starts by torch.optim.SGD
(Nesterov) fed the mean pseudo-gradient, and the island's fragment then merged as
alpha * local + (1 - alpha) * global (Douillard et al. 2025, arXiv 2501.18512)."""

import pytest
import torch

from conftest import python_island, run_islands
from worker import STREAMING_SHAPES, streaming_initial, streaming_target


def reference(world, c):
    names = list(STREAMING_SHAPES)
    H, P, tau, alpha = c["H"], c["P"], c["tau"], c["alpha"]
    start = streaming_initial()
    glob = {n: torch.nn.Parameter(start[n].clone()) for n in names}
    outer = [torch.optim.SGD([glob[n] for i, n in enumerate(names) if c["fragment_of"][i] == f],
                             lr=c["outer_lr"], momentum=c["outer_momentum"], nesterov=True)
             for f in range(P)]
    local = [{n: start[n].clone() for n in names} for _ in range(world)]
    pending = {}

    def starting(step):
        if step < 1:
            return None
        phase = (step - 1) % H + 1
        for f in range(P):
            if (f + 1) * H // P == phase:
                return f
        return None

    def start_exchange(f):
        pending[f] = {n: sum(glob[n].detach() - local[r][n] for r in range(world)) / world
                      for i, n in enumerate(names) if c["fragment_of"][i] == f}

    def apply(f):
        for n, delta in pending.pop(f).items():
            glob[n].grad = delta
        outer[f].step()
        for n in [n for i, n in enumerate(names) if c["fragment_of"][i] == f]:
            for r in range(world):
                local[r][n] = alpha * local[r][n] + (1 - alpha) * glob[n].detach()

    after = []
    for step in range(1, c["steps"] + 1):
        for r in range(world):
            for i, n in enumerate(names):
                t = local[r][n]
                local[r][n] = t - c["lr"] * (t - streaming_target(t.shape, r, step, i))
        if tau > 0 and starting(step - tau) is not None:
            apply(starting(step - tau))
        if starting(step) is not None:
            start_exchange(starting(step))
            if tau == 0:
                apply(starting(step))
        after.append({n: glob[n].detach().clone() for n in names})
    return after, local


@pytest.mark.parametrize("world,P,tau,alpha", [(2, 2, 2, 0.5), (3, 2, 2, 0.5), (3, 3, 1, 0.0)])
def test_streaming_matches_a_pytorch_reference(tmp_path, world, P, tau, alpha):
    fragment_of = [0, 1, 0, 1] if P == 2 else [0, 1, 2, 2]
    c = {"H": 6, "P": P, "tau": tau, "alpha": alpha, "steps": 27, "lr": 0.1,
         "outer_lr": 0.7, "outer_momentum": 0.9, "fragment_of": fragment_of}
    results = run_islands([python_island()] * world,
                          {"tasks": ["streaming"], "streaming": c, "timeout_s": 60}, tmp_path)
    runs = [torch.load(tmp_path / "out" / ("rank%d.streaming.pt" % r)) for r in range(world)]
    want_global, want_local = reference(world, c)
    worst = 0.0
    for step in range(c["steps"]):
        for name in STREAMING_SHAPES:
            got = runs[0]["global"][step][name]
            for r in range(1, world):  # every rank bit-identical after every step
                assert torch.equal(runs[r]["global"][step][name], got), (step, name, r)
            worst = max(worst, (got - want_global[step][name]).abs().max().item())
    for r in range(world):
        for name in STREAMING_SHAPES:
            worst = max(worst, (runs[r]["local"][name] - want_local[r][name]).abs().max().item())
    assert worst < 1e-6, worst
    # A round ends when its last fragment is applied: after steps H + tau, 2H + tau, ...
    assert results[0]["outer_steps"] == (c["steps"] - tau) // c["H"]
    # DiLoCo.on_exchange: every applied exchange, in order, on every rank: (outer step, fragment,
    # the step it started after) as the schedule says, its times in order on the steady clock.
    H = c["H"]
    starts = [(s, f) for s in range(1, c["steps"] + 1) for f in range(P)
              if (f + 1) * H // P == (s - 1) % H + 1 and s + tau <= c["steps"]]
    want = [[(s - 1) // H + 1, f, s] for s, f in starts]
    for r in range(world):
        got = results[r]["exchanges"]
        assert [e[:3] for e in got] == want, (r, got)
        assert all(started <= due <= done for *_, started, due, done in got), got
