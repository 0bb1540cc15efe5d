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
    RESIZE_POLICIES,
    build_feature_extractor,
    dinov2_features,
    iter_image_batches,
    resize_images,
)
from visionformers.metrics.inception import InceptionV3
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
    "iter_image_batches", "RESIZE_POLICIES", "dinov2_features", "resize_images", "InceptionV3",
    "FeatureStats", "MetricResult", "compute_statistics", "extract_features", "feature_statistics", "fid",
    "frechet_distance", "kid", "kid_from_features", "load_statistics", "save_statistics",
]
