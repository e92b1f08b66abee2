"""Helpers of the Python bindings' tests: free ports, one-rank groups, islands as threads of the
test's process, and runs of real island processes (Python worker.py and the C++ cpp_peer) over
loopback Gloo with torchrun's variables.

ctest sets PYTHONPATH to the built package and DILOCO_CPP_PEER to the C++ island; run the suite
with `ctest --test-dir build -R python_bindings` (see README.md).
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = HERE / "worker.py"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_threads(count, body, timeout=120):
    """Runs body(i) for i in range(count), each on a thread of this process (islands over
    loopback Gloo); returns {i: the exception body(i) raised}."""
    errors = {}

    def run(i):
        try:
            body(i)
        except Exception as e:  # noqa: BLE001 - returned to the caller
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


def python_island():
    return [sys.executable, str(WORKER)]


def cpp_island():
    path = os.environ.get("DILOCO_CPP_PEER")
    if not path or not os.path.exists(path):
        pytest.fail("DILOCO_CPP_PEER must name the built C++ island (build/tests/diloco_cpp_peer); "
                    "ctest sets it")
    return [path]


def launch(commands, tmp_path, extra_env=None, timeout=120):
    """Start one process per command with torchrun's variables; wait for all. Returns their
    (returncode, output) pairs; a process still running at the timeout is killed."""
    port = free_port()
    procs = []
    for rank, command in enumerate(commands):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(len(commands)), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(len(commands)), OMP_NUM_THREADS="1")
        env.update(extra_env or {})
        log = open(tmp_path / ("rank%d.log" % rank), "w+")
        procs.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=str(REPO)), log))
    deadline = time.monotonic() + timeout
    results = []
    for proc, log in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        results.append((proc.returncode, log.read()))
        log.close()
    return results


def run_islands(commands, config, tmp_path, timeout=120):
    """Run worker-protocol islands (worker.py / cpp_peer) on `config`; returns each rank's JSON
    result, failing the test with every rank's output if any rank failed."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    full = [c + [str(config_path), str(out)] for c in commands]
    results = launch(full, tmp_path, timeout=timeout)
    if any(code != 0 for code, _ in results):
        report = "\n".join("--- rank %d (exit %s)\n%s" % (r, code, text[-3000:])
                           for r, (code, text) in enumerate(results))
        pytest.fail("an island failed:\n" + report)
    return [json.loads((out / ("rank%d.json" % r)).read_text()) for r in range(len(commands))]


@pytest.fixture
def solo_group():
    """A one-rank group over loopback (a real TCPStore and Gloo context)."""
    import diloco
    return diloco.init_process_group("127.0.0.1", free_port(), rank=0, world_size=1, timeout=30)


@pytest.fixture
def train_lm_flags(capsys):
    """examples/python/train_lm.py as a module, and error(*flags): the message its flag parser
    prints when it refuses `flags` (it exits with code 2)."""
    sys.path.insert(0, str(REPO / "examples" / "python"))
    try:
        import train_lm
    finally:
        sys.path.pop(0)

    def error(*flags):
        with pytest.raises(SystemExit) as exit:
            train_lm.parse_flags(list(flags))
        assert exit.value.code == 2
        return capsys.readouterr().err

    return train_lm, error
