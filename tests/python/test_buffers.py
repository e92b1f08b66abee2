"""Module buffers across real island processes (worker.py's batchnorm task): a small CNN with
BatchNorm, every island on data of its own, so its running statistics drift apart between outer
steps, and rank r runs r more batches, so num_batches_tracked differs too.

- buffers="average": after every outer step the buffers are bit-identical on every island, the
  floating-point ones equal to the mean of the islands' values just before the step (computed
  here from what each rank reports, not taken from the library), num_batches_tracked rank 0's;
- buffers="local": every island keeps its own statistics through the outer steps;
- every mode starts from rank 0's buffers, and the parameters end identical either way.
"""

import pytest
import torch

from conftest import python_island, run_islands

CONFIG = {"tasks": ["batchnorm"], "seed": 5, "lr": 0.05, "inner_steps": 2, "steps": 6,
          "timeout_s": 60}
OUTER_STEPS = CONFIG["steps"] // CONFIG["inner_steps"]


def run(tmp_path, world, buffers):
    results = run_islands([python_island()] * world, dict(CONFIG, buffers=buffers), tmp_path)
    assert all(r["outer_steps"] == OUTER_STEPS for r in results), results
    return [torch.load(tmp_path / "out" / ("rank%d.bn.pt" % r)) for r in range(world)]


def floating(name):
    return not name.endswith("num_batches_tracked")


def check_common(ranks, mode):
    names = ranks[0]["buffer_names"]
    assert sorted(names) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"], names
    assert all(r["mode"] == mode for r in ranks)
    for r in ranks[1:]:  # rank 0's buffers everywhere after construction (rank r had r there)
        for name in names:
            assert torch.equal(r["initial"][name], ranks[0]["initial"][name]), name
    for k in range(OUTER_STEPS):
        for r in ranks[1:]:
            assert torch.equal(r["steps"][k]["parameters"], ranks[0]["steps"][k]["parameters"])
            # The islands did drift apart before the step: the checks below are not vacuous.
            # (num_batches_tracked differs before the first step; with "average" it is equal
            # from then on, as every island runs the same number of batches per interval.)
            for name in names if k == 0 or mode == "local" else filter(floating, names):
                assert not torch.equal(r["steps"][k]["before"][name],
                                       ranks[0]["steps"][k]["before"][name]), (k, name)
    return names


@pytest.mark.parametrize("world", [2, 3])
def test_average_makes_buffers_identical_and_the_mean(world, tmp_path):
    ranks = run(tmp_path, world, "average")
    names = check_common(ranks, "average")
    worst = 0.0
    for k in range(OUTER_STEPS):
        for name in names:
            after = [r["steps"][k]["after"][name] for r in ranks]
            for r in range(1, world):
                assert after[r].dtype == after[0].dtype
                assert after[r].numpy().tobytes() == after[0].numpy().tobytes(), (k, name, r)
            before = [r["steps"][k]["before"][name] for r in ranks]
            if floating(name):
                mean = torch.stack([b.double() for b in before]).sum(0) / world
                worst = max(worst, (after[0].double() - mean).abs().max().item())
                assert torch.allclose(after[0].double(), mean, rtol=1e-6, atol=1e-7), (k, name)
                if world == 2:  # one float32 addition, then an exact halving
                    assert torch.equal(after[0], (before[0] + before[1]) / 2), (k, name)
            else:  # integer buffers take rank 0's value
                assert torch.equal(after[0], before[0]), (k, name)
                assert int(before[1]) == int(before[0]) + (1 if k == 0 else 0), (k, name)
    print("max |library - mean of the islands' buffers| over %d outer steps: %.3g"
          % (OUTER_STEPS, worst))
    assert worst < 1e-6


def test_local_leaves_each_island_its_own_buffers(tmp_path):
    ranks = run(tmp_path, 2, "local")
    names = check_common(ranks, "local")
    for k in range(OUTER_STEPS):
        for r in ranks:
            for name in names:
                assert torch.equal(r["steps"][k]["after"][name], r["steps"][k]["before"][name])
        for name in names:
            assert not torch.equal(ranks[0]["steps"][k]["after"][name],
                                   ranks[1]["steps"][k]["after"][name]), (k, name)
