"""PoSE context-window extension (arXiv 2309.10400): position sampler, Trainer collator, data loading, training loop,
evaluation.

Only the sampler and the collator are imported here; `train`, `eval` and `data` load transformers and the kernels
when used.
"""

from .collator import PoseDataCollator
from .sampler import CONTENT_STRATEGIES, METHODS, ChunkLayout, PoseCollator, PoseSampler

__all__ = ["CONTENT_STRATEGIES", "METHODS", "ChunkLayout", "PoseCollator", "PoseDataCollator", "PoseSampler"]
