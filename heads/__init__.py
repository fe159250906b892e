"""Stage 2: per-gene heads on cached embeddings.

Importing this package registers every head in :data:`virtualst.heads.base.HEADS`.
"""

from virtualst.heads.base import HEADS, Head, HeadState, head_class, make_head
from virtualst.heads.ensemble import EnsembleHead
from virtualst.heads.features import FeatureTransform
from virtualst.heads.knn import KNNHead
from virtualst.heads.lgbm import LGBMHead
from virtualst.heads.ridge import RidgeHead

__all__ = [
    "HEADS",
    "EnsembleHead",
    "FeatureTransform",
    "Head",
    "HeadState",
    "KNNHead",
    "LGBMHead",
    "RidgeHead",
    "head_class",
    "make_head",
]
