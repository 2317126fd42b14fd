"""Diffusion training loss: noise sampling, weightings and the multiscale loss.

Every weighting is an MSE between a prediction and its target, times a
per-example weight w(logsnr), averaged over pixels (and channels), then over
the batch. With x_hat, eps_hat read from the network (see parametrization.py)
and v = alpha * eps - sigma * x:

  weighting       pair           w(logsnr)                        note
  'eps_mse'       eps_hat, eps   1                                simple diffusion (with a v-net)
  'v_mse'         v_hat, v       1
  'x_mse'         x_hat, x       1
  'snr_plus_one'  x_hat, x       1 + SNR                          equal to 'v_mse'
  'min_snr'       x_hat, x       min(SNR, gamma)                  Hang et al. 2023
  'sigmoid'       eps_hat, eps   sigmoid(b - logsnr)              SiD2 / VDM++ (see below)
  'edm'           x_hat, x       (s^2 + sd^2) / (s sd)^2          Karras et al., s = exp(-logsnr/2)

SiD2 shifts the sigmoid's bias with the resolution like the schedule: with
``sigmoid_bias_ref_d = r`` (config) the bias b is given at reference resolution
r and used at image size d as b + 2 log(r / d) (`sigmoid_bias_at`), so the
weighting keeps its place relative to a schedule shifted by the same amount.

The multiscale loss (simple diffusion section 3.2) replaces the per-pixel MSE by
sum_s w_s * MSE(D_s[pred], D_s[target]) over block-average poolings D_s to the
resolutions s = min_res, 2 min_res, ..., H, with w_s = (1/s) / sum_s' (1/s').
The paper weights by 1/s; dividing by sum_s' 1/s' (a constant for a given image
size) makes the weights sum to 1, so a single scale is exactly the plain loss
and the loss scale does not change with the number of scales. D_s is linear, so
pooling before or after the subtraction is the same.
"""

from typing import Callable

import math

import jax
import jax.numpy as jnp

from simple_diffusion import parametrization
from simple_diffusion import schedules

WEIGHTINGS = ("eps_mse", "v_mse", "x_mse", "snr_plus_one", "min_snr", "sigmoid", "edm")
NOISE_SAMPLINGS = ("uniform", "stratified", "discrete", "edm_lognormal")

# ``config.loss`` fields and their defaults (every weighting's fields are declared,
# so --config.loss.weighting=sigmoid --config.loss.sigmoid_bias=-3 just works).
CONFIG_DEFAULTS = dict(
    prediction="v", weighting="eps_mse", noise_sampling="stratified", multiscale_min_res=0,
    sigmoid_bias=0.0, sigmoid_bias_ref_d=0, min_snr_gamma=5.0, sigma_data=0.5, p_mean=-1.2,
    p_std=1.2)


def sigmoid_bias_at(bias: float, image_d: int, ref_d: int) -> float:
    """The sigmoid weighting's bias at image size ``image_d`` for a bias given at
    reference resolution ``ref_d`` (0: no shift): b + 2 log(ref_d / image_d)."""
    if not ref_d:
        return float(bias)
    return float(bias) + 2.0 * math.log(ref_d / image_d)


def kwargs_from_config(loss_config, *, image_size: int, num_timesteps: int | None) -> dict:
    """Keyword arguments of `diffusion_loss` (besides model_fn, x, rng, logsnr_fn)
    from ``config.loss``, with the sigmoid bias resolved for ``image_size``.

    Fields missing from ``loss_config`` (configs of older runs) take the defaults.
    ``num_timesteps`` is the T of a discrete DDPM schedule (for 'discrete').
    """
    c = {**CONFIG_DEFAULTS, **dict(loss_config)}
    return dict(
        prediction=c["prediction"], weighting=c["weighting"], noise_sampling=c["noise_sampling"],
        multiscale_min_res=c["multiscale_min_res"],
        sigmoid_bias=sigmoid_bias_at(c["sigmoid_bias"], image_size, c["sigmoid_bias_ref_d"]),
        min_snr_gamma=c["min_snr_gamma"], sigma_data=c["sigma_data"], p_mean=c["p_mean"],
        p_std=c["p_std"], num_timesteps=num_timesteps)


def block_average_pool(x: jax.Array, factor: int) -> jax.Array:
    """Exact average pooling over non-overlapping factor x factor blocks.

    Args:
      x: [B, H, W, C]; H and W divisible by `factor`.
      factor: block size (1 returns x).

    Returns:
      [B, H / factor, W / factor, C], same dtype.
    """
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"image {h}x{w} is not divisible by pooling factor {factor}")
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def multiscale_factors(height: int, width: int, min_res: int) -> list[int]:
    """Pooling factors 1, 2, 4, ... whose pooled height stays >= min_res.

    Args:
      height, width: image size.
      min_res: lowest resolution (in pixels of height); 0 disables multiscale.

    Returns:
      Factors in increasing order, [1] when min_res == 0.
    """
    if min_res == 0:
        return [1]
    if min_res < 0 or min_res > height:
        raise ValueError(f"multiscale_min_res must be in [1, {height}] (or 0 for off), got {min_res}")
    factors = [1]
    while (height // (2 * factors[-1]) >= min_res and height % (2 * factors[-1]) == 0
           and width % (2 * factors[-1]) == 0):
        factors.append(2 * factors[-1])
    return factors


def sample_logsnr(rng: jax.Array, batch_size: int, noise_sampling: str,
                  logsnr_fn: Callable[[jax.Array], jax.Array] | None,
                  p_mean: float = -1.2, p_std: float = 1.2,
                  num_timesteps: int | None = None) -> jax.Array:
    """Training noise levels, float32 [batch_size].

    'uniform': t ~ U[0, 1). 'stratified': t_i = (u + i / B) mod 1 with one shared
    u (one point per stratum, as VDM's antithetic sampling). 'discrete': DDPM's
    t = k / T with k ~ U{1, ..., T} (needs num_timesteps). 'edm_lognormal':
    ln sigma_ve ~ N(p_mean, p_std^2), logsnr = -2 ln sigma_ve (logsnr_fn unused).
    """
    if noise_sampling == "edm_lognormal":
        return schedules.edm_lognormal_logsnr(rng, (batch_size,), p_mean, p_std)
    if noise_sampling not in NOISE_SAMPLINGS:
        raise ValueError(f"noise_sampling must be one of {NOISE_SAMPLINGS}, got {noise_sampling!r}")
    if logsnr_fn is None:
        raise ValueError(f"noise_sampling={noise_sampling!r} needs a logsnr_fn")
    if noise_sampling == "uniform":
        t = jax.random.uniform(rng, (batch_size,), jnp.float32)
    elif noise_sampling == "discrete":
        if not num_timesteps:
            raise ValueError("noise_sampling='discrete' needs num_timesteps (a ddpm_* schedule)")
        k = jax.random.randint(rng, (batch_size,), 1, num_timesteps + 1)
        t = k.astype(jnp.float32) / num_timesteps
    else:
        u = jax.random.uniform(rng, (), jnp.float32)
        t = jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
    return logsnr_fn(t)


def weighted_pair(weighting: str, x, eps, x_hat, eps_hat, logsnr, *, sigmoid_bias=0.0,
                  min_snr_gamma=5.0, sigma_data=0.5):
    """Prediction, target and per-example weight for a weighting.

    Args:
      weighting: one of WEIGHTINGS (see the module docstring).
      x, eps, x_hat, eps_hat: [B, H, W, C] float32.
      logsnr: [B] float32.

    Returns:
      (pred [B, H, W, C], target [B, H, W, C], weight [B]).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    ones = jnp.ones_like(logsnr)
    if weighting == "eps_mse":
        return eps_hat, eps, ones
    if weighting == "x_mse":
        return x_hat, x, ones
    if weighting == "v_mse":
        alpha, sigma = schedules.alpha_sigma(logsnr[:, None, None, None])
        return (parametrization.v_from_x_eps(x_hat, eps_hat, alpha, sigma),
                parametrization.v_from_x_eps(x, eps, alpha, sigma), ones)
    if weighting == "snr_plus_one":
        return x_hat, x, 1.0 + jnp.exp(logsnr)
    if weighting == "min_snr":
        return x_hat, x, jnp.minimum(jnp.exp(logsnr), min_snr_gamma)
    if weighting == "sigmoid":
        return eps_hat, eps, jax.nn.sigmoid(sigmoid_bias - logsnr)
    sigma_ve = schedules.sigma_ve_from_logsnr(logsnr)
    return x_hat, x, (sigma_ve**2 + sigma_data**2) / (sigma_ve * sigma_data) ** 2


def diffusion_loss(model_fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                   rng: jax.Array, *, logsnr_fn: Callable[[jax.Array], jax.Array] | None,
                   prediction: str = "v", weighting: str = "eps_mse",
                   noise_sampling: str = "uniform", multiscale_min_res: int = 0,
                   sigmoid_bias: float = 0.0, min_snr_gamma: float = 5.0,
                   sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
                   num_timesteps: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Monte Carlo diffusion loss for one batch.

    Args:
      model_fn: (z [B, H, W, C] f32, logsnr [B] f32) -> raw output [B, H, W, C],
        where z is `parametrization.network_input` of the VP state (z itself
        except for 'edm') and the output is read per `prediction`.
      x: clean images [B, H, W, C] float32 in [-1, 1].
      rng: PRNGKey; split into the noise-level and the eps draws.
      logsnr_fn: schedule t -> logsnr (unused with 'edm_lognormal').
      prediction: 'eps' | 'x' | 'v' | 'edm'.
      weighting: one of WEIGHTINGS.
      noise_sampling: one of NOISE_SAMPLINGS.
      multiscale_min_res: 0 = off; else the lowest pyramid resolution.
      sigmoid_bias: b of the 'sigmoid' weighting.
      min_snr_gamma: gamma of 'min_snr'.
      sigma_data: EDM sigma_data (for 'edm' prediction and weighting).
      p_mean, p_std: EDM log-normal noise parameters.
      num_timesteps: T of a discrete schedule, for noise_sampling='discrete'.

    Returns:
      (loss, metrics): loss is a float32 scalar; metrics has 'loss' and, when
      multiscale is on, 'loss_scale_{s}' (the weighted per-pixel MSE at
      resolution s before the 1/s scale weight) for every scale s.
    """
    batch, height, width, _ = x.shape
    factors = multiscale_factors(height, width, multiscale_min_res)
    t_rng, eps_rng = jax.random.split(rng)
    logsnr = sample_logsnr(t_rng, batch, noise_sampling, logsnr_fn, p_mean, p_std, num_timesteps)
    eps = jax.random.normal(eps_rng, x.shape, jnp.float32)
    logsnr_b = logsnr[:, None, None, None]
    alpha, sigma = schedules.alpha_sigma(logsnr_b)
    z = alpha * x + sigma * eps

    raw = model_fn(parametrization.network_input(z, logsnr_b, prediction, sigma_data), logsnr)
    x_hat, eps_hat = parametrization.predict_x_eps(raw.astype(jnp.float32), z, logsnr_b,
                                                   prediction, sigma_data)
    pred, target, weight = weighted_pair(weighting, x, eps, x_hat, eps_hat, logsnr,
                                         sigmoid_bias=sigmoid_bias, min_snr_gamma=min_snr_gamma,
                                         sigma_data=sigma_data)
    diff = pred - target
    scale_weights = [f / height for f in factors]  # 1/s with s = height / f.
    total_weight = sum(scale_weights)
    metrics = {}
    loss = jnp.zeros((), jnp.float32)
    for factor, scale_weight in zip(factors, scale_weights):
        per_example = jnp.mean(block_average_pool(diff, factor) ** 2, axis=(1, 2, 3))
        scale_loss = jnp.mean(weight * per_example)
        loss = loss + (scale_weight / total_weight) * scale_loss
        if multiscale_min_res:
            metrics[f"loss_scale_{height // factor}"] = scale_loss
    metrics["loss"] = loss
    return loss, metrics
