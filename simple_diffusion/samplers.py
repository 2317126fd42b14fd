"""Samplers as one `lax.scan` over a precomputed noise grid.

Samplers ('ddpm', 'ddim') step a VP state z between logSNR grid points
lambda_t -> lambda_s (lambda_s > lambda_t) on t = linspace(1, 0, N + 1) of a
schedule. The EDM samplers ('euler', 'heun') step the VE state x_ve = z / alpha
on the Karras sigma grid (final sigma = 0). Both call the network the same way
(see `make_denoiser`), so a model never needs to know which sampler runs it.

Each sampler is a per-step function `step(state, (i, cur, nxt)) -> (state, z)`;
`sample` runs it with `lax.scan` (compile time independent of the number of
steps) or, with `use_scan=False`, in an eager Python loop for debugging. Step i
draws its randomness from `jax.random.fold_in(rng, i)`, so both paths consume
identical noise.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

from simple_diffusion import parametrization
from simple_diffusion import schedules

SAMPLERS = ("ddpm", "ddim", "euler", "heun")


def make_denoiser(model_fn: Callable, *, prediction: str = "v", labels=None, null_label=None,
                  guidance_scale=0.0, guidance_interval=None, clip_x: bool = False,
                  sigma_data: float = 0.5) -> Callable[[jax.Array, jax.Array], tuple]:
    """Wraps a network as denoise(z, logsnr) -> (x_hat, eps_hat).

    Args:
      model_fn: (net_in [B', H, W, C] f32, logsnr [B'] f32, labels [B'] int32 or
        None) -> raw output per `prediction`. net_in is
        `parametrization.network_input(z, logsnr)` (z itself except for 'edm').
      prediction: 'eps' | 'x' | 'v' | 'edm'.
      labels: [B] int32 class labels or None.
      null_label: the unconditional label (`num_classes`), needed for guidance.
      guidance_scale: w in x_hat = (1 + w) x_cond - w x_uncond (0 = off). The
        conditional and unconditional halves go through ONE model call with
        B' = 2B (labels concatenated with null_label). x_hat and eps_hat are
        affine in the raw output, so guiding them equals guiding the raw output.
      guidance_interval: None or (lo, hi): guidance only where lo <= logsnr <= hi.
      clip_x: clip x_hat to [-1, 1] (eps_hat is then recomputed from it).
      sigma_data: EDM data std (only for 'edm').

    Returns:
      denoise(z [B, H, W, C] f32, logsnr scalar f32) -> (x_hat, eps_hat), both
      [B, H, W, C] float32.
    """
    guided = not (isinstance(guidance_scale, (int, float)) and guidance_scale == 0)
    if guided and (labels is None or null_label is None):
        raise ValueError("guidance_scale != 0 needs labels and null_label")

    def denoise(z, logsnr):
        if guided:
            net_z = jnp.concatenate([z, z])
            net_labels = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
        else:
            net_z, net_labels = z, labels
        logsnr_vec = jnp.full((net_z.shape[0],), logsnr, jnp.float32)
        logsnr_b = logsnr_vec[:, None, None, None]
        net_in = parametrization.network_input(net_z, logsnr_b, prediction, sigma_data)
        raw = model_fn(net_in, logsnr_vec, net_labels).astype(jnp.float32)
        x_hat, eps_hat = parametrization.predict_x_eps(raw, net_z, logsnr_b, prediction,
                                                       sigma_data)
        if guided:
            w = jnp.asarray(guidance_scale, jnp.float32)
            if guidance_interval is not None:
                lo, hi = guidance_interval
                w = jnp.where((logsnr >= lo) & (logsnr <= hi), w, 0.0)
            x_cond, x_uncond = jnp.split(x_hat, 2)
            eps_cond, eps_uncond = jnp.split(eps_hat, 2)
            x_hat = (1.0 + w) * x_cond - w * x_uncond
            eps_hat = (1.0 + w) * eps_cond - w * eps_uncond
        if clip_x:
            alpha, sigma = schedules.alpha_sigma(logsnr)
            x_hat = jnp.clip(x_hat, -1.0, 1.0)
            eps_hat = parametrization.eps_from_x(z, x_hat, alpha, sigma)
        return x_hat, eps_hat

    return denoise


def ddpm_step(z, x_hat, logsnr_t, logsnr_s, noise):
    """Ancestral step t -> s of the VP posterior q(z_s | z_t, x = x_hat), logSNR form.

    c = -expm1(logsnr_t - logsnr_s) = 1 - SNR_t / SNR_s,
    mean = alpha_s (z_t (1 - c) / alpha_t + c x_hat), var = sigma_s^2 c.

    Args:
      z: [B, H, W, C] state at t. x_hat: prediction of x at t.
      logsnr_t, logsnr_s: scalars, logsnr_s > logsnr_t (+inf allowed).
      noise: standard normal like z (pass zeros for no noise).

    Returns:
      z_s, like z.
    """
    c = -jnp.expm1(logsnr_t - logsnr_s)
    alpha_t, _ = schedules.alpha_sigma(logsnr_t)
    alpha_s, sigma_s = schedules.alpha_sigma(logsnr_s)
    mean = alpha_s * (z * (1.0 - c) / alpha_t + c * x_hat)
    return mean + jnp.sqrt(sigma_s**2 * c) * noise


def ddim_step(x_hat, eps_hat, logsnr_t, logsnr_s, eta, noise):
    """DDIM step t -> s: z_s = alpha_s x_hat + sqrt(sigma_s^2 - s_eta^2) eps_hat + s_eta noise.

    s_eta^2 = eta^2 sigma_s^2 c with c = 1 - SNR_t / SNR_s, which is DDIM's
    eta^2 (1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s); eta = 0 is the
    deterministic sampler, eta = 1 coincides with `ddpm_step`.
    """
    c = -jnp.expm1(logsnr_t - logsnr_s)
    alpha_s, sigma_s = schedules.alpha_sigma(logsnr_s)
    var_eta = eta**2 * sigma_s**2 * c
    return alpha_s * x_hat + jnp.sqrt(sigma_s**2 - var_eta) * eps_hat + jnp.sqrt(var_eta) * noise


def _ve_denoise(denoise, x_ve, sigma_ve):
    """x_hat of the VE state x_ve = x + sigma_ve * eps (sigma_ve > 0)."""
    logsnr = schedules.logsnr_from_sigma_ve(sigma_ve)
    alpha, _ = schedules.alpha_sigma(logsnr)
    return denoise(x_ve * alpha, logsnr)[0]


def _make_step(sampler, denoise, rng, num_steps, eta, s_churn, s_tmin, s_tmax, s_noise):
    """Per-step function step(state, (i, cur, nxt)) -> (state, VP z after the step)."""
    last = num_steps - 1

    if sampler in ("ddpm", "ddim"):
        def step(z, xs):
            i, logsnr_t, logsnr_s = xs
            # No noise is added on the final step.
            noise = jnp.where(i == last, 0.0, 1.0) * jax.random.normal(
                jax.random.fold_in(rng, i), z.shape, jnp.float32)
            x_hat, eps_hat = denoise(z, logsnr_t)
            if sampler == "ddpm":
                z = ddpm_step(z, x_hat, logsnr_t, logsnr_s, noise)
            else:
                z = ddim_step(x_hat, eps_hat, logsnr_t, logsnr_s, eta, noise)
            return z, z
        return step

    gamma_max = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)

    def step(x, xs):
        i, sigma, sigma_next = xs
        gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma_max, 0.0)
        sigma_hat = sigma * (1.0 + gamma)
        noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
        # sqrt(sigma_hat^2 - sigma^2) written so that gamma = 0 gives exactly 0 (the
        # direct difference can round below 0 under FMA contraction and yield NaN).
        x_hat = x + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * noise
        d = (x_hat - _ve_denoise(denoise, x_hat, sigma_hat)) / sigma_hat
        x_next = x_hat + (sigma_next - sigma_hat) * d
        if sampler == "heun":
            def correct():
                d_next = (x_next - _ve_denoise(denoise, x_next, sigma_next)) / sigma_next
                return x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
            # The step to sigma = 0 stays a first-order Euler step.
            x_next = jax.lax.cond(sigma_next > 0, correct, lambda: x_next)
        return x_next, x_next / jnp.sqrt(1.0 + sigma_next**2)
    return step


def noise_grid(sampler: str, num_steps: int, logsnr_fn=None, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = 7.0) -> jax.Array:
    """The sampler's grid, float32 [num_steps + 1], from noise to data.

    'ddpm'/'ddim': logsnr_fn(linspace(1, 0, N + 1)) (increasing logSNR).
    'euler'/'heun': `schedules.karras_sigmas` (decreasing VE sigma, final 0).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler in ("euler", "heun"):
        return schedules.karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    if logsnr_fn is None:
        raise ValueError(f"sampler {sampler!r} needs a logsnr_fn")
    return logsnr_fn(jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)).astype(jnp.float32)


def sample(model_fn: Callable, rng: jax.Array, *, shape=None, noise=None, sampler: str = "ddpm",
           num_steps: int = 256, logsnr_fn=None, prediction: str = "v", labels=None,
           null_label=None, guidance_scale=0.0, guidance_interval=None, clip_x: bool = True,
           eta: float = 0.0, s_churn: float = 0.0, s_tmin: float = 0.0,
           s_tmax: float = float("inf"), s_noise: float = 1.0, sigma_min: float = 0.002,
           sigma_max: float = 80.0, rho: float = 7.0, return_trajectory: bool = False,
           sigma_data: float = 0.5, use_scan: bool = True):
    """Draws samples from a diffusion model.

    Args:
      model_fn: (net_in [B', H, W, C] f32, logsnr [B'] f32, labels [B'] int32 or
        None) -> raw output per `prediction`; see `make_denoiser` for net_in and
        for the guided batch B' = 2B.
      rng: PRNGKey for the initial noise (when `noise` is None) and every step.
      shape: [B, H, W, C] of the samples, or None when `noise` is given.
      noise: optional standard-normal initial noise [B, H, W, C] float32; the
        start state is `noise` (ddpm/ddim) or `noise * sigma_max` (euler/heun).
      sampler: 'ddpm' (ancestral), 'ddim' (eta), 'euler', 'heun' (EDM, churn).
      num_steps: number of steps N (Heun uses 2N - 1 network evaluations).
      logsnr_fn: schedule t -> logsnr for 'ddpm'/'ddim'; unused by 'euler'/'heun',
        which use the Karras grid (sigma_min, sigma_max, rho).
      prediction: 'eps' | 'x' | 'v' | 'edm'.
      labels, null_label, guidance_scale, guidance_interval: class conditioning
        and classifier-free guidance, pred = (1 + w) cond - w uncond.
      clip_x: clip x_hat to [-1, 1] at every step.
      eta: DDIM stochasticity (0 deterministic, 1 = ancestral).
      s_churn, s_tmin, s_tmax, s_noise: EDM stochastic churn (s_churn = 0 off).
      sigma_min, sigma_max, rho: Karras grid.
      return_trajectory: also return the VP state after every step.
      sigma_data: EDM data std (only for 'edm' prediction).
      use_scan: False runs the same step function in an eager Python loop.

    Returns:
      x [B, H, W, C] float32: the final state (z at logsnr_fn(0) for ddpm/ddim,
      x at sigma = 0 for euler/heun). With return_trajectory, (x, trajectory)
      where trajectory is [N, B, H, W, C] VP states z = alpha * x + sigma * eps
      after each step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    init_rng, step_rng = jax.random.split(rng)
    if noise is None:
        if shape is None:
            raise ValueError("give either shape or noise")
        noise = jax.random.normal(init_rng, shape, jnp.float32)
    grid = noise_grid(sampler, num_steps, logsnr_fn, sigma_min, sigma_max, rho)
    denoise = make_denoiser(model_fn, prediction=prediction, labels=labels, null_label=null_label,
                            guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                            clip_x=clip_x, sigma_data=sigma_data)
    step = _make_step(sampler, denoise, step_rng, num_steps, eta, s_churn, s_tmin, s_tmax,
                      s_noise)
    state = jnp.asarray(noise, jnp.float32)
    if sampler in ("euler", "heun"):
        state = state * grid[0]
    if not return_trajectory:
        full_step = step
        step = lambda carry, xs: (full_step(carry, xs)[0], None)  # Keeps no [N, ...] buffer.
    xs = (jnp.arange(num_steps), grid[:-1], grid[1:])
    if use_scan:
        state, trajectory = jax.lax.scan(step, state, xs)
    else:
        zs = []
        for i in range(num_steps):
            state, z = step(state, jax.tree.map(lambda a, i=i: a[i], xs))
            zs.append(z)
        trajectory = jnp.stack(zs) if return_trajectory else None
    if return_trajectory:
        return state, trajectory
    return state
