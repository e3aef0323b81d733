"""Smoke run of the benchmark suite (`benchmarks/suite.py --quick`): one world, one seed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def suite():
    """The suite's module, with benchmarks/ importable and torch's settings restored after."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import suite as module

        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def _accuracy(text: str, contender: str) -> float:
    match = re.search(rf"^\| {re.escape(contender)} \| ([0-9.]+)", text, flags=re.MULTILINE)
    assert match, f"no row for {contender!r} in:\n{text}"
    return float(match.group(1))


def test_quick_run_writes_the_table_and_the_plot(suite, tmp_path: Path) -> None:
    suite.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert (tmp_path / "free.png").stat().st_size > 0
    for recipe in suite.RECIPES:
        _accuracy(text, recipe.name)
    # The world has looks worth a mixture: k-means beats one prompt per class by far, and the
    # data-driven start keeps the sub-prompts on the true looks.
    assert _accuracy(text, suite.KMEANS) > _accuracy(text, suite.ONE_PROMPT.name) + 5
    row = re.search(rf"^\| {re.escape(suite.DEFAULTS.name)} \| [^|]+ \| ([0-9.]+)", text, re.M)
    assert row and float(row.group(1)) >= 0.85
    assert "| imbalanced | free |" in text  # the targets table


def test_worlds_split_shots_by_look_frequency(suite) -> None:
    from suite_worlds import split_counts

    assert split_counts(32, (0.4, 0.3, 0.2, 0.1)) == [13, 10, 6, 3]
    assert split_counts(4, (0.25,) * 4) == [1, 1, 1, 1]
