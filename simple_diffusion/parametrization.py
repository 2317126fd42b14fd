"""Network parametrisations (eps, x, v, EDM) and conversions between them.

A VP state is z = alpha * x + sigma * eps with alpha^2 = sigmoid(logsnr),
sigma^2 = sigmoid(-logsnr); the VE view of the same state is
z / alpha = x + sigma_ve * eps with sigma_ve = sigma / alpha = exp(-logsnr / 2).

What the network sees (`network_input`) and how its raw output is read
(`predict_x_eps`), per `prediction`:
  'eps': input z, output eps_hat.
  'x':   input z, output x_hat.
  'v':   input z, output v_hat with v = alpha * eps - sigma * x (simple diffusion).
  'edm': input c_in * z / alpha = (x + sigma_ve * eps) / sqrt(sigma_ve^2 + sigma_data^2),
         output F with x_hat = c_skip * z / alpha + c_out * F (Karras et al. 2022).
In every case the network is also given the per-example logsnr [B]; EDM's
c_noise = ln(sigma_ve) / 4 = -logsnr / 8 is a fixed affine map of it, so a model
conditioned on logsnr needs no knowledge of the parametrisation.

All arrays are float32; alpha/sigma/logsnr broadcast against the images
(e.g. [B, 1, 1, 1] against [B, H, W, C]).
"""

import jax
import jax.numpy as jnp

from simple_diffusion import schedules

PREDICTIONS = ("eps", "x", "v", "edm")


def x_from_eps(z, eps, alpha, sigma):
    """x = (z - sigma * eps) / alpha."""
    return (z - sigma * eps) / alpha


def eps_from_x(z, x, alpha, sigma):
    """eps = (z - alpha * x) / sigma."""
    return (z - alpha * x) / sigma


def x_from_v(z, v, alpha, sigma):
    """x = alpha * z - sigma * v (uses alpha^2 + sigma^2 = 1)."""
    return alpha * z - sigma * v


def eps_from_v(z, v, alpha, sigma):
    """eps = sigma * z + alpha * v (uses alpha^2 + sigma^2 = 1)."""
    return sigma * z + alpha * v


def v_from_x_eps(x, eps, alpha, sigma):
    """v = alpha * eps - sigma * x."""
    return alpha * eps - sigma * x


def edm_precond(sigma_ve, sigma_data: float = 0.5):
    """EDM preconditioning coefficients for a VE noise level.

    Args:
      sigma_ve: any shape, float32, >= 0.
      sigma_data: data standard deviation.

    Returns:
      (c_skip, c_out, c_in, c_noise), each shaped like sigma_ve:
      c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2),
      c_in = 1 / sqrt(s^2 + sd^2), c_noise = ln(s) / 4.
    """
    var = sigma_ve**2 + sigma_data**2
    return (sigma_data**2 / var, sigma_ve * sigma_data / jnp.sqrt(var), 1.0 / jnp.sqrt(var),
            jnp.log(sigma_ve) / 4.0)


def _check(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def network_input(z: jax.Array, logsnr: jax.Array, prediction: str,
                  sigma_data: float = 0.5) -> jax.Array:
    """What the network receives for a VP state z.

    Args:
      z: [B, H, W, C] float32 VP state.
      logsnr: logSNR broadcastable to z (e.g. [B, 1, 1, 1]).
      prediction: 'eps' | 'x' | 'v' | 'edm'.
      sigma_data: EDM data std (only for 'edm').

    Returns:
      [B, H, W, C]: z itself, or c_in * z / alpha for 'edm'.
    """
    _check(prediction)
    if prediction != "edm":
        return z
    sigma_ve = schedules.sigma_ve_from_logsnr(logsnr)
    # c_in / alpha = sqrt(1 + s^2) / sqrt(s^2 + sd^2); written this way it stays finite
    # and exact when sigma_data = 1 (then the input is z itself).
    return z * jnp.sqrt((1.0 + sigma_ve**2) / (sigma_ve**2 + sigma_data**2))


def predict_x_eps(raw: jax.Array, z: jax.Array, logsnr: jax.Array, prediction: str,
                  sigma_data: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """Reads a raw network output as (x_hat, eps_hat).

    Both results are affine in `raw` for fixed (z, logsnr), so guidance can be
    applied to either of them with the same effect as on `raw`.

    Args:
      raw: [B, H, W, C] float32 network output.
      z: [B, H, W, C] float32 VP state the network was evaluated at.
      logsnr: logSNR broadcastable to z.
      prediction: 'eps' | 'x' | 'v' | 'edm'.
      sigma_data: EDM data std (only for 'edm').

    Returns:
      (x_hat, eps_hat), each [B, H, W, C] float32.
    """
    _check(prediction)
    alpha, sigma = schedules.alpha_sigma(logsnr)
    if prediction == "eps":
        return x_from_eps(z, raw, alpha, sigma), raw
    if prediction == "x":
        return raw, eps_from_x(z, raw, alpha, sigma)
    if prediction == "v":
        return x_from_v(z, raw, alpha, sigma), eps_from_v(z, raw, alpha, sigma)
    sigma_ve = schedules.sigma_ve_from_logsnr(logsnr)
    c_skip, c_out, _, _ = edm_precond(sigma_ve, sigma_data)
    x_hat = c_skip * (z / alpha) + c_out * raw
    return x_hat, eps_from_x(z, x_hat, alpha, sigma)
