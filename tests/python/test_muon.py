"""diloco.Muon against Muon's update written out here in float64 (Jordan et al. 2024), and as a
torch.optim.Optimizer (schedulers, state_dict, refusing vectors)."""

import math

import pytest
import torch

import diloco


def reference_ns(x, steps=5):
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.t()
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        a = x @ x.t()
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.t() if tall else x


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("scale", ["spectral", "match_adamw"])
def test_muon_matches_the_written_out_update(nesterov, scale):
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(40, 24, generator=gen))
    ref = w.detach().double().clone()
    buf = torch.zeros_like(ref)
    opt = diloco.Muon([w], lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1,
                      scale=scale)
    s = math.sqrt(40 / 24) if scale == "spectral" else 0.2 * math.sqrt(40)
    for _ in range(4):
        g = torch.randn(40, 24, generator=gen)
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g.double()
        u = g.double() + 0.9 * buf if nesterov else buf
        ref = ref * (1 - 0.05 * 0.1) - 0.05 * s * reference_ns(u)
    assert (w.detach().double() - ref).abs().max().item() < 1e-5


def test_muon_is_a_torch_optimizer():
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = diloco.Muon([w], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    w.grad = torch.randn(8, 8)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert "momentum_buffer" in opt.state_dict()["state"][0]
    with pytest.raises(diloco.OptionError, match="fewer than 2 dimensions"):
        diloco.Muon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(diloco.OptionError, match="momentum"):
        bad = diloco.Muon([w], momentum=1.5)
        w.grad = torch.randn(8, 8)
        bad.step()
