"""promptmix.distributed with two gloo processes: sharded terms equal the single-process ones.

One ``torch.multiprocessing.spawn`` (two processes, ~5 s) computes everything; each process saves
what it saw and the tests compare it with the single-process computation on the whole batch.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import promptmix.functional as PF
from promptmix import (
    AssignmentEntropy,
    MixtureOfPromptsLoss,
    SoftEMAssigner,
    UsageEstimate,
    distributed,
)

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("single_thread")]

WORLD_SIZE = 2
LOCAL_BATCH = 6
NUM_CLASSES, K, DIM = 3, 3, 8


def global_batch() -> dict[str, torch.Tensor]:
    """The same global batch in every process (and in the test process)."""
    generator = torch.Generator().manual_seed(1234)
    batch = WORLD_SIZE * LOCAL_BATCH
    images = torch.randn(batch, DIM, generator=generator)
    prompts = torch.randn(NUM_CLASSES, K, DIM, generator=generator)
    # Classes split unevenly across the shards, so per-shard statistics differ from global ones.
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 1, 1, 2, 2, 2, 0])
    logits = 2 * torch.randn(batch, K, generator=generator)
    weights = torch.randn(batch, K, generator=generator)
    return {"images": images, "prompts": prompts, "labels": labels, "logits": logits, "w": weights}


#: A usage prior of the NUM_CLASSES classes over K sub-prompts (simplex rows).
PRIOR = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])


def entropy_modules() -> dict[str, tuple[AssignmentEntropy, torch.Tensor | None]]:
    return {
        "marginal": (AssignmentEntropy(mode="marginal", sync_distributed=True), None),
        "mutual_information": (
            AssignmentEntropy(mode="mutual_information", sync_distributed=True),
            None,
        ),
        "sample": (AssignmentEntropy(mode="sample", sync_distributed=True), None),
        "marginal_prior": (AssignmentEntropy(mode="marginal", sync_distributed=True), PRIOR),
    }


def synced_loss() -> MixtureOfPromptsLoss:
    return MixtureOfPromptsLoss(
        usage_estimate=UsageEstimate(num_classes=NUM_CLASSES, n_subprompts=K),
        sync_distributed=True,
    )


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        data = global_batch()
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        labels = data["labels"][local]
        result: dict[str, object] = {"is_distributed": distributed.is_distributed()}

        # gather_with_grad: forward concatenates, backward returns this shard's gradient summed
        # over the processes' (identical) losses.
        x = data["logits"][local].clone().requires_grad_()
        gathered = distributed.gather_with_grad(x)
        (gathered * data["w"]).sum().backward()
        result["gathered"] = gathered.detach()
        result["gathered_grad"] = x.grad
        result["labels_gathered"] = distributed.gather_no_grad(labels)
        result["local_slice"] = distributed.local_slice(data["logits"], local_batch=LOCAL_BATCH)

        for name, (module, prior) in entropy_modules().items():
            logits = data["logits"][local].clone().requires_grad_()
            value = module(logits.softmax(-1), labels, prior)
            value.backward()
            result[f"entropy_{name}"] = value.detach()
            result[f"entropy_{name}_grad"] = logits.grad

        # The loss's usage estimate is updated from the global batch: every process holds the
        # single-process estimate.
        loss_fn = synced_loss()
        loss_fn(data["images"][local], data["prompts"], labels)
        result["usage"] = loss_fn.usage_estimate.usage.clone()

        assigner = SoftEMAssigner(mode="sinkhorn", logit_scale=10.0, sync_distributed=True)
        result["sinkhorn"] = assigner(data["images"][local], data["prompts"], labels, tau=0.5)
        local_only = SoftEMAssigner(mode="sinkhorn", logit_scale=10.0)
        result["sinkhorn_local"] = local_only(
            data["images"][local], data["prompts"], labels, tau=0.5
        )
        soft = SoftEMAssigner(mode="soft", logit_scale=10.0, sync_distributed=True)
        result["soft"] = soft(data["images"][local], data["prompts"], labels, tau=0.5)

        # Unequal local batch sizes: every process must raise the same clear error (no hang).
        uneven = data["logits"][: LOCAL_BATCH - rank].softmax(-1)
        for name, call in (
            ("gather_with_grad", lambda: distributed.gather_with_grad(uneven)),
            ("gather_no_grad", lambda: distributed.gather_no_grad(uneven)),
            (
                "entropy",
                lambda: AssignmentEntropy(mode="marginal", sync_distributed=True)(
                    uneven, data["labels"][: LOCAL_BATCH - rank]
                ),
            ),
        ):
            try:
                call()
                result[f"uneven_{name}"] = None
            except ValueError as error:
                result[f"uneven_{name}"] = str(error)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # Tear down together: a process closing its gloo connections while the other still
        # finishes a collective aborts it ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[dict[str, object]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def local(rank: int) -> slice:
    return slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)


def test_processes_were_distributed(shards) -> None:
    assert [shard["is_distributed"] for shard in shards] == [True, True]
    assert not distributed.is_distributed()  # and the test process is not


def test_gather_with_grad_concatenates_and_keeps_gradient(shards) -> None:
    data = global_batch()
    for rank, shard in enumerate(shards):
        torch.testing.assert_close(shard["gathered"], data["logits"])
        # Each process back-propagates the same loss, so this shard's gradient is summed
        # WORLD_SIZE times; DDP's gradient averaging then recovers the single-process gradient.
        torch.testing.assert_close(shard["gathered_grad"], WORLD_SIZE * data["w"][local(rank)])
        assert torch.equal(shard["labels_gathered"], data["labels"])
        torch.testing.assert_close(shard["local_slice"], data["logits"][local(rank)])


def test_gather_helpers_are_identity_without_a_process_group() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    assert distributed.gather_no_grad(x) is x
    assert distributed.local_slice(x, local_batch=1) is x


@pytest.mark.parametrize("name", ["marginal", "mutual_information", "marginal_prior"])
def test_synced_marginal_entropy_equals_single_process_value(shards, name) -> None:
    data = global_batch()
    module, prior = entropy_modules()[name]
    logits = data["logits"].clone().requires_grad_()
    expected = module(logits.softmax(-1), data["labels"], prior)
    expected.backward()
    sharded_values = [shard[f"entropy_{name}"] for shard in shards]
    per_shard = [
        module(data["logits"][local(rank)].softmax(-1), data["labels"][local(rank)], prior)
        for rank in range(WORLD_SIZE)
    ]
    for rank, shard in enumerate(shards):
        torch.testing.assert_close(sharded_values[rank], expected.detach())
        torch.testing.assert_close(
            shard[f"entropy_{name}_grad"], WORLD_SIZE * logits.grad[local(rank)]
        )
    # Without the sync, the shards would disagree with the global value: the test can tell.
    assert not torch.allclose(per_shard[0].detach(), expected.detach(), atol=1e-4)


def test_the_losss_usage_estimate_follows_the_global_batch(shards) -> None:
    data = global_batch()
    loss_fn = synced_loss()
    loss_fn(data["images"], data["prompts"], data["labels"])
    for shard in shards:
        torch.testing.assert_close(shard["usage"], loss_fn.usage_estimate.usage)
    local_only = MixtureOfPromptsLoss(
        usage_estimate=UsageEstimate(num_classes=NUM_CLASSES, n_subprompts=K)
    )
    local_only(data["images"][local(0)], data["prompts"], data["labels"][local(0)])
    assert not torch.allclose(local_only.usage_estimate.usage, loss_fn.usage_estimate.usage)


def test_sample_entropy_is_not_synced(shards) -> None:
    data = global_batch()
    for rank, shard in enumerate(shards):
        gamma = data["logits"][local(rank)].softmax(-1)
        expected = PF.assignment_entropy(gamma, mode="sample")
        torch.testing.assert_close(shard["entropy_sample"], expected)


def test_synced_sinkhorn_equals_single_process_assignment(shards) -> None:
    data = global_batch()
    expected = SoftEMAssigner(mode="sinkhorn", logit_scale=10.0)(
        data["images"], data["prompts"], data["labels"], tau=0.5
    )
    for rank, shard in enumerate(shards):
        torch.testing.assert_close(shard["sinkhorn"], expected[local(rank)])
        assert not torch.allclose(shard["sinkhorn_local"], expected[local(rank)], atol=1e-3)
        soft = SoftEMAssigner(mode="soft", logit_scale=10.0)(
            data["images"][local(rank)], data["prompts"], data["labels"][local(rank)], tau=0.5
        )
        torch.testing.assert_close(shard["soft"], soft)  # soft rows need no global batch


def test_unequal_local_batch_sizes_raise_a_clear_error(shards) -> None:
    for shard in shards:
        for name in ("gather_with_grad", "gather_no_grad", "entropy"):
            message = shard[f"uneven_{name}"]
            assert message is not None, name
            assert "same local batch size" in message and "[6, 5]" in message, message
