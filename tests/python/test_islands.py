"""Real island processes over loopback Gloo: Python islands (worker.py) and C++ islands
(cpp_peer) started with torchrun's variables, alone and mixed.

- the outer step equals torch.optim.SGD(lr, momentum, nesterov=True) fed the averaged
  pseudo-gradient, over several outer steps;
- 2 and 4 Python islands train and end bit-identical;
- a Python island and a C++ island train together, bit-identical, and the same as two Python
  islands (the same LibTorch kernels run both);
- every compressor spec sends from Python exactly the bytes it sends from C++, and the bytes the
  exchange formulas give for its payload size.
"""

import numpy as np
import pytest
import torch

import diloco
from conftest import cpp_island, launch, python_island, run_islands

TINY = {"d_model": 16, "layers": 1, "heads": 2, "seq_len": 8}
TRAIN = {"task": "train", "model": TINY, "seed": 3, "lr": 0.3, "symbols": 16, "batch": 4,
         "inner_steps": 3, "steps": 12, "outer_lr": 0.7, "outer_momentum": 0.9, "timeout_s": 60}


def final_weights(tmp_path, world):
    return [np.fromfile(tmp_path / "out" / ("rank%d.bin" % r), dtype=np.float32)
            for r in range(world)]


@pytest.fixture(scope="module")
def two_python_islands(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("py2")
    results = run_islands([python_island()] * 2, dict(TRAIN, trace=True), tmp)
    return tmp, results


def test_outer_step_equals_torch_sgd_on_the_mean_pseudo_gradient(two_python_islands):
    tmp, _ = two_python_islands
    traces = [torch.load(tmp / "out" / ("rank%d.trace.pt" % r)) for r in range(2)]
    assert torch.equal(traces[0]["initial"], traces[1]["initial"]), "ranks started apart"
    steps = len(traces[0]["steps"])
    assert steps == TRAIN["steps"] // TRAIN["inner_steps"] == 4

    theta = torch.nn.Parameter(traces[0]["initial"].clone())
    reference = torch.optim.SGD([theta], lr=TRAIN["outer_lr"], momentum=TRAIN["outer_momentum"],
                                nesterov=True)
    worst = 0.0
    no_momentum_gap = 0.0
    for k in range(steps):
        locals_ = [t["steps"][k][0] for t in traces]
        delta = torch.stack([theta.detach() - local for local in locals_]).mean(0)
        plain_average = theta.detach() - TRAIN["outer_lr"] * delta
        theta.grad = delta
        reference.step()
        for t in traces:
            worst = max(worst, (t["steps"][k][1] - theta.detach()).abs().max().item())
        no_momentum_gap = max(no_momentum_gap,
                              (plain_average - theta.detach()).abs().max().item())
        # Continue from the library's global weights (identical on both ranks).
        assert torch.equal(traces[0]["steps"][k][1], traces[1]["steps"][k][1])
        with torch.no_grad():
            theta.copy_(traces[0]["steps"][k][1])
    print("max |library - torch.optim.SGD| over %d outer steps: %.3g" % (steps, worst))
    assert worst < 1e-6
    # The reference is sensitive: momentum moves the weights far more than the tolerance.
    assert no_momentum_gap > 1e-4


@pytest.mark.parametrize("world", [2, 4])
def test_islands_train_and_end_bit_identical(world, two_python_islands, tmp_path):
    if world == 2:
        tmp, results = two_python_islands
    else:
        tmp, results = tmp_path, run_islands([python_island()] * world, TRAIN, tmp_path)
    weights = final_weights(tmp, world)
    for r in range(1, world):
        assert weights[r].tobytes() == weights[0].tobytes(), "rank %d differs from rank 0" % r
    for result in results:
        stats = result["stats"]
        assert stats["outer_steps"] == TRAIN["steps"] // TRAIN["inner_steps"]
        assert stats["bytes_sent"] > 0 and stats["sync_seconds"] > 0
        losses = result["losses"]
        assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses


def test_python_and_cpp_islands_train_together(two_python_islands, tmp_path):
    results = run_islands([python_island(), cpp_island()], TRAIN, tmp_path)
    assert [r["language"] for r in results] == ["python", "c++"]
    assert results[0]["names"] == results[1]["names"]  # the same architecture, name for name
    weights = final_weights(tmp_path, 2)
    assert weights[0].tobytes() == weights[1].tobytes()
    for result in results:
        assert result["stats"]["outer_steps"] == 4
        assert np.mean(result["losses"][-3:]) < np.mean(result["losses"][:3]) - 0.1
    # Same init (rank 0 is Python in both runs), same data streams, same LibTorch kernels: the
    # C++ island computes exactly what a Python island does.
    py_tmp, py_results = two_python_islands
    assert weights[0].tobytes() == final_weights(py_tmp, 2)[0].tobytes()
    assert results[1]["losses"] == py_results[1]["losses"]


def test_python_and_cpp_islands_bytes_agree(tmp_path):
    results = run_islands([cpp_island(), python_island(), cpp_island()], TRAIN, tmp_path)
    weights = final_weights(tmp_path, 3)
    assert weights[0].tobytes() == weights[1].tobytes() == weights[2].tobytes()
    # Ranks 0 and 2 run C++ and rank 1 Python: the symmetric collectives cost all the same.
    sent = [r["stats"]["bytes_received"] for r in results]
    assert sent[1] == sent[2]


SHAPES = [[64, 96], [33], [5, 7, 3]]


def all_specs():
    specs = ["none"] + diloco.codec_names()
    return specs + ["int8+ef", "topk(k=64,values=2bit)+ef", "sign+ef(beta=0.9)", "dct+ef"]


def test_every_compressor_sends_the_same_bytes_from_python_and_cpp(tmp_path):
    config = {"task": "bytes", "specs": all_specs(), "shapes": SHAPES, "timeout_s": 60}
    (tmp_path / "py").mkdir()
    (tmp_path / "cpp").mkdir()
    py = run_islands([python_island()] * 2, config, tmp_path / "py")
    cpp = run_islands([cpp_island()] * 2, config, tmp_path / "cpp")
    tensors = [torch.zeros(*s) for s in SHAPES]
    for spec in config["specs"]:
        for rank in range(2):
            assert py[rank][spec] == cpp[rank][spec], (spec, rank)
            sent = sum(op[1] for op in py[rank][spec].values())
            assert sent > 0, spec
            n = diloco.payload_bytes(spec, tensors)
            kind = diloco.aggregation(spec)
            big = max(py[rank][spec].items(), key=lambda item: item[1][1])
            if kind == "summable":
                expected = diloco.collective_bytes("allreduce", n, 2, rank)
            elif kind == "gathered":
                expected = diloco.collective_bytes("allgather", n, 2, rank)
            else:  # ring-requantized: about 2(N-1)/N * n, in chunks
                expected = None
                assert 0.9 * n <= big[1][1] <= 1.1 * n + 64, (spec, big, n)
            if expected is not None:
                assert tuple(big[1][1:]) == expected, (spec, big, n)


def test_world_size_mismatch_fails_with_a_message(tmp_path):
    code = ("import diloco, os; os.environ['WORLD_SIZE'] = os.environ['RANK'] == '0' and '2' or "
            "'3'; diloco.init_process_group(timeout=5)")
    import sys
    results = launch([[sys.executable, "-c", code]] * 2, tmp_path, timeout=60)
    assert any(code != 0 for code, _ in results)
    text = "\n".join(out for _, out in results)
    assert "diloco" in text and ("Error" in text), text
