"""Smoke run of the benchmark suite (`benchmarks/suite.py --quick`) and its worlds' promises."""

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


def _row(text: str, world: str) -> list[str]:
    match = re.search(rf"^\| {re.escape(world)} \|(.*)$", text, flags=re.MULTILINE)
    assert match, f"no row for {world!r} in:\n{text}"
    return [cell.strip() for cell in match.group(1).split("|")]


def test_quick_run_writes_the_tables_and_the_recipe_beats_one_prompt(suite, tmp_path) -> None:
    suite.main(["--quick", "--workers", "1", "--out", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    recipe, best, _, first, *_ = _row(text, "fine 4 shots")  # the targets table
    assert first == "pass", text
    assert float(recipe.split()[0]) > float(best.split()[-1])
    header = next(line for line in text.splitlines() if line.startswith("| world | zero-shot"))
    names = [cell.strip() for cell in header.split("|")[2:-2]]
    assert names == list(suite.CONTENDERS)
    # Even after a short run the looks learned from every class match the true looks.
    results = text.split("### Fine-grained worlds")[1]
    assert float(_row(results, "fine 4 shots")[-2]) >= 0.85  # NMI of the recommended recipe
    # The saved rows rebuild the same report without training.
    (tmp_path / "results.md").unlink()
    suite.main(["--replot", "--out", str(tmp_path)])
    assert (tmp_path / "results.md").read_text() == text


def test_fine_world_is_shaped_like_fine_grained_data(suite) -> None:
    from fine_worlds import FineSpec, FineWorld, classnames

    spec = FineSpec("probe", shots=4, flipped_labels=0.1, outliers=0.1)
    world = FineWorld(spec, seed=0)
    text = world.text_features
    cosine = text @ text.T
    off_diagonal = cosine[~torch.eye(spec.num_classes, dtype=torch.bool)]
    assert spec.num_classes >= 128 and len(set(classnames(spec))) == spec.num_classes
    assert 0.7 <= off_diagonal.mean() <= 0.9  # close classes, as in CLIP
    generator = torch.Generator().manual_seed(0)
    clean = world.sample(4, generator, corrupt=False)
    noisy = world.sample(4, torch.Generator().manual_seed(0), corrupt=True)
    own = (clean.features * text[clean.labels]).sum(-1).mean()
    assert 0.2 < own < 0.45  # image-text cosines as in CLIP
    flipped = (noisy.labels != clean.labels).float().mean()
    outliers = (noisy.looks == -1).float().mean()
    assert 0.05 < flipped < 0.15 and 0.05 < outliers < 0.15
    zero_shot = ((clean.features @ text.T).argmax(-1) == clean.labels).float().mean()
    assert 0.2 < zero_shot < 0.8  # well above chance (1/128), far from perfect


def test_worlds_split_shots_by_look_frequency(suite) -> None:
    from fine_worlds import split_counts

    assert split_counts(32, (0.4, 0.3, 0.2, 0.1)) == [13, 10, 6, 3]
    assert split_counts(4, (0.25,) * 4) == [1, 1, 1, 1]
