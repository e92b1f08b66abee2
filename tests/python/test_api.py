"""The bindings in one process (one-rank groups over loopback): parameters shared without copies
with a Python model and its torch.optim optimizer, the options and statistics, the codec
registry, and errors arriving as Python exceptions with the library's messages."""

import datetime

import pytest
import torch

import diloco
from conftest import free_port


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def train_step(model, inner):
    x = torch.randn(16, 4)
    loss = model(x).pow(2).mean()
    loss.backward()
    inner.step()
    inner.zero_grad()


def test_exception_hierarchy():
    assert issubclass(diloco.Error, RuntimeError)
    assert issubclass(diloco.OptionError, diloco.Error)
    assert issubclass(diloco.OptionError, ValueError)
    assert issubclass(diloco.PeerLostError, diloco.Error)
    assert diloco.Error.__module__ == "diloco"


def test_parameters_are_shared_without_copies(solo_group):
    model = tiny_model()
    params_before = list(model.parameters())
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outer = diloco.DiLoCo(model, inner, solo_group, inner_steps=3)

    # The same Parameter objects, now views into the library's flat buffer.
    assert all(a is b for a, b in zip(params_before, model.parameters()))
    assert all(a is b for a, b in zip(params_before, inner.param_groups[0]["params"]))
    (flat,) = outer.flat_parameters()
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    for p in model.parameters():
        assert start <= p.data_ptr() < end
    assert flat.numel() == sum(p.numel() for p in model.parameters())

    # A write through Python is seen by the library's buffer and the other way round.
    first = next(model.parameters())
    with torch.no_grad():
        first.view(-1)[0] = 123.0
    assert flat[0].item() == 123.0
    with torch.no_grad():
        flat[0] = -7.0
    assert first.view(-1)[0].item() == -7.0

    # The user's optimizer keeps training the shared storage.
    before = flat.clone()
    train_step(model, inner)
    assert outer.step() is False  # step 1 of 3: no sync
    assert not torch.equal(before, flat), "inner.step() did not change the shared buffer"
    assert len(inner.state) == len(params_before)

    # After a sync (one island: global = local with lr 1 averaging) the model is the global model.
    outer.sync()
    (global_weights,) = outer.global_weights()
    assert torch.equal(global_weights, flat)
    assert outer.stats().outer_steps == 1


def test_step_syncs_every_inner_steps_and_reports_stats(solo_group):
    model = tiny_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = diloco.DiLoCo(model, inner, solo_group, inner_steps=2, outer_lr=0.5,
                          outer_momentum=0.0, nesterov=False)
    results = []
    for _ in range(5):
        train_step(model, inner)
        results.append(outer.step())
    assert results == [False, True, False, True, False]
    s = outer.stats()
    assert (s.inner_steps, s.outer_steps) == (5, 2)
    assert s.sync_seconds > 0
    assert 0 <= s.wait_seconds <= s.sync_seconds  # one island: nothing to wait for
    assert isinstance(s, diloco.SyncStats) and "outer_steps=2" in repr(s)
    assert s._asdict()["inner_steps"] == 5 and "wait_seconds" in s._asdict()
    assert (outer.inner_steps, outer.outer_lr, outer.outer_momentum, outer.nesterov) == (
        2, 0.5, 0.0, False)
    assert outer.outer_device == "cpu" and outer.compression == "none"
    assert outer.group is solo_group
    comm = solo_group.stats()
    assert isinstance(comm, diloco.CommStats)
    assert comm.ops["allreduce:outer_sync"].calls == 2
    assert "DiLoCo(" in repr(outer)


def test_data_parallel_sync_gradients(solo_group):
    model = tiny_model()
    dp = diloco.DataParallel(model, solo_group)
    model(torch.randn(8, 4)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    dp.sync_gradients()  # one rank: the mean is the gradient itself
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)
    assert dp.stats().inner_steps == 1
    assert dp.group is solo_group


def test_codec_registry_and_payload_bytes():
    names = diloco.codec_names()
    for name in ("fp32", "fp16", "int8", "int4", "int3", "int2", "int8_normal", "fp4", "topk", "dct",
                 "randomk", "sign"):
        assert name in names
    assert len(diloco.codec_help()) == len(names)
    x = torch.zeros(1000)
    assert diloco.payload_bytes("none", [x]) == 4000
    assert diloco.payload_bytes("fp16", [x]) == 2000
    assert diloco.payload_bytes("sign", [x]) == 4 + 125
    assert diloco.aggregation("int8") == "ring-requantized"
    assert diloco.aggregation("topk") == "gathered"
    assert diloco.aggregation("fp16+ef") == "summable"
    assert diloco.compressor_spec("int8+ef").startswith("int8(")
    # clip changes the scales, not the bytes.
    assert diloco.compressor_spec("int3(clip=2)") == "int3(block=256,rounding=nearest,seed=0,clip=2)"
    assert diloco.payload_bytes("int3(clip=2)", [x]) == diloco.payload_bytes("int3", [x])
    with pytest.raises(diloco.OptionError, match=r"clip must be 0 \(off\) or a number in \[0.5, 64\]"):
        diloco.compressor_spec("int2(clip=0.1)")
    assert diloco.collective_bytes("allreduce", 1000, 4, 0) == (1500, 1500)


def test_bad_compression_spec_lists_the_codecs(solo_group):
    model = tiny_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(diloco.OptionError) as info:
        diloco.DiLoCo(model, inner, solo_group, compression="int9")
    message = str(info.value)
    assert "int9" in message and "topk" in message and "int8" in message
    with pytest.raises(ValueError):  # OptionError is a ValueError
        diloco.compressor_spec("topk(k=banana)")


def test_bad_options_raise_option_error(solo_group):
    model = tiny_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(diloco.OptionError, match="inner_steps"):
        diloco.DiLoCo(model, inner, solo_group, inner_steps=0)
    with pytest.raises(diloco.OptionError, match="momentum"):
        diloco.DiLoCo(model, inner, solo_group, outer_momentum=1.5)
    with pytest.raises(diloco.OptionError, match="outer_device"):
        diloco.DiLoCo(model, inner, solo_group, outer_device="banana")
    with pytest.raises(diloco.OptionError, match="aggregator must be one of mean"):
        diloco.DiLoCo(model, inner, solo_group, aggregator="avg")
    with pytest.raises(diloco.OptionError, match="trim must be an integer"):
        diloco.DiLoCo(model, inner, solo_group, aggregator="trimmed_mean(trim=0)")
    with pytest.raises(diloco.OptionError, match="screen_factor"):
        diloco.DiLoCo(model, inner, solo_group, screen_factor=0.5)


def test_trust_options_are_kept(solo_group):
    model = tiny_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = diloco.DiLoCo(model, inner, solo_group, aggregator="norm_clip(k=3)", screen_factor=50,
                          compare_states=False)
    assert (outer.aggregator, outer.screen_factor, outer.compare_states) == \
        ("norm_clip(k=3)", 50.0, False)
    assert outer.refused_contributions == 0 and outer.last_screening == ""


def test_non_tensor_parameters_raise_type_error(solo_group):
    with pytest.raises(TypeError, match="parameter 'w' is a int, not a torch.Tensor"):
        diloco.DiLoCo([("w", 3)], None, solo_group)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        diloco.DiLoCo(42, None, solo_group)
    model = tiny_model()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        diloco.DiLoCo(model, "adam", solo_group)
    with pytest.raises(TypeError, match="diloco.Group"):
        diloco.DiLoCo(model, None, "gloo")
    with pytest.raises(TypeError, match="diloco.Group"):
        diloco.DataParallel(model, None)


def test_integer_parameters_raise_library_error(solo_group):
    with pytest.raises(diloco.Error, match="floating"):
        diloco.DiLoCo([("steps", torch.zeros(3, dtype=torch.long))], None, solo_group)


def test_parameter_missing_from_optimizer(solo_group):
    model = tiny_model()
    inner = torch.optim.SGD(list(model.parameters())[:-1], lr=0.1)
    with pytest.raises(diloco.Error, match=r"parameter '2.bias' is not in the inner optimizer"):
        diloco.DiLoCo(model, inner, solo_group)


def test_group_arguments():
    with pytest.raises(diloco.OptionError, match="rank"):
        diloco.init_process_group("127.0.0.1", free_port(), rank=2, world_size=2, timeout=5)
    with pytest.raises(diloco.OptionError, match="world_size"):
        diloco.init_process_group("127.0.0.1", free_port(), rank=0, world_size=0, timeout=5)
    with pytest.raises(diloco.OptionError, match="timeout"):
        diloco.init_process_group("127.0.0.1", free_port(), rank=0, world_size=1, timeout=-1)
    with pytest.raises(diloco.OptionError, match="master_port"):
        diloco.init_process_group("127.0.0.1", "http", rank=0, world_size=1)
    g = diloco.init_process_group("127.0.0.1", free_port(), rank=0, world_size=1,
                                  timeout=datetime.timedelta(seconds=7))
    assert (g.rank, g.world_size, g.timeout) == (0, 1, 7.0)


def test_init_process_group_reads_torchrun_environment(monkeypatch):
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    g = diloco.init_process_group()
    assert (g.rank, g.world_size) == (0, 1)
    monkeypatch.delenv("RANK")
    with pytest.raises(diloco.OptionError, match="RANK is not set"):
        diloco.init_process_group()


def test_port_in_use_is_reported(solo_group):
    port = free_port()
    holder = diloco.init_process_group("127.0.0.1", port, rank=0, world_size=1, timeout=5)
    assert holder.world_size == 1
    with pytest.raises(diloco.Error, match="in use"):
        diloco.init_process_group("127.0.0.1", port, rank=0, world_size=1, timeout=5)


def test_help_is_useful():
    doc = diloco.DiLoCo.__doc__
    for word in ("inner_steps", "outer_lr", "compression", "set_data", "collective"):
        assert word in doc
    for method in ("step", "sync", "stats"):
        assert getattr(diloco.DiLoCo, method).__doc__
    assert diloco.init_process_group.__doc__ and diloco.DataParallel.__doc__


def test_lost_peer_raises_peer_lost_error():
    # Two ranks as threads of this process (the rendezvous releases the GIL); rank 1 leaves by
    # destroying its group, rank 0's next collective must raise PeerLostError.
    import threading

    port = free_port()
    groups = {}

    def join(rank):
        groups[rank] = diloco.init_process_group("127.0.0.1", port, rank=rank, world_size=2,
                                                 timeout=5)

    threads = [threading.Thread(target=join, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(groups) == [0, 1]
    x = torch.ones(4)
    del groups[1]
    with pytest.raises(diloco.PeerLostError) as info:
        groups[0].allreduce_sum(x, "after_loss")
    assert "after_loss" in str(info.value) and "rank 0" in str(info.value)
    assert isinstance(info.value, diloco.Error) and isinstance(info.value, RuntimeError)


def test_group_options_mirror_the_cpp_struct(monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "DILOCO_TIMEOUT_S",
                "DILOCO_HOSTNAME", "DILOCO_LINK_MBPS", "DILOCO_LINK_LATENCY_MS",
                "TORCHELASTIC_USE_AGENT_STORE", "DILOCO_RUN_KEY", "DILOCO_RUN_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)
    defaults = diloco.GroupOptions()
    assert (defaults.master_addr, defaults.master_port, defaults.rank, defaults.world_size,
            defaults.timeout, defaults.hostname, defaults.join_existing_store) == (
        "127.0.0.1", 29500, -1, -1, 60.0, "", False)
    assert (defaults.link.mbit_per_s, defaults.link.latency_ms) == (0.0, 0.0)
    # read_env with nothing set: the same defaults, nothing validated.
    assert repr(diloco.GroupOptions.read_env()) == repr(defaults)
    with pytest.raises(diloco.OptionError, match="MASTER_ADDR"):
        diloco.GroupOptions.from_env()

    o = diloco.GroupOptions(rank=1, world_size=3, timeout=2.5,
                            link=diloco.LinkModel(mbit_per_s=100, latency_ms=20))
    assert (o.rank, o.world_size, o.timeout, o.link.mbit_per_s, o.link.latency_ms) == (
        1, 3, 2.5, 100.0, 20.0)
    o.link.latency_ms = 30  # a field of the struct, not a copy
    assert o.link.latency_ms == 30.0
    o.validate()
    with pytest.raises(TypeError, match="no field 'rnak'"):
        diloco.GroupOptions(rnak=1)
    with pytest.raises(diloco.OptionError, match="timeout"):
        o.timeout = float("nan")
    o.link.mbit_per_s = -1
    with pytest.raises(diloco.OptionError, match="mbit_per_s"):
        o.validate()

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("DILOCO_LINK_MBPS", "12.5")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "1")
    env = diloco.GroupOptions.read_env()
    assert (env.rank, env.world_size, env.link.mbit_per_s, env.join_existing_store) == (
        1, -1, 12.5, True)
    monkeypatch.setenv("DILOCO_LINK_MBPS", "fast")
    with pytest.raises(diloco.OptionError, match="DILOCO_LINK_MBPS"):
        diloco.GroupOptions.read_env()


def test_init_process_group_honours_the_link_variables(monkeypatch):
    # Two ranks as threads of this process; the link comes from the environment only.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("DILOCO_LINK_MBPS", "80")
    monkeypatch.setenv("DILOCO_LINK_LATENCY_MS", "5")
    import threading

    groups, errors = {}, {}

    def join(rank):
        try:
            groups[rank] = diloco.init_process_group(rank=rank, timeout=30)
            x = torch.ones(100_000)
            groups[rank].allreduce_sum(x, "linked")
        except Exception as e:  # reported below, with the rank
            errors[rank] = e

    threads = [threading.Thread(target=join, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and sorted(groups) == [0, 1], errors
    for rank, g in groups.items():
        assert (g.link.mbit_per_s, g.link.latency_ms) == (80.0, 5.0)
        op = g.stats().ops["allreduce:linked"]
        # comm_stats.h: bytes sent * 8 / rate + 2(N-1) latency steps for a ring all-reduce.
        expected = op.bytes_sent * 8 / 80e6 + 2 * 5e-3
        assert op.bytes_sent == diloco.collective_bytes("allreduce", 400_000, 2, rank)[0]
        assert op.link_seconds == pytest.approx(expected, rel=1e-9), (op, expected)
        assert g.stats().link_seconds == pytest.approx(expected, rel=1e-9)
        assert op.seconds >= expected * 0.99, op


def test_init_process_group_joins_the_agent_store(monkeypatch):
    # torchrun's agent serves the store on MASTER_PORT and sets TORCHELASTIC_USE_AGENT_STORE;
    # a TCPStore served by this process stands in for it.
    import torch.distributed as dist

    port = free_port()
    agent = dist.TCPStore("127.0.0.1", port, 1, True, datetime.timedelta(seconds=30))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("DILOCO_TIMEOUT_S", "10")
    # Without the variable rank 0 tries to serve a store of its own on the agent's port.
    with pytest.raises(diloco.Error, match="in use"):
        diloco.init_process_group()
    for value in ("1", "True"):
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", value)
        g = diloco.init_process_group()
        assert (g.rank, g.world_size, g.timeout) == (0, 1, 10.0)
        g.barrier("joined")
    # An explicit master_port is not the agent's store: rank 0 serves one there again.
    with pytest.raises(diloco.Error, match="in use"):
        diloco.init_process_group(master_port=port)
    assert agent.num_keys() > 1  # the groups' keys went to the agent's store


def test_buffers_option(solo_group):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = diloco.DiLoCo(model, inner, solo_group, inner_steps=2)
    assert outer.buffers == "average" and "buffers='average'" in repr(outer)
    assert sorted(outer.buffer_names()) == [
        "1.num_batches_tracked", "1.running_mean", "1.running_var"]
    for mode in ("rank0", "local"):
        assert diloco.DiLoCo(model, inner, solo_group, buffers=mode).buffers == mode
        assert diloco.DataParallel(model, solo_group, buffers=mode).buffers == mode
    assert diloco.DataParallel(model, solo_group).buffers == "average"
    with pytest.raises(diloco.OptionError, match="buffers"):
        diloco.DiLoCo(model, inner, solo_group, buffers="mean")
    with pytest.raises(TypeError, match="buffers"):
        diloco.DiLoCo(model, inner, solo_group, buffers=None)
    # A dict or pairs of tensors has no buffers.
    pairs = [("w", torch.nn.Parameter(torch.randn(3)))]
    assert diloco.DiLoCo(pairs, None, solo_group).buffer_names() == []
    # Compressing needs no outer_device: the library keeps the outer state on the CPU.
    assert diloco.DiLoCo(model, inner, solo_group, compression="int8").outer_device == "cpu"
    # agree_on: extra fields checked with the library's own (one rank: always agreed).
    diloco.DiLoCo(model, inner, solo_group, agree_on={"steps": 400})


def test_outer_state_saves_and_resumes_bit_for_bit(solo_group, tmp_path):
    """save_state/load_state: a fresh DiLoCo loaded from the file continues exactly like the run
    that saved it (global weights, momentum and error-feedback residuals all carried)."""
    def run(steps, outer):
        torch.manual_seed(5)  # the same batches for both runs
        for _ in range(steps):
            train_step(outer_model[outer], inners[outer])
            outers[outer].step()

    outer_model, inners, outers = {}, {}, {}
    for name in ("a", "b"):
        outer_model[name] = tiny_model()
        inners[name] = torch.optim.SGD(outer_model[name].parameters(), lr=0.1)
        outers[name] = diloco.DiLoCo(outer_model[name], inners[name], solo_group, inner_steps=2,
                                     outer_lr=0.8, outer_momentum=0.6, compression="int4+ef")
    path = str(tmp_path / "state.pt")
    run(6, "a")
    outers["a"].save_state(path)
    outers["b"].load_state(path)
    for x, y in zip(outers["a"].global_weights(), outers["b"].global_weights()):
        assert torch.equal(x, y)
    for x, y in zip(outer_model["a"].parameters(), outer_model["b"].parameters()):
        assert torch.equal(x, y)
    assert outers["b"].stats().outer_steps == 3
    run(4, "a")
    run(4, "b")
    for x, y in zip(outers["a"].global_weights(), outers["b"].global_weights()):
        assert torch.equal(x, y)
    # Another model's state does not fit: an OptionError naming the field.
    other = torch.nn.Linear(3, 3)
    other_outer = diloco.DiLoCo(other, torch.optim.SGD(other.parameters(), lr=0.1), solo_group,
                                inner_steps=2, compression="int4+ef")
    with pytest.raises(diloco.OptionError, match="global weights of bucket 0"):
        other_outer.load_state(path)


def test_speed_balancer_follows_its_documented_rule():
    # The rule of the docstring, computed here: f *= ((1 + m) / (1 + target_wait)) ** gain with m
    # the least wait / compute of the last `memory` windows; after `memory` windows of waiting
    # at most target_wait, f *= 1 - shrink; f within [1, max_factor].
    b = diloco.SpeedBalancer(16, max_factor=3.0)
    assert (b.base_batch, b.factor) == (16, 1.0)
    windows = [(1.0, 0.5), (1.0, 0.3), (2.0, 0.2), (1.0, 0.4), (1.0, 0.0), (1.0, 0.0),
               (1.0, 0.0), (1.0, 0.0), (1.0, 0.0)]
    f, waits = 1.0, []
    for compute, wait in windows:
        b.observe(compute, wait)
        waits = (waits + [wait / compute])[-4:]
        if len(waits) == 4 and max(waits) <= 0.002:
            f *= 1 - 0.02
        else:
            f *= ((1 + min(waits)) / 1.002) ** 0.5
        f = min(3.0, max(1.0, f))
        assert b.factor == pytest.approx(f, rel=1e-12)
    assert 1.4 < b.factor < 1.5  # grew to 1.53, then shrank twice by 2% (4 windows without waiting)
    batches = [b.next_batch() for _ in range(1000)]
    assert set(batches) <= {int(16 * b.factor), int(16 * b.factor) + 1}
    assert sum(batches) / 1000 == pytest.approx(16 * b.factor, abs=1e-3)
    with pytest.raises(diloco.OptionError, match="base_batch must be >= 1"):
        diloco.SpeedBalancer(0)
    # The documented memory for n islands: max(4, 3 (n - 1)).
    assert [diloco.SpeedBalancer.memory_for(n) for n in (1, 2, 3, 4, 8)] == [4, 4, 6, 9, 21]
    with pytest.raises(diloco.OptionError, match="islands must be >= 1"):
        diloco.SpeedBalancer.memory_for(0)
    with pytest.raises(diloco.OptionError, match=r"memory must be in \[1, 1000\]"):
        diloco.SpeedBalancer(16, memory=0)
    with pytest.raises(diloco.OptionError, match=r"max_factor must be in \[1, 1024\]"):
        diloco.SpeedBalancer(16, max_factor=0.5)
