"""Samplers driven by the exact posterior-mean denoiser of Gaussian data.

For x ~ N(mu, S) and z = alpha x + sigma eps, E[x | z] = mu + alpha S (alpha^2 S + sigma^2 I)^-1 (z - alpha mu)
in closed form, so a sampler fed with it must reproduce mu and S. Images are
[N, 2, 2, 1] (D = 4 dimensions). Deterministic samplers are affine in their
initial noise for this denoiser, so their output law is read off exactly from
D + 1 runs (noise 0 and the unit vectors).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simple_diffusion import samplers
from simple_diffusion import schedules

D = 4
SHAPE = (2, 2, 1)
_A = np.random.RandomState(0).randn(D, D) * 0.3
COV = _A @ _A.T + 0.05 * np.eye(D)
MEAN = np.array([0.3, -0.2, 0.1, 0.0])
EIGVALS, EIGVECS = np.linalg.eigh(COV)
SIGMA_DATA = 0.5


def _posterior_mean(z, logsnr):
    """E[x | z] for z [B, 2, 2, 1], logsnr [B], via the eigenbasis of COV."""
    a = jnp.sqrt(jax.nn.sigmoid(logsnr))[:, None]
    s2 = jax.nn.sigmoid(-logsnr)[:, None]
    u, mean, lam = (jnp.asarray(v, jnp.float32) for v in (EIGVECS, MEAN, EIGVALS))
    coef = a * lam / (a**2 * lam + s2)  # [B, D] gain per eigen-direction.
    r = (z.reshape(z.shape[0], D) - a * mean) @ u
    return (mean + (coef * r) @ u.T).reshape(z.shape)


def gaussian_model(prediction):
    """The exact denoiser, emitting the raw output of a `prediction` network."""
    def model_fn(net_in, logsnr, labels):
        del labels
        lam = logsnr[:, None, None, None]
        a, s = jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))
        sve = s / a
        z = net_in
        if prediction == "edm":  # The network saw c_in * z / alpha.
            z = net_in * a * jnp.sqrt(sve**2 + SIGMA_DATA**2)
        x_hat = _posterior_mean(z, logsnr)
        if prediction == "x":
            return x_hat
        eps_hat = (z - a * x_hat) / s
        if prediction == "eps":
            return eps_hat
        if prediction == "v":
            return a * eps_hat - s * x_hat
        c_skip = SIGMA_DATA**2 / (sve**2 + SIGMA_DATA**2)
        c_out = sve * SIGMA_DATA / jnp.sqrt(sve**2 + SIGMA_DATA**2)
        return (x_hat - c_skip * z / a) / c_out
    return model_fn


def _basis_noise():
    return jnp.concatenate([jnp.zeros((1, D)), jnp.eye(D)]).reshape((D + 1,) + SHAPE)


@functools.lru_cache(maxsize=None)
def _affine_map(sampler, num_steps, prediction="x", **kwargs):
    """(A, b) with sample = A @ noise + b, float64, for a deterministic sampler."""
    run = jax.jit(lambda noise: samplers.sample(
        gaussian_model(prediction), jax.random.PRNGKey(0), noise=noise, sampler=sampler,
        num_steps=num_steps, prediction=prediction, clip_x=False, sigma_data=SIGMA_DATA,
        **kwargs))
    out = np.asarray(run(_basis_noise()), np.float64).reshape(D + 1, D)
    return (out[1:] - out[0]).T, out[0]


def _exact_ve_ode_map(sigma_max=80.0):
    """Exact probability-flow ODE from x_ve = sigma_max * n to sigma = 0.

    Per eigen-direction dx/dsigma = (x - mu) sigma / (lam + sigma^2), so
    x(0) - mu = (x(sigma_max) - mu) sqrt(lam / (lam + sigma_max^2)).
    """
    m = EIGVECS @ np.diag(np.sqrt(EIGVALS / (EIGVALS + sigma_max**2))) @ EIGVECS.T
    return m * sigma_max, MEAN - m @ MEAN


def _ode_error(sampler, num_steps):
    a, b = _affine_map(sampler, num_steps)
    a_ref, b_ref = _exact_ve_ode_map()
    return max(np.abs(a - a_ref).max(), np.abs(b - b_ref).max())


def test_heun_is_second_order_and_euler_first_order():
    heun = [_ode_error("heun", n) for n in (8, 16, 32)]
    euler = [_ode_error("euler", n) for n in (8, 16, 32)]
    for coarse, fine in zip(heun[:-1], heun[1:]):
        assert 3.2 < coarse / fine < 6.0, heun
    for coarse, fine in zip(euler[:-1], euler[1:]):
        assert 1.7 < coarse / fine < 2.3, euler
    assert heun[-1] < 0.02 and heun[-1] < euler[-1] / 5


def test_heun_reproduces_data_law():
    a, b = _affine_map("heun", 32)  # Shared with the order test.
    # The initial noise is standard normal, so the output law is N(b, A A^T).
    np.testing.assert_allclose(b, MEAN, atol=0.01)
    np.testing.assert_allclose(a @ a.T, COV, atol=0.03)


def test_ddim_reproduces_data_law_with_first_order_error():
    errors = []
    for num_steps in (64, 128):
        a, b = _affine_map("ddim", num_steps, logsnr_fn=schedules.get_logsnr_fn("cosine"))
        np.testing.assert_allclose(b, MEAN, atol=1e-3)
        errors.append(np.abs(a @ a.T - COV).max())
    assert errors[1] < 0.02 and 1.7 < errors[0] / errors[1] < 2.3, errors


@pytest.mark.parametrize("sampler,prediction,kwargs", [
    # Ancestral sampling ignores Var[x | z_t] within a step: its error is O(1 / N), so
    # the paper's 512 steps.
    ("ddpm", "eps", dict(logsnr_fn=schedules.get_logsnr_fn("cosine"), num_steps=512)),
    # EDM's stochastic sampler: Heun with churn (gamma = 10 / 64 inside [s_tmin, s_tmax]).
    ("heun", "edm", dict(num_steps=64, s_churn=10.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.0)),
])
def test_stochastic_samplers_reproduce_data_law(sampler, prediction, kwargs):
    n = 4096
    out = jax.jit(lambda rng: samplers.sample(
        gaussian_model(prediction), rng, shape=(n,) + SHAPE, sampler=sampler,
        prediction=prediction, clip_x=False, sigma_data=SIGMA_DATA, **kwargs))(
            jax.random.PRNGKey(7))
    x = np.asarray(out, np.float64).reshape(n, D)
    # Monte Carlo standard errors: mean ~0.01, covariance entries ~0.01.
    np.testing.assert_allclose(x.mean(0), MEAN, atol=0.04)
    np.testing.assert_allclose(np.cov(x.T), COV, atol=0.05)


@pytest.mark.parametrize("clip_x", [False, True])
def test_ddim_eta_one_is_ddpm(clip_x):
    common = dict(noise=_basis_noise() * 0.8, num_steps=16, prediction="v", clip_x=clip_x,
                  logsnr_fn=schedules.get_logsnr_fn("cosine_shifted", image_d=128))
    rng = jax.random.PRNGKey(3)
    ddpm = samplers.sample(gaussian_model("v"), rng, sampler="ddpm", **common)
    ddim = samplers.sample(gaussian_model("v"), rng, sampler="ddim", eta=1.0, **common)
    np.testing.assert_allclose(ddim, ddpm, atol=2e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "heun"])
def test_scan_matches_python_loop_and_rng_is_reproducible(sampler):
    kwargs = dict(shape=(3,) + SHAPE, sampler=sampler, num_steps=4, prediction="v",
                  logsnr_fn=schedules.get_logsnr_fn("cosine"), s_churn=10.0, return_trajectory=True)
    model = gaussian_model("v")
    x_scan, traj_scan = samplers.sample(model, jax.random.PRNGKey(1), **kwargs)
    x_loop, traj_loop = samplers.sample(model, jax.random.PRNGKey(1), use_scan=False, **kwargs)
    x_again, _ = samplers.sample(model, jax.random.PRNGKey(1), **kwargs)
    x_other, _ = samplers.sample(model, jax.random.PRNGKey(2), **kwargs)
    # Eager and compiled float32 arithmetic differ in rounding only.
    np.testing.assert_allclose(x_loop, x_scan, atol=1e-4)
    np.testing.assert_allclose(traj_loop, traj_scan, atol=1e-4)
    np.testing.assert_array_equal(x_again, x_scan)
    assert np.abs(np.asarray(x_other) - np.asarray(x_scan)).max() > 1e-2
    assert traj_scan.shape == (4, 3) + SHAPE
    # The last trajectory entry is the returned state (VP z at sigma = 0 is x itself).
    np.testing.assert_allclose(traj_scan[-1], x_scan, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x", "v", "edm"])
def test_denoiser_recovers_posterior_mean_for_every_parametrization(prediction):
    denoise = samplers.make_denoiser(gaussian_model(prediction), prediction=prediction,
                                     sigma_data=SIGMA_DATA)
    z = jax.random.normal(jax.random.PRNGKey(0), (3,) + SHAPE)
    for logsnr in (-6.0, 0.0, 6.0):
        x_hat, eps_hat = denoise(z, jnp.float32(logsnr))
        # float64 reference of E[x | z].
        a, s = math.sqrt(1 / (1 + math.exp(-logsnr))), math.sqrt(1 / (1 + math.exp(logsnr)))
        zf = np.asarray(z, np.float64).reshape(3, D)
        gain = EIGVECS @ np.diag(a * EIGVALS / (a**2 * EIGVALS + s**2)) @ EIGVECS.T
        expected = MEAN + (zf - a * MEAN) @ gain.T
        np.testing.assert_allclose(np.asarray(x_hat).reshape(3, D), expected, atol=1e-4)
        np.testing.assert_allclose(eps_hat, (z - a * x_hat) / s, atol=1e-4)


def _label_model(calls):
    """x-prediction network whose output is label * 0.1 everywhere (null label -> -0.5)."""
    def model_fn(net_in, logsnr, labels):
        calls.append(net_in.shape[0])
        value = jnp.where(labels == 10, -0.5, 0.1 * labels.astype(jnp.float32))
        return jnp.broadcast_to(value[:, None, None, None], net_in.shape)
    return model_fn


def test_guidance_convention_single_call_and_interval():
    calls = []
    labels = jnp.asarray([1, 4], jnp.int32)
    z = jnp.zeros((2,) + SHAPE)
    denoise = samplers.make_denoiser(_label_model(calls), prediction="x", labels=labels,
                                     null_label=10, guidance_scale=2.0,
                                     guidance_interval=(-1.0, 3.0))
    x_hat, eps_hat = denoise(z, jnp.float32(0.0))
    assert calls == [4]  # Conditional and unconditional in one batched call.
    cond = np.array([0.1, 0.4])
    expected = 3.0 * cond - 2.0 * (-0.5)  # (1 + w) cond - w uncond.
    np.testing.assert_allclose(np.asarray(x_hat)[:, 0, 0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(eps_hat, (z - math.sqrt(0.5) * x_hat) / math.sqrt(0.5), atol=1e-6)
    x_out, _ = denoise(z, jnp.float32(5.0))  # Outside the interval: plain conditional.
    np.testing.assert_allclose(np.asarray(x_out)[:, 0, 0, 0], cond, rtol=1e-6)
    with pytest.raises(ValueError, match="null_label"):
        samplers.make_denoiser(_label_model([]), labels=labels, guidance_scale=1.0)


def test_guided_sampling_jits_and_clips():
    calls = []
    run = jax.jit(lambda rng: samplers.sample(
        _label_model(calls), rng, shape=(2,) + SHAPE, sampler="ddim", num_steps=8, prediction="x",
        logsnr_fn=schedules.get_logsnr_fn("cosine"), labels=jnp.asarray([1, 4], jnp.int32),
        null_label=10, guidance_scale=2.0, clip_x=True))
    x = np.asarray(run(jax.random.PRNGKey(0)))
    # Guided x_hat is 1.3 and 2.2, clipped to 1: DDIM with a constant x_hat lands on it,
    # up to the final state's noise level sigma(logsnr = 15) = 5.5e-4.
    np.testing.assert_allclose(x, np.ones_like(x), atol=2e-3)
    assert calls == [4]  # Traced once (scan), with the doubled batch.


def test_karras_grid_and_bad_arguments():
    np.testing.assert_allclose(samplers.noise_grid("heun", 5),
                               [80.0, 17.527832, 2.515219, 0.169753, 0.002, 0.0], rtol=1e-5)
    grid = samplers.noise_grid("ddpm", 4, schedules.get_logsnr_fn("cosine"))
    np.testing.assert_allclose(grid, [-15.0, -1.761183, 0.0, 1.761183, 15.0], atol=1e-4)
    with pytest.raises(ValueError, match="sampler"):
        samplers.sample(gaussian_model("x"), jax.random.PRNGKey(0), shape=(1,) + SHAPE,
                        sampler="dpm")
    with pytest.raises(ValueError, match="logsnr_fn"):
        samplers.sample(gaussian_model("x"), jax.random.PRNGKey(0), shape=(1,) + SHAPE)
    with pytest.raises(ValueError, match="shape or noise"):
        samplers.sample(gaussian_model("x"), jax.random.PRNGKey(0), sampler="heun")
