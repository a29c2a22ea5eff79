"""PoSE context-window extension (arXiv 2309.10400): position sampler, data loading, training loop, evaluation.

Only the sampler is imported here; `train`, `eval` and `data` load transformers and the kernels when used.
"""

from .sampler import CONTENT_STRATEGIES, METHODS, ChunkLayout, PoseCollator, PoseSampler

__all__ = ["CONTENT_STRATEGIES", "METHODS", "ChunkLayout", "PoseCollator", "PoseSampler"]
