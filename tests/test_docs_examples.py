"""The code the docs show runs, does what the docs say, and the benchmark table is current."""

from __future__ import annotations

import copy
import re
import runpy
import sys
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch

from promptmix import MixtureOfPromptsLoss, OffsetMixtureOfPrompts, TemperatureSchedule

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SNIPPETS = DOCS / "snippets"
BENCHMARKS = ROOT / "benchmarks"
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$', re.MULTILINE)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def own_loop() -> dict[str, Any]:
    return runpy.run_path(str(SNIPPETS / "own_loop.py"))


@pytest.fixture(scope="module")
def trained(own_loop: dict[str, Any]) -> dict[str, Any]:
    return own_loop["main"]()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_every_included_file_exists() -> None:
    pages = sorted(DOCS.glob("*.md"))
    included = [match for page in pages for match in INCLUDE.findall(page.read_text())]
    assert included, "the docs include no snippet: the pattern is out of date"
    for path in included:
        assert (ROOT / path).is_file(), path


def test_quickstart_runs_and_reaches_the_subprompts(capsys: pytest.CaptureFixture[str]) -> None:
    namespace = runpy.run_path(str(SNIPPETS / "quickstart.py"))
    gradient = namespace["subprompts"].grad
    assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    assert set(namespace["out"]) >= {"loss", "ce", "mixture", "diversity", "entropy", "tau"}
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1].startswith("mean sub-prompt cosine")
    # docs/index.md shows docs/snippets/quickstart.out: it must be this run's output.
    assert (SNIPPETS / "quickstart.out").read_text() == printed


def test_own_loop_learns_and_keeps_the_mixture(trained: dict[str, Any]) -> None:
    losses = trained["losses"]
    # The shared-look start already sits near the looks (a loss of 0.14 at step 0, against about
    # 1.0 from the text start); training still lowers it.
    assert _mean(losses[:20]) < 0.3
    assert _mean(losses[-20:]) < _mean(losses[:20])
    # The learner's prior is in the loss (it was 0 at the text, before the start moved it).
    assert 0.0 < trained["prior"] < losses[-1]
    assert trained["accuracy"] > 0.9
    report = trained["report"]
    assert not report.collapsed, report.message
    assert report.effective_subprompts > 1.8  # of K = 2
    # Each sub-prompt of a class claims one look: the assignment recovers the true looks.
    for label in trained["labels"].unique():
        mask = trained["labels"] == label
        claimed, looks = trained["claimed"][mask], trained["looks"][mask]
        agreement = (claimed == looks).float().mean().item()
        assert max(agreement, 1 - agreement) > 0.9


def test_own_loop_output_in_the_docs_is_current(trained: dict[str, Any]) -> None:
    """docs/snippets/own_loop.out, shown in the docs, matches a fresh run (to rounding)."""
    shown = (SNIPPETS / "own_loop.out").read_text().splitlines()
    assert len(shown) == 4  # steps 0, 100 and 199 of 200, then the held-out summary
    summary = shown[-1].split("; ")[-1]
    report = trained["report"]
    assert summary.split(": ")[-1] == report.message.split(": ")[-1]  # the verdict
    numbers = [float(n) for n in re.findall(r"\d+\.\d+", summary)]
    expected = [report.mean_cosine, report.dominant_share, report.effective_subprompts]
    assert numbers == pytest.approx(expected, abs=0.05)


def test_own_loop_before_configuration_collapses(own_loop: dict[str, Any]) -> None:
    result = own_loop["main"](regularise=False)
    report = result["report"]
    assert report.collapsed
    assert report.dominant_share > 0.85
    assert result["prior"] == 0.0  # the uncured reference has no prior
    assert result["accuracy"] > 0.9  # collapse does not show in accuracy


def test_offset_learner_is_free_vectors_under_adam() -> None:
    """docs/maths.md: offsets from a frozen text feature train like free feature vectors."""
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1, head_width=32),
        text_cfg=dict(width=64, heads=2, layers=1),
    )
    prompts = OffsetMixtureOfPrompts(
        model,
        open_clip.get_tokenizer("ViT-B-32"),
        ["cat", "dog", "owl"],
        n_subprompts=3,
        share_looks=False,
    )
    free = torch.nn.Parameter((prompts.text_features + prompts.offsets).detach().clone())
    images, labels = torch.randn(24, 32), torch.arange(3).repeat(8)
    finals = []
    for parameters, features in ((prompts.parameters(), prompts), ([free], lambda: free)):
        schedule = TemperatureSchedule(total_steps=20)
        loss_fn = MixtureOfPromptsLoss(tau=schedule)
        optimizer = torch.optim.Adam(parameters, lr=1e-2)
        for _ in range(20):
            loss = loss_fn(images, features(), labels)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        finals.append(torch.nn.functional.normalize(copy.deepcopy(features().detach()), dim=-1))
    torch.testing.assert_close(finals[0], finals[1], atol=1e-5, rtol=0)
    assert (finals[0] - prompts.text_features).abs().max() > 0.05  # it did train


def test_suite_table_lists_the_suite_recipes_and_the_pictures_exist() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import suite
    finally:
        sys.path.remove(str(BENCHMARKS))
    table = (DOCS / "suite" / "results.md").read_text()
    cells = {cell.strip() for line in table.splitlines() for cell in line.split("|")}
    names = set(suite.CONTENDERS) | {c.name for c in suite.lever_contenders()} | set(suite.WORLDS)
    assert names <= cells, (
        f"docs/suite/results.md is stale: rerun benchmarks/suite.py ({names - cells})"
    )
    tuning = (DOCS / "tuning.md").read_text()
    images = re.findall(r"\]\((suite/[^)]+\.png)\)", tuning)
    assert images
    for image in images:
        assert (DOCS / image).is_file(), image


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) == 1, "README should show exactly one Python example"
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    prompts, steps = namespace["prompts"], namespace["steps"]
    assert steps == 200  # the recipe's length
    # The recipe's pieces: shared looks, the init call (it sets the prior's image count), the
    # prior in the loss, and the loss's defaults with the schedule run to its end.
    assert prompts.share_looks and prompts.num_images.item() == 160
    for parameter in (prompts.class_offsets, prompts.shared_offsets, prompts.offsets):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    out, loss_fn = namespace["out"], namespace["loss_fn"]
    assert out["prior"].item() > 0
    assert loss_fn.mixture_weight == 1.0 and loss_fn.label_noise == 0.1
    assert loss_fn.schedule.step_count.item() == steps and loss_fn.current_tau() == 0.3
    assert namespace["predictions"].shape == (160,)
    assert capsys.readouterr().out.startswith("mean sub-prompt cosine")
