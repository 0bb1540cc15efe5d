import numpy as np
import pytest
import torch

from visionformers.metrics import (
    FeatureStats,
    compute_statistics,
    fid,
    frechet_distance,
    kid,
    kid_from_features,
    load_statistics,
    save_statistics,
)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_scipy_sqrtm_closed_form():
    import scipy.linalg as linalg
    rng = np.random.default_rng(0)
    for d in (3, 17, 64):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_distance_diagonal_closed_form():
    # diagonal covariances commute, so Tr((S1 S2)^1/2) = sum sqrt(s1_i s2_i) with no matrix function at all
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n,d", [(40, 64), (500, 16)])  # rank-deficient and full-rank covariances
def test_fid_of_a_set_with_itself_is_zero(n, d):
    x = np.random.default_rng(2).normal(size=(n, d)) * 3 + 1
    stats = compute_statistics(x)
    result = fid(stats, stats)
    assert abs(result.value) < 1e-8 * d
    assert (result.num_real, result.num_fake) == (n, n) and f"n={n}" in str(result)


def test_fid_of_gaussian_samples_approaches_the_population_value():
    rng = np.random.default_rng(3)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    sample_fid = fid(compute_statistics(x, keep_features=False), compute_statistics(y, keep_features=False)).value
    assert sample_fid == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=0.02)


def _unbiased_mmd2_loops(x, y):
    """Independent oracle: the unbiased MMD^2 (Gretton et al. 2012, Lemma 6) by explicit sums."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_the_unbiased_mmd_by_explicit_sums():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.3
    mean, std = kid_from_features(x, y, num_subsets=3, subset_size=12)  # each subset is all 12, permuted
    assert mean == pytest.approx(_unbiased_mmd2_loops(x, y), rel=1e-10) and std == pytest.approx(0, abs=1e-12)


def test_kid_is_unbiased_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(5)
    # 300 independent small pairs from one distribution: the mean is ~0 (a biased V-statistic would be > 0)
    values = [kid_from_features(rng.normal(size=(8, 4)), rng.normal(size=(8, 4)), num_subsets=1, subset_size=8)[0]
              for _ in range(300)]
    assert abs(np.mean(values)) < 3 * np.std(values) / np.sqrt(len(values))
    same = kid(compute_statistics(rng.normal(size=(400, 16))), compute_statistics(rng.normal(size=(400, 16))),
               num_subsets=20, subset_size=100)
    shifted = kid(compute_statistics(rng.normal(size=(400, 16))),
                  compute_statistics(rng.normal(size=(400, 16)) + 0.5), num_subsets=20, subset_size=100)
    assert shifted.value > 10 * abs(same.value) and shifted.value > 5 * shifted.std
    assert shifted.num_real == 400 and "+-" in str(shifted)


def test_statistics_round_trip_without_pickle(tmp_path):
    x = np.random.default_rng(6).normal(size=(30, 7)).astype(np.float32)
    stats = compute_statistics(x, extractor="random_conv(seed=0, dim=7)")
    path = tmp_path / "sub" / "ref_stats"  # no .npz suffix: written exactly there, no temporary left behind
    save_statistics(path, stats)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ref_stats"]
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    back = load_statistics(path)
    assert np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)
    assert np.array_equal(back.features, stats.features)
    assert (back.num_samples, back.extractor) == (30, stats.extractor)
    no_feats = tmp_path / "small.npz"
    save_statistics(no_feats, compute_statistics(x, keep_features=False))
    assert load_statistics(no_feats).features is None


def test_statistics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_statistics(tmp_path / "missing.npz")
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, mu=np.zeros(3))
    with pytest.raises(ValueError, match="save_statistics"):
        load_statistics(foreign)
    a = FeatureStats(np.zeros(2), np.eye(2), 5, None, "a")
    b = FeatureStats(np.zeros(2), np.eye(2), 5, None, "b")
    with pytest.raises(ValueError, match="one extractor"):
        fid(a, b)
    with pytest.raises(ValueError, match="features"):
        kid(a, a)
    with pytest.raises(ValueError, match="N >= 2"):
        compute_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="statistics"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="subset_size"):
        kid_from_features(torch.zeros(1, 3), torch.zeros(5, 3))
