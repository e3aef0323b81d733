"""Image features from the frozen CLIP image encoder, cached once or encoded every step.

The image encoder never changes, so without random augmentation a training image's feature is
the same in every epoch: encoding it once and reusing it is exact. With augmentation, either a
few augmented views per image are encoded once and one is drawn per epoch, or (``augment_views:
0``) every batch is augmented and encoded on the fly.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from cars_checkpoint import derive_seed
from cars_data import ImageDataset, Sample
from cars_distributed import Runtime, gather_shards, shard_indices
from cars_model import ClipModel, autocast
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Subset

Batch = tuple[torch.Tensor, torch.Tensor]


class ImageEncoder:
    """Unit-norm ``(batch, dim)`` float32 features of a frozen CLIP's image tower."""

    def __init__(self, clip_model: ClipModel, device: torch.device, dtype: torch.dtype | None):
        self.clip_model, self.device, self.dtype = clip_model, device, dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            features = self.clip_model.encode_image(images.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1)


def encode_samples(
    encoder: ImageEncoder,
    samples: Sequence[Sample],
    transform: Callable[[Any], torch.Tensor],
    runtime: Runtime,
    *,
    batch_size: int,
    num_workers: int,
    seed: int | None = None,
) -> torch.Tensor:
    """Features ``(len(samples), dim)`` on every process; each process encodes its shard.

    Args:
        seed: seeds the random transforms of an augmented view (``None`` for deterministic ones),
            so that a resumed run re-creates the same views.
    """
    if len(samples) < runtime.world_size:
        raise ValueError(
            f"{len(samples)} images cannot be shared by {runtime.world_size} processes."
        )
    dataset = Subset(ImageDataset(samples, transform), shard_indices(len(samples), runtime))
    with torch.random.fork_rng(devices=[]):
        generator = None
        if seed is not None:
            process_seed = derive_seed(seed, runtime.rank)
            torch.manual_seed(process_seed)  # transforms in this process
            generator = torch.Generator().manual_seed(process_seed)  # loader workers
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            generator=generator,
        )
        parts = [encoder(images) for images, _ in loader]
    return gather_shards(torch.cat(parts), len(samples), runtime)


class TrainBatches(ABC):
    """Per-epoch training batches of ``(image features, labels)`` for this process.

    The data order comes from a ``DistributedSampler`` (also with one process): a function of
    ``(seed, epoch)``, so a run resumed at an epoch boundary sees the same order. The global
    batch is split evenly across processes.
    """

    def __init__(self, labels: torch.Tensor, local_batch_size: int, runtime: Runtime, seed: int):
        self.labels = labels
        self.local_batch_size = local_batch_size
        self.sampler: DistributedSampler = DistributedSampler(
            range(len(labels)),  # type: ignore[arg-type]
            num_replicas=runtime.world_size,
            rank=runtime.rank,
            shuffle=True,
            seed=seed,
        )
        self.seed = seed

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.local_batch_size)

    def index_batches(self, epoch: int) -> Iterator[list[int]]:
        """The sample indices of each of this process's batches in ``epoch``."""
        self.sampler.set_epoch(epoch)
        return iter(BatchSampler(self.sampler, self.local_batch_size, drop_last=False))

    @abstractmethod
    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Yield this process's batches of ``epoch``."""


class CachedTrainBatches(TrainBatches):
    """Batches read from features ``(N, views, dim)`` encoded once; one view per image and epoch."""

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        local_batch_size: int,
        runtime: Runtime,
        seed: int,
    ):
        super().__init__(labels.to(features.device), local_batch_size, runtime, seed)
        self.features = features

    def epoch(self, epoch: int) -> Iterator[Batch]:
        count, views = self.features.shape[:2]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        chosen = torch.randint(views, (count,), generator=generator).to(self.features.device)
        for batch in self.index_batches(epoch):
            rows = torch.tensor(batch, device=self.features.device)
            yield self.features[rows, chosen[rows]], self.labels[rows]


class OnlineTrainBatches(TrainBatches):
    """Batches of freshly augmented images, encoded every step (no cache).

    Augmentation draws from the global torch generator (and the workers seeded from it), whose
    state the checkpoint saves.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        encoder: ImageEncoder,
        local_batch_size: int,
        runtime: Runtime,
        seed: int,
        num_workers: int,
    ):
        labels = torch.tensor([sample.label for sample in dataset.samples])
        super().__init__(labels, local_batch_size, runtime, seed)
        self.dataset, self.encoder, self.num_workers = dataset, encoder, num_workers

    def epoch(self, epoch: int) -> Iterator[Batch]:
        loader = DataLoader(
            self.dataset,
            batch_sampler=list(self.index_batches(epoch)),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        for images, labels in loader:
            yield self.encoder(images), labels.to(self.encoder.device)


def timed(function: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """``function()`` and the seconds it took (synchronising CUDA for an honest number)."""
    start = time.perf_counter()
    result = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start
