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


_OPTION_FIELDS = set(samplers.SamplerOptions.field_names())


def run_sampler(model_fn, rng, **kwargs):
    """`samplers.sample` with SamplerOptions fields and sample() arguments mixed as
    keywords. ODE samplers without a logsnr_fn use EDM's sigma in [0.002, 80]."""
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_FIELDS}
    if options.get("sampler") in ("euler", "heun") and kwargs.get("logsnr_fn") is None:
        options.setdefault("sigma_min", 0.002)
        options.setdefault("sigma_max", 80.0)
    return samplers.sample(model_fn, rng, samplers.SamplerOptions(**options), **kwargs)


def _basis_noise():
    return jnp.concatenate([jnp.zeros((1, D)), jnp.eye(D)]).reshape((D + 1,) + SHAPE)


@functools.lru_cache(maxsize=None)
def _affine_map(sampler, num_steps, prediction="x", **kwargs):
    """(A, b) with sample = A @ noise + b, float64, for a deterministic sampler."""
    run = jax.jit(lambda noise: run_sampler(
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
    out = jax.jit(lambda rng: run_sampler(
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
    ddpm = run_sampler(gaussian_model("v"), rng, sampler="ddpm", **common)
    ddim = run_sampler(gaussian_model("v"), rng, sampler="ddim", eta=1.0, **common)
    np.testing.assert_allclose(ddim, ddpm, atol=2e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "heun"])
def test_scan_matches_python_loop_and_rng_is_reproducible(sampler):
    kwargs = dict(shape=(3,) + SHAPE, sampler=sampler, num_steps=4, prediction="v",
                  logsnr_fn=schedules.get_logsnr_fn("cosine"), s_churn=10.0, return_trajectory=True,
                  sigma_min=0.002, sigma_max=80.0)  # EDM's range keeps |x| ~ 1 (rounding).
    model = gaussian_model("v")
    x_scan, traj_scan = run_sampler(model, jax.random.PRNGKey(1), **kwargs)
    x_loop, traj_loop = run_sampler(model, jax.random.PRNGKey(1), use_scan=False, **kwargs)
    x_again, _ = run_sampler(model, jax.random.PRNGKey(1), **kwargs)
    x_other, _ = run_sampler(model, jax.random.PRNGKey(2), **kwargs)
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
    # lax.cond traces both branches: the guided pair in ONE batched call of 2B, and the
    # conditional batch alone (which one runs is tested by counting executed calls).
    assert calls == [4, 2]
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
    run = jax.jit(lambda rng: run_sampler(
        _label_model(calls), rng, shape=(2,) + SHAPE, sampler="ddim", num_steps=8, prediction="x",
        logsnr_fn=schedules.get_logsnr_fn("cosine"), labels=jnp.asarray([1, 4], jnp.int32),
        null_label=10, guidance_scale=2.0, clip_x=True))
    x = np.asarray(run(jax.random.PRNGKey(0)))
    # Guided x_hat is 1.3 and 2.2, clipped to 1: DDIM with a constant x_hat lands on it,
    # up to the final state's noise level sigma(logsnr = 15) = 5.5e-4.
    np.testing.assert_allclose(x, np.ones_like(x), atol=2e-3)
    assert calls == [4]  # Traced once (scan), with the doubled batch.


def test_grids_follow_the_trained_schedule_and_bad_arguments():
    # ODE samplers: Karras rho-grid between the trained ends sigma = exp(-logsnr / 2).
    shifted = schedules.get_logsnr_fn("cosine_shifted", image_d=512)  # logSNR [-19.16, 10.84].
    grid = samplers.logsnr_grid(samplers.SamplerOptions(sampler="heun", num_steps=5), shifted)
    sigmas = np.exp(-0.5 * np.asarray(grid, np.float64))
    lo, hi = -15.0 - 2 * math.log(8), 15.0 - 2 * math.log(8)
    s_max, s_min = math.exp(-lo / 2), math.exp(-hi / 2)
    ramp = np.linspace(0, 1, 5)
    expected = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas[:-1], expected, rtol=2e-4)
    assert sigmas[-1] == 0.0 and np.isinf(grid[-1])
    # EDM's own grid when the range is given explicitly (paper.md section 9 values).
    grid = samplers.logsnr_grid(samplers.SamplerOptions(sampler="euler", num_steps=5,
                                                        sigma_min=0.002, sigma_max=80.0))
    np.testing.assert_allclose(np.exp(-0.5 * np.asarray(grid, np.float64)),
                               [80.0, 17.527832, 2.515219, 0.169753, 0.002, 0.0], rtol=1e-5)
    grid = samplers.logsnr_grid(samplers.SamplerOptions(num_steps=4),
                                schedules.get_logsnr_fn("cosine"))
    np.testing.assert_allclose(grid, [-15.0, -1.761183, 0.0, 1.761183, 15.0], atol=1e-4)
    for bad, match in [(dict(sampler="dpm"), "sampler"), (dict(eta=1.5), "eta"),
                       (dict(eta=-5.0), "eta"), (dict(guidance_scale=float("nan")), "guidance"),
                       (dict(num_steps=0), "num_steps"),
                       (dict(guidance_logsnr_min=3.0, guidance_logsnr_max=-3.0), "guidance"),
                       (dict(sampler="heun", spacing="trailing"), "spacing"),
                       (dict(clip_x="maybe"), "clip_x")]:
        with pytest.raises(ValueError, match=match):
            samplers.SamplerOptions(**bad).validate()
    with pytest.raises(ValueError, match="logsnr_fn"):
        run_sampler(gaussian_model("x"), jax.random.PRNGKey(0), shape=(1,) + SHAPE)
    with pytest.raises(ValueError, match="shape or noise"):
        run_sampler(gaussian_model("x"), jax.random.PRNGKey(0), sampler="heun")


def test_clip_default_is_off_for_ode_samplers():
    assert samplers.SamplerOptions(sampler="ddpm").clip
    assert samplers.SamplerOptions(sampler="ddim").clip
    assert not samplers.SamplerOptions(sampler="heun").clip
    assert not samplers.SamplerOptions(sampler="euler").clip
    assert not samplers.SamplerOptions(sampler="ddpm", clip_x="false").clip


@pytest.mark.parametrize("schedule", [
    dict(name="cosine_shifted", image_d=128, noise_d=64),
    dict(name="cosine_interpolated", image_d=128, noise_d_low=32, noise_d_high=256),
])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_ode_samplers_on_the_trained_schedule_reproduce_the_data_law(schedule, sampler):
    spec = dict(schedule)
    logsnr_fn = schedules.get_logsnr_fn(spec.pop("name"), **spec)
    # Errors on this wide range (sigma 3.6e3 .. 2.8e-4): Heun 0.045 / 0.010 / 0.0025 at
    # 32 / 64 / 128 steps (second order), Euler 0.13 / 0.067 / 0.034 (first order).
    num_steps = 128 if sampler == "euler" else 64
    a, b = _affine_map(sampler, num_steps, logsnr_fn=logsnr_fn)
    # The grid starts at the schedule's noisiest point, far beyond EDM's sigma = 80.
    sigma_max = math.exp(-0.5 * float(logsnr_fn(1.0)))
    assert sigma_max > 1000
    a_ref, b_ref = _exact_ve_ode_map(sigma_max)
    tol = 0.05 if sampler == "euler" else 0.015
    np.testing.assert_allclose(a, a_ref, atol=tol)
    np.testing.assert_allclose(b, b_ref, atol=tol)
    # Output law N(b, A A^T) against the data law.
    np.testing.assert_allclose(b, MEAN, atol=tol)
    np.testing.assert_allclose(a @ a.T, COV, atol=3 * tol)


def _counting_model(counter):
    """x-prediction network (output 0) that counts the examples it is called on."""
    def count(n):
        counter.append(int(n))

    def model_fn(net_in, logsnr, labels):
        del logsnr, labels
        jax.debug.callback(count, net_in.shape[0])
        return jnp.zeros_like(net_in)
    return model_fn


@pytest.mark.parametrize("sampler,num_steps", [("ddpm", 16), ("heun", 8)])
def test_guidance_interval_skips_the_unconditional_branch(sampler, num_steps):
    band = (-2.0, 2.5)
    batch = 3
    options = samplers.SamplerOptions(sampler=sampler, num_steps=num_steps, guidance_scale=2.0,
                                      guidance_logsnr_min=band[0], guidance_logsnr_max=band[1])
    logsnr_fn = schedules.get_logsnr_fn("cosine")
    counter = []
    out = jax.jit(lambda rng: samplers.sample(
        _counting_model(counter), rng, options, logsnr_fn=logsnr_fn, shape=(batch,) + SHAPE,
        prediction="x", labels=jnp.arange(batch, dtype=jnp.int32), null_label=10))(
            jax.random.PRNGKey(0))
    jax.block_until_ready(out)
    jax.effects_barrier()
    # Independent count: float64 cosine logSNR at t = linspace(1, 0, N + 1), or the
    # Karras sigmas between the schedule's ends for Heun (2 calls per step but the last).
    t_min, t_max = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
    if sampler == "ddpm":
        t = np.linspace(1.0, 0.0, num_steps + 1)
        points = -2 * np.log(np.tan(t_min + t * (t_max - t_min)))[:-1]
    else:
        ramp = np.linspace(0, 1, num_steps)
        s_max, s_min = math.exp(7.5), math.exp(-7.5)
        sig = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
        lam = -2 * np.log(sig)
        points = np.concatenate([lam, lam[1:]])
    inside = int(np.sum((points >= band[0]) & (points <= band[1])))
    assert 0 < inside < len(points)
    expected = batch * (len(points) + inside)
    assert sum(counter) == expected, (sum(counter), expected)
    grid = samplers.logsnr_grid(options, logsnr_fn)
    assert samplers.num_model_evaluations(options, grid) * batch == expected
    # Without the interval every evaluation is doubled.
    full = samplers.SamplerOptions(sampler=sampler, num_steps=num_steps, guidance_scale=2.0)
    assert samplers.num_model_evaluations(full, grid) == 2 * len(points)


def test_float64_in_float64_out():
    with jax.enable_x64(True):
        t = np.float64(1 - 1e-5)
        got = float(schedules.logsnr_cosine(jnp.asarray(t)))
        t_min, t_max = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
        assert abs(got - (-2 * math.log(math.tan(t_min + t * (t_max - t_min))))) < 1e-9
        noise = jnp.asarray(np.random.RandomState(0).randn(2, *SHAPE))
        for sampler in ("ddpm", "heun"):
            out = samplers.sample(gaussian_model("x"), jax.random.PRNGKey(0),
                                  samplers.SamplerOptions(sampler=sampler, num_steps=4),
                                  noise=noise, prediction="x",
                                  logsnr_fn=schedules.get_logsnr_fn("cosine"))
            assert out.dtype == jnp.float64, (sampler, out.dtype)


def _diffusers_alphas_cumprod(betas):
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_on_discrete_spacing_matches_diffusers_step_for_step(spacing):
    """DDIM (eta = 0) on a ddpm_linear schedule against diffusers' DDIMScheduler
    update (set_alpha_to_one, eps-prediction), re-derived in float64 NumPy."""
    T, n = 1000, 10
    betas = np.linspace(1e-4, 0.02, T)
    abar = _diffusers_alphas_cumprod(betas)
    ratio = T // n
    if spacing == "leading":
        timesteps = (np.arange(0, n) * ratio).round()[::-1].astype(np.int64)
    else:
        timesteps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    # Our discrete t = (diffusers index + 1) / T, then the clean end.
    np.testing.assert_allclose(schedules.discrete_t_grid(T, n, spacing)[:-1],
                               (timesteps + 1) / T)
    gain = 0.3  # The network: eps_hat = gain * z.
    x = np.random.RandomState(1).randn(2, *SHAPE)
    ref = x.copy()
    for tt in timesteps:
        prev = tt - ratio
        a_t, a_prev = abar[tt], (abar[prev] if prev >= 0 else 1.0)
        eps = gain * ref
        x0 = (ref - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        ref = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    options = samplers.SamplerOptions(sampler="ddim", num_steps=n, spacing=spacing,
                                      clip_x=False)
    got = samplers.sample(lambda z, lam, lab: gain * z, jax.random.PRNGKey(0), options,
                          noise=jnp.asarray(x, jnp.float32), prediction="eps",
                          logsnr_fn=schedules.get_logsnr_fn("ddpm_linear"), num_timesteps=T)
    # Our chain ends at logSNR 20 (sigma 4.5e-5) instead of exactly clean.
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-4, atol=2e-4)


def test_explicit_grid_overrides_the_default():
    logsnr_fn = schedules.get_logsnr_fn("cosine")
    options = samplers.SamplerOptions(sampler="ddim", num_steps=999, clip_x=False)
    grid = logsnr_fn(jnp.asarray([1.0, 0.7, 0.2, 0.0]))
    noise = jax.random.normal(jax.random.PRNGKey(0), (2,) + SHAPE)
    _, traj = samplers.sample(gaussian_model("x"), jax.random.PRNGKey(0), options, noise=noise,
                              prediction="x", grid=grid, return_trajectory=True)
    assert traj.shape[0] == 3  # N = len(grid) - 1, not options.num_steps.
