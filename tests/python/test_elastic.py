"""Elastic runs from Python: diloco.Membership / diloco.join_elastic and DiLoCo over a membership.

- join_elastic() outside a launcher, or with nobody serving the store, fails at once with a clear
  error; bad options raise diloco.OptionError naming the option (or the variable);
- in one process (islands are threads, the store is a torch TCPStore this test serves): an island
  starts a run alone, a second one joins it mid-run (its DiLoCo constructor waits, with the GIL
  released, until it is admitted at an outer-step boundary), and both end bit-identical; the
  membership's group is one diloco.Group object throughout, the same as the DiLoCo's;
- examples/python/train_lm.py under `diloco-run -n 3 --elastic`: one island is killed (-9) at a
  random moment after outer step 2, the launcher reports it (137), the two survivors form a new
  epoch and end on the same global state. The C++ example's own fault tests (restart, SIGSTOP,
  joiners, min_islands) are tests/examples/elastic_test.sh.
"""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import diloco
from conftest import REPO, free_port

EXAMPLE = str(REPO / "examples" / "python" / "train_lm.py")
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "DILOCO_MIN_ISLANDS",
                      "DILOCO_HEARTBEAT_TIMEOUT_S", "DILOCO_TIMEOUT_S",
                      "DILOCO_RENDEZVOUS_TIMEOUT_S", "DILOCO_HOSTNAME", "DILOCO_LINK_MBPS",
                      "DILOCO_LINK_LATENCY_MS", "DILOCO_ELASTIC", "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_errors_are_diloco_errors():
    for error in (diloco.RemovedError, diloco.TooFewIslandsError):
        assert issubclass(error, diloco.Error) and not issubclass(error, diloco.PeerLostError)
        assert error.__module__ == "diloco" and error.__doc__
        assert error.__name__ in diloco.__all__


def test_join_elastic_outside_a_launcher_names_the_variable(no_launcher):
    start = time.monotonic()
    with pytest.raises(diloco.OptionError, match=r"slot not given and RANK is not set.*"
                                                 r"diloco-run --elastic"):
        diloco.join_elastic()
    no_launcher.setenv("RANK", "0")
    with pytest.raises(diloco.OptionError, match="world_size not given and WORLD_SIZE"):
        diloco.join_elastic()
    assert time.monotonic() - start < 1.0


def test_join_elastic_without_a_coordinator_fails_within_its_timeout(no_launcher):
    port = free_port()  # nobody listens there
    no_launcher.setenv("MASTER_ADDR", "127.0.0.1")
    no_launcher.setenv("MASTER_PORT", str(port))
    no_launcher.setenv("RANK", "0")
    no_launcher.setenv("WORLD_SIZE", "2")
    start = time.monotonic()
    with pytest.raises(diloco.Error, match=r"slot 0: no coordinator answered at 127\.0\.0\.1:%d "
                                           r"\(start diloco-coordinator, or launch with "
                                           r"diloco-run --elastic\)" % port):
        diloco.join_elastic(timeout=2, heartbeat_timeout=1)
    took = time.monotonic() - start
    print("no coordinator: failed after %.2f s (timeout 2 s)" % took)
    assert took < 10


def test_bad_options_raise_option_error_naming_the_option(no_launcher):
    port = free_port()
    common = {"store_port": port, "slot": 0, "world_size": 2}
    for kwargs, named in (
            ({"min_islands": 3}, r"min_islands must be in \[1, world_size = 2\], got 3"),
            ({"heartbeat_timeout": -1}, "heartbeat_timeout must be a positive number of seconds"),
            ({"heartbeat_timeout": 5, "timeout": 4},
             "timeout .the collective timeout. must be above heartbeat_timeout"),
            ({"timeout": 30, "rendezvous_timeout": 20}, "rendezvous_timeout must be >= timeout"),
            ({"heartbeat_timeout": 1, "heartbeat_interval": 0.9},
             r"heartbeat_timeout must be >= 2 x heartbeat_interval"),
            ({"store_port": 70000}, r"store_port \(MASTER_PORT\) must be in \[1, 65535\]"),
            ({"slot": "two"}, r"\[join_elastic\] slot must be an integer, got 'two'"),
            ({"link_mbps": -5}, "mbit_per_s"),
            ({"timeout": "soon"}, r"\[join_elastic\] timeout must be seconds")):
        with pytest.raises(diloco.OptionError, match=named):
            diloco.join_elastic(**dict(common, **kwargs))
    # The keyword form of Membership.join validates the same way.
    with pytest.raises(diloco.OptionError, match=r"slot \(RANK\) must be >= 0"):
        diloco.Membership.join(store_port=port, world_size=2)
    # A malformed variable is named with its value.
    no_launcher.setenv("DILOCO_MIN_ISLANDS", "many")
    with pytest.raises(diloco.OptionError, match="DILOCO_MIN_ISLANDS='many' must be an integer"):
        diloco.join_elastic(**common)
    no_launcher.delenv("DILOCO_MIN_ISLANDS")
    no_launcher.setenv("DILOCO_HEARTBEAT_TIMEOUT_S", "0")
    with pytest.raises(diloco.OptionError, match="DILOCO_HEARTBEAT_TIMEOUT_S='0'"):
        diloco.ElasticOptions.read_env()
    with pytest.raises(TypeError, match="ElasticOptions has no field 'heartbeat'"):
        diloco.ElasticOptions(heartbeat=3)


def test_elastic_options_read_the_launchers_environment(no_launcher):
    defaults = diloco.ElasticOptions()
    assert (defaults.store_addr, defaults.store_port, defaults.slot, defaults.world_size,
            defaults.min_islands) == ("127.0.0.1", 29500, -1, -1, 1)
    assert (defaults.heartbeat_interval, defaults.heartbeat_timeout, defaults.timeout,
            defaults.rendezvous_timeout) == (1.0, 10.0, 60.0, 600.0)
    for name, value in (("MASTER_ADDR", "10.1.2.3"), ("MASTER_PORT", "4567"), ("RANK", "3"),
                        ("WORLD_SIZE", "4"), ("DILOCO_MIN_ISLANDS", "2"),
                        ("DILOCO_HEARTBEAT_TIMEOUT_S", "3"), ("DILOCO_TIMEOUT_S", "20"),
                        ("DILOCO_RENDEZVOUS_TIMEOUT_S", "90"), ("DILOCO_LINK_MBPS", "100")):
        no_launcher.setenv(name, value)
    o = diloco.ElasticOptions.read_env()
    assert (o.store_addr, o.store_port, o.slot, o.world_size, o.min_islands) == (
        "10.1.2.3", 4567, 3, 4, 2)
    assert (o.heartbeat_interval, o.heartbeat_timeout, o.timeout, o.rendezvous_timeout) == (
        0.6, 3.0, 20.0, 90.0)
    assert o.link.mbit_per_s == 100.0
    o.validate()
    assert repr(diloco.ElasticOptions.from_env()) == repr(o)


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def train_steps(model, inner, outer, first, last, slot):
    """Inner steps first..last-1 on batches fixed by (slot, step); returns the outer steps seen."""
    outer_steps = 0
    for step in range(first, last):
        g = torch.Generator().manual_seed(1000 * slot + step)
        x = torch.randn(8, 4, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        inner.zero_grad()
        loss.backward()
        inner.step()
        outer_steps += bool(outer.step())
    return outer_steps


def test_in_process_run_an_island_joins_mid_run_and_ends_identical(no_launcher):
    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, None, True,
                                       timeout=torch.distributed.constants.default_pg_timeout,
                                       wait_for_workers=False)
    fast = dict(store_port=port, world_size=1, hostname="127.0.0.1", heartbeat_timeout=0.5,
                heartbeat_interval=0.05, timeout=5, rendezvous_timeout=30)
    H, total = 3, 12

    first = diloco.join_elastic(slot=0, **fast)
    assert (first.island, first.joining, first.epoch, first.members, first.epochs_joined) == (
        "0.0", False, 0, ["0.0"], 1)
    group = first.group
    assert isinstance(group, diloco.Group) and first.group is group
    assert (group.rank, group.world_size) == (0, 1)
    assert first.options.heartbeat_timeout == 0.5 and first.options.slot == 0
    assert "island='0.0'" in repr(first)

    model = tiny_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    outer = diloco.DiLoCo(model, inner, first, inner_steps=H, outer_lr=0.7, outer_momentum=0.9)
    assert outer.elastic and outer.membership is first
    assert outer.group is group and first.group is group

    # Slot 1 of a run of 1 joins: it registers at once, and its DiLoCo waits to be admitted.
    second = diloco.join_elastic(slot=1, **fast)
    assert (second.island, second.joining, second.epoch) == ("1.0", True, -1)
    joiner = {}

    def join_and_train():
        try:
            model2 = tiny_model()
            torch.nn.init.zeros_(model2[0].weight)  # replaced by the run's state on admission
            inner2 = torch.optim.SGD(model2.parameters(), lr=0.05)
            outer2 = diloco.DiLoCo(model2, inner2, second, inner_steps=H, outer_lr=0.7,
                                   outer_momentum=0.9)
            joiner["joined_at"] = outer2.stats().inner_steps
            joiner["outer_steps"] = train_steps(model2, inner2, outer2, joiner["joined_at"],
                                                total, 1)
            joiner["sha"] = outer2.state_sha256()
            joiner["world"] = outer2.group.world_size
            joiner["group_is_membership_group"] = outer2.group is second.group
            second.leave()
        except Exception as e:  # reported by the main thread
            joiner["error"] = repr(e)

    # The first island trains one outer step, lets the joiner start and waits until it waits to
    # be admitted, and trains on: it is admitted at the next boundary (outer step 2) and takes
    # part from the one after.
    assert train_steps(model, inner, outer, 0, H, 0) == 1
    thread = threading.Thread(target=join_and_train)
    thread.start()
    deadline = time.monotonic() + 30
    while store.add("diloco-elastic/join/count", 0) < 1:
        assert time.monotonic() < deadline, "the joiner never asked to be admitted"
        time.sleep(0.01)
    train_steps(model, inner, outer, H, total, 0)
    sha = outer.state_sha256()
    first.leave()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the joiner did not finish"
    assert "error" not in joiner, joiner.get("error")
    assert joiner["joined_at"] == 2 * H, joiner  # admitted at the second outer step's boundary
    assert joiner["outer_steps"] == (total - 2 * H) // H
    assert (second.joining, second.members, second.epochs_joined) == (False, ["0.0", "1.0"], 1)
    assert first.members == ["0.0", "1.0"] and first.epochs_joined == 2
    assert outer.group.world_size == 2 and joiner["world"] == 2
    assert joiner["group_is_membership_group"]
    assert joiner["sha"] == sha
    assert outer.stats().outer_steps == total // H


def test_train_lm_elastic_flags_are_validated(train_lm_flags, no_launcher):
    train_lm, error = train_lm_flags
    assert "--elastic is for --mode diloco" in error("--mode", "dp", "--min-islands", "2")
    assert "--elastic runs plain DiLoCo: no --warm-start-steps, --fragments" in error(
        "--elastic", "--fragments", "2")
    assert "--elastic does not take --checkpoint-dir" in error("--elastic", "--checkpoint-dir",
                                                               "x")
    assert "--heartbeat-timeout-s must be below --timeout-s (20)" in error(
        "--elastic", "--heartbeat-timeout-s", "20", "--timeout-s", "20")
    assert "--min-islands must be in [1, WORLD_SIZE]" in error("--min-islands", "0")
    assert not train_lm.parse_flags([]).elastic
    assert train_lm.parse_flags(["--min-islands", "2"]).elastic
    no_launcher.setenv("DILOCO_ELASTIC", "1")  # diloco-run --elastic sets it
    assert train_lm.parse_flags([]).elastic
    assert "--elastic is for --mode diloco" in error("--mode", "single")
    # No launcher: the coordinator's address is missing, named, with how to launch.
    f = train_lm.parse_flags([])
    with pytest.raises(SystemExit, match=r"environment variable MASTER_ADDR is not set\n"
                                         r"--elastic needs a coordinator: launch under "
                                         r"diloco-run --elastic"):
        train_lm.make_membership(f)


def find_island(marker, slot):
    """The pid of the train_lm.py process of `slot` (its RANK) in the run whose command line
    holds `marker`, or None."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmdline = f.read()
            with open("/proc/%s/environ" % pid, "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if (marker.encode() in cmdline and b"train_lm.py" in cmdline
                and ("RANK=%d" % slot).encode() in environ):
            return int(pid)
    return None


def test_example_survives_an_island_killed_at_a_random_moment(tmp_path):
    launcher = os.environ.get("DILOCO_RUN")
    if not launcher:
        pytest.fail("DILOCO_RUN must name diloco-run (ctest sets it)")
    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    log_path = tmp_path / "run.txt"
    flags = ["--data", str(corpus), "--steps", "300", "--inner-steps", "10", "--d-model", "16",
             "--heads", "2", "--layers", "1", "--seq-len", "16", "--batch-size", "4",
             "--warmup", "5", "--eval-batches", "1", "--min-islands", "2",
             "--heartbeat-timeout-s", "3", "--timeout-s", "30"]
    victim = random.randrange(3)
    start = time.monotonic()
    with open(log_path, "w+") as log:
        run = subprocess.Popen(
            [launcher, "-n", "3", "--elastic", "--timeout", "150", "--", sys.executable,
             EXAMPLE] + flags, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not re.search(r"step \d+/300 outer 2 ", log_path.read_text()):
                assert run.poll() is None, "the run ended early:\n" + log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(0.05)
            # A random moment of the next few outer steps: during an exchange or between them
            # (the run has some 280 steps left, 1.5 s or more).
            time.sleep(random.random() * 0.5)
            pid = find_island(str(corpus), victim)
            assert pid, "island %d not found:\n%s" % (victim, log_path.read_text()[-4000:])
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic() - start
            code = run.wait(timeout=150)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        out = log_path.read_text()
    print("island %d killed %.1f s into the run; the run took %.1f s"
          % (victim, killed_at, time.monotonic() - start))
    assert code == 137, "diloco-run should report the killed island (137), got %s:\n%s" % (
        code, out[-4000:])
    formed = re.search(r"\[elastic\] island \S+: epoch (\d+) formed .*", out)
    assert formed and int(formed.group(1)) >= 1, out[-4000:]
    print(formed.group(0))
    hashes = re.findall(r"rank (\d)/(\d): global state sha256 ([0-9a-f]{64})", out)
    assert sorted((r, n) for r, n, _ in hashes) == [("0", "2"), ("1", "2")], out[-4000:]
    assert len({h for _, _, h in hashes}) == 1, "the survivors disagree:\n" + out[-4000:]
    assert re.search(r"step \d+/300 outer \d+ \| 2 islands \(epoch \d+\)", out), out[-4000:]
    assert "the run ends with 2 islands" in out, out[-4000:]


def test_keyed_elastic_run_refuses_processes_without_its_key(no_launcher, tmp_path):
    """A run key in an elastic run (ElasticOptions.run_key, join_elastic(run_key=...)): the
    islands holding it run; a process with none, or another, fails on its own naming why."""
    key = "python elastic run key, 16+ bytes"
    o = diloco.ElasticOptions(run_key=key)
    assert key not in repr(o) and "run_key='<hidden>'" in repr(o)
    no_launcher.setenv("DILOCO_RUN_KEY", key)
    assert diloco.ElasticOptions.read_env().run_key == key
    no_launcher.delenv("DILOCO_RUN_KEY")
    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, None, True,
                                       timeout=torch.distributed.constants.default_pg_timeout,
                                       wait_for_workers=False)
    fast = dict(store_port=port, world_size=1, hostname="127.0.0.1", heartbeat_timeout=0.5,
                heartbeat_interval=0.05, timeout=5, rendezvous_timeout=30)
    with pytest.raises(diloco.OptionError, match=r"run_key \(DILOCO_RUN_KEY\) must be at least 16"):
        diloco.join_elastic(slot=0, run_key="short", **fast)
    key_file = tmp_path / "run.key"
    key_file.write_text(key + "\n")
    member = diloco.join_elastic(slot=0, run_key_file=key_file, **fast)
    members = store.get("diloco-elastic/e/0/members")
    assert members[:3] == b"0.0" and len(members) == 3 + 32  # MACed
    with pytest.raises(diloco.Error, match="requires a run key and this process has none"):
        diloco.join_elastic(slot=1, **fast)
    with pytest.raises(diloco.Error, match="run key does not match the run's"):
        diloco.join_elastic(slot=1, run_key="another key, 16+ bytes", **fast)
    assert member.members == ["0.0"]
    member.leave()
    del store
