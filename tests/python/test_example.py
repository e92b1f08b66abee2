"""The example examples/python/train_lm.py, launched as users do: by torchrun (python3 -m
torch.distributed.run) and by diloco-run next to the C++ example (a Python island and a C++
island in one run). A small text file stands in for the Brown corpus to keep it quick."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, free_port

EXAMPLE = str(REPO / "examples" / "python" / "train_lm.py")
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


def test_python_and_cpp_examples_train_together(corpus):
    launcher = os.environ.get("DILOCO_RUN")
    cpp_example = os.environ.get("DILOCO_TRAIN_LM")
    if cpp_example == "":  # ctest's value when the build has no examples
        pytest.skip("the C++ example is not built (DILOCO_BUILD_EXAMPLES=OFF)")
    if not launcher or not cpp_example:
        pytest.fail("DILOCO_RUN and DILOCO_TRAIN_LM must name diloco-run and the C++ train_lm "
                    "(ctest sets them)")
    # 7 steps, H = 3, evaluations every 6: outer steps at 3 and 6, an evaluation after the one at
    # 6, and a final sync at 7, which both examples must agree on (it is a collective).
    seven = ["7" if i > 0 and FLAGS[i - 1] == "--steps" else v for i, v in enumerate(FLAGS)]
    flags = " ".join(["--data", corpus] + seven + ["--eval-every", "6"])
    script = ('if [ "$RANK" = 0 ]; then exec %s %s %s; else exec %s %s; fi'
              % (sys.executable, EXAMPLE, flags, cpp_example, flags))
    out = run([launcher, "-n", "2", "--", "bash", "-c", script])
    assert "train_lm.py: mode diloco, 2 islands" in out, out  # rank 0 is the Python example
    assert "(3 outer steps, H = 3)" in out, out
    done = re.findall(r"rank (\d)/2: done, 7 steps .*\| sent ([\d.]+ \w?B) \| received "
                      r"([\d.]+ \w?B)", out)
    assert sorted(d[0] for d in done) == ["0", "1"], out
    by_rank = {d[0]: d for d in done}
    # What the Python rank sent, the C++ rank received, and the other way round.
    assert by_rank["0"][1] == by_rank["1"][2] and by_rank["0"][2] == by_rank["1"][1], out
