"""diffusion_loss against float64 NumPy re-derivations of each weighting."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simple_diffusion import losses
from simple_diffusion import parametrization
from simple_diffusion import schedules

PREDICTIONS = ("eps", "x", "v", "edm")
SIGMA_DATA = 0.5


def _images(shape=(4, 8, 8, 2), seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-1.0, maxval=1.0)


def _np_alpha_sigma(logsnr):
    return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def _np_state(net_in, logsnr, prediction):
    """The VP state z behind a network input (the inverse of EDM's c_in / alpha scaling)."""
    net_in = np.asarray(net_in, np.float64)
    if prediction != "edm":
        return net_in
    s = np.exp(-0.5 * logsnr)[:, None, None, None]
    return net_in * np.sqrt((s**2 + SIGMA_DATA**2) / (1 + s**2))


def _np_x_eps(raw, z, logsnr, prediction):
    """x_hat, eps_hat from a raw output, re-derived in float64."""
    a, s = (v[:, None, None, None] for v in _np_alpha_sigma(logsnr))
    raw = np.asarray(raw, np.float64)
    if prediction == "eps":
        return (z - s * raw) / a, raw
    if prediction == "x":
        return raw, (z - a * raw) / s
    if prediction == "v":
        return a * z - s * raw, s * z + a * raw
    sve = s / a  # EDM: D = c_skip * (z / alpha) + c_out * F.
    x_hat = SIGMA_DATA**2 / (sve**2 + SIGMA_DATA**2) * z / a + (
        sve * SIGMA_DATA / np.sqrt(sve**2 + SIGMA_DATA**2)) * raw
    return x_hat, (z - a * x_hat) / s


def _np_loss(weighting, x, z, logsnr, x_hat, eps_hat, factor=1, bias=0.0, gamma=5.0):
    a, s = (v[:, None, None, None] for v in _np_alpha_sigma(logsnr))
    eps = (z - a * x) / s
    snr = np.exp(logsnr)
    pairs = {
        "eps_mse": (eps_hat, eps, 1.0), "x_mse": (x_hat, x, 1.0),
        "v_mse": (a * eps_hat - s * x_hat, a * eps - s * x, 1.0),
        "snr_plus_one": (x_hat, x, 1 + snr), "min_snr": (x_hat, x, np.minimum(snr, gamma)),
        "sigmoid": (eps_hat, eps, 1 / (1 + np.exp(logsnr - bias))),
        "edm": (x_hat, x, (np.exp(-logsnr) + SIGMA_DATA**2) / (np.exp(-logsnr) * SIGMA_DATA**2)),
    }
    pred, target, weight = pairs[weighting]
    diff = pred - target
    b, h, w, c = diff.shape
    pooled = diff.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    return np.mean(weight * np.mean(pooled**2, axis=(1, 2, 3)))


def _recording_model(calls, scale=0.7, offset=0.1):
    """An imperfect network that records what it receives (run eagerly)."""
    def model_fn(net_in, logsnr):
        calls.append((np.asarray(net_in), np.asarray(logsnr, np.float64)))
        return scale * net_in + offset * jnp.sin(3.0 * net_in)
    return model_fn


def _perfect_model(x, prediction):
    """Returns the exact target, recovering eps from the VP state and the known x."""
    def model_fn(net_in, logsnr):
        lam = logsnr[:, None, None, None]
        a, s = jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))
        sve = s / a
        z = net_in
        if prediction == "edm":
            z = net_in * jnp.sqrt((sve**2 + SIGMA_DATA**2) / (1 + sve**2))
        eps = (z - a * x) / s
        if prediction == "eps":
            return eps
        if prediction == "x":
            return x
        if prediction == "v":
            return a * eps - s * x
        c_skip = SIGMA_DATA**2 / (sve**2 + SIGMA_DATA**2)
        c_out = sve * SIGMA_DATA / jnp.sqrt(sve**2 + SIGMA_DATA**2)
        return (x - c_skip * z / a) / c_out
    return model_fn


def _assert_matches_rederivation(prediction, weighting):
    x = _images()
    calls = []
    loss, metrics = losses.diffusion_loss(
        _recording_model(calls), x, jax.random.PRNGKey(3), prediction=prediction,
        weighting=weighting, logsnr_fn=schedules.get_logsnr_fn("cosine"), sigmoid_bias=-1.0,
        min_snr_gamma=3.0, sigma_data=SIGMA_DATA)
    (net_in, logsnr), = calls
    z = _np_state(net_in, logsnr, prediction)
    raw = 0.7 * np.asarray(net_in, np.float64) + 0.1 * np.sin(3.0 * np.asarray(net_in, np.float64))
    x_hat, eps_hat = _np_x_eps(raw, z, logsnr, prediction)
    expected = _np_loss(weighting, np.asarray(x, np.float64), z, logsnr, x_hat, eps_hat, bias=-1.0,
                        gamma=3.0)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-3)
    assert float(metrics["loss"]) == float(loss)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_parametrizations_match_float64_rederivation(prediction):
    # v-MSE reads both x_hat and eps_hat, so it checks both conversions.
    _assert_matches_rederivation(prediction, "v_mse")


@pytest.mark.parametrize("weighting", losses.WEIGHTINGS)
def test_weightings_match_float64_rederivation(weighting):
    _assert_matches_rederivation("v", weighting)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_perfect_predictor_has_zero_loss(prediction):
    x = _images()
    logsnr_fn = schedules.get_logsnr_fn("cosine", logsnr_min=-8.0, logsnr_max=8.0)
    loss, _ = losses.diffusion_loss(_perfect_model(x, prediction), x, jax.random.PRNGKey(0),
                                    logsnr_fn=logsnr_fn, prediction=prediction, weighting="v_mse")
    assert 0.0 <= float(loss) < 1e-6


def test_snr_plus_one_equals_v_mse():
    x = _images()
    kw = dict(logsnr_fn=schedules.get_logsnr_fn("cosine"), prediction="eps")
    model_fn = lambda z, logsnr: 0.5 * z
    v_loss, _ = losses.diffusion_loss(model_fn, x, jax.random.PRNGKey(1), weighting="v_mse", **kw)
    s_loss, _ = losses.diffusion_loss(model_fn, x, jax.random.PRNGKey(1), weighting="snr_plus_one",
                                      **kw)
    np.testing.assert_allclose(float(v_loss), float(s_loss), rtol=1e-4)


def test_block_average_pool_matches_loop():
    x = np.asarray(_images((2, 8, 4, 3)))
    got = np.asarray(losses.block_average_pool(jnp.asarray(x), 2))
    expected = np.zeros((2, 4, 2, 3))
    for i in range(4):
        for j in range(2):
            expected[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="divisible"):
        losses.block_average_pool(jnp.zeros((1, 6, 6, 1)), 4)


def test_multiscale_factors():
    assert losses.multiscale_factors(512, 512, 32) == [1, 2, 4, 8, 16]
    assert losses.multiscale_factors(64, 64, 64) == [1]
    assert losses.multiscale_factors(64, 64, 0) == [1]
    assert losses.multiscale_factors(48, 48, 4) == [1, 2, 4, 8]  # 48 / 16 = 3 < 4.
    with pytest.raises(ValueError, match="multiscale_min_res"):
        losses.multiscale_factors(32, 32, 64)


def test_multiscale_single_scale_equals_base_loss():
    x = _images()
    kw = dict(logsnr_fn=schedules.get_logsnr_fn("cosine"), prediction="v", weighting="eps_mse")
    model_fn = lambda z, logsnr: 0.3 * z
    base, base_metrics = losses.diffusion_loss(model_fn, x, jax.random.PRNGKey(2), **kw)
    single, metrics = losses.diffusion_loss(model_fn, x, jax.random.PRNGKey(2),
                                            multiscale_min_res=8, **kw)
    np.testing.assert_allclose(float(single), float(base), rtol=1e-6)
    assert set(metrics) == {"loss", "loss_scale_8"}
    assert set(base_metrics) == {"loss"}


def test_multiscale_pyramid_matches_rederivation():
    x = _images()
    calls = []
    loss, metrics = losses.diffusion_loss(
        _recording_model(calls), x, jax.random.PRNGKey(4), logsnr_fn=schedules.get_logsnr_fn("cosine"),
        prediction="v", weighting="sigmoid", sigmoid_bias=2.0, multiscale_min_res=2)
    (net_in, logsnr), = calls
    z = np.asarray(net_in, np.float64)
    raw = 0.7 * z + 0.1 * np.sin(3.0 * z)
    x_hat, eps_hat = _np_x_eps(raw, z, logsnr, "v")
    per_scale = {8 // f: _np_loss("sigmoid", np.asarray(x, np.float64), z, logsnr, x_hat, eps_hat,
                                  factor=f, bias=2.0) for f in (1, 2, 4)}
    for s, value in per_scale.items():
        np.testing.assert_allclose(float(metrics[f"loss_scale_{s}"]), value, rtol=2e-3)
    # Weights 1/s normalised to sum to one: 1/8, 1/4, 1/2 over 7/8.
    expected = sum(value / s for s, value in per_scale.items()) / (1 / 8 + 1 / 4 + 1 / 2)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-3)


def test_gradients_finite_at_clip_ends():
    """Half the batch at logsnr = -15, half at +15 (the cosine clip ends), float32."""
    x = _images()
    logsnr_fn = lambda t: jnp.where(jnp.arange(t.shape[0]) % 2 == 0, -15.0, 15.0)

    def loss_fn(params, prediction, weighting):
        model_fn = lambda z, logsnr: params[0] * z + params[1]
        return losses.diffusion_loss(model_fn, x, jax.random.PRNGKey(0), logsnr_fn=logsnr_fn,
                                     prediction=prediction, weighting=weighting)[0]

    params = jnp.asarray([0.5, 0.1])
    # The weightings differ only by finite per-example factors; these cover the eps,
    # x and v targets and the largest weight (EDM's, ~1/sigma_ve^2 at +15).
    for prediction in PREDICTIONS:
        for weighting in ("eps_mse", "x_mse", "v_mse", "edm"):
            grads = np.asarray(jax.grad(loss_fn)(params, prediction, weighting))
            assert np.all(np.isfinite(grads)) and np.any(grads != 0), (prediction, weighting)


def test_stratified_sampling_covers_every_stratum():
    calls = []
    losses.diffusion_loss(_recording_model(calls), _images(), jax.random.PRNGKey(5),
                          logsnr_fn=schedules.get_logsnr_fn("cosine"), noise_sampling="stratified")
    t = np.sort(np.asarray(schedules.t_from_logsnr_cosine(jnp.asarray(calls[0][1], jnp.float32))))
    strata = np.floor(t * 4)
    assert np.all(np.abs(t * 4 - np.round(t * 4)) > 1e-3)  # Not at a boundary (seeded draw).
    np.testing.assert_array_equal(strata, np.arange(4))


def test_edm_lognormal_noise_levels():
    logsnr = losses.sample_logsnr(jax.random.PRNGKey(6), 8192, "edm_lognormal", None,
                                  p_mean=-0.5, p_std=0.8)
    ln_sigma = -0.5 * np.asarray(logsnr, np.float64)
    assert abs(ln_sigma.mean() + 0.5) < 0.04 and abs(ln_sigma.std() - 0.8) < 0.04
    # The schedule is not needed (nor used) with EDM noise.
    loss, _ = losses.diffusion_loss(lambda z, logsnr: z, _images(), jax.random.PRNGKey(6),
                                    logsnr_fn=None, noise_sampling="edm_lognormal",
                                    prediction="edm", weighting="edm")
    assert np.isfinite(float(loss))


def test_bad_options_raise():
    x = _images()
    fn = schedules.get_logsnr_fn("cosine")
    model_fn = lambda z, logsnr: z
    for kwargs, match in [(dict(weighting="l1"), "weighting"), (dict(prediction="score"), "prediction"),
                          (dict(noise_sampling="sobol"), "noise_sampling")]:
        with pytest.raises(ValueError, match=match):
            losses.diffusion_loss(model_fn, x, jax.random.PRNGKey(0), logsnr_fn=fn, **kwargs)
    with pytest.raises(ValueError, match="logsnr_fn"):
        losses.diffusion_loss(model_fn, x, jax.random.PRNGKey(0), logsnr_fn=None)
    assert math.isfinite(float(losses.diffusion_loss(model_fn, x, jax.random.PRNGKey(0),
                                                     logsnr_fn=fn)[0]))


def test_edm_preconditioning_matches_paper_notes_values():
    """paper.md section 9: sigma = 1, sigma_data = 0.5 gives c_skip 0.2, c_out 0.447214,
    c_in 0.894427, c_noise 0 and loss weight lambda(sigma) = 5.0."""
    c_skip, c_out, c_in, c_noise = parametrization.edm_precond(jnp.float32(1.0), 0.5)
    np.testing.assert_allclose([c_skip, c_out, c_in, c_noise], [0.2, 0.447214, 0.894427, 0.0],
                               atol=1e-6)
    # The same numbers through the code paths a model sees: logSNR 0 is sigma_ve = 1.
    z = jnp.ones((1, 2, 2, 1))
    logsnr = jnp.zeros((1, 1, 1, 1))
    alpha = math.sqrt(0.5)
    np.testing.assert_allclose(parametrization.network_input(z, logsnr, "edm", 0.5),
                               0.894427 * z / alpha, rtol=1e-5)
    raw = jnp.full((1, 2, 2, 1), 0.3)
    x_hat, _ = parametrization.predict_x_eps(raw, z, logsnr, "edm", 0.5)
    np.testing.assert_allclose(x_hat, 0.2 * z / alpha + 0.447214 * 0.3, rtol=1e-5)
    _, _, weight = losses.weighted_pair("edm", z, z, z, z, jnp.zeros((1,)), sigma_data=0.5)
    np.testing.assert_allclose(weight, [5.0], rtol=1e-6)


def test_sigmoid_weighting_matches_paper_notes_values():
    """paper.md section 9: b = -3 gives w(-3) = 0.5, w(0) = 0.0474, w(3) = 0.00247."""
    x = jnp.zeros((3, 2, 2, 1))
    _, _, w = losses.weighted_pair("sigmoid", x, x, x, x, jnp.asarray([-3.0, 0.0, 3.0]),
                                   sigmoid_bias=-3.0)
    np.testing.assert_allclose(w, [0.5, 0.0474, 0.00247], rtol=3e-3)


def test_discrete_noise_sampling_hits_ddpm_timesteps():
    table_fn = schedules.get_logsnr_fn("ddpm_linear", num_timesteps=10)
    logsnr = losses.sample_logsnr(jax.random.PRNGKey(0), 4096, "discrete", table_fn,
                                  num_timesteps=10)
    betas = np.linspace(1e-4, 0.02, 10)
    abar = np.cumprod(1 - betas)
    allowed = np.log(abar / (1 - abar))  # Timesteps k = 1..10, never the clean k = 0.
    got = np.asarray(logsnr, np.float64)
    dist = np.abs(got[:, None] - allowed[None]).min(axis=1)
    assert dist.max() < 1e-4
    counts = np.bincount(np.abs(got[:, None] - allowed[None]).argmin(axis=1), minlength=10)
    assert counts.min() > 300  # Uniform over the 10 timesteps (expected 410 each).
    with pytest.raises(ValueError, match="num_timesteps"):
        losses.sample_logsnr(jax.random.PRNGKey(0), 4, "discrete", table_fn)
