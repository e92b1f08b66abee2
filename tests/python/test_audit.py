"""Replay audits from Python (diloco.DiLoCo(audit_rate=...), enable_audits with a Python step
function): three islands (threads of this process, Gloo on loopback) audit each other at every
outer step; honest rounds pass bit for bit, an island that scales its update is caught, named
on every rank and left out of later outer steps."""

import threading

import pytest
import torch

import diloco
from conftest import free_port


def net():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def inner_step(model, optimizer, island, t):
    """Inner step t (0-based) of `island`: its own regression batch."""
    g = torch.Generator().manual_seed(1000 * island + t)
    x = torch.randn(16, 8, generator=g)
    y = x.sum(1, keepdim=True).sin()
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def islands(cheat, rounds=3, world=3, h=3):
    port = free_port()
    out, errors = {}, {}

    def island(rank):
        try:
            group = diloco.init_process_group(master_port=port, rank=rank, world_size=world,
                                              timeout=30)
            torch.manual_seed(0)
            model, replica = net(), net()
            inner = torch.optim.AdamW(model.parameters(), lr=0.01)
            replica_inner = torch.optim.AdamW(replica.parameters(), lr=0.01)
            outer = diloco.DiLoCo(model, inner, group, inner_steps=h, audit_rate=1.0,
                                  screen_factor=0)
            outer.enable_audits(replica, replica_inner,
                                lambda island, t: inner_step(replica, replica_inner, island, t),
                                data_seed=7)
            for t in range(h * rounds):
                inner_step(model, inner, rank, t)
                if cheat and rank == 2 and t % h == h - 1:
                    with torch.no_grad():
                        flat, g = outer.flat_parameters()[0], outer.global_weights()[0]
                        if t == h - 1:
                            flat.copy_(g - 2.0 * (g - flat))  # its update x2
                        else:
                            flat.add_(1e3)  # would show in the global weights if averaged
                outer.step()
            out[rank] = (outer.audits(), outer.global_weights()[0].clone())
        except Exception as e:  # noqa: BLE001 - reported below
            errors[rank] = e

    threads = [threading.Thread(target=island, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return out


def test_honest_islands_pass_every_audit():
    out = islands(cheat=False)
    for rank, (audits, weights) in out.items():
        assert audits.audits == 9 and audits.failed == 0, (rank, audits.last_failure)
        assert audits.excluded == []
        assert torch.equal(weights, out[0][1])


def test_a_scaling_island_is_caught_named_and_left_out():
    out = islands(cheat=True)
    for rank, (audits, weights) in out.items():
        assert audits.excluded == [2] and audits.excluded_at == [1], (rank, audits)
        assert "rank 2 failed its audit by rank" in audits.last_failure
        assert "replayed pseudo-gradient" in audits.last_failure
        assert weights.abs().max().item() < 10.0  # its later +1e3 never averaged in
        assert torch.equal(weights, out[0][1])


def test_audit_options_are_validated():
    group = diloco.init_process_group(master_port=free_port(), rank=0, world_size=1)
    model = net()
    inner = torch.optim.AdamW(model.parameters())
    with pytest.raises(diloco.OptionError, match="audit_rate must be in"):
        diloco.DiLoCo(model, inner, group, audit_rate=2.0)
    with pytest.raises(diloco.OptionError, match="audits .* replay plain DiLoCo"):
        diloco.DiLoCo(model, inner, group, audit_rate=0.5, fragments=2, inner_steps=4)


def test_optimizer_state_digest_is_by_content():
    torch.manual_seed(3)
    a, b = net(), net()
    oa, ob = torch.optim.AdamW(a.parameters()), torch.optim.AdamW(b.parameters())
    inner_step(a, oa, 0, 0)
    assert diloco.optimizer_state_digest([oa]) != diloco.optimizer_state_digest([ob])
    ob.load_state_dict(oa.state_dict())
    assert diloco.optimizer_state_digest([ob]) == diloco.optimizer_state_digest([oa])
    assert len(diloco.optimizer_state_digest([oa])) == 32
