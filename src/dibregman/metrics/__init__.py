"""Sample-quality metrics: feature nets, FID/KID/precision-recall/IS, reference-stat cache, exact GMM metrics.

User-facing entry points (`evaluate_samples`, `evaluate_path`, `load_samples`) are in `dibregman.evaluate`.
"""

from .distances import FeatureSums, feature_stats, fid, frechet_distance, inception_score, kid, precision_recall
from .features import (
    FeatureNet,
    InceptionV3Features,
    MnistFeatures,
    RandomFeatures,
    TorchmetricsFeature,
    extract_features,
    get_feature_net,
    sharded_features,
)
from .gmm_metrics import energy_distance, exact_metrics, gmm_log_prob, mmd_rbf, mode_statistics, sample_gmm
from .progress import Progress
from .protocols import PROTOCOLS, resize_pil_bicubic
from .refstats import ReferenceStats, default_cache_dir, load_stats, reference_stats, save_stats

__all__ = [
    "PROTOCOLS",
    "FeatureSums",
    "Progress",
    "load_stats",
    "save_stats",
    "resize_pil_bicubic",
    "sharded_features",
    "FeatureNet",
    "InceptionV3Features",
    "MnistFeatures",
    "RandomFeatures",
    "ReferenceStats",
    "TorchmetricsFeature",
    "default_cache_dir",
    "energy_distance",
    "exact_metrics",
    "extract_features",
    "feature_stats",
    "fid",
    "frechet_distance",
    "get_feature_net",
    "gmm_log_prob",
    "inception_score",
    "kid",
    "mmd_rbf",
    "mode_statistics",
    "precision_recall",
    "reference_stats",
    "sample_gmm",
]
