"""The field's regularizers in ``examples/train_cars.py``: config fields, wiring, a tiny run."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cars_fixtures import (
    UsageError,
    cars_clip,
    cars_config,
    cars_files,
    old_config,
    one_torch_thread,
    step_records,
    train_cars,
    write_original,
)

import promptmix

CLASSNAMES = ["Acura TL Sedan 2012", "Volvo 240 Sedan 1993", "AM General Hummer SUV 2000"]
ALL_ON = [
    "model.anchor_loss_weight=8",
    "model.zero_shot_loss_weight=1",
    "model.text_to_text_loss_weight=5",
    "model.dispersion_loss_weight=0.1",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def clip() -> cars_clip.Clip:
    torch.manual_seed(0)
    cfg = cars_config.load(None, ["model.clip_name=tiny-random", "model.pretrained=null"])
    return cars_clip.load_clip(cfg.model, torch.device("cpu"))


def _cfg(*overrides: str):
    base = ["model.clip_name=tiny-random", "model.pretrained=null", "model.n_subprompts=2"]
    return cars_config.load(None, [*base, *overrides])


def test_regularizers_are_off_by_default(clip) -> None:
    assert train_cars.build_regularizers(_cfg(), clip, CLASSNAMES) == {}


@pytest.mark.parametrize(
    ("override", "name", "kind", "weight"),
    [
        ("model.anchor_loss_weight=8", "anchor", promptmix.PromptAnchor, 8.0),
        ("model.zero_shot_loss_weight=1", "zero_shot", promptmix.ZeroShotConsistency, 1.0),
        ("model.text_to_text_loss_weight=5", "text_to_text", promptmix.TextToTextLoss, 5.0),
        ("model.dispersion_loss_weight=0.1", "dispersion", promptmix.InterClassDispersion, 0.1),
    ],
)
def test_each_weight_switches_its_regularizer_on(clip, override, name, kind, weight) -> None:
    regularizers = train_cars.build_regularizers(_cfg(override), clip, CLASSNAMES)
    assert list(regularizers) == [name]
    module, got = regularizers[name]
    assert isinstance(module, kind) and got == weight
    assert module.inputs in (("subprompt_features",), ("logits", "image_features"))


def test_references_are_the_frozen_tower_on_the_templates(clip) -> None:
    templates = ["a photo of a {}.", "art of the {}."]
    cfg = _cfg(
        *ALL_ON,
        f"model.hand_crafted_templates=[{templates[0]!r},{templates[1]!r}]",
        "model.anchor_distance=l1",
        "model.zero_shot_reduction=mean",
    )
    regularizers = train_cars.build_regularizers(cfg, clip, CLASSNAMES)
    with torch.no_grad():
        encoded = torch.stack(
            [
                F.normalize(
                    clip.model.encode_text(clip.tokenizer([t.format(c) for c in CLASSNAMES])),
                    dim=-1,
                )
                for t in templates
            ]
        )
    ensemble = F.normalize(encoded.mean(0), dim=-1)
    anchor, _ = regularizers["anchor"]
    zero_shot, _ = regularizers["zero_shot"]
    text_to_text, _ = regularizers["text_to_text"]
    torch.testing.assert_close(anchor.anchor_features, ensemble)
    assert anchor.distance == "l1"
    torch.testing.assert_close(zero_shot.zero_shot_text_features, ensemble)
    assert zero_shot.reduction == "mean" and zero_shot.logit_scale == clip.logit_scale
    torch.testing.assert_close(text_to_text.template_features, encoded)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.anchor_distance=l3", "anchor_distance"),
        ("model.zero_shot_reduction=none", "zero_shot_reduction"),
        ("model.zero_shot_temperature=0", "zero_shot_temperature"),
        ("model.dispersion_loss_weight=-1", "dispersion_loss_weight"),
        ("model.hand_crafted_templates=[a photo]", "hand_crafted_templates"),
    ],
)
def test_bad_values_are_config_errors(override, match) -> None:
    with pytest.raises(UsageError, match=match):
        _cfg(override)


def test_objective_carries_the_regularizers(clip) -> None:
    objective = train_cars.build_loss(_cfg(*ALL_ON), clip, CLASSNAMES, 2, 10, sync=False)
    assert sorted(objective.regularizers) == ["anchor", "dispersion", "text_to_text", "zero_shot"]
    images, labels = torch.randn(4, 32), torch.tensor([0, 1, 2, 0])
    out = objective(images, torch.randn(3, 2, 32), labels, logit_scale=clip.logit_scale)
    assert all(torch.isfinite(out[name]) and out[name] > 0 for name in objective.regularizers)


def test_tiny_run_with_every_regularizer(tmp_path: Path) -> None:
    data_root = tmp_path / "cars"
    write_original(data_root)
    config = old_config(tmp_path / "config.yaml")
    output = tmp_path / "run"
    status = train_cars.main(
        [
            "--config",
            str(config),
            "--data-root",
            str(data_root),
            "--output-dir",
            str(output),
            "output.plots=false",
            "train.epochs=1",
            *ALL_ON,
            "model.text_to_text_noise_std=0.05",
        ]
    )
    assert status == train_cars.EXIT_OK
    steps = step_records(output)
    assert len(steps) == 2
    for r in steps:  # the regularizers add positive terms to the documented combination
        builtin = _builtin(r)
        assert math.isfinite(r["loss"]) and r["loss"] > builtin + 1e-3


def _builtin(record: dict) -> float:
    """The loss's own terms in a step record, combined with promptmix's default weights, plus
    the learner's prior."""
    loss = promptmix.MixtureOfPromptsLoss()
    return (record["ce"] + loss.mixture_weight * record["mixture"]
            + loss.diversity_weight * record["diversity"] - loss.entropy_weight * record["entropy"]
            + record["prior"])


def _tiny_run(tmp_path: Path, *overrides: str, epochs: int = 2) -> Path:
    data_root = tmp_path / "cars"
    write_original(data_root)
    output = tmp_path / "run"
    status = train_cars.main(
        [
            "--config",
            str(old_config(tmp_path / "config.yaml")),
            "--data-root",
            str(data_root),
            "--output-dir",
            str(output),
            "output.plots=false",
            f"train.epochs={epochs}",
            *overrides,
        ]
    )
    assert status == train_cars.EXIT_OK
    return output


def test_extra_terms_are_logged_per_step(tmp_path: Path) -> None:
    output = _tiny_run(tmp_path, "model.anchor_loss_weight=8", epochs=1)
    for r in step_records(output):
        builtin = _builtin(r)
        assert math.isclose(r["loss"], builtin + 8 * r["anchor"], rel_tol=1e-4, abs_tol=1e-4)


def test_prograd_applies_the_projected_gradient(tmp_path: Path, monkeypatch) -> None:
    calls = []
    real = promptmix.prograd_backward

    def spy(loss, reference, parameters, **kwargs):
        calls.append(kwargs)
        return real(loss, reference, parameters, **kwargs)

    monkeypatch.setattr(promptmix, "prograd_backward", spy)
    output = _tiny_run(
        tmp_path,
        "model.zero_shot_loss_weight=1",
        "model.prograd=true",
        "model.prograd_strength=0.5",
    )
    assert calls and all(c == {"strength": 0.5} for c in calls)
    assert all(math.isfinite(r["zero_shot"]) for r in step_records(output))


def test_prograd_needs_the_zero_shot_term() -> None:
    with pytest.raises(UsageError, match=r"model\.prograd"):
        _cfg("model.prograd=true")


def test_prompt_averaging_ends_on_the_gaussian_average(tmp_path: Path) -> None:
    output = _tiny_run(
        tmp_path, "model.prompt_averaging=true", "model.prompt_averaging_mean=1", epochs=2
    )
    records = cars_files.read_records(output / "metrics.jsonl")
    assert records[-1]["event"] == "final" and records[-1]["prompt_average"]
    saved = cars_files.read_checkpoint(output / "checkpoints" / "last.pt", "test")
    state = saved["prompt_average"]
    assert state["epoch"] == 2 and state["averages"]
    for name, value in state["averages"].items():  # the final prompts are the average
        torch.testing.assert_close(saved["learner"][name].float(), value)
