"""Process-group plumbing for ``torchrun`` (DDP); everything degrades to one process without it.

Start a multi-GPU run with ``torchrun --nproc_per_node=N examples/train_cars.py ...``. On CPU the
``gloo`` backend is used, which is how the tests run two processes on one machine.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cars import Stopped, UsageError


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, checkpoints and pictures."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there are several processes."""
        return self.world_size > 1


def _pick_device(choice: str, local_rank: int, local_world_size: int = 1) -> torch.device:
    """`train.device` for the process with `local_rank` among `local_world_size` on this machine.

    Under `torchrun` every process needs a GPU of its own. With `"auto"`, when the machine has
    fewer GPUs than processes, *all* of them run on the CPU (one gloo group) with a warning; with
    `"cuda"` that is an error.
    """
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("train.device: expected auto or cpu on this machine (no CUDA), got cuda")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    available = torch.cuda.device_count()
    if local_world_size > available:
        message = (
            f"{local_world_size} processes on this machine but only {available} GPU(s): start "
            f"torchrun with --nproc_per_node={available} or fewer"
        )
        if choice == "cuda":
            raise UsageError(f"train.device=cuda: {message}")
        warnings.warn(f"{message}; every process runs on the CPU (gloo).", stacklevel=2)
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setup_runtime(device_choice: str = "auto") -> Runtime:
    """Join the process group ``torchrun`` describes in the environment, if any.

    ``nccl`` on CUDA, ``gloo`` on CPU. Without ``WORLD_SIZE`` (plain ``python``) this is a single
    process and no group is created.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = _pick_device(device_choice, local_rank, local_world_size)
    if world_size == 1:
        return Runtime(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(dist.get_rank(), dist.get_world_size(), device)


@contextlib.contextmanager
def session(device_choice: str = "auto") -> Iterator[Runtime]:
    """:func:`setup_runtime` for the duration of a run, then leave the process group."""
    runtime = setup_runtime(device_choice)
    try:
        yield runtime
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


def wrap(module: nn.Module, runtime: Runtime) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` (gradients averaged) when there are processes."""
    if not runtime.distributed:
        return module
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def all_reduce_mean(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The mean of ``values`` over processes (``values`` itself for one process)."""
    if not runtime.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / runtime.world_size


def any_process(flag: bool, runtime: Runtime) -> bool:
    """Whether ``flag`` is true on at least one process (so all processes act together)."""
    if not runtime.distributed:
        return flag
    value = torch.tensor([float(flag)], device=runtime.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def check_finite(
    values: dict[str, torch.Tensor], epoch: int, step: int, runtime: Runtime, record: Any
) -> None:
    """Stop every process before an update with NaN or inf (on any of them): the last checkpoint
    and the metrics stay good. ``record`` writes the values to the metrics first."""
    finite = bool(torch.isfinite(torch.stack(list(values.values()))).all())
    if not any_process(not finite, runtime):
        return
    numbers = {name: value.item() for name, value in values.items()}
    record({"event": "nonfinite", "epoch": epoch, "step": step} | numbers)
    what = "gradient norm" if "gradient norm" in numbers else "loss"
    shown = ", ".join(f"{name}={value:.4g}" for name, value in numbers.items())
    raise Stopped(
        f"non-finite {what} at epoch {epoch}, step {step} ({shown}); stopped before the update, "
        "the last checkpoint is good: try a lower train.lr, train.grad_clip_norm or "
        "train.precision=fp32",
        1,
    )


def all_gather_objects(obj: Any, runtime: Runtime) -> list[Any]:
    """``obj`` of every process, in rank order."""
    if not runtime.distributed:
        return [obj]
    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def shard_indices(count: int, runtime: Runtime) -> list[int]:
    """This process's share of ``range(count)``: every ``world_size``-th index from ``rank``."""
    return list(range(runtime.rank, count, runtime.world_size))


def gather_shards(local: torch.Tensor, count: int, runtime: Runtime) -> torch.Tensor:
    """All ``count`` rows on every process, from the rows each computed on its shard."""
    if not runtime.distributed:
        return local
    per_process = -(-count // runtime.world_size)
    padded = local.new_zeros((per_process, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(runtime.world_size)]
    dist.all_gather(parts, padded)
    full = local.new_empty((count, *local.shape[1:]))
    for rank, part in enumerate(parts):
        rows = torch.arange(rank, count, runtime.world_size, device=local.device)
        full[rows] = part[: len(rows)]
    return full
