"""The Python examples, launched as users do. examples/python/train_lm.py by torchrun (python3 -m
torch.distributed.run) and by diloco-run next to the C++ example (a Python island and a C++
island in one run); a small text file stands in for the Brown corpus to keep it quick.
examples/python/fashion_mnist.py on 2 islands for a few steps: both ranks end with the same
parameters and BatchNorm buffers (the same hash)."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_port, launch

EXAMPLE = str(REPO / "examples" / "python" / "train_lm.py")
FASHION = str(REPO / "examples" / "python" / "fashion_mnist.py")
FASHION_DATA = "/usr/share/datasets/fashion-mnist"
FLAGS = ["--steps", "6", "--inner-steps", "3", "--eval-batches", "2", "--d-model", "16",
         "--heads", "2", "--layers", "1", "--seq-len", "16", "--batch-size", "4", "--warmup", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return str(path)


def run(command, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def test_example_under_torchrun(corpus):
    # --redirects 1 --tee 1: Debian's torch 1.13 torchrun fails to parse its default "0" under
    # Python 3.11 (IntFlag iteration skips the zero member).
    out = run([sys.executable, "-m", "torch.distributed.run", "--redirects", "1", "--tee", "1",
               "--nproc_per_node", "2", "--master_port", str(free_port()), EXAMPLE,
               "--data", corpus] + FLAGS)
    assert "summary: diloco, 2 islands x 6 steps (2 outer steps, H = 3)" in out, out
    start, end = map(float, re.search(r"validation loss +([\d.]+) at the start -> ([\d.]+)",
                                      out).groups())
    assert end < start


def test_example_replicated_warm_start(corpus):
    # The first 3 of 6 steps on rank 0's batches on both islands, then DiLoCo (H = 3): its start
    # finds both islands holding rank 0's weights to the bit, and one outer step follows.
    out = run([sys.executable, "-m", "torch.distributed.run", "--redirects", "1", "--tee", "1",
               "--nproc_per_node", "2", "--master_port", str(free_port()), EXAMPLE,
               "--data", corpus, "--warm-start-steps", "3", "--warm-start", "replicated"] + FLAGS)
    assert out.count("replicated warm start of 3 steps: this island's weights equal rank 0's") \
        == 2, out
    assert "summary: diloco, 2 islands x 6 steps (1 outer steps, H = 3)" in out, out



def test_example_fills_waits_on_a_slow_link(corpus):
    # Streaming with overlap (P = 1, tau = 2) on an emulated 1 Mbit/s link: each exchange takes
    # longer than the 2 steps it overlaps, so with --fill-waits both islands add batches to the
    # due steps instead of waiting, and still end on the same global weights.
    env_link = dict(os.environ, OMP_NUM_THREADS="1", DILOCO_LINK_MBPS="1",
                    DILOCO_LINK_LATENCY_MS="20")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--redirects", "1", "--tee", "1",
         "--nproc_per_node", "2", "--master_port", str(free_port()), EXAMPLE, "--data", corpus,
         "--overlap-steps", "2", "--fill-waits", "--fill-max-batches", "3"] + FLAGS,
        env=env_link, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    filled = re.findall(r"rank (\d)/2: filled waits: (\d+) batches added \(([\d.]+) s\), "
                        r"([\d.]+) sequences a step", out)
    assert sorted(f[0] for f in filled) == ["0", "1"], out
    for rank, added, seconds, per_step in filled:
        # One due step in training (after step 5; the exchange started after step 6 is applied
        # by the end-of-run sync), at most 3 batches of 4 sequences added to it.
        assert 1 <= int(added) <= 3, out
        assert float(per_step) == pytest.approx(4 + 4 * int(added) / 6, abs=0.006), out  # %.2f
    hashes = set(re.findall(r"global state sha256 ([0-9a-f]+)", out))
    assert len(hashes) == 1, out


def test_example_refuses_warm_start_flags_it_would_ignore(train_lm_flags):
    train_lm, error = train_lm_flags
    assert "--warm-start-steps is for --mode diloco (a warm start is where DiLoCo starts), " \
        "not --mode dp" in error("--mode", "dp", "--warm-start-steps", "5")
    assert "not --mode single" in error("--mode", "single", "--warm-start-steps", "5")
    assert "--warm-start needs --warm-start-steps N (N >= 1)" in error("--warm-start",
                                                                        "replicated")
    assert "--exchange-log must hold {island}: every island writes its own file" in error(
        "--exchange-log", "x.jsonl")
    assert "--exchange-log logs DiLoCo's exchanges (--mode diloco)" in error(
        "--mode", "dp", "--exchange-log", "x.{island}.jsonl")
    assert "--fill-waits fills the overlap of streaming DiLoCo" in error("--fill-waits")
    assert "--fill-waits fills the overlap of streaming DiLoCo" in error(
        "--mode", "dp", "--overlap-steps", "1", "--fill-waits")
    assert "--fill-waits does not combine with --audit-rate" in error(
        "--overlap-steps", "1", "--fill-waits", "--audit-rate", "0.5")
    assert "--fill-max-batches needs --fill-waits" in error("--fill-max-batches", "2")
    assert "--fill-max-batches must be in [1, 1024], got 0" in error(
        "--overlap-steps", "1", "--fill-waits", "--fill-max-batches", "0")
    assert train_lm.parse_flags(["--warm-start-steps", "5"]).warm_start == "dp"
    assert train_lm.parse_flags(["--warm-start-steps", "5", "--warm-start",
                                 "replicated"]).warm_start == "replicated"


def test_example_audits_its_islands(corpus):
    # 3 islands, audit rate 1: every island's round replayed by another at both outer steps,
    # bit for bit (Muon and AdamW inner optimizers), nobody excluded.
    out = run([sys.executable, "-m", "torch.distributed.run", "--redirects", "1", "--tee", "1",
               "--nproc_per_node", "3", "--master_port", str(free_port()), EXAMPLE,
               "--data", corpus, "--audit-rate", "1"] + FLAGS)
    audits = re.findall(r"rank (\d)/3: audits (\d+), failed (\d+) \| replayed (\d+) inner steps"
                        r".*\| excluded: (\w+)", out)
    assert sorted(a[0] for a in audits) == ["0", "1", "2"], out
    assert all(a[1:3] == ("6", "0") and a[4] == "none" for a in audits), out
    assert sum(int(a[3]) for a in audits) == 3 * 2 * 3, out  # 6 rounds of 3 steps replayed


def test_python_and_cpp_examples_train_together(corpus, tmp_path):
    launcher = os.environ.get("DILOCO_RUN")
    cpp_example = os.environ.get("DILOCO_TRAIN_LM")
    if cpp_example == "":  # ctest's value when the build has no examples
        pytest.skip("the C++ example is not built (DILOCO_BUILD_EXAMPLES=OFF)")
    if not launcher or not cpp_example:
        pytest.fail("DILOCO_RUN and DILOCO_TRAIN_LM must name diloco-run and the C++ train_lm "
                    "(ctest sets them)")
    # 7 steps, H = 3, evaluations every 6: outer steps at 3 and 6, an evaluation after the one at
    # 6, and a final sync at 7, which both examples must agree on (it is a collective). --clip is
    # one of the fields the islands compare: both examples must spell 0.3 the same.
    seven = ["7" if i > 0 and FLAGS[i - 1] == "--steps" else v for i, v in enumerate(FLAGS)]
    # Both examples log their exchanges (--exchange-log) in one format, replacing every {island}.
    log = str(tmp_path / "exchanges-{island}.{island}.jsonl")
    flags = " ".join(["--data", corpus] + seven + ["--eval-every", "6", "--clip", "0.3",
                                                   "--exchange-log", "'%s'" % log])
    script = ('if [ "$RANK" = 0 ]; then exec %s %s %s; else exec %s %s; fi'
              % (sys.executable, EXAMPLE, flags, cpp_example, flags))
    out = run([launcher, "-n", "2", "--", "bash", "-c", script])
    assert "train_lm.py: mode diloco, 2 islands" in out, out  # rank 0 is the Python example
    assert "(3 outer steps, H = 3)" in out, out
    assert "clip 0.3" in out, out
    done = re.findall(r"rank (\d)/2: done, 7 steps .*\| sent ([\d.]+ \w?B) \| received "
                      r"([\d.]+ \w?B)", out)
    assert sorted(d[0] for d in done) == ["0", "1"], out
    by_rank = {d[0]: d for d in done}
    # What the Python rank sent, the C++ rank received, and the other way round.
    assert by_rank["0"][1] == by_rank["1"][2] and by_rank["0"][2] == by_rank["1"][1], out
    # The same exchanges in the same format from both: outer steps 1 and 2 after steps 3 and 6,
    # then the end-of-run fold-in after step 7; times in order on the steady clock.
    records = [[json.loads(line) for line in open(log.replace("{island}", str(r)))]
               for r in range(2)]
    keys = ["outer_step", "fragment", "inner_step", "started", "due", "done", "end_of_run"]
    for r in range(2):
        assert all(list(e) == keys for e in records[r]), records[r]
        assert [(e["outer_step"], e["fragment"], e["inner_step"], e["end_of_run"])
                for e in records[r]] == [(1, 0, 3, False), (2, 0, 6, False), (3, 0, 7, True)], \
            records[r]
        assert all(e["started"] <= e["due"] <= e["done"] for e in records[r]), records[r]
    # One machine's steady clock: each exchange completes on both islands after both started it.
    for a, b in zip(*records):
        assert min(a["done"], b["done"]) >= max(a["started"], b["started"]), (a, b)


def test_fashion_mnist_islands_end_with_the_same_model(tmp_path):
    if not os.path.exists(os.path.join(FASHION_DATA, "t10k-labels-idx1-ubyte.gz")):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    flags = ["--steps", "8", "--inner-steps", "3", "--batch-size", "32", "--test-limit", "500",
             "--eval-every", "6"]
    start = time.monotonic()
    results = launch([[sys.executable, FASHION] + flags] * 2, tmp_path, timeout=120)
    seconds = time.monotonic() - start
    hashes = {}
    for rank, (code, out) in enumerate(results):
        assert code == 0, out[-4000:]
        found = re.search(r"rank %d/2: test accuracy ([\d.]+) \| sha256 ([0-9a-f]{64}) \| sent"
                          % rank, out)
        assert found, out[-4000:]
        hashes[rank] = found.group(2)
    leader = results[0][1]
    # Outer steps at 3 and 6, a final sync at 8; an evaluation after the one at 6.
    assert "buffers (average at every outer step)" in leader, leader
    assert "1.running_mean" in leader, leader
    steps = re.findall(r"step (\d)/8 \| outer (\d) \| loss [\d.]+ \| sent [\d.]+ .B", leader)
    assert steps == [("3", "1"), ("6", "2"), ("8", "3")], leader
    assert re.search(r"step 6/8 .* \| test accuracy [\d.]+\n", leader), leader
    print("2 islands in %.1f s, hashes %s" % (seconds, hashes))
    assert hashes[0] == hashes[1], "the islands ended with different models"
    assert seconds < 60
