"""Settings and model loading of ``examples/train_cars.py``: defaults once, every key checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from cars_fixtures import EXAMPLES, UsageError, cars_clip, cars_config, old_config
from omegaconf import OmegaConf

import promptmix.functional as PF

CONFIGS = EXAMPLES / "configs"
#: Keys whose value is an option of a promptmix object: left null, the object keeps its default.
LIBRARY_OPTIONS = (
    "n_subprompts", "n_ctx", "ctx_init", "class_specific", "init_noise_std",
    "gradient_checkpointing", "em_tau_start", "em_tau_end", "em_tau_schedule", "assignment",
    "sinkhorn_iterations", "entropy_mode", "aggregation", "mixture_loss_weight",
    "diversity_loss_weight", "entropy_loss_weight", "anchor_distance", "zero_shot_temperature",
    "zero_shot_reduction", "zero_shot_average_over_classes", "text_to_text_noise_std",
    "dispersion_bandwidth", "prograd_strength", "prompt_averaging_mean", "prompt_averaging_std",
    "share_looks", "text_prior_weight", "subprompt_prior_weight", "prior_count", "label_noise",
)


def test_default_yaml_documents_every_key_with_its_default() -> None:
    documented = OmegaConf.load(CONFIGS / "default.yaml")
    schema = OmegaConf.structured(cars_config.ExperimentConfig)
    assert sorted(cars_config.valid_keys(documented)) == sorted(cars_config.valid_keys())
    assert OmegaConf.to_container(documented) == OmegaConf.to_container(schema)


@pytest.mark.parametrize("name", ["default.yaml", "stanford_cars.yaml", "demo.yaml"])
def test_promptmix_options_are_left_to_promptmix(name: str) -> None:
    """Defaults live once, in the library: no shipped config restates one."""
    cfg = cars_config.load(CONFIGS / name)
    restated = {
        key: cfg.model[key]
        for key in LIBRARY_OPTIONS
        if cfg.model[key] is not None and key != "n_subprompts"  # K: a recipe's own choice
    }
    assert restated == {}


def test_modes_come_from_the_library_and_nothing_reads_signatures() -> None:
    choices = cars_config.CHOICES
    assert choices["model.assignment"] is PF.ASSIGNMENT_MODES
    assert choices["model.entropy_mode"] is PF.ENTROPY_MODES
    assert choices["model.aggregation"] is PF.AGGREGATIONS
    assert choices["model.em_tau_schedule"] is PF.SCHEDULE_KINDS
    assert choices["model.anchor_distance"] is PF.ANCHOR_DISTANCES
    sources = [EXAMPLES / "train_cars.py", *sorted((EXAMPLES / "cars").glob("*.py"))]
    assert not [path.name for path in sources if re.search(r"\binspect\b", path.read_text())]


def test_output_folder_follows_the_overrides() -> None:
    cfg = cars_config.load(CONFIGS / "stanford_cars.yaml", ["train.shots=4"])
    assert cfg.output.output_dir == "runs/cars_ViT-B-16_k8_4shot_seed1"
    assert "runs/cars_ViT-B-16_k8_4shot_seed1" in cars_config.to_yaml(cfg)


def test_old_config_loads_and_overrides_apply(tmp_path: Path) -> None:
    cfg = cars_config.load(
        old_config(tmp_path / "old.yaml"), ["model.n_subprompts=4", "train.epochs=3"]
    )
    assert (cfg.model.n_subprompts, cfg.train.epochs, cfg.train.shots) == (4, 3, 4)
    assert cfg.model.mixture_loss_weight is None and cfg.model.init == "kmeans"


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
        ("trian:\n  epochs: 8\n", "trian.epochs", "train.epochs"),
    ],
)
def test_unknown_key_is_named_with_the_closest_valid_key(
    tmp_path: Path, yaml_text: str, named: str, suggested: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UsageError) as error:
        cars_config.load(path)
    (message,) = error.value.messages
    assert message == f"unknown key '{named}' in {path}. Did you mean '{suggested}'?"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.assignment=sofft", "model.assignment: expected one of soft, hard, sinkhorn, "
         "got 'sofft'. Did you mean 'soft'?"),
        ("train.optimizer=adam", "Did you mean 'adamw'?"),
        ("train.epochs=two", "train.epochs in the command line: expected an integer, got 'two'"),
        ("train.epochs=0", "train.epochs: expected an integer >= 1, got 0"),
        ("model.em_tau_end=0", "model.em_tau_end: expected a finite number > 0, got 0.0"),
        ("train.shots", "overrides: expected key=value, got train.shots"),
        ("model.zero_shot_reduction=none", "expected one of mean, sum, got 'none'"),
        ("train.warmup_epochs=60", "train.warmup_epochs: expected at most train.epochs (8)"),
        ("model.prograd=true", "model.prograd: expected false unless model.zero_shot_loss_weight"),
    ],
)
def test_bad_values_are_rejected_clearly(override: str, expected: str) -> None:
    with pytest.raises(UsageError, match=re.escape(expected)):
        cars_config.load(None, [override])


def test_every_bad_key_of_a_config_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: -1\n  seed: -2\n  epoch: 3\nmodel:\n  assignment: sofft\n")
    with pytest.raises(UsageError) as error:
        cars_config.load(path, ["output.collapse_share_threshold=5"])
    keys = [message.split(":")[0].split(" ")[0] for message in error.value.messages]
    assert sorted(keys) == sorted(
        ["unknown", "train.lr", "train.seed", "model.assignment", "output.collapse_share_threshold"]
    )


def test_context_length_must_match_its_words() -> None:
    mixture = "model.learner=mixture"
    with pytest.raises(UsageError, match=r"model.n_ctx: expected the 4 tokens of model.ctx_init"):
        cars_config.load(None, [mixture, "model.n_ctx=3", "model.ctx_init=a photo of a"])
    cfg = cars_config.load(None, [mixture, "model.n_ctx=16", "model.ctx_init=random"])
    assert cfg.model.n_ctx == 16


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.label_noise=1", "model.label_noise: expected a number in [0, 1), got 1.0"),
        ("model.label_noise=nan", "model.label_noise: expected a number in [0, 1), got nan"),
        ("model.text_prior_weight=-1",
         "model.text_prior_weight: expected a finite number >= 0, got -1.0"),
        ("model.subprompt_prior_weight=inf",
         "model.subprompt_prior_weight: expected a finite number >= 0, got inf"),
        ("model.prior_count=-4", "model.prior_count: expected a finite number >= 0, got -4.0"),
        ("model.share_looks=maybe",
         "model.share_looks in the command line: expected true or false or null, got 'maybe'"),
    ],
)
def test_the_recipe_keys_are_checked(override: str, expected: str) -> None:
    with pytest.raises(UsageError) as error:
        cars_config.load(None, [override])
    assert error.value.messages == [expected]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.learner=mixture", "model.share_looks=false"],
         "model.share_looks: expected null with model.learner=mixture (an option of "
         "OffsetMixtureOfPrompts: model.learner=offset), got False"),
        (["model.n_ctx=4"], "model.n_ctx: expected null with model.learner=offset (an option of "
         "MixtureOfPrompts: model.learner=mixture), got 4"),
        (["model.ctx_init=random"], "model.ctx_init: expected words with model.learner=offset"),
        (["model.init=text", "model.prior_count=2"],
         "model.prior_count: expected null unless model.learner=offset, model.init=kmeans and "
         "shared looks"),
        (["model.share_looks=false", "model.prior_count=2"], "model.prior_count: expected null"),
    ],
)
def test_options_the_learner_or_start_would_ignore_are_refused(
    overrides: list[str], expected: str
) -> None:
    with pytest.raises(UsageError) as error:
        cars_config.load(None, overrides)
    (message,) = error.value.messages
    assert message.startswith(expected)


def test_the_recipe_is_the_default_and_its_options_fall_through_to_promptmix() -> None:
    """default.yaml and stanford_cars.yaml train the recipe: the offset learner, the k-means
    start, Adam at 5e-3 without decay or clipping, and every promptmix option left null."""
    for name in ("default.yaml", "stanford_cars.yaml"):
        cfg = cars_config.load(CONFIGS / name)
        assert (cfg.model.learner, cfg.model.init) == ("offset", "kmeans")
        train = cfg.train
        assert (train.optimizer, train.lr, train.weight_decay) == ("adamw", 0.005, 0.0)
        assert (train.min_lr, train.warmup_epochs, train.grad_clip_norm) == (None, 0.0, None)
        recipe = ("share_looks", "text_prior_weight", "subprompt_prior_weight", "prior_count",
                  "label_noise", "mixture_loss_weight", "entropy_loss_weight", "em_tau_end")
        assert all(cfg.model[key] is None for key in recipe)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "expected a YAML file, got unreadable text"),
        (b"- model\n- train\n", "expected a mapping of sections (model:, data:, train:, output:), "
         "got a list"),
        (b"model: 3\n", "model in {path}: expected a mapping of keys, got 3"),
        (b"data:\n  # layout: auto\ntrain:\n  epoch: 2\n", "unknown key 'train.epoch'"),
    ],
)
def test_a_config_file_that_is_no_mapping_is_named(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(UsageError) as error:
        cars_config.load(path)
    (message,) = error.value.messages
    assert expected.format(path=path) in message and "\n" not in message


def test_unknown_model_or_pretrained_tag_is_rejected_before_any_download() -> None:
    cfg = cars_config.load(None, ["model.pretrained=opneai"])
    with pytest.raises(UsageError, match="Did you mean 'openai'"):
        cars_clip.load_clip(cfg.model, torch.device("cpu"))
    cfg = cars_config.load(None, ["model.clip_name=ViT-B-61"])
    with pytest.raises(UsageError, match=re.escape("got 'ViT-B-61'. Did you mean 'ViT-B-16'?")):
        cars_clip.load_clip(cfg.model, torch.device("cpu"))
    cfg = cars_config.load(None, ["model.clip_name=tiny-random"])  # pretrained: openai
    with pytest.raises(UsageError, match="it has no published weights"):
        cars_clip.load_clip(cfg.model, torch.device("cpu"))


def test_a_foreign_file_as_pretrained_weights_is_named(tmp_path: Path) -> None:
    foreign = tmp_path / "weights.pt"
    foreign.write_text("not weights")
    for name in ("tiny-random", "RN50"):
        cfg = cars_config.load(None, [f"model.clip_name={name}", f"model.pretrained={foreign}"])
        with pytest.raises(UsageError) as error:
            cars_clip.load_clip(cfg.model, torch.device("cpu"))
        (message,) = error.value.messages
        assert message.startswith(f"model.pretrained {foreign}: expected weights of {name}")


def test_precision_is_full_on_cpu_unless_asked() -> None:
    cpu = torch.device("cpu")
    assert cars_clip.autocast_dtype("auto", cpu) is None
    assert cars_clip.autocast_dtype("fp32", cpu) is None
    assert cars_clip.autocast_dtype("bf16", cpu) is torch.bfloat16


def test_failed_download_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, pretrained: str | None = None) -> None:
        raise RuntimeError(f"Failed to download weights for tag '{pretrained}': no network")

    monkeypatch.setattr(cars_clip.open_clip, "create_model_and_transforms", offline)
    monkeypatch.setattr(cars_clip, "weights_cached", lambda name, tag: False)
    monkeypatch.setattr(cars_clip, "hub_reachable", lambda timeout=3.0: True)
    cfg = cars_config.load(None, ["model.clip_name=ViT-B-32"])  # pretrained: openai
    with pytest.raises(UsageError, match="downloading the weights failed") as error:
        cars_clip.load_clip(cfg.model, torch.device("cpu"))
    (message,) = error.value.messages
    assert "\n" not in message and "model.clip_name=ViT-B-32 model.pretrained=openai" in message
    assert "model.pretrained=/path/to/" in message


def test_rising_temperature_schedule_warns(caplog: pytest.LogCaptureFixture) -> None:
    cars_config.load(None, ["model.em_tau_start=0.05", "model.em_tau_end=1.0"])
    assert "model.em_tau_start (0.05) is below model.em_tau_end (1.0)" in caplog.text


def test_an_old_spelling_keeps_working_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    cfg = cars_config.load(None, ["model.zero_shot_reduction=batchmean"])
    assert cfg.model.zero_shot_reduction == "mean"
    assert "model.zero_shot_reduction=batchmean in the command line is an old spelling" in (
        caplog.text)
    cars_config.load(None, ["model.zero_shot_reduction=mean", "model.zero_shot_loss_weight=1"])
    assert "(the old 'mean') is model.zero_shot_average_over_classes=true" in caplog.text


def test_unset_options_are_not_passed_so_the_library_defaults_apply() -> None:
    from cars_fixtures import train_cars

    import promptmix

    cfg = cars_config.load(None, ["model.assignment=sinkhorn"])
    loss = train_cars.build_loss(cfg, None, ["a", "b"], 2, 10, sync=False)
    default = promptmix.MixtureOfPromptsLoss()
    assert loss.assigner.sinkhorn_iterations == promptmix.SoftEMAssigner().sinkhorn_iterations
    assert (loss.mixture_weight, loss.entropy_weight, loss.diversity_weight) == (
        default.mixture_weight, default.entropy_weight, default.diversity_weight)
    assert loss.entropy.mode == default.entropy.mode and loss.aggregation == default.aggregation
    schedule = promptmix.TemperatureSchedule(total_steps=10)
    assert (loss.schedule.start, loss.schedule.end, loss.schedule.kind) == (
        schedule.start, schedule.end, schedule.kind)
    set_ = cars_config.load(None, ["model.sinkhorn_iterations=7", "model.entropy_mode=sample"])
    loss = train_cars.build_loss(set_, None, ["a", "b"], 2, 10, sync=False)
    assert loss.assigner.sinkhorn_iterations == 7 and loss.entropy.mode == "sample"
