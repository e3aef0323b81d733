"""Which device each `torchrun` process of the Cars example asks for."""

from __future__ import annotations

import pytest
import torch
from cars_fixtures import UsageError, cars_distributed


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_auto_never_asks_for_a_gpu_that_does_not_exist(one_gpu: None) -> None:
    with pytest.warns(UserWarning, match="2 processes on this machine but only 1 GPU"):
        devices = [cars_distributed._pick_device("auto", rank, 2) for rank in range(2)]
    assert devices == [torch.device("cpu")] * 2  # one gloo group, never cuda:1


def test_auto_uses_one_gpu_per_process_when_there_are_enough(one_gpu: None) -> None:
    assert cars_distributed._pick_device("auto", 0, 1) == torch.device("cuda", 0)


def test_explicit_cuda_with_too_few_gpus_is_a_clear_error(one_gpu: None) -> None:
    with pytest.raises(UsageError, match="nproc_per_node=1"):
        cars_distributed._pick_device("cuda", 1, 2)


def test_cpu_is_always_cpu(one_gpu: None) -> None:
    assert cars_distributed._pick_device("cpu", 1, 2) == torch.device("cpu")
