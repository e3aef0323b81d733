"""promptmix: mixture-of-prompts learning for CLIP, with the regularizers that stop mode collapse.

The public API is listed in `__all__`; the maths behind each module is in
`promptmix.functional`, the collapse diagnostics in `promptmix.diagnostics`. The API follows
semantic versioning from 1.0.0 on (`docs/conventions.md`, `CHANGELOG.md`).
"""

from promptmix import diagnostics, functional
from promptmix.assignment import SoftEMAssigner
from promptmix.averaging import GaussianPromptAverage
from promptmix.diagnostics import CollapseReport, detect_collapse
from promptmix.diversity import DiversityLoss
from promptmix.entropy import AssignmentEntropy
from promptmix.gradients import prograd_backward, project_conflicting_gradients
from promptmix.initialization import initialize_from_kmeans
from promptmix.objective import MixtureOfPromptsLoss
from promptmix.prompts import MixtureOfPrompts, OffsetMixtureOfPrompts
from promptmix.regularizers import (
    ImagePrototypeLoss,
    InterClassDispersion,
    PromptAnchor,
    TextToTextLoss,
    ZeroShotConsistency,
)
from promptmix.schedule import TemperatureSchedule
from promptmix.usage import SubpromptReviver, UsageEstimate, UsageFloor

__version__ = "1.0.0"

__all__ = [
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
    "UsageEstimate",
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
