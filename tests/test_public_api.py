"""The public API resolves, is typed, and its defaults take effect.

The exact names and signatures are pinned by tests/test_api_snapshot.py; the conventions they
follow by tests/test_conventions.py.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

import promptmix

ROOT = Path(__file__).resolve().parents[1]


def test_all_is_sorted_and_unique() -> None:
    assert promptmix.__all__ == sorted(set(promptmix.__all__))
    assert promptmix.functional.__all__ == sorted(set(promptmix.functional.__all__))


def test_every_public_name_resolves() -> None:
    for name in promptmix.__all__:
        assert getattr(promptmix, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from promptmix import *", namespace)
    assert set(promptmix.__all__) - {"__version__"} <= set(namespace)
    for name in promptmix.functional.__all__:
        assert callable(getattr(promptmix.functional, name)), name


def test_diagnostics_names_are_reexported() -> None:
    assert promptmix.detect_collapse is promptmix.diagnostics.detect_collapse
    assert promptmix.CollapseReport is promptmix.diagnostics.CollapseReport
    for name in promptmix.diagnostics.__all__:
        assert getattr(promptmix.diagnostics, name) is not None, name


def test_version_matches_installed_metadata() -> None:
    """The installed distribution's version is the package's, when it is this source tree's."""
    distribution = importlib.metadata.distribution("promptmix")
    direct_url = distribution.read_text("direct_url.json")
    if direct_url is not None:
        url = json.loads(direct_url).get("url", "")
        if url.startswith("file://") and Path(url[len("file://") :]).resolve() != ROOT:
            pytest.skip(f"promptmix is installed from {url}, not from this tree")
    assert promptmix.__version__ == distribution.version


def test_version_is_semantic() -> None:
    major, minor, patch = (int(part) for part in promptmix.__version__.split("."))
    assert (major, minor, patch) >= (1, 0, 0)


def test_package_is_typed() -> None:
    assert (Path(promptmix.__file__).parent / "py.typed").is_file()


def test_package_metadata_names_the_project_urls() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    urls = project["urls"]
    assert {"Documentation", "Source", "Changelog", "Issues"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())


def test_defaults_take_effect() -> None:
    loss = promptmix.MixtureOfPromptsLoss()
    assert (loss.diversity_weight, loss.entropy_weight, loss.mixture_weight) == (0.0, 0.0, 1.0)
    assert loss.label_noise == 0.1
    assert loss.fixed_tau == 0.3 and loss.schedule is None and loss.usage_estimate is None
    assert loss.assigner.mode == "soft" and loss.assigner.logit_scale == 100.0
    assert loss.entropy.mode == "marginal" == promptmix.AssignmentEntropy().mode
    schedule = promptmix.TemperatureSchedule(total_steps=10)
    assert (schedule.start, schedule.end, schedule.kind) == (1.0, 0.3, "linear")
    assert schedule.end == loss.fixed_tau == promptmix.functional.DEFAULT_TAU
