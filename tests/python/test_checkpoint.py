"""Checkpoints from Python: DiLoCo.state_dict()/load_state_dict() continue bit-identically, and
examples/python/train_lm.py --checkpoint-dir/--resume survives a kill -9 of every island and a
corrupted checkpoint, ending on the same global state (its last 'global state sha256' line) as
an uninterrupted run."""

import io
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import diloco
from conftest import REPO, free_port, launch

EXAMPLE = str(REPO / "examples" / "python" / "train_lm.py")
# 24 steps, H = 2: 12 outer steps. int8 with error feedback, so that the exchange's residuals are
# part of what a resume must restore; Muon and AdamW (the default) as inner optimizers.
FLAGS = ["--steps", "24", "--inner-steps", "2", "--eval-batches", "1", "--d-model", "16",
         "--heads", "2", "--layers", "1", "--seq-len", "16", "--batch-size", "4", "--warmup", "2",
         "--compress", "int8+ef"]
SHA = re.compile(r"rank (\d)/2: global state sha256 ([0-9a-f]{64})")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return str(path)


def make_run(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, inner


def train(model, inner, outer, steps, first):
    """`steps` inner steps on batches fixed by the step index (a resumed run sees the same)."""
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        inner.step()
        inner.zero_grad()
        outer.step()


def test_state_dict_round_trip_continues_bit_identically(solo_group):
    options = dict(inner_steps=3, outer_lr=0.7, outer_momentum=0.9, compression="int8+ef")
    model, inner = make_run()
    outer = diloco.DiLoCo(model, inner, solo_group, **options)
    train(model, inner, outer, 6, 0)  # 2 outer steps: a state between exchanges

    state = outer.state_dict()
    assert isinstance(state["outer_state"], bytes) and state["outer_state"]
    assert (state["inner_steps"], state["outer_steps"]) == (6, 2)
    # It travels through torch.save like any state_dict, beside the model's and optimizer's.
    buffer = io.BytesIO()
    torch.save({"diloco": state, "model": model.state_dict(), "inner": inner.state_dict()},
               buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()))
    sha_at_save = outer.state_sha256()

    train(model, inner, outer, 9, 6)  # the uninterrupted run: 3 more outer steps
    expected = [w.clone() for w in outer.global_weights()]
    expected_sha = outer.state_sha256()
    assert expected_sha != sha_at_save

    # A fresh island (other initial weights) restored from the saved dicts.
    model2, inner2 = make_run(seed=1)
    outer2 = diloco.DiLoCo(model2, inner2, solo_group, **options)
    outer2.load_state_dict(saved["diloco"])
    assert (outer2.stats().inner_steps, outer2.stats().outer_steps) == (6, 2)
    assert outer2.state_sha256() == sha_at_save
    # load_state_dict set the model to the global weights; the island's own come after it.
    model2.load_state_dict(saved["model"])
    inner2.load_state_dict(saved["inner"])
    train(model2, inner2, outer2, 9, 6)
    for got, want in zip(outer2.global_weights(), expected):
        assert torch.equal(got, want)
    assert outer2.state_sha256() == expected_sha
    # The outer state as a uint8 tensor is accepted too.
    as_tensor = dict(state, outer_state=torch.frombuffer(bytearray(state["outer_state"]),
                                                         dtype=torch.uint8))
    outer2.load_state_dict(as_tensor)
    assert outer2.state_sha256() == sha_at_save


def test_load_state_dict_rejects_what_is_not_a_state(solo_group):
    model, inner = make_run()
    outer = diloco.DiLoCo(model, inner, solo_group, inner_steps=2)
    with pytest.raises(TypeError, match="state_dict"):
        outer.load_state_dict({"model": 1})
    with pytest.raises(ValueError, match="format"):
        outer.load_state_dict(dict(outer.state_dict(), format=99))
    with pytest.raises(diloco.Error):
        outer.load_state_dict(dict(outer.state_dict(), outer_state=b"not an archive"))


def shas(output):
    return dict(SHA.findall(output))


def test_train_lm_resumes_bit_exactly_after_kill_and_corruption(corpus, tmp_path):
    start = time.monotonic()
    flags = ["--data", corpus] + FLAGS
    command = [sys.executable, EXAMPLE] + flags

    # 1. Uninterrupted, no checkpoints.
    (tmp_path / "plain").mkdir()
    results = launch([command] * 2, tmp_path / "plain", timeout=120)
    for code, out in results:
        assert code == 0, out[-4000:]
    plain = shas(results[0][1] + results[1][1])
    assert set(plain) == {"0", "1"} and plain["0"] == plain["1"], results[0][1][-3000:]

    # 2. With checkpoints, over a slow emulated link (so the run is still going when killed):
    # kill -9 both islands once each holds at least 2 checkpoints.
    ckpt = tmp_path / "ckpt"
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE="2", OMP_NUM_THREADS="1", DILOCO_LINK_LATENCY_MS="150")
        logs.append(open(tmp_path / ("killed%d.log" % rank), "w+"))
        procs.append(subprocess.Popen(command + ["--checkpoint-dir", str(ckpt)], env=env,
                                      stdout=logs[-1], stderr=subprocess.STDOUT, cwd=str(REPO)))

    def written(rank):
        folder = ckpt / ("rank-%d" % rank)
        if not folder.is_dir():
            return []
        return sorted(p for p in os.listdir(folder) if re.match(r"^ckpt-\d{8}\.pt$", p))

    deadline = time.monotonic() + 90
    while not all(len(written(r)) >= 2 for r in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            "no 2 checkpoints per rank in time: " + repr([written(r) for r in range(2)])
        time.sleep(0.02)
    for proc in procs:
        proc.kill()  # SIGKILL
    for proc, log in zip(procs, logs):
        proc.wait()
        log.seek(0)
        assert "global state sha256" not in log.read(), "the run ended before it was killed"
        log.close()

    # 3. Corrupt rank 0's newest checkpoint (one byte in the middle), then resume.
    newest = ckpt / "rank-0" / written(0)[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    (tmp_path / "resumed").mkdir()
    results = launch([command + ["--checkpoint-dir", str(ckpt), "--resume"]] * 2,
                     tmp_path / "resumed", timeout=120)
    for code, out in results:
        assert code == 0, out[-4000:]
    out0, out1 = results[0][1], results[1][1]
    assert "rank 0: skipping a checkpoint: '%s': checksum mismatch" % newest in out0, out0[-3000:]
    skipped = int(re.search(r"ckpt-(\d{8})\.pt", newest.name).group(1))
    for rank, out in enumerate((out0, out1)):
        found = re.search(r"rank %d/2: resumed from \S+ckpt-(\d{8})\.pt \(outer step (\d+), "
                          r"inner step (\d+)\)" % rank, out)
        assert found, out[-3000:]
        assert int(found.group(2)) < skipped and 0 < int(found.group(3)) < 24
    resumed = shas(out0 + out1)
    assert resumed == plain, (resumed, plain)
    # The newest --keep-checkpoints (3) kept, no temporary file left behind.
    assert len(os.listdir(ckpt / "rank-1")) == 3
    print("kill -9 + corrupted checkpoint + resume: %.1f s" % (time.monotonic() - start))


def test_train_lm_checkpoint_flags_are_validated(train_lm_flags):
    train_lm, error = train_lm_flags
    assert "--checkpoint-dir: checkpoints are of DiLoCo runs" in error(
        "--mode", "single", "--checkpoint-dir", "x")
    assert "--resume needs --checkpoint-dir" in error("--resume")
    assert "--checkpoint-every must be >= 1" in error("--checkpoint-dir", "x",
                                                      "--checkpoint-every", "0")
    assert "--keep-checkpoints must be >= 1" in error("--checkpoint-dir", "x",
                                                      "--keep-checkpoints", "0")
    f = train_lm.parse_flags(["--checkpoint-dir", "x", "--resume"])
    assert (f.checkpoint_every, f.keep_checkpoints) == (1, 3)
