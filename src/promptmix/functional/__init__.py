"""The maths of promptmix as pure functions; the modules are thin, validated wrappers around them.

One file per topic: `similarity` (cosines and class logits), `estep` (responsibilities and
Sinkhorn), `entropy`, `diversity` and `schedule`. Shapes use `B` for the batch, `C` for classes,
`K` for sub-prompts per class and `D` for the embedding dimension. Every function accepts raw
(unnormalised) features and normalises internally; a zero vector gives zeros and a zero gradient,
never NaN, in every dtype.
"""

# The mode lists and their Literal types are importable from here too (not in `__all__`).
from promptmix.functional._common import (
    AGGREGATIONS,
    ASSIGNMENT_MODES,
    ENTROPY_MODES,
    REDUCTIONS,
    SCHEDULE_KINDS,
    SUBPROMPT_SHAPE,
    Aggregation,
    AssignmentMode,
    EntropyMode,
    Reduction,
    ScheduleKind,
    connected_zero,
)
from promptmix.functional.diversity import diversity_loss
from promptmix.functional.entropy import assignment_entropy, class_mean_responsibilities, entropy
from promptmix.functional.estep import (
    DEFAULT_SINKHORN_ITERATIONS,
    responsibilities,
    responsibilities_from_similarities,
    sinkhorn,
)
from promptmix.functional.schedule import temperature_at
from promptmix.functional.similarity import (
    class_logits,
    own_class_similarities,
    pairwise_cosine,
    subprompt_similarities,
)

__all__ = [
    "assignment_entropy",
    "class_logits",
    "class_mean_responsibilities",
    "connected_zero",
    "diversity_loss",
    "entropy",
    "own_class_similarities",
    "pairwise_cosine",
    "responsibilities",
    "responsibilities_from_similarities",
    "sinkhorn",
    "subprompt_similarities",
    "temperature_at",
]
