"""Generative metrics (FID, KID) with pluggable feature extractors, and classifier accuracy."""
from visionformers.metrics.accuracy import (
    AccuracyResult,
    classifier_accuracy,
    conditional_sample_accuracy,
    topk_correct,
)
from visionformers.metrics.features import (
    ClassifierFeatures,
    InceptionFeatures,
    RandomConvFeatures,
    build_feature_extractor,
    iter_image_batches,
)
from visionformers.metrics.fid import (
    FeatureStats,
    MetricResult,
    compute_statistics,
    extract_features,
    feature_statistics,
    fid,
    frechet_distance,
    kid,
    kid_from_features,
    load_statistics,
    save_statistics,
)

__all__ = [
    "AccuracyResult", "classifier_accuracy", "conditional_sample_accuracy", "topk_correct",
    "ClassifierFeatures", "InceptionFeatures", "RandomConvFeatures", "build_feature_extractor",
    "iter_image_batches",
    "FeatureStats", "MetricResult", "compute_statistics", "extract_features", "feature_statistics", "fid",
    "frechet_distance", "kid", "kid_from_features", "load_statistics", "save_statistics",
]
