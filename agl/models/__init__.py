"""Models: backbone registry, frozen-feature cache and the estimator."""
from agl.fileio import sha256_file
from agl.models.backbones import BACKBONES, create_backbone, read_state_dict, register_backbone
from agl.models.estimator import Estimator
from agl.models.features import feature_cache, feature_cache_key

__all__ = [
    "BACKBONES", "create_backbone", "register_backbone", "read_state_dict", "sha256_file",
    "Estimator", "feature_cache", "feature_cache_key",
]
