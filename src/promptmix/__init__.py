"""promptmix: mixture-of-prompts learning for CLIP, with the regularizers that stop mode collapse.

The public API is listed in `__all__`; the maths behind each module is in
`promptmix.functional`, the collapse diagnostics in `promptmix.diagnostics`.
"""

from promptmix import diagnostics, functional
from promptmix.assignment import SoftEMAssigner
from promptmix.diagnostics import CollapseReport, detect_collapse
from promptmix.diversity import DiversityLoss
from promptmix.entropy import AssignmentEntropy
from promptmix.objective import MixtureOfPromptsLoss
from promptmix.prompts import MixtureOfPrompts, OffsetMixtureOfPrompts
from promptmix.schedule import TemperatureSchedule

__version__ = "0.1.0"

__all__ = [
    "AssignmentEntropy",
    "CollapseReport",
    "DiversityLoss",
    "MixtureOfPrompts",
    "MixtureOfPromptsLoss",
    "OffsetMixtureOfPrompts",
    "SoftEMAssigner",
    "TemperatureSchedule",
    "__version__",
    "detect_collapse",
    "diagnostics",
    "functional",
]
