"""Configuration and model loading of ``examples/train_cars.py``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from cars_fixtures import EXAMPLES, cars_config, cars_model, old_config
from omegaconf import OmegaConf

CONFIGS = EXAMPLES / "configs"
ConfigError = cars_config.ConfigError


def test_default_yaml_documents_every_key_with_its_default() -> None:
    documented = OmegaConf.load(CONFIGS / "default.yaml")
    schema = OmegaConf.structured(cars_config.ExperimentConfig)
    assert sorted(cars_config.valid_keys(documented)) == sorted(cars_config.valid_keys())
    assert OmegaConf.to_container(documented) == OmegaConf.to_container(schema)


@pytest.mark.parametrize("name", ["default.yaml", "stanford_cars.yaml", "demo.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = cars_config.load_config(CONFIGS / name)
    assert cfg.model.em_tau_end == 0.3
    assert (cfg.model.diversity_loss_weight, cfg.model.entropy_loss_weight) == (0.1, 0.3)


def test_output_folder_follows_the_overrides() -> None:
    cfg = cars_config.load_config(CONFIGS / "stanford_cars.yaml", ["train.shots=4"])
    assert cfg.output.output_dir == "runs/cars_ViT-B-16_k8_4shot_seed1"
    assert "runs/cars_ViT-B-16_k8_4shot_seed1" in cars_config.to_yaml(cfg)


def test_old_config_gets_regulariser_defaults_and_overrides_apply(tmp_path: Path) -> None:
    cfg = cars_config.load_config(
        old_config(tmp_path / "old.yaml"), ["model.n_subprompts=4", "train.epochs=3"]
    )
    assert (cfg.model.n_subprompts, cfg.train.epochs, cfg.train.shots) == (4, 3, 4)
    assert cfg.model.diversity_loss_weight == 0.1 and cfg.model.entropy_loss_weight == 0.3
    assert cfg.model.em_tau_end == 0.3 and cfg.model.assignment == "soft"


@pytest.mark.parametrize(
    ("yaml_text", "named", "suggested"),
    [
        ("model:\n  n_subprompt: 4\n", "model.n_subprompt", "model.n_subprompts"),
        (
            "model:\n  diversity_weight: 0.2\n",
            "model.diversity_weight",
            "model.diversity_loss_weight",
        ),
        ("train:\n  n_ctx: 8\n", "train.n_ctx", "model.n_ctx"),  # right key, wrong section
        ("trian:\n  epochs: 8\n", "trian", "train"),
    ],
)
def test_unknown_key_is_named_with_the_closest_valid_key(
    tmp_path: Path, yaml_text: str, named: str, suggested: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as error:
        cars_config.load_config(path)
    message = str(error.value)
    assert f"Unknown config key '{named}' in {path}" in message
    assert f"Did you mean '{suggested}'?" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.assignment=sofft", "model.assignment must be one of ['soft', 'hard', 'sinkhorn']"),
        ("train.optimizer=adam", "Did you mean 'adamw'?"),
        ("train.epochs=two", "Bad value for 'train.epochs'"),
        ("train.epochs=0", "train.epochs must be >= 1 but is 0"),
        ("model.em_tau_end=0", "model.em_tau_end must be > 0"),
        ("train.shots", "Overrides must look like key=value"),
    ],
)
def test_bad_values_are_rejected_clearly(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        cars_config.load_config(None, [override])


def test_unknown_model_or_pretrained_tag_is_rejected_before_any_download() -> None:
    cfg = cars_config.load_config(None, ["model.pretrained=opneai"])
    with pytest.raises(ConfigError, match="Did you mean 'openai'"):
        cars_model.load_clip(cfg, torch.device("cpu"))
    cfg = cars_config.load_config(None, ["model.clip_name=ViT-B-61"])
    with pytest.raises(
        ConfigError, match=re.escape("not an open_clip model. Did you mean 'ViT-B-16'?")
    ):
        cars_model.load_clip(cfg, torch.device("cpu"))
    cfg = cars_config.load_config(None, ["model.clip_name=tiny-random"])  # pretrained: openai
    with pytest.raises(ConfigError, match="has no published weights"):
        cars_model.load_clip(cfg, torch.device("cpu"))


def test_precision_is_full_on_cpu_unless_asked() -> None:
    cpu = torch.device("cpu")
    assert cars_model.autocast_dtype("auto", cpu) is None
    assert cars_model.autocast_dtype("fp32", cpu) is None
    assert cars_model.autocast_dtype("bf16", cpu) is torch.bfloat16


def test_failed_download_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, pretrained: str | None = None) -> None:
        raise RuntimeError(f"Failed to download weights for tag '{pretrained}': no network")

    monkeypatch.setattr(cars_model.open_clip, "create_model_and_transforms", offline)
    monkeypatch.setattr(cars_model, "weights_cached", lambda name, tag: False)
    monkeypatch.setattr(cars_model, "hub_reachable", lambda timeout=3.0: True)
    cfg = cars_config.load_config(None, ["model.clip_name=ViT-B-32"])  # pretrained: openai
    with pytest.raises(ConfigError, match="downloading the weights failed") as error:
        cars_model.load_clip(cfg, torch.device("cpu"))
    message = str(error.value)
    assert "\n" not in message and "model.clip_name=ViT-B-32 model.pretrained=openai" in message
    assert "model.pretrained=/path/to/" in message
