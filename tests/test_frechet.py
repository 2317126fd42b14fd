"""Fréchet distance, KID, Inception Score and metric bookkeeping vs closed forms."""

import os

import numpy as np
import pytest

from simple_diffusion.evaluation import frechet
from simple_diffusion.evaluation import metrics


def _random_rotation(rng, dim):
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


_METHODS = pytest.mark.parametrize("method", ["eigh", "sqrtm"])


@_METHODS
def test_frechet_distance_commuting_covariances_closed_form(method):
    # With a shared eigenbasis, tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so
    # d² = |mu1 - mu2|² + sum (sqrt(a_i) - sqrt(b_i))².
    rng = np.random.default_rng(0)
    dim = 24
    q = _random_rotation(rng, dim)
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet.frechet_distance(mu1, q @ np.diag(a) @ q.T,
                                   mu2, q @ np.diag(b) @ q.T, method=method)
    np.testing.assert_allclose(got, expected, rtol=1e-9)


@_METHODS
def test_frechet_distance_general_covariances_vs_eigenvalues(method):
    # S1 S2 is similar to a PSD matrix, so tr((S1 S2)^1/2) is the sum of the
    # square roots of its (real, >= 0) eigenvalues.
    rng = np.random.default_rng(1)
    dim = 16
    m1, m2 = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = m1 @ m1.T / dim, m2 @ m2.T / dim
    eigenvalues = np.linalg.eigvals(s1 @ s2).real
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eigenvalues))
    got = frechet.frechet_distance(np.zeros(dim), s1, np.zeros(dim), s2,
                                   method=method)
    np.testing.assert_allclose(got, expected, rtol=1e-8)


@_METHODS
def test_frechet_distance_one_dimensional(method):
    # N(m1, s1²) vs N(m2, s2²): (m1 - m2)² + (s1 - s2)².
    got = frechet.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]], method=method)
    assert got == pytest.approx(9.0 + 1.0, rel=1e-12)


@_METHODS
def test_frechet_distance_near_singular_covariances(method):
    # Rank-deficient covariances (as from fewer samples than dimensions):
    # the closed form still holds, with zero eigenvalues contributing 0.
    rng = np.random.default_rng(2)
    dim = 32
    q = _random_rotation(rng, dim)
    a = np.concatenate([rng.uniform(0.5, 2.0, dim // 2), np.zeros(dim // 2)])
    b = np.concatenate([rng.uniform(0.5, 2.0, dim // 2), 1e-12 * np.ones(dim // 2)])
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet.frechet_distance(np.zeros(dim), q @ np.diag(a) @ q.T,
                                   np.zeros(dim), q @ np.diag(b) @ q.T,
                                   method=method)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


@_METHODS
def test_frechet_distance_few_samples_many_dims_is_finite_and_zero_on_self(method):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(20, 64))  # covariance of rank 19 < 64
    mu, sigma = frechet.feature_statistics(features)
    assert abs(frechet.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-4
    mu2, sigma2 = frechet.feature_statistics(rng.normal(size=(20, 64)) + 1.0)
    got = frechet.frechet_distance(mu, sigma, mu2, sigma2, method=method)
    assert np.isfinite(got) and got > 50  # the mean shift alone gives 64
    assert got == pytest.approx(
        frechet.frechet_distance(mu, sigma, mu2, sigma2,
                                 method="sqrtm" if method == "eigh" else "eigh"),
        rel=1e-6)


def test_dataset_vs_itself_is_zero_and_vs_noise_is_large():
    rng = np.random.default_rng(4)
    # A "dataset": correlated, low-dimensional structure in 48-d features.
    latent = rng.normal(size=(2000, 6))
    data = np.tanh(latent @ rng.normal(size=(6, 48)))
    shuffled = data[rng.permutation(len(data))]
    noise = rng.uniform(-1, 1, size=(2000, 48))
    stats = frechet.feature_statistics(data)
    self_fd = frechet.frechet_distance(*stats, *stats)
    half_fd = frechet.frechet_distance(*frechet.feature_statistics(data[:1000]),
                                       *frechet.feature_statistics(data[1000:]))
    noise_fd = frechet.frechet_distance(*stats, *frechet.feature_statistics(noise))
    assert abs(self_fd) < 1e-8
    assert abs(frechet.frechet_distance(
        *stats, *frechet.feature_statistics(shuffled))) < 1e-8
    assert noise_fd > 10.0
    assert half_fd < noise_fd / 50


def test_feature_statistics_match_numpy_definitions():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 3)).astype(np.float32)
    mu, sigma = frechet.feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.shape == (3, 3)
    centred = x.astype(np.float64) - x.astype(np.float64).mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)


def _mmd2_unbiased_bruteforce(x, y):
    m, d = len(x), x.shape[1]
    k = lambda u, v: (np.dot(u, v) / d + 1.0) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2 * xy / m**2


def test_kid_equals_unbiased_mmd_when_subset_is_everything():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.3
    # A subset of all samples is a permutation, so every subset agrees.
    mean, std = frechet.kernel_distance(x, y, num_subsets=3, subset_size=12)
    np.testing.assert_allclose(mean, _mmd2_unbiased_bruteforce(x, y), rtol=1e-10)
    assert std < 1e-12
    assert frechet.kernel_distance(y, x, num_subsets=3, subset_size=12)[0] == (
        pytest.approx(mean, rel=1e-10))


def test_kid_is_near_zero_for_one_distribution_and_grows_with_shift():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    same, same_std = frechet.kernel_distance(x, y, num_subsets=10, subset_size=100)
    small, _ = frechet.kernel_distance(x, y + 0.5, num_subsets=10, subset_size=100)
    large, _ = frechet.kernel_distance(x, y + 2.0, num_subsets=10, subset_size=100)
    assert abs(same) < 3 * same_std + 1e-3
    assert 0 < small < large


def test_inception_score_closed_forms():
    k, per_class = 7, 4
    confident = 100.0 * np.tile(np.eye(k), (per_class, 1))
    score, _ = metrics.inception_score(confident, num_splits=1)
    assert score == pytest.approx(k, rel=1e-6)
    # Every split holds each class equally often: all splits score K.
    score, std = metrics.inception_score(confident, num_splits=per_class)
    assert score == pytest.approx(k, rel=1e-6) and std < 1e-6
    assert metrics.inception_score(np.zeros((10, 5)), num_splits=2)[0] == (
        pytest.approx(1.0))
    # Two classes, p(y|x) = (p, 1 - p) or (1 - p, p) half the time each:
    # p(y) is uniform and IS = exp(log 2 - H(p)).
    p = 0.8
    logits = np.log(np.array([[p, 1 - p], [1 - p, p]] * 5))
    entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert metrics.inception_score(logits, num_splits=1)[0] == pytest.approx(
        2 * np.exp(-entropy), rel=1e-10)


def test_stats_roundtrip(tmp_path):
    rng = np.random.default_rng(8)
    features = rng.normal(size=(30, 4))
    stats = metrics.compute_stats(features, keep_for_kid=10)
    assert stats.features.shape == (10, 4)
    path = str(tmp_path / "ref.npz")
    metrics.save_stats(path, stats.mu, stats.sigma, features=stats.features)
    loaded = metrics.load_stats(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, stats.features)
    metrics.save_stats(path, stats.mu, stats.sigma)
    assert metrics.load_stats(path).features is None


def test_unreadable_stats_files_name_the_path_and_the_fix(tmp_path):
    stats = metrics.compute_stats(np.random.default_rng(0).normal(size=(30, 4)), keep_for_kid=5)
    good = str(tmp_path / "good.npz")
    metrics.save_stats(good, stats.mu, stats.sigma, features=stats.features)
    assert os.listdir(tmp_path) == ["good.npz"]  # Written atomically: no temporary left.
    with open(good, "rb") as f:
        data = f.read()
    truncated, text, wrong = (str(tmp_path / n) for n in ("cut.npz", "text.npz", "wrong.npz"))
    with open(truncated, "wb") as f:
        f.write(data[:len(data) // 2])
    with open(text, "w") as f:
        f.write("mu sigma\n1 2\n")
    np.savez(wrong, mean=stats.mu)
    for path in (truncated, text, wrong):
        with pytest.raises(metrics.StatsFileError) as error:
            metrics.load_stats(path)
        message = str(error.value)
        assert path in message and "Delete it" in message and "\n" not in message
        assert isinstance(error.value, ValueError)  # The CLIs' one-line errors.
    with pytest.raises(FileNotFoundError):
        metrics.load_stats(str(tmp_path / "absent.npz"))


def test_compute_metrics_names_and_values():
    rng = np.random.default_rng(9)
    gen, ref = rng.normal(size=(60, 8)), rng.normal(size=(80, 8)) + 1.0
    out = metrics.compute_metrics(gen, ref, feature_name="effnet_lite0",
                                  kid_subsets=5, kid_subset_size=50)
    assert set(out) == {"fd_effnet_lite0", "kid_effnet_lite0", "kid_effnet_lite0_std"}
    expected_fd = frechet.frechet_distance(*frechet.feature_statistics(gen),
                                           *frechet.feature_statistics(ref))
    assert out["fd_effnet_lite0"] == pytest.approx(expected_fd, rel=1e-12)
    assert out["kid_effnet_lite0"] > 0

    stats_only = metrics.FeatureStats(*frechet.feature_statistics(ref))
    out = metrics.compute_metrics(gen, stats_only, feature_name="inception_v3",
                                  gen_logits=rng.normal(size=(60, 1008)))
    assert set(out) == {"fid", "inception_score", "inception_score_std"}
    assert out["fid"] == pytest.approx(expected_fd, rel=1e-12)

    with pytest.raises(ValueError, match="InceptionV3 logits"):
        metrics.compute_metrics(gen, ref, feature_name="effnet_lite0",
                                gen_logits=rng.normal(size=(60, 1000)))
    with pytest.raises(ValueError, match="unknown feature_name"):
        metrics.compute_metrics(gen, ref, feature_name="fid")
