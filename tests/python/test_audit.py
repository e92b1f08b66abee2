"""Replay audits from Python (diloco.DiLoCo(audit_rate=...), enable_audits with a Python step
function): three islands (threads of this process, Gloo on loopback) audit each other at every
outer step; honest rounds pass bit for bit, an island that scales its update is caught, named
on every rank and left out of later outer steps."""

import pytest
import torch

import diloco
from conftest import free_port, run_threads


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
    out = {}

    def island(rank):
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

    errors = run_threads(world, island)
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


def test_elastic_run_removes_an_island_that_fails_its_audit():
    """Elastic islands (threads, a store this test serves): audits need stream_of (each island's
    data stream from its name); the island that scales its update is removed at outer step 1,
    told why (RemovedError), and the other two audit each other on in a new epoch."""
    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, None, True,
                                       timeout=torch.distributed.constants.default_pg_timeout,
                                       wait_for_workers=False)
    h, rounds, world = 3, 3, 3
    out = {}

    def stream_of(name):
        slot, incarnation = name.split(".")
        return int(slot) * 10 + int(incarnation)

    def island(slot):
        membership = diloco.join_elastic(store_port=port, slot=slot, world_size=world,
                                         hostname="127.0.0.1", heartbeat_timeout=0.5,
                                         heartbeat_interval=0.05, timeout=10,
                                         rendezvous_timeout=30)
        torch.manual_seed(0)
        model, replica = net(), net()
        inner = torch.optim.AdamW(model.parameters(), lr=0.01)
        replica_inner = torch.optim.AdamW(replica.parameters(), lr=0.01)
        outer = diloco.DiLoCo(model, inner, membership, inner_steps=h, audit_rate=1.0)
        step = lambda stream, t: inner_step(replica, replica_inner, stream, t)  # noqa: E731
        with pytest.raises(diloco.OptionError, match="needs AuditHooks::stream_of"):
            outer.enable_audits(replica, replica_inner, step, data_seed=7)
        outer.enable_audits(replica, replica_inner, step, data_seed=7, stream_of=stream_of)
        mine = stream_of(membership.island)
        for t in range(h * rounds):
            inner_step(model, inner, mine, t)
            if slot == 2 and t == h - 1:
                with torch.no_grad():
                    flat, g = outer.flat_parameters()[0], outer.global_weights()[0]
                    flat.copy_(g - 2.0 * (g - flat))  # its update x2
            outer.step()
        out[slot] = (outer.audits(), outer.state_sha256(), outer.group.world_size)
        membership.leave()

    errors = run_threads(world, island)
    assert set(errors) == {2}, errors
    assert isinstance(errors[2], diloco.RemovedError)
    assert "rank 2 (island 2.0) failed its audit" in str(errors[2])
    for slot in (0, 1):
        audits, sha, size = out[slot]
        assert audits.failed == 1 and audits.excluded_names == ["2.0"], audits
        assert audits.excluded_at == [1]
        assert audits.audits == 3 + 2 + 2  # 3 islands at outer step 1, then the 2 survivors
        assert size == 2 and sha == out[0][1]
    del store
