"""The public API is pinned: adding, removing or renaming a name, argument or default fails here."""

from __future__ import annotations

import importlib.metadata
import inspect
from pathlib import Path

import pytest

import promptmix

PUBLIC_NAMES = [
    "AssignmentEntropy",
    "CollapseReport",
    "DiversityLoss",
    "GaussianPromptAverage",
    "ImagePrototypeLoss",
    "InterClassDispersion",
    "MixtureOfPrompts",
    "MixtureOfPromptsLoss",
    "OffsetMixtureOfPrompts",
    "PromptAnchor",
    "SoftEMAssigner",
    "SubpromptReviver",
    "TemperatureSchedule",
    "TextToTextLoss",
    "UsageFloor",
    "ZeroShotConsistency",
    "__version__",
    "detect_collapse",
    "diagnostics",
    "functional",
    "initialize_from_kmeans",
    "prograd_backward",
    "project_conflicting_gradients",
]

FUNCTIONAL_NAMES = [
    "anchor_distances",
    "assignment_entropy",
    "class_logits",
    "class_mean_responsibilities",
    "class_prototypes",
    "connected_zero",
    "dispersion_loss",
    "diversity_loss",
    "entropy",
    "image_prototype_loss",
    "kmeans_subprompts",
    "own_class_similarities",
    "pairwise_cosine",
    "prompt_anchor_loss",
    "responsibilities",
    "responsibilities_from_similarities",
    "revive_dead_subprompts",
    "sinkhorn",
    "spherical_kmeans",
    "subprompt_similarities",
    "temperature_at",
    "text_to_text_loss",
    "usage_floor",
    "zero_shot_consistency",
]

EMPTY = inspect.Parameter.empty

# (parameter name, default) in order, for each public constructor; EMPTY = required.
CONSTRUCTORS = {
    "DiversityLoss": [("power", 2.0), ("margin", 0.0), ("reduction", "mean")],
    "AssignmentEntropy": [
        ("mode", "sample"),
        ("normalize", False),
        ("num_classes", None),
        ("n_subprompts", None),
        ("momentum", 0.9),
        ("prior_count", 4.0),
        ("sync_distributed", False),
    ],
    "SoftEMAssigner": [
        ("mode", "soft"),
        ("scale", 100.0),
        ("sinkhorn_iterations", 20),
        ("sync_distributed", False),
    ],
    "TemperatureSchedule": [
        ("start", 1.0),
        ("end", 0.3),
        ("total_steps", EMPTY),
        ("kind", "linear"),
        ("warmup_steps", 0),
    ],
    "MixtureOfPromptsLoss": [
        ("diversity_weight", 0.0),
        ("entropy_weight", 1.0),
        ("mixture_weight", 10.0),
        ("aggregation", "logsumexp"),
        ("tau", 0.3),
        ("assigner", None),
        ("entropy", None),
        ("diversity", None),
        ("regularizers", None),
        ("sync_distributed", False),
    ],
    "PromptAnchor": [("distance", "cosine"), ("reduction", "mean"), ("anchor_features", None)],
    "ZeroShotConsistency": [
        ("temperature", 1.0),
        ("reduction", "batchmean"),
        ("text_weight", 0.0),
        ("image_weight", 0.0),
        ("zero_shot_text_features", None),
        ("logit_scale", 100.0),
    ],
    "TextToTextLoss": [
        ("logit_scale", 100.0),
        ("aggregation", "logsumexp"),
        ("reduction", "mean"),
        ("noise_std", 0.0),
        ("noise_probability", 0.5),
        ("template_features", None),
    ],
    "InterClassDispersion": [("bandwidth", 2.0)],
    "ImagePrototypeLoss": [("prototypes", None)],
    "GaussianPromptAverage": [
        ("module", EMPTY),
        ("total_epochs", EMPTY),
        ("mean", 15.0),
        ("std", 1.0),
    ],
}

# Arguments that must be passed by keyword (so their order can change without breaking callers).
KEYWORD_ONLY = {
    "AssignmentEntropy": {
        "normalize",
        "num_classes",
        "n_subprompts",
        "momentum",
        "prior_count",
        "sync_distributed",
    },
    "SoftEMAssigner": {"scale", "sinkhorn_iterations", "sync_distributed"},
    "TemperatureSchedule": {"total_steps", "kind", "warmup_steps"},
    "MixtureOfPromptsLoss": {name for name, _ in CONSTRUCTORS["MixtureOfPromptsLoss"]},
    "PromptAnchor": {"anchor_features"},
    "ZeroShotConsistency": {
        "text_weight",
        "image_weight",
        "zero_shot_text_features",
        "logit_scale",
    },
    "TextToTextLoss": {"noise_std", "noise_probability", "template_features"},
    "ImagePrototypeLoss": {"prototypes"},
    "GaussianPromptAverage": {"mean", "std"},
}


def test_all_is_pinned() -> None:
    assert promptmix.__all__ == PUBLIC_NAMES


def test_all_is_sorted_and_unique() -> None:
    assert promptmix.__all__ == sorted(set(promptmix.__all__))
    assert promptmix.functional.__all__ == sorted(set(promptmix.functional.__all__))


def test_every_public_name_resolves() -> None:
    for name in promptmix.__all__:
        assert getattr(promptmix, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from promptmix import *", namespace)
    assert set(PUBLIC_NAMES) - {"__version__"} <= set(namespace)


def test_functional_api_is_pinned() -> None:
    assert promptmix.functional.__all__ == FUNCTIONAL_NAMES
    for name in FUNCTIONAL_NAMES:
        assert callable(getattr(promptmix.functional, name)), name


def test_diagnostics_names_are_reexported() -> None:
    assert promptmix.detect_collapse is promptmix.diagnostics.detect_collapse
    assert promptmix.CollapseReport is promptmix.diagnostics.CollapseReport
    for name in (
        "mean_pairwise_cosine",
        "subprompt_usage",
        "dominant_share",
        "effective_subprompts",
    ):
        assert callable(getattr(promptmix.diagnostics, name)), name


def test_version_matches_installed_metadata() -> None:
    assert promptmix.__version__ == importlib.metadata.version("promptmix")


def test_package_is_typed() -> None:
    assert (Path(promptmix.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_constructor_signature(name) -> None:
    parameters = list(inspect.signature(getattr(promptmix, name)).parameters.values())
    assert [(p.name, p.default) for p in parameters] == CONSTRUCTORS[name]
    keyword_only = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only == KEYWORD_ONLY.get(name, set())


def test_constructor_defaults_take_effect() -> None:
    loss = promptmix.MixtureOfPromptsLoss()
    assert loss.diversity_weight == 0.0
    assert loss.entropy_weight == 1.0
    assert loss.mixture_weight == 10.0
    assert loss.fixed_tau == 0.3 and loss.schedule is None
    assert loss.assigner.mode == "soft" and loss.assigner.scale == 100.0
    assert loss.entropy.mode == "marginal"
    schedule = promptmix.TemperatureSchedule(total_steps=10)
    assert (schedule.start, schedule.end, schedule.kind) == (1.0, 0.3, "linear")


def test_forward_signatures() -> None:
    forward = inspect.signature(promptmix.MixtureOfPromptsLoss.forward).parameters
    assert list(forward) == [
        "self",
        "image_features",
        "subprompt_features",
        "labels",
        "logit_scale",
        "tau",
        "regularizer_inputs",
    ]
    assert forward["logit_scale"].default == 100.0 and forward["tau"].default is None
    assigner = inspect.signature(promptmix.SoftEMAssigner.forward).parameters
    assert list(assigner) == [
        "self",
        "image_features",
        "subprompt_features",
        "labels",
        "tau",
        "usage_prior",
    ]
    assert assigner["labels"].default is None and assigner["tau"].default == 1.0
    entropy = inspect.signature(promptmix.AssignmentEntropy.forward).parameters
    assert list(entropy) == ["self", "responsibilities", "labels"]
