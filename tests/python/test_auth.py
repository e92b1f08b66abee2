"""Run keys from Python: the GroupOptions fields (and their environment variables), and a keyed
two-rank group (threads of this process) whose all-reduce runs as the authenticated ring."""

import threading

import pytest
import torch

import diloco
from conftest import free_port

KEY = "python test run key, 16+ bytes"


def test_run_key_fields_and_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DILOCO_RUN_KEY", raising=False)
    monkeypatch.delenv("DILOCO_RUN_KEY_FILE", raising=False)
    o = diloco.GroupOptions(rank=0, world_size=1, run_key=KEY)
    assert o.run_key == KEY
    assert KEY not in repr(o) and "<hidden>" in repr(o)
    o.validate()
    o.run_key = "short"
    with pytest.raises(diloco.OptionError, match="run_key"):
        o.validate()
    o.run_key = ""
    o.run_key_file = str(tmp_path / "missing.key")
    with pytest.raises(diloco.OptionError, match="run_key_file .* cannot be read"):
        o.validate()
    key_file = tmp_path / "run.key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv("DILOCO_RUN_KEY_FILE", str(key_file))
    env = diloco.GroupOptions.read_env()
    assert env.run_key_file == str(key_file) and env.run_key == ""
    monkeypatch.setenv("DILOCO_RUN_KEY", KEY)
    assert diloco.GroupOptions.read_env().run_key == KEY


def test_keyed_group_sums_and_refuses_another_key():
    port = free_port()
    groups, results, errors = {}, {}, {}

    def join(rank, key):
        try:
            options = diloco.GroupOptions(master_port=port, rank=rank, world_size=2, timeout=20,
                                          run_key=key)
            groups[rank] = diloco.Group.create(options)
            x = torch.full((1000,), float(rank + 1))
            groups[rank].allreduce_sum(x, "outer_sync")
            results[rank] = x
        except Exception as e:  # noqa: BLE001 - reported below
            errors[rank] = e

    first = threading.Thread(target=join, args=(0, KEY))
    first.start()
    with pytest.raises(diloco.Error, match="does not match the run's"):
        diloco.Group.create(diloco.GroupOptions(master_port=port, rank=1, world_size=2,
                                                timeout=20, run_key="another key, 16+ bytes"))
    second = threading.Thread(target=join, args=(1, KEY))
    second.start()
    first.join()
    second.join()
    assert not errors, errors
    for rank in (0, 1):
        assert torch.equal(results[rank], torch.full((1000,), 3.0))
