"""Crash safety of the example's checkpoints and the random state saved in them."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch
from cars_fixtures import cars_checkpoint


def _partial_then(failure: str):
    def write(file: BinaryIO) -> None:
        file.write(b"half a checkpoint")
        file.flush()
        if failure == "error":
            raise OSError("disk full")
        os._exit(17)  # a kill: no exception handler, no cleanup

    return write


def test_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    cars_checkpoint.atomic_save({"epoch": 1, "weights": torch.arange(4.0)}, path)
    with pytest.raises(OSError, match="disk full"):
        cars_checkpoint.atomic_write(path, _partial_then("error"))
    saved = cars_checkpoint.load_checkpoint(path)
    assert saved["epoch"] == 1 and torch.equal(saved["weights"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # temporary file removed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a writer mid-save")
def test_killed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    cars_checkpoint.atomic_save({"epoch": 1}, path)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, which dies mid-write
        cars_checkpoint.atomic_write(path, _partial_then("kill"))
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 17
    assert cars_checkpoint.load_checkpoint(path) == {"epoch": 1}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.pt.")  # only the dead temp
    cars_checkpoint.atomic_save({"epoch": 2}, path)  # the next save still works
    assert cars_checkpoint.load_checkpoint(path) == {"epoch": 2}


def test_rng_state_round_trip() -> None:
    cars_checkpoint.seed_everything(5)
    state = cars_checkpoint.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    cars_checkpoint.seed_everything(6)
    cars_checkpoint.restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_trainable_state_dict_leaves_frozen_weights_out() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    module[0].requires_grad_(False)
    module.register_buffer("steps", torch.tensor(3))
    state = cars_checkpoint.trainable_state_dict(module)
    assert sorted(state) == ["1.bias", "1.weight", "steps"]
    other = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    other[0].requires_grad_(False)
    other.register_buffer("steps", torch.tensor(0))
    cars_checkpoint.load_trainable_state_dict(other, state)
    assert torch.equal(other[1].weight, module[1].weight) and int(other.steps) == 3
    with pytest.raises(RuntimeError, match="missing"):
        cars_checkpoint.load_trainable_state_dict(other, {"steps": torch.tensor(1)})


def test_checkpoint_gets_the_permissions_of_a_normal_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    cars_checkpoint.atomic_save({"epoch": 1}, tmp_path / "last.pt")
    mode = (tmp_path / "last.pt").stat().st_mode & 0o777
    assert mode == plain.stat().st_mode & 0o777  # not mkstemp's owner-only 0600
