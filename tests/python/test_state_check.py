"""The state comparison from Python: three islands (threads of this process, Gloo on loopback)
compare their global state after every outer step; check_state() compares the last one, and an
island whose state is not the others' is named on every rank."""

import torch

import diloco
from conftest import free_port, run_threads


def net():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def inner_step(model, optimizer, island, t):
    g = torch.Generator().manual_seed(1000 * island + t)
    x = torch.randn(16, 8, generator=g)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin()).backward()
    optimizer.step()


def islands(tmp_path, reload_rank=None, world=3, h=2, rounds=2):
    """`reload_rank` loads the state it saved after outer step 1 once the last outer step is done
    (a state of its own, and no hash of the last outer step)."""
    port = free_port()

    def island(rank):
        group = diloco.init_process_group(master_port=port, rank=rank, world_size=world,
                                          timeout=30)
        torch.manual_seed(0)
        model = net()
        inner = torch.optim.SGD(model.parameters(), lr=0.05)
        outer = diloco.DiLoCo(model, inner, group, inner_steps=h)
        saved = str(tmp_path / ("rank%d.pt" % rank))
        for t in range(h * rounds):
            inner_step(model, inner, rank, t)
            outer.step()
            if t == h - 1:
                outer.save_state(saved)
        if rank == reload_rank:
            outer.load_state(saved)
        outer.check_state()

    return run_threads(world, island)


def test_check_state_passes_when_the_islands_agree(tmp_path):
    assert islands(tmp_path) == {}


def test_check_state_names_the_island_whose_state_differs(tmp_path):
    errors = islands(tmp_path, reload_rank=2)
    assert sorted(errors) == [0, 1, 2], errors
    for rank, e in errors.items():
        assert isinstance(e, diloco.Error), e
        assert ("outer step 2, fragment 0] rank %d: the islands' global states differ after the "
                "outer step: rank(s) 2 disagree with the majority" % rank) in str(e), e
        assert "theirs none" in str(e), e
