"""Gathering batch statistics across processes (DDP) for terms that need the whole batch.

Marginal entropy and Sinkhorn balance act on a class's images across the *global* batch; with
`torch.distributed` each process only sees its shard, so these helpers concatenate the shards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_no_grad", "gather_with_grad", "is_distributed", "local_slice"]


def is_distributed() -> bool:
    """Whether a `torch.distributed` process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _check_equal_sizes(tensor: Tensor) -> None:
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    if len(set(counts)) != 1:
        raise ValueError(
            "sync_distributed needs the same local batch size on every process (use "
            f"drop_last=True in the DistributedSampler/DataLoader), but got sizes {counts}."
        )


class _AllGatherWithGrad(torch.autograd.Function):
    """`all_gather` whose backward sums each rank's gradient and returns this rank's rows."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        ctx.local_batch = tensor.shape[0]
        return _all_gather(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return local_slice(grad, local_batch=ctx.local_batch)


def _all_gather(tensor: Tensor) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate `tensor` from all processes along dim 0, keeping the local part's gradient.

    Every process computes the same loss on the gathered batch, so the backward pass sums the
    processes' gradients for this rank's rows; DDP's gradient averaging then gives the gradient of
    the single-process loss on the global batch.

    Args:
        tensor: `(local_batch, ...)`, the same shape on every process.

    Returns:
        `(world_size * local_batch, ...)` in rank order; `tensor` itself when not distributed.

    Examples:
        >>> gather_with_grad(torch.ones(2, 3)).shape  # single process: unchanged
        torch.Size([2, 3])
    """
    if not is_distributed():
        return tensor
    _check_equal_sizes(tensor)
    return _AllGatherWithGrad.apply(tensor)


def gather_no_grad(tensor: Tensor) -> Tensor:
    """Like `gather_with_grad` for tensors that need no gradient (labels, detached scores)."""
    if not is_distributed():
        return tensor
    _check_equal_sizes(tensor)
    return _all_gather(tensor)


def local_slice(gathered: Tensor, *, local_batch: int) -> Tensor:
    """The rows of this process in a tensor from `gather_with_grad`/`gather_no_grad`."""
    if not is_distributed():
        return gathered
    start = dist.get_rank() * local_batch
    return gathered[start : start + local_batch]
