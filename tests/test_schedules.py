"""Schedules against float64 NumPy re-derivations and the reference values of paper.md section 9."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simple_diffusion import losses
from simple_diffusion import schedules

T9 = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
# paper.md section 9, image_d = 512.
REFERENCE = {
    "cos": [15.000, 3.680, 1.761, 0.000, -1.761, -3.680, -15.000],
    "shift64": [10.841, -0.479, -2.398, -4.159, -5.920, -7.839, -19.159],
    "kd_shift64": [15.000, -0.468, -2.390, -4.150, -5.903, -7.794, -15.000],
    "interp_luc": [13.614, 1.878, -0.665, -3.466, -6.267, -8.809, -20.545],
    "interp_rev": [9.455, -1.450, -2.744, -3.466, -4.187, -5.482, -16.386],
}
FNS = {
    "cos": dict(name="cosine"),
    "shift64": dict(name="cosine_shifted", image_d=512),
    "kd_shift64": dict(name="cosine_shifted", image_d=512, shift_mode="clip_preserving"),
    "interp_luc": dict(name="cosine_interpolated", image_d=512),
    "interp_rev": dict(name="cosine_interpolated", image_d=512, interp_orientation="reversed"),
}
ALL_SCHEDULES = list(FNS.values()) + [
    dict(name="ddpm_linear"), dict(name="ddpm_cosine"), dict(name="ddpm_sigmoid"),
    dict(name="edm")]


def _fn(spec):
    spec = dict(spec)
    return schedules.get_logsnr_fn(spec.pop("name"), **spec)


def _np_cosine(t, lmin=-15.0, lmax=15.0):
    t_min = np.arctan(np.exp(-0.5 * lmax))
    t_max = np.arctan(np.exp(-0.5 * lmin))
    return -2.0 * np.log(np.tan(t_min + np.asarray(t, np.float64) * (t_max - t_min)))


@pytest.mark.parametrize("column", sorted(REFERENCE))
def test_section9_reference_values(column):
    got = np.asarray(_fn(FNS[column])(jnp.asarray(T9)))
    np.testing.assert_allclose(got, REFERENCE[column], atol=1.5e-3)


def test_cosine_family_matches_float64_rederivation():
    t = np.linspace(0.0, 1.0, 1001)
    for lmin, lmax in [(-15.0, 15.0), (-10.0, 5.0)]:
        got = schedules.logsnr_cosine(jnp.asarray(t, jnp.float32), lmin, lmax)
        np.testing.assert_allclose(got, _np_cosine(t, lmin, lmax), atol=2e-4, rtol=1e-5)
    shift = 2 * np.log(64 / 256)
    got = _fn(dict(name="cosine_shifted", image_d=256))(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(got, _np_cosine(t) + shift, atol=2e-4, rtol=1e-5)
    got = _fn(dict(name="cosine_shifted", image_d=256, shift_mode="clip_preserving"))(
        jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(got, _np_cosine(t, -15 - shift, 15 - shift) + shift, atol=2e-4,
                               rtol=1e-5)
    lo, hi = 2 * np.log(32 / 512), 2 * np.log(256 / 512)
    expected = t * (_np_cosine(t) + lo) + (1 - t) * (_np_cosine(t) + hi)
    got = _fn(dict(name="cosine_interpolated", image_d=512))(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("spec", ALL_SCHEDULES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_monotone_decreasing_and_finite(spec):
    logsnr = np.asarray(_fn(spec)(jnp.linspace(0.0, 1.0, 2049)), np.float64)
    assert np.all(np.isfinite(logsnr))
    assert np.all(np.diff(logsnr) < 0)


def test_endpoints():
    ends = jnp.asarray([0.0, 1.0])
    np.testing.assert_allclose(_fn(dict(name="cosine", logsnr_min=-7, logsnr_max=9))(ends),
                               [9.0, -7.0], atol=1e-4)
    shift = 2 * math.log(64 / 128)
    np.testing.assert_allclose(_fn(dict(name="cosine_shifted", image_d=128))(ends),
                               [15 + shift, -15 + shift], atol=1e-4)
    np.testing.assert_allclose(
        _fn(dict(name="cosine_shifted", image_d=128, shift_mode="clip_preserving"))(ends),
        [15.0, -15.0], atol=1e-4)
    np.testing.assert_allclose(_fn(dict(name="edm"))(ends),
                               [-2 * math.log(0.002), -2 * math.log(80.0)], rtol=1e-5)
    np.testing.assert_allclose(_fn(dict(name="ddpm_linear", logsnr_max=12.0))(ends)[0], 12.0)


def test_alpha_sigma_identities():
    logsnr = jnp.linspace(-20.0, 20.0, 101)
    alpha, sigma = schedules.alpha_sigma(logsnr)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    lam = np.linspace(-20.0, 20.0, 101)
    np.testing.assert_allclose(alpha, np.sqrt(1 / (1 + np.exp(-lam))), rtol=1e-5)
    np.testing.assert_allclose(sigma, np.sqrt(1 / (1 + np.exp(lam))), rtol=1e-5)
    a_inf, s_inf = schedules.alpha_sigma(jnp.asarray([jnp.inf, -jnp.inf]))
    np.testing.assert_array_equal(a_inf, [1.0, 0.0])
    np.testing.assert_array_equal(s_inf, [0.0, 1.0])


@pytest.mark.parametrize("spec", [
    dict(name="cosine"), dict(name="cosine", logsnr_min=-10, logsnr_max=6),
    dict(name="cosine_shifted", image_d=512),
    dict(name="cosine_shifted", image_d=512, shift_mode="clip_preserving"),
    dict(name="edm"), dict(name="edm", sigma_min=0.01, sigma_max=10.0, rho=3.0)],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_inverse_round_trip(spec):
    spec = dict(spec)
    name = spec.pop("name")
    t = jnp.linspace(0.0, 1.0, 1001)
    t_back = schedules.get_t_fn(name, **spec)(schedules.get_logsnr_fn(name, **spec)(t))
    np.testing.assert_allclose(t_back, t, atol=2e-5)


def _np_ddpm_betas(kind, n=1000):
    if kind == "linear":
        return np.linspace(1e-4, 0.02, n)
    if kind == "sigmoid":
        return 1e-4 + (0.02 - 1e-4) / (1 + np.exp(-np.linspace(-6, 6, n)))
    f = lambda i: math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(n)])


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_ddpm_logsnr_matches_cumprod(kind):
    alpha_bar = np.cumprod(1.0 - _np_ddpm_betas(kind))
    expected = np.log(alpha_bar / (1 - alpha_bar))
    idx = np.array([1, 2, 10, 100, 500, 900, 999, 1000])
    got = _fn(dict(name=f"ddpm_{kind}"))(jnp.asarray(idx / 1000.0, jnp.float32))
    np.testing.assert_allclose(got, expected[idx - 1], atol=2e-3, rtol=1e-4)


def test_karras_sigmas_and_edm_schedule():
    np.testing.assert_allclose(schedules.karras_sigmas(5),
                               [80.0, 17.527832, 2.515219, 0.169753, 0.002, 0.0], rtol=1e-5)
    # A uniform t grid of the continuous EDM schedule is the Karras grid reversed.
    sig = np.exp(-0.5 * np.asarray(schedules.logsnr_edm(jnp.linspace(0.0, 1.0, 5))))
    np.testing.assert_allclose(sig[::-1], [80.0, 17.527832, 2.515219, 0.169753, 0.002], rtol=1e-5)


def test_vp_ve_mapping():
    np.testing.assert_allclose(schedules.sigma_ve_from_logsnr(jnp.asarray([0.0, -4.159])),
                               [1.0, 8.0005], rtol=1e-4)
    np.testing.assert_allclose(schedules.alpha_sigma(jnp.asarray(0.0))[0], 0.70710678, rtol=1e-6)
    np.testing.assert_allclose(schedules.logsnr_from_sigma_ve(jnp.asarray([1.0, 0.5])),
                               [0.0, 2 * math.log(2)], atol=1e-6)


def test_edm_lognormal_moments():
    logsnr = schedules.edm_lognormal_logsnr(jax.random.PRNGKey(0), (20000,))
    ln_sigma = -0.5 * np.asarray(logsnr, np.float64)
    assert abs(ln_sigma.mean() - (-1.2)) < 0.03
    assert abs(ln_sigma.std() - 1.2) < 0.03


def test_bad_names_and_kwargs_raise():
    with pytest.raises(ValueError, match="accepted"):
        schedules.get_logsnr_fn("linear")
    with pytest.raises(ValueError, match="noise_d"):
        schedules.get_logsnr_fn("cosine", noise_d=64)
    with pytest.raises(ValueError, match="requires"):
        schedules.get_logsnr_fn("cosine_shifted")
    with pytest.raises(ValueError, match="shift_mode"):
        schedules.get_logsnr_fn("cosine_shifted", image_d=64, shift_mode="before")
    with pytest.raises(ValueError, match="interp_orientation"):
        schedules.get_logsnr_fn("cosine_interpolated", image_d=64, interp_orientation="eq6")
    with pytest.raises(ValueError, match="closed-form"):
        schedules.get_t_fn("cosine_interpolated", image_d=512)


def test_average_pooling_multiplies_snr_by_s_squared():
    """Seed identity, by Monte Carlo: s x s pooling of z_t multiplies the SNR by s^2.

    And the 512-px schedule shifted to 64, pooled by 8 to 64 px, has the SNR of the
    unshifted cosine schedule at 64 px.
    """
    x_rng, eps_rng = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.uniform(x_rng, (16, 64, 64, 1), minval=-1, maxval=1)
    eps = jax.random.normal(eps_rng, x.shape)
    t = jnp.asarray([0.2, 0.5, 0.8])
    shifted = schedules.get_logsnr_fn("cosine_shifted", image_d=512, noise_d=64)(t)
    for i in range(3):
        logsnr = shifted[i]
        alpha, sigma = schedules.alpha_sigma(logsnr)
        z = alpha * x + sigma * eps
        for s in (2, 8):
            noise = losses.block_average_pool(z, s) - alpha * losses.block_average_pool(x, s)
            pooled_logsnr = np.log(float(alpha) ** 2 / np.var(np.asarray(noise, np.float64)))
            # Standard error of a log-variance over n samples is sqrt(2 / n) <= 0.045 here.
            assert abs(pooled_logsnr - (float(logsnr) + 2 * math.log(s))) < 0.15
            if s == 8:
                assert abs(pooled_logsnr - _np_cosine(float(t[i]))) < 0.15
