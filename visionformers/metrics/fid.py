"""FID and KID between two image sets, with cached reference statistics.

FID (Heusel et al. 2017, Eq. 6): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
The trace of the matrix square root uses Tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(S1^(1/2) S2 S1^(1/2))): the
matrix in the eigenvalue problem is symmetric PSD, so two float64 ``eigh`` calls suffice (no scipy, no complex
parts to discard, exact also for the rank-deficient covariances of small sample sets).

KID (Binkowski et al. 2018, Sec. 3): the unbiased MMD^2 estimator (Gretton et al. 2012, Lemma 6) with the
cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets; reported with its std.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch

from visionformers._validate import check_device, fail
from visionformers.metrics.features import FeatureExtractor, iter_image_batches, model_device

STATS_FORMAT = 1  # bump when the .npz layout changes; older caches are then refused, not misread


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set (and the features themselves, which KID needs)."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64, unbiased (N - 1) normalisation as in pytorch-fid
    num_samples: int
    features: np.ndarray | None = None  # (N, D) float32; None when only FID is needed (a smaller cache)
    extractor: str = ""  # the extractor's name: statistics from different extractors must never be compared


@dataclass(frozen=True)
class MetricResult:
    """One reported figure with the sample counts it was computed from."""

    name: str
    value: float
    num_real: int
    num_fake: int
    std: float | None = None  # KID, IS: std over subsets / splits
    extractor: str = ""  # the network the features came from: figures from different ones never compare
    note: str = ""  # e.g. why the figure is below the standard protocol

    def __str__(self) -> str:
        spread = f" +- {self.std:.6g}" if self.std is not None else ""  # 6 significant digits at any scale
        by = f", {self.extractor}" if self.extractor else ""
        note = f" [{self.note}]" if self.note else ""
        return f"{self.name}: {self.value:.6g}{spread} (real n={self.num_real}, fake n={self.num_fake}{by}){note}"


def extract_features(
    source, extractor: FeatureExtractor, batch_size: int = 64, device: str | torch.device | None = None
) -> np.ndarray:
    """Run ``extractor`` over every image of ``source`` (see ``iter_image_batches``) -> (N, D) float32."""
    device = check_device("device", device) if device is not None else model_device(extractor)
    chunks = []
    with torch.no_grad():
        for images, _ in iter_image_batches(source, batch_size):
            feats = extractor(images.to(device, torch.float32))
            if feats.ndim != 2 or feats.shape[0] != images.shape[0]:
                fail("extractor output", feats, f"a (B, D) tensor with B={images.shape[0]}")
            chunks.append(feats.float().cpu().numpy())
    if not chunks:
        fail("source", type(source).__name__, "at least one image")
    return np.concatenate(chunks)


def compute_statistics(features, keep_features: bool = True, extractor: str = "") -> FeatureStats:
    """(N, D) features -> FeatureStats (mean, unbiased covariance; N >= 2)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        fail("features", f"array of shape {f.shape}",
             "an (N, D) array with N >= 2 (a covariance needs at least 2 images; the standard protocol uses 50,000)")
    return FeatureStats(
        mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), num_samples=f.shape[0],
        features=np.asarray(features, dtype=np.float32) if keep_features else None, extractor=extractor,
    )


def feature_statistics(
    source, extractor: FeatureExtractor, batch_size: int = 64, device=None, keep_features: bool = True
) -> FeatureStats:
    """Features of every image in ``source``, summarised; the extractor's ``name`` attribute labels them."""
    feats = extract_features(source, extractor, batch_size, device)
    return compute_statistics(feats, keep_features, getattr(extractor, "name", type(extractor).__name__))


def _psd_eigvals_floor(evals: torch.Tensor) -> torch.Tensor:
    """Zero the eigenvalues below the numerical rank tolerance (max |lambda| * D * eps, as numpy's matrix_rank).

    Covariances of N < D samples are rank-deficient; the sqrt of their ~1e-14 round-off eigenvalues would
    otherwise add up to a visible bias (about -3e-4 for FID(x, x) with N=500, D=2048).
    """
    tol = evals.abs().max() * evals.shape[0] * torch.finfo(evals.dtype).eps
    return torch.where(evals > tol, evals, torch.zeros_like(evals))


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root by eigendecomposition."""
    evals, evecs = torch.linalg.eigh(s)
    return (evecs * _psd_eigvals_floor(evals).sqrt()) @ evecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, Eq. 6), in float64."""
    mu1, mu2, s1, s2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or mu1.ndim != 1 or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        fail("statistics", f"mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, sigma {tuple(s1.shape)}/{tuple(s2.shape)}",
             "mu1, mu2 of shape (D,) and sigma1, sigma2 of shape (D, D) with one D")
    root1 = _psd_sqrt(s1)
    m = root1 @ s2 @ root1  # similar to S1 S2, so equal eigenvalues; symmetric, so eigvalsh applies
    tr_covmean = _psd_eigvals_floor(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3  # k(x, y) = (x.y / d + 1)^3, Binkowski et al. 2018, Sec. 3


def kid_from_features(
    real, fake, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) over ``num_subsets`` of the unbiased MMD^2; subsets of min(subset_size, N_real, N_fake),
    drawn without replacement within a subset (as torch-fidelity and clean-fid do)."""
    x = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        fail("features", f"shapes {tuple(x.shape)} and {tuple(y.shape)}", "two (N, D) arrays with one D")
    if isinstance(num_subsets, bool) or not isinstance(num_subsets, int) or num_subsets < 1:
        fail("num_subsets", num_subsets, "a positive int")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        fail("subset_size", m, "at least 2 samples in each set (and subset_size >= 2)")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        xs = x[torch.from_numpy(rng.choice(len(x), m, replace=False))]
        ys = y[torch.from_numpy(rng.choice(len(y), m, replace=False))]
        kxx, kyy, kxy = _polynomial_kernel(xs, xs), _polynomial_kernel(ys, ys), _polynomial_kernel(xs, ys)
        # unbiased: the diagonal k(x_i, x_i) terms are left out of the within-set means
        mmd2 = (
            (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean()
        )
        values.append(float(mmd2))
    return float(np.mean(values)), float(np.std(values))


def _check_same_extractor(real: FeatureStats, fake: FeatureStats) -> None:
    if real.extractor and fake.extractor and real.extractor != fake.extractor:
        fail("statistics", f"{real.extractor} vs {fake.extractor}", "real and fake features from one extractor")


def fid(real: FeatureStats, fake: FeatureStats) -> MetricResult:
    """FID between two sets of statistics."""
    _check_same_extractor(real, fake)
    value = frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)
    return MetricResult("FID", value, real.num_samples, fake.num_samples, extractor=real.extractor)


def kid(real: FeatureStats, fake: FeatureStats, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> MetricResult:
    """KID between two sets of statistics (both must keep their features)."""
    _check_same_extractor(real, fake)
    if real.features is None or fake.features is None:
        fail("statistics", "without features", "FeatureStats with features (compute with keep_features=True)")
    mean, std = kid_from_features(real.features, fake.features, num_subsets, subset_size, seed)
    return MetricResult("KID", mean, real.num_samples, fake.num_samples, std=std, extractor=real.extractor)


def save_statistics(path: str | os.PathLike, stats: FeatureStats) -> None:
    """Write statistics to a .npz (plain arrays only, so it loads with allow_pickle=False); atomic."""
    from visionformers._io import atomic_write_bytes

    path = os.fspath(path)
    arrays = {
        "format": np.int64(STATS_FORMAT), "mu": stats.mu, "sigma": stats.sigma,
        "num_samples": np.int64(stats.num_samples), "extractor": np.str_(stats.extractor),
    }
    if stats.features is not None:
        arrays["features"] = stats.features
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def load_statistics(path: str | os.PathLike) -> FeatureStats:
    """Read statistics written by ``save_statistics``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"statistics file {path!r} does not exist")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):  # not an .npz, or one holding pickled objects (never unpickled)
        fail("statistics file", path, f"a .npz written by save_statistics (format {STATS_FORMAT})")
    if not isinstance(z, np.lib.npyio.NpzFile):
        fail("statistics file", path, f"a .npz written by save_statistics (format {STATS_FORMAT}), not a bare .npy")
    with z:
        if "format" not in z.files or int(z["format"]) != STATS_FORMAT:
            fail("statistics file", path, f"a .npz written by save_statistics (format {STATS_FORMAT})")
        return FeatureStats(
            mu=z["mu"], sigma=z["sigma"], num_samples=int(z["num_samples"]),
            features=z["features"] if "features" in z.files else None, extractor=str(z["extractor"]),
        )
