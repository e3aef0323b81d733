"""Crash-safe checkpoints and the random state a resumed run needs to repeat itself exactly."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file so that readers see either the old file or the complete new one.

    ``write`` fills a temporary file in the same folder, which is flushed, fsync-ed and then
    renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows). A crash or an error
    in ``write`` leaves ``path`` untouched, and the temporary file is removed on errors.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, _new_file_mode())  # mkstemp's 0600 would make checkpoints private
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(folder: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened this way on Windows.
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda file: torch.save(obj, file))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    # Checkpoints hold numpy/random RNG states (plain Python objects), hence weights_only=False:
    # only load checkpoints you wrote yourself.
    return torch.load(path, map_location="cpu", weights_only=False)


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, numpy's and torch's (CPU and CUDA) global random generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`: the global generators continue from where they were."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A seed for one purpose (e.g. ``(seed, epoch)``), independent across different ``parts``.

    Examples:
        >>> derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)
        True
    """
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` without its frozen parameters (e.g. the CLIP weights).

    Learned parameters and persistent buffers (schedules, running statistics) are kept, so a
    checkpoint holds what training changed and stays small.
    """
    frozen = {name for name, parameter in module.named_parameters() if not parameter.requires_grad}
    return {name: value for name, value in module.state_dict().items() if name not in frozen}


def load_trainable_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`trainable_state_dict`; everything else must be a frozen parameter."""
    result = module.load_state_dict(state, strict=False)
    frozen = {name for name, parameter in module.named_parameters() if not parameter.requires_grad}
    missing = [name for name in result.missing_keys if name not in frozen]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"Checkpoint does not match {type(module).__name__}: missing {missing}, "
            f"unexpected {result.unexpected_keys}. Was it written with another model config?"
        )
