"""Real island processes over loopback Gloo: Python islands (worker.py) and C++ islands
(cpp_peer) started with torchrun's variables, alone and mixed.

- the outer step equals torch.optim.SGD(lr, momentum, nesterov=True) fed the averaged
  pseudo-gradient, over several outer steps; with aggregator="median", fed torch.median's;
- 2 and 4 Python islands train and end bit-identical;
- a Python island and a C++ island train together, bit-identical, and the same as two Python
  islands (the same LibTorch kernels run both);
- every compressor spec sends from Python exactly the bytes it sends from C++, and the bytes the
  exchange formulas give for its payload size;
- islands configured differently fail at construction, on every rank, naming the field.
"""

import json
import threading

import numpy as np
import pytest
import torch

import diloco
from conftest import cpp_island, free_port, launch, python_island, run_islands

TINY = {"d_model": 16, "layers": 1, "heads": 2, "seq_len": 8}
TRAIN = {"tasks": ["train"], "model": TINY, "seed": 3, "lr": 0.3, "symbols": 16, "batch": 4,
         "inner_steps": 3, "steps": 12, "outer_lr": 0.7, "outer_momentum": 0.9,
         "timeout_s": 120}
SHAPES = [[64, 96], [33], [5, 7, 3]]


def all_specs():
    specs = ["none"] + diloco.codec_names()
    return specs + ["int8+ef", "topk(k=64,values=2bit)+ef", "sign+ef(beta=0.9)", "dct+ef"]


def final_weights(tmp_path, world):
    return [np.fromfile(tmp_path / "out" / ("rank%d.bin" % r), dtype=np.float32)
            for r in range(world)]


@pytest.fixture(scope="module")
def two_python_islands(tmp_path_factory):
    """One run of two Python islands serves several tests (each start imports torch): training
    with a trace of every outer step, then one outer step per compressor spec."""
    tmp = tmp_path_factory.mktemp("py2")
    config = dict(TRAIN, tasks=["train", "bytes"], trace=True, specs=all_specs(), shapes=SHAPES)
    results = run_islands([python_island()] * 2, config, tmp, timeout=300)
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


def test_median_outer_step_equals_torch_sgd_on_the_median_pseudo_gradient(tmp_path):
    config = dict(TRAIN, trace=True, aggregator="median")
    run_islands([python_island()] * 3, config, tmp_path, timeout=300)
    traces = [torch.load(tmp_path / "out" / ("rank%d.trace.pt" % r)) for r in range(3)]
    theta = torch.nn.Parameter(traces[0]["initial"].clone())
    reference = torch.optim.SGD([theta], lr=TRAIN["outer_lr"], momentum=TRAIN["outer_momentum"],
                                nesterov=True)
    worst = 0.0
    median_vs_mean = 0.0
    for k in range(len(traces[0]["steps"])):
        deltas = torch.stack([theta.detach() - t["steps"][k][0] for t in traces])
        delta = deltas.median(0).values  # 3 islands: the middle value, per coordinate
        median_vs_mean = max(median_vs_mean, (delta - deltas.mean(0)).abs().max().item())
        theta.grad = delta
        reference.step()
        for t in traces:
            assert torch.equal(t["steps"][k][1], traces[0]["steps"][k][1])
            worst = max(worst, (t["steps"][k][1] - theta.detach()).abs().max().item())
        with torch.no_grad():
            theta.copy_(traces[0]["steps"][k][1])
    print("max |library median - torch.optim.SGD on torch.median| : %.3g" % worst)
    assert worst < 1e-6
    assert median_vs_mean > 1e-4  # the median is not the mean here: the check can fail


@pytest.mark.parametrize("world", [2, 4])
def test_islands_train_and_end_bit_identical(world, two_python_islands, tmp_path):
    if world == 2:
        tmp, results = two_python_islands
    else:
        tmp, results = tmp_path, run_islands([python_island()] * world, TRAIN, tmp_path,
                                              timeout=300)
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


def test_every_compressor_sends_the_same_bytes_from_python_and_cpp(two_python_islands,
                                                                 tmp_path):
    _, py = two_python_islands
    config = {"tasks": ["bytes"], "specs": all_specs(), "shapes": SHAPES, "timeout_s": 120}
    cpp = run_islands([cpp_island()] * 2, config, tmp_path)
    tensors = [torch.zeros(*s) for s in SHAPES]
    for spec in config["specs"]:
        n = diloco.payload_bytes(spec, tensors)
        kind = diloco.aggregation(spec)
        for rank in range(2):
            ops = py[rank]["bytes"][spec]
            assert ops == cpp[rank]["bytes"][spec], (spec, rank)
            # The exchange itself: the operation that sent the most.
            label, (calls, sent, received) = max(ops.items(), key=lambda item: item[1][1])
            if kind == "summable":
                assert (sent, received) == diloco.collective_bytes("allreduce", n, 2, rank), (
                    spec, label, n)
            elif kind == "gathered":
                assert (sent, received) == diloco.collective_bytes("allgather", n, 2, rank), (
                    spec, label, n)
            elif kind == "multi-round":  # all-reduces of its factors: n in all for 2 ranks
                total = sum(op[1] for key, op in ops.items() if key.startswith("allreduce"))
                assert n <= total <= n + 64, (spec, ops, n)
            else:  # ring-requantized: 2(N-1)/N * n in encoded chunks, n for 2 ranks
                assert kind == "ring-requantized"
                assert 0.95 * n <= sent <= 1.05 * n + 64, (spec, label, sent, n)


def test_world_size_mismatch_fails_with_a_message():
    # Two ranks that disagree on the world size, as threads of this process (the rendezvous
    # releases the GIL): both must fail within the timeout, naming their rank and world size.
    port = free_port()
    errors = {}

    def join(rank, world_size):
        try:
            diloco.init_process_group("127.0.0.1", port, rank=rank, world_size=world_size,
                                      timeout=5)
        except diloco.Error as e:
            errors[rank] = str(e)

    threads = [threading.Thread(target=join, args=(0, 2)), threading.Thread(target=join, args=(1, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(errors) == [0, 1], errors
    assert "rank 0 of 2" in errors[0] and "rank 1 of 3" in errors[1], errors


@pytest.mark.parametrize("field, per_rank", [
    ("compression", {"0": {"compression": "int8"}, "1": {"compression": "none"}}),
    ("inner_steps", {"0": {"inner_steps": 10}, "1": {"inner_steps": 20}}),
])
def test_configuration_mismatch_fails_on_every_rank(field, per_rank, tmp_path):
    # Before the configuration check, int8 against none aborted one rank inside Gloo and left
    # the other to report a lost peer; H 10 against 20 ended with one rank "done", exit 0.
    out = tmp_path / "out"
    out.mkdir()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"tasks": ["construct"], "options": {}, "per_rank": per_rank,
                                  "timeout_s": 60}))
    results = launch([python_island() + [str(config), str(out)]] * 2, tmp_path, timeout=90)
    for rank, (code, text) in enumerate(results):
        assert code not in (0, None, -9), "rank %d exited %s:\n%s" % (rank, code, text[-3000:])
        assert "OptionError" in text, text[-3000:]
        error = json.loads((out / ("rank%d.json" % rank)).read_text())
        print("rank %d: %s after %.2f s: %s" % (rank, error["type"], error["seconds"],
                                                error["message"]))
        assert error["type"] == "OptionError"
        assert field in error["message"] and "rank 0" in error["message"], error
        values = [str(v[field]) for v in per_rank.values()]
        assert all(v in error["message"] for v in values), error
        assert error["seconds"] < 5.0, error  # not the 60 s timeout
