"""Shared test set-up: offline model hubs, hypothesis profiles, markers and seeding."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# Before anything imports huggingface_hub/open_clip: nothing may try the network in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci", the default: deterministic (the same examples on every run, so a red run is reproducible)
# and with the failing example's blob printed for `@reproduce_failure`. "dev"
# (HYPOTHESIS_PROFILE=dev): random examples, fewer of them, to search for new failures.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=50,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "compile: torch.compile equivalence (deselect with -m 'not compile')"
    )
    config.addinivalue_line(
        "markers",
        "distributed: spawns torch.distributed processes (deselect with -m 'not distributed')",
    )


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same torch RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Run a module of tiny-tensor tests on one intra-op thread.

    On a 2-core machine with other work running, waking the second OpenMP thread costs ~4 ms per
    op (a 4x2 softmax: 4 ms instead of 1 us), which made the maths tests 50x slower. Modules of
    large models should not use this.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-class Stanford Cars in the devkit layout, 4 training and 2 test images per class."""
    from cars_fixtures import write_original

    root = tmp_path_factory.mktemp("cars")
    write_original(root, train_per_class=4, test_per_class=2)
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``train_cars.py`` config in the old spelling that trains one epoch."""
    from cars_fixtures import old_config

    path = old_config(tmp_path_factory.mktemp("config") / "old.yaml")
    path.write_text(path.read_text().replace("epochs: 2", "epochs: 1"))
    return path
