"""Progressive distillation (Salimans & Ho 2022) as pure, jit-able functions.

Conventions as everywhere in the project: t in [0, 1], t = 1 is noise and
t = 0 is data; logsnr = logsnr_fn(t) decreases in t and is finite at both
ends (e.g. logsnr_fn(0) = 15 for the cosine schedule); z_t = alpha_t x +
sigma_t eps with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr).

A student that samples with N deterministic DDIM steps (eta = 0) on the grid
t_i = i / N learns to match TWO DDIM steps of its teacher (which samples with
2N steps on the grid i / 2N) with ONE step of its own:

  i ~ U{1, ..., N},  t = i / N,  t' = t - 0.5 / N,  t'' = t - 1 / N
  z_t   = alpha_t x + sigma_t eps
  z_t'  = DDIM_teacher(z_t;  t -> t')        (x_hat, eps_hat of the teacher at t)
  z_t'' = DDIM_teacher(z_t'; t' -> t'')      (x_hat, eps_hat of the teacher at t')
  x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

x_tilde is the x for which one DDIM step t -> t'' of the STUDENT, z_t'' =
alpha_t'' x + sigma_t'' (z_t - alpha_t x) / sigma_t, lands exactly on the
teacher's z_t''. The last student step goes to t'' = 0, i.e. logsnr_fn(0)
(finite), exactly where the samplers' grid ends. The loss is the x-space MSE
with the paper's truncated-SNR weighting, per example max(SNR_t, 1) =
max(exp(logsnr_t), 1), averaged over pixels and then over the batch; the
student reads its network output in its own parametrisation (v in this paper
family: x_hat = alpha z - sigma v).

The teacher may be guided with a FIXED weight w (x_hat = (1 + w) cond - w
uncond, one network call on the doubled batch); the student then learns the
guided teacher and is sampled without guidance. A null label gives (1 + w) u -
w u = u, so label dropout during distillation also distils the unconditional
model. Guidance distillation with w as a network input (Meng et al. 2023) is
not implemented: it needs a w-embedding in the models.

Every function here takes per-example logSNRs [B]; the teacher and student are
`samplers.make_denoiser` wrappers, which accept a [B] logSNR.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from simple_diffusion import samplers
from simple_diffusion import schedules

# (z [B, H, W, C], logsnr [B]) -> (x_hat, eps_hat), both [B, H, W, C].
Denoiser = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _bcast(v: jax.Array) -> jax.Array:
    """[B] -> [B, 1, 1, 1]."""
    return v[:, None, None, None]


def sample_student_times(rng: jax.Array, batch_size: int, num_student_steps: int,
                         dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(t, t', t''), each `dtype` [batch_size]: t = i / N with i ~ U{1..N},
    t' = t - 0.5 / N, t'' = t - 1 / N (t'' = 0 for i = 1)."""
    n = num_student_steps
    i = jax.random.randint(rng, (batch_size,), 1, n + 1)
    t = i.astype(dtype) / n
    return t, (i.astype(dtype) - 0.5) / n, (i - 1).astype(dtype) / n


def teacher_two_steps(teacher: Denoiser, z_t: jax.Array, logsnr_t: jax.Array,
                      logsnr_mid: jax.Array, logsnr_s: jax.Array) -> jax.Array:
    """z_s after two deterministic teacher DDIM steps t -> mid -> s.

    Args:
      teacher: per-example denoiser (`samplers.make_denoiser`).
      z_t: [B, H, W, C] state at t. logsnr_t < logsnr_mid < logsnr_s: [B] each.

    Returns:
      z_s [B, H, W, C], via `samplers.ddim_step` with eta = 0.
    """
    zero = jnp.zeros_like(z_t)
    x_hat, eps_hat = teacher(z_t, logsnr_t)
    z_mid = samplers.ddim_step(x_hat, eps_hat, _bcast(logsnr_t), _bcast(logsnr_mid), 0.0, zero)
    x_hat, eps_hat = teacher(z_mid, logsnr_mid)
    return samplers.ddim_step(x_hat, eps_hat, _bcast(logsnr_mid), _bcast(logsnr_s), 0.0, zero)


def x_target(z_t: jax.Array, z_s: jax.Array, logsnr_t: jax.Array,
             logsnr_s: jax.Array) -> jax.Array:
    """x_tilde [B, H, W, C] such that one DDIM step t -> s from z_t lands on z_s:
    (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t).

    logsnr_t < logsnr_s, [B] each; z_t, z_s [B, H, W, C].
    """
    alpha_t, sigma_t = schedules.alpha_sigma(_bcast(logsnr_t))
    alpha_s, sigma_s = schedules.alpha_sigma(_bcast(logsnr_s))
    ratio = sigma_s / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


def distillation_target(teacher: Denoiser, x: jax.Array, eps: jax.Array, t: jax.Array,
                        num_student_steps: int, logsnr_fn: Callable[[jax.Array], jax.Array]
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(z_t, logsnr_t, x_tilde) for clean images x, noise eps and student times t.

    Args:
      teacher: per-example denoiser.
      x, eps: [B, H, W, C] float32 (data in [-1, 1], standard normal noise).
      t: [B] student times i / N (see `sample_student_times`).
      num_student_steps: N.
      logsnr_fn: the trained schedule t -> logsnr.

    Returns:
      z_t [B, H, W, C], logsnr_t [B], x_tilde [B, H, W, C] (no gradient flows
      into the target).
    """
    half = 0.5 / num_student_steps
    logsnr_t = logsnr_fn(t)
    logsnr_mid = logsnr_fn(t - half)
    logsnr_s = logsnr_fn(t - 2 * half)
    alpha_t, sigma_t = schedules.alpha_sigma(_bcast(logsnr_t))
    z_t = alpha_t * x + sigma_t * eps
    z_s = teacher_two_steps(teacher, z_t, logsnr_t, logsnr_mid, logsnr_s)
    return z_t, logsnr_t, jax.lax.stop_gradient(x_target(z_t, z_s, logsnr_t, logsnr_s))


def truncated_snr_weight(logsnr: jax.Array) -> jax.Array:
    """max(SNR, 1) = max(exp(logsnr), 1), shaped like logsnr (the paper's weighting)."""
    return jnp.maximum(jnp.exp(logsnr), 1.0)


def distillation_loss(student: Denoiser, teacher: Denoiser, x: jax.Array, eps: jax.Array,
                      t: jax.Array, *, num_student_steps: int,
                      logsnr_fn: Callable[[jax.Array], jax.Array]
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The distillation loss of one batch (float32 scalar) and its metrics.

    loss = mean_b max(SNR_t, 1) * mean_pixels (x_hat_student(z_t) - x_tilde)^2.

    Args:
      student, teacher: per-example denoisers (the student unclipped, unguided).
      x, eps, t, num_student_steps, logsnr_fn: as in `distillation_target`.

    Returns:
      (loss, {'loss', 'x_mse'}) with x_mse the unweighted per-pixel MSE.
    """
    z_t, logsnr_t, x_tilde = distillation_target(teacher, x, eps, t, num_student_steps,
                                                 logsnr_fn)
    x_hat, _ = student(z_t, logsnr_t)
    per_example = jnp.mean((x_hat - x_tilde) ** 2, axis=(1, 2, 3))
    loss = jnp.mean(truncated_snr_weight(logsnr_t) * per_example)
    return loss, {"loss": loss, "x_mse": jnp.mean(per_example)}
