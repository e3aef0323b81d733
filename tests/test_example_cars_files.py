"""Crash safety of the example's files, checkpoints and the random state saved in them."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch
from cars_fixtures import UsageError, cars_files


def _partial_then(failure: str):
    def write(file: BinaryIO) -> None:
        file.write(b"half a checkpoint")
        file.flush()
        if failure == "error":
            raise OSError("disk full")
        os._exit(17)  # a kill: no exception handler, no cleanup

    return write


def _read(path: Path) -> dict:
    checkpoint = cars_files.read_checkpoint(path, "test")
    del checkpoint["format"]
    return checkpoint


def test_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    cars_files.save_checkpoint({"epoch": 1, "weights": torch.arange(4.0)}, path)
    with pytest.raises(OSError, match="disk full"):
        cars_files.atomic_write(path, _partial_then("error"))
    saved = _read(path)
    assert saved["epoch"] == 1 and torch.equal(saved["weights"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # temporary file removed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a writer mid-save")
def test_killed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    cars_files.save_checkpoint({"epoch": 1}, path)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, which dies mid-write
        cars_files.atomic_write(path, _partial_then("kill"))
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 17
    assert _read(path) == {"epoch": 1}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.pt.")  # only the dead temp
    cars_files.save_checkpoint({"epoch": 2}, path)  # the next save still works
    assert _read(path) == {"epoch": 2}


def test_rng_state_round_trip() -> None:
    cars_files.seed_everything(5)
    state = cars_files.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    cars_files.seed_everything(6)
    cars_files.restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_trainable_state_dict_leaves_frozen_weights_out() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    module[0].requires_grad_(False)
    module.register_buffer("steps", torch.tensor(3))
    state = cars_files.trainable_state_dict(module)
    assert sorted(state) == ["1.bias", "1.weight", "steps"]
    other = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    other[0].requires_grad_(False)
    other.register_buffer("steps", torch.tensor(0))
    cars_files.load_trainable_state_dict(other, state, Path("last.pt"))
    assert torch.equal(other[1].weight, module[1].weight) and int(other.steps) == 3
    with pytest.raises(UsageError, match=r"last.pt: expected learned .* got 1.weight missing"):
        cars_files.load_trainable_state_dict(other, {"steps": torch.tensor(1)}, Path("last.pt"))


def test_checkpoint_gets_the_permissions_of_a_normal_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    cars_files.save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    mode = (tmp_path / "last.pt").stat().st_mode & 0o777
    assert mode == plain.stat().st_mode & 0o777  # not mkstemp's owner-only 0600


@pytest.mark.parametrize(
    ("content", "got"),
    [
        (b"", "an empty file"),
        (b"model:\n  n_subprompts: 4\n", "a text file"),
        (None, "a truncated checkpoint"),  # a real checkpoint cut in half
        (b"\x80\x02}q\x00.\xff", "a file torch cannot read"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(
    tmp_path: Path, content: bytes | None, got: str
) -> None:
    path = tmp_path / "last.pt"
    if content is None:
        cars_files.save_checkpoint({"epoch": 1, "weights": torch.arange(100.0)}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(UsageError) as error:
        cars_files.read_checkpoint(path, "--resume")
    (message,) = error.value.messages
    assert message.startswith(f"--resume {path}: expected a train_cars.py checkpoint, got {got}")
    assert "\n" not in message


def test_a_checkpoint_of_another_format_or_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"format": 1, "epoch": 3}, path)
    with pytest.raises(UsageError, match="of format 3, got format 1"):
        cars_files.read_checkpoint(path, "--evaluate")
    torch.save({"format": 3, "code": Path("x")}, path)  # an object: refused, never unpickled
    with pytest.raises(UsageError, match="torch cannot read"):
        cars_files.read_checkpoint(path, "--evaluate")
    with pytest.raises(UsageError, match="got a folder"):
        cars_files.read_checkpoint(tmp_path, "--evaluate")
