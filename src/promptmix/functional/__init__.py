"""The maths of promptmix as pure functions; the modules are thin, validated wrappers around them.

One file per topic: `similarity` (cosines and class logits), `estep` (responsibilities and
Sinkhorn), `label_noise` (how far to trust each label), `entropy`, `diversity`, `schedule`,
`kmeans` and `looks` (data-driven starting points: per-class centroids, or looks shared by all
classes with a start shrunk toward the text), `usage` (the running usage estimate, a usage
floor, reviving dead sub-prompts), and the field's regularizers: `anchors` (KgCoOp/PromptSRC),
`consistency` (zero-shot distillation), `text_to_text` (LASP) and
`dispersion` (DAPT). Shapes use `B` for the batch, `C` for classes, `K` for sub-prompts per class
and `D` for the embedding dimension; sub-prompt features are `(C, K, D)` everywhere, and
`(C, D)` is read as `K = 1`. Every function accepts raw (unnormalised) features and normalises
internally; a zero vector gives zeros and a zero gradient, never NaN, in every dtype. The
conventions (argument order, names, reductions) are in `docs/conventions.md`.
"""

# The mode lists and their Literal types are importable from here too (not in `__all__`).
from promptmix.functional._common import (
    AGGREGATIONS,
    ASSIGNMENT_MODES,
    DEFAULT_LOGIT_SCALE,
    DEFAULT_TAU,
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
from promptmix.functional.anchors import (
    ANCHOR_DISTANCES,
    AnchorDistance,
    anchor_distances,
    prompt_anchor_loss,
)
from promptmix.functional.consistency import zero_shot_consistency
from promptmix.functional.dispersion import (
    class_prototypes,
    dispersion_loss,
    image_prototype_loss,
)
from promptmix.functional.diversity import diversity_loss
from promptmix.functional.entropy import assignment_entropy, class_mean_responsibilities, entropy
from promptmix.functional.estep import (
    DEFAULT_SINKHORN_ITERATIONS,
    responsibilities,
    responsibilities_from_similarities,
    sinkhorn,
)
from promptmix.functional.kmeans import KMeansResult, kmeans_subprompts, spherical_kmeans
from promptmix.functional.label_noise import label_confidence
from promptmix.functional.looks import SharedLookStart, shared_look_start, shrunk_group_means
from promptmix.functional.schedule import temperature_at
from promptmix.functional.similarity import (
    class_logits,
    own_class_similarities,
    pairwise_cosine,
    subprompt_similarities,
)
from promptmix.functional.text_to_text import text_to_text_loss
from promptmix.functional.usage import revive_dead_subprompts, running_usage, usage_floor

__all__ = [
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
    "label_confidence",
    "own_class_similarities",
    "pairwise_cosine",
    "prompt_anchor_loss",
    "responsibilities",
    "responsibilities_from_similarities",
    "revive_dead_subprompts",
    "running_usage",
    "shared_look_start",
    "shrunk_group_means",
    "sinkhorn",
    "spherical_kmeans",
    "subprompt_similarities",
    "temperature_at",
    "text_to_text_loss",
    "usage_floor",
    "zero_shot_consistency",
]
