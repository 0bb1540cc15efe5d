"""Generative metrics (FID, KID, IS, sFID, precision/recall, FD-DINOv2) with pluggable feature extractors,
the evaluation protocol (features over processes, cached reference features), and classifier accuracy."""
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
from visionformers.metrics.inception_score import inception_score
from visionformers.metrics.precision_recall import precision_recall
from visionformers.metrics.protocol import METRICS, compute_metric, extract_distributed, protocol_note, split_in_two
from visionformers.metrics.reference import load_reference, reference_key, save_reference
from visionformers.metrics.samples import model_dir_sampler
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
    "inception_score", "precision_recall", "METRICS", "compute_metric", "extract_distributed", "protocol_note",
    "split_in_two", "load_reference", "reference_key", "save_reference", "model_dir_sampler",
    "FeatureStats", "MetricResult", "compute_statistics", "extract_features", "feature_statistics", "fid",
    "frechet_distance", "kid", "kid_from_features", "load_statistics", "save_statistics",
]
