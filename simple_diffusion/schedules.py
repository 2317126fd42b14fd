"""Noise schedules expressed in logSNR.

Conventions (see docs/diffusion_core.md):
  * Continuous time t in [0, 1]; t = 0 is data, t = 1 is noise. Every schedule
    is a function t -> logsnr that decreases in t.
  * z_t = alpha * x + sigma * eps with alpha^2 = sigmoid(logsnr) and
    sigma^2 = sigmoid(-logsnr), i.e. logsnr = log(alpha^2 / sigma^2).
  * Discrete DDPM schedules and the EDM (variance exploding) sigma are mapped to
    logSNR too, so that one loss and one sampler code path serve all of them.
    The VE sigma of a VP state is sigma / alpha = exp(-logsnr / 2).

All functions are pure `jnp`, jit-compatible and broadcast over any shape of t.
They compute in the caller's floating dtype: float32 normally, float64 for
float64 inputs under `jax_enable_x64` (integer or Python inputs take JAX's
default float). Hyper-parameters are Python scalars (static).
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

_HALF_PI = math.pi / 2


def _as_float(x) -> jax.Array:
    """x as a floating array, keeping a float input's dtype (float64 stays float64)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x
    return x.astype(jnp.result_type(float))


def alpha_sigma(logsnr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """VP signal and noise scales for a logSNR.

    Args:
      logsnr: any shape, float; +inf (clean) and -inf (pure noise) are allowed.

    Returns:
      (alpha, sigma), same shape as `logsnr`, with alpha^2 + sigma^2 = 1.
    """
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def sigma_ve_from_logsnr(logsnr: jax.Array) -> jax.Array:
    """VE noise level of z / alpha = x + sigma_ve * eps: sigma_ve = exp(-logsnr / 2)."""
    return jnp.exp(-0.5 * logsnr)


def logsnr_from_sigma_ve(sigma_ve: jax.Array) -> jax.Array:
    """Inverse of `sigma_ve_from_logsnr`: logsnr = -2 log(sigma_ve) (sigma_ve = 0 -> +inf)."""
    return -2.0 * jnp.log(sigma_ve)


# ----------------------------------------------------------------------------
# Cosine family (simple diffusion).
# ----------------------------------------------------------------------------


def _cosine_angles(logsnr_min: float, logsnr_max: float) -> tuple[float, float, float]:
    """(theta at t=0, pi/2 - theta at t=1, angle span), in float64 Python."""
    if not logsnr_min < logsnr_max:
        raise ValueError(f"need logsnr_min < logsnr_max, got {logsnr_min}, {logsnr_max}")
    t_min = math.atan(math.exp(-0.5 * logsnr_max))
    # pi/2 - t_max, computed without cancellation.
    t_max_complement = math.atan(math.exp(0.5 * logsnr_min))
    return t_min, t_max_complement, _HALF_PI - t_max_complement - t_min


def logsnr_cosine(t: jax.Array, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> jax.Array:
    """Clipped alpha-cosine schedule: logsnr = -2 log tan(t_min + t (t_max - t_min)).

    t_min = atan(exp(-logsnr_max / 2)) and t_max = atan(exp(-logsnr_min / 2)), so
    logsnr(0) = logsnr_max and logsnr(1) = logsnr_min.

    Args:
      t: any shape, float in [0, 1].
      logsnr_min: logSNR at t = 1.
      logsnr_max: logSNR at t = 0.

    Returns:
      logsnr, same shape as t.
    """
    t_min, t_max_c, span = _cosine_angles(logsnr_min, logsnr_max)
    t = _as_float(t)
    # tan(pi/2 - a) = 1 / tan(a): evaluating the half near t = 1 through the
    # complementary angle keeps float32 accuracy where tan is steep.
    low = -2.0 * jnp.log(jnp.tan(t_min + t * span))
    high = 2.0 * jnp.log(jnp.tan(t_max_c + (1.0 - t) * span))
    return jnp.where(t < 0.5, low, high)


def t_from_logsnr_cosine(logsnr: jax.Array, logsnr_min: float = -15.0,
                         logsnr_max: float = 15.0) -> jax.Array:
    """Inverse of `logsnr_cosine` for logsnr in [logsnr_min, logsnr_max] (any shape, float)."""
    t_min, t_max_c, span = _cosine_angles(logsnr_min, logsnr_max)
    logsnr = _as_float(logsnr)
    low = (jnp.arctan(jnp.exp(-0.5 * logsnr)) - t_min) / span
    high = 1.0 - (jnp.arctan(jnp.exp(0.5 * logsnr)) - t_max_c) / span
    return jnp.where(logsnr > 0, low, high)


def resolution_shift(image_d: float, noise_d: float) -> float:
    """logSNR shift 2 log(noise_d / image_d) of simple diffusion section 3.1.

    Average pooling by a factor s multiplies the SNR by s^2, so a schedule
    designed at resolution noise_d is moved to image_d by this shift.
    """
    if image_d <= 0 or noise_d <= 0:
        raise ValueError(f"image_d and noise_d must be positive, got {image_d}, {noise_d}")
    return 2.0 * math.log(noise_d / image_d)


def _shifted_bounds(logsnr_min, logsnr_max, shift, shift_mode):
    if shift_mode == "after_clip":
        return logsnr_min, logsnr_max
    if shift_mode == "clip_preserving":
        return logsnr_min - shift, logsnr_max - shift
    raise ValueError(f"shift_mode must be 'after_clip' or 'clip_preserving', got {shift_mode!r}")


def logsnr_cosine_shifted(t: jax.Array, image_d: float, noise_d: float = 64.0,
                          logsnr_min: float = -15.0, logsnr_max: float = 15.0,
                          shift_mode: str = "after_clip") -> jax.Array:
    """Resolution-shifted cosine: logsnr_cosine(t) + 2 log(noise_d / image_d).

    Args:
      t: any shape, float in [0, 1].
      image_d: image resolution the schedule is used at.
      noise_d: reference resolution the cosine schedule is designed for (64 in
        the paper for ImageNet).
      logsnr_min, logsnr_max: clip range of the underlying cosine schedule.
      shift_mode: 'after_clip' (appendix pseudocode: the clip range moves with
        the shift, e.g. [-19.16, 10.84] at 512 px) or 'clip_preserving'
        (k-diffusion: the clip range stays [logsnr_min, logsnr_max]).

    Returns:
      logsnr, same shape as t.
    """
    shift = resolution_shift(image_d, noise_d)
    lo, hi = _shifted_bounds(logsnr_min, logsnr_max, shift, shift_mode)
    return logsnr_cosine(t, lo, hi) + shift


def t_from_logsnr_cosine_shifted(logsnr: jax.Array, image_d: float, noise_d: float = 64.0,
                                 logsnr_min: float = -15.0, logsnr_max: float = 15.0,
                                 shift_mode: str = "after_clip") -> jax.Array:
    """Inverse of `logsnr_cosine_shifted` (same arguments)."""
    shift = resolution_shift(image_d, noise_d)
    lo, hi = _shifted_bounds(logsnr_min, logsnr_max, shift, shift_mode)
    return t_from_logsnr_cosine(_as_float(logsnr) - shift, lo, hi)


def logsnr_cosine_interpolated(t: jax.Array, image_d: float, noise_d_low: float = 32.0,
                               noise_d_high: float = 256.0, logsnr_min: float = -15.0,
                               logsnr_max: float = 15.0, shift_mode: str = "after_clip",
                               interp_orientation: str = "pseudocode") -> jax.Array:
    """Interpolated shifted cosine (simple diffusion eq. 6 / appendix pseudocode).

    'pseudocode' (default): t * shifted(noise_d_low) + (1 - t) * shifted(noise_d_high),
      so the noise end (t = 1) uses the low-resolution shift ("start at shift 32").
    'reversed': t * shifted(noise_d_high) + (1 - t) * shifted(noise_d_low), eq. 6
      as transcribed by readers of the paper.

    Args:
      t: any shape, float in [0, 1].
      image_d: image resolution.
      noise_d_low, noise_d_high: the two reference resolutions.
      logsnr_min, logsnr_max, shift_mode: as in `logsnr_cosine_shifted`.
      interp_orientation: 'pseudocode' or 'reversed'.

    Returns:
      logsnr, same shape as t. No closed-form inverse exists.
    """
    if interp_orientation not in ("pseudocode", "reversed"):
        raise ValueError("interp_orientation must be 'pseudocode' or 'reversed', "
                         f"got {interp_orientation!r}")
    t = _as_float(t)
    low = logsnr_cosine_shifted(t, image_d, noise_d_low, logsnr_min, logsnr_max, shift_mode)
    high = logsnr_cosine_shifted(t, image_d, noise_d_high, logsnr_min, logsnr_max, shift_mode)
    if interp_orientation == "pseudocode":
        return t * low + (1.0 - t) * high
    return t * high + (1.0 - t) * low


# ----------------------------------------------------------------------------
# Discrete DDPM schedules.
# ----------------------------------------------------------------------------


def ddpm_betas(kind: str, num_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, cosine_s: float = 0.008,
               max_beta: float = 0.999) -> np.ndarray:
    """Discrete DDPM betas beta_1..beta_T, float64 NumPy [num_timesteps].

    kind: 'linear' (Ho et al.: linspace(beta_start, beta_end)), 'cosine'
    (improved DDPM: alpha_bar(i) = f(i) / f(0), f(i) = cos^2((i/T + s)/(1 + s) pi/2),
    betas clipped at max_beta) or 'sigmoid' (sigmoid(linspace(-6, 6)) rescaled to
    [beta_start, beta_end]).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    n = num_timesteps
    if kind == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if kind == "cosine":
        f = np.cos((np.arange(n + 1, dtype=np.float64) / n + cosine_s) / (1 + cosine_s) * _HALF_PI) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], max_beta)
    if kind == "sigmoid":
        x = np.linspace(-6.0, 6.0, n, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"kind must be 'linear', 'cosine' or 'sigmoid', got {kind!r}")


def ddpm_logsnr_table(betas: np.ndarray, logsnr_max: float = 20.0) -> np.ndarray:
    """logSNR at t = i / T, i = 0..T, float64 NumPy [T + 1].

    logsnr_i = log(alpha_bar_i / (1 - alpha_bar_i)) with alpha_bar_i = prod_{j<=i}(1 - beta_j).
    alpha_bar_0 = 1 is infinitely clean; it is clamped to `logsnr_max` so that
    t = 0 never feeds an infinite logSNR to a network.
    """
    log_alpha_bar = np.cumsum(np.log1p(-np.asarray(betas, np.float64)))
    # log(1 - alpha_bar) via expm1 keeps precision when alpha_bar is close to 1.
    logsnr = log_alpha_bar - np.log(-np.expm1(log_alpha_bar))
    if logsnr[0] >= logsnr_max:
        raise ValueError(f"logsnr_max={logsnr_max} must exceed logsnr at i=1 ({logsnr[0]:.3f})")
    return np.concatenate([[logsnr_max], logsnr])


def logsnr_from_table(t: jax.Array, table: np.ndarray) -> jax.Array:
    """Piecewise-linear logSNR between grid points t = i / T of a [T + 1] table.

    Exact at the discrete timesteps, continuous in between so that continuous-time
    training and samplers with any step count work unchanged.
    """
    t = _as_float(t)
    grid = jnp.linspace(0.0, 1.0, len(table), dtype=t.dtype)
    return jnp.interp(t, grid, jnp.asarray(table, t.dtype))


# ----------------------------------------------------------------------------
# EDM (Karras et al. 2022).
# ----------------------------------------------------------------------------


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0, dtype=jnp.float32) -> jax.Array:
    """Karras sampling grid, descending, with a final 0: `dtype` [num_steps + 1].

    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0..N-1, then sigma_N = 0. These are VE noise levels (exp(-logsnr / 2)).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    frac = (jnp.linspace(0.0, 1.0, num_steps, dtype=dtype) if num_steps > 1
            else jnp.zeros(1, dtype))
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    return jnp.concatenate([sigmas, jnp.zeros(1, dtype)]).astype(dtype)


def logsnr_edm(t: jax.Array, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0) -> jax.Array:
    """Continuous Karras schedule in logSNR: sigma(t) = (a + t (b - a))^rho, logsnr = -2 log sigma.

    a = sigma_min^(1/rho), b = sigma_max^(1/rho); t = 0 gives sigma_min, t = 1
    gives sigma_max, so a uniform t grid reproduces `karras_sigmas` (without the
    final 0).
    """
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    t = _as_float(t)
    return -2.0 * rho * jnp.log(lo + t * (hi - lo))


def t_from_logsnr_edm(logsnr: jax.Array, sigma_min: float = 0.002, sigma_max: float = 80.0,
                      rho: float = 7.0) -> jax.Array:
    """Inverse of `logsnr_edm`."""
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (jnp.exp(-_as_float(logsnr) / (2.0 * rho)) - lo) / (hi - lo)


def edm_lognormal_logsnr(rng: jax.Array, shape: tuple[int, ...], p_mean: float = -1.2,
                         p_std: float = 1.2) -> jax.Array:
    """EDM training noise: ln sigma_ve ~ N(p_mean, p_std^2), returned as logsnr = -2 ln sigma_ve."""
    return -2.0 * (p_mean + p_std * jax.random.normal(rng, shape, jnp.float32))


# ----------------------------------------------------------------------------
# Name-based construction (configs).
# ----------------------------------------------------------------------------

_COSINE = ("logsnr_min", "logsnr_max")
_DDPM = ("num_timesteps", "beta_start", "beta_end", "logsnr_max")
_ACCEPTED = {
    "cosine": _COSINE,
    "cosine_shifted": _COSINE + ("image_d", "noise_d", "shift_mode"),
    "cosine_interpolated": _COSINE + ("image_d", "noise_d_low", "noise_d_high", "shift_mode",
                                      "interp_orientation"),
    "ddpm_linear": _DDPM,
    "ddpm_cosine": ("num_timesteps", "cosine_s", "max_beta", "logsnr_max"),
    "ddpm_sigmoid": _DDPM,
    "edm": ("sigma_min", "sigma_max", "rho"),
}
NAMES = tuple(_ACCEPTED)
_REQUIRED = {"cosine_shifted": ("image_d",), "cosine_interpolated": ("image_d",)}


def _check_kwargs(name: str, kwargs: dict) -> None:
    if name not in _ACCEPTED:
        raise ValueError(f"unknown schedule {name!r}; accepted: {sorted(_ACCEPTED)}")
    unknown = sorted(set(kwargs) - set(_ACCEPTED[name]))
    if unknown:
        raise ValueError(f"schedule {name!r} got unknown kwargs {unknown}; "
                         f"accepted: {list(_ACCEPTED[name])}")
    missing = [k for k in _REQUIRED.get(name, ()) if k not in kwargs]
    if missing:
        raise ValueError(f"schedule {name!r} requires {missing}")


def get_logsnr_fn(name: str, **kwargs) -> Callable[[jax.Array], jax.Array]:
    """Schedule t -> logsnr by name (t any shape, float in [0, 1], t = 1 noise).

    Names and accepted kwargs:
      'cosine': logsnr_min=-15, logsnr_max=15.
      'cosine_shifted': image_d (required), noise_d=64, logsnr_min, logsnr_max,
        shift_mode ('after_clip' | 'clip_preserving').
      'cosine_interpolated': image_d (required), noise_d_low=32, noise_d_high=256,
        logsnr_min, logsnr_max, shift_mode, interp_orientation ('pseudocode' | 'reversed').
      'ddpm_linear', 'ddpm_sigmoid': num_timesteps=1000, beta_start=1e-4,
        beta_end=0.02, logsnr_max=20 (the clamped value at t = 0).
      'ddpm_cosine': num_timesteps=1000, cosine_s=0.008, max_beta=0.999, logsnr_max=20.
      'edm': sigma_min=0.002, sigma_max=80, rho=7 (Karras sigma in logSNR form).

    Raises:
      ValueError: unknown name, unknown or missing kwarg, or invalid value.
    """
    _check_kwargs(name, kwargs)
    if name == "cosine":
        _cosine_angles(kwargs.get("logsnr_min", -15.0), kwargs.get("logsnr_max", 15.0))
        return lambda t: logsnr_cosine(t, **kwargs)
    if name == "cosine_shifted":
        logsnr_cosine_shifted(jnp.zeros(()), **kwargs)  # Validates the arguments eagerly.
        return lambda t: logsnr_cosine_shifted(t, **kwargs)
    if name == "cosine_interpolated":
        logsnr_cosine_interpolated(jnp.zeros(()), **kwargs)
        return lambda t: logsnr_cosine_interpolated(t, **kwargs)
    if name.startswith("ddpm_"):
        logsnr_max = kwargs.pop("logsnr_max", 20.0)
        table = ddpm_logsnr_table(ddpm_betas(name[len("ddpm_"):], **kwargs), logsnr_max)
        return lambda t: logsnr_from_table(t, table)
    return lambda t: logsnr_edm(t, **kwargs)


def get_t_fn(name: str, **kwargs) -> Callable[[jax.Array], jax.Array]:
    """Closed-form inverse logsnr -> t of `get_logsnr_fn(name, **kwargs)`.

    Available for 'cosine', 'cosine_shifted' and 'edm'.

    Raises:
      ValueError: for schedules without a closed-form inverse, or bad kwargs.
    """
    _check_kwargs(name, kwargs)
    if name == "cosine":
        return lambda logsnr: t_from_logsnr_cosine(logsnr, **kwargs)
    if name == "cosine_shifted":
        return lambda logsnr: t_from_logsnr_cosine_shifted(logsnr, **kwargs)
    if name == "edm":
        return lambda logsnr: t_from_logsnr_edm(logsnr, **kwargs)
    raise ValueError(f"schedule {name!r} has no closed-form inverse; "
                     "available: ['cosine', 'cosine_shifted', 'edm']")


def logsnr_range(logsnr_fn: Callable[[jax.Array], jax.Array]) -> tuple[float, float]:
    """(logsnr at t = 1, logsnr at t = 0): the trained noise range, as Python floats.

    Evaluated eagerly even while a caller is being traced by `jax.jit`.
    """
    with jax.ensure_compile_time_eval():
        return float(logsnr_fn(1.0)), float(logsnr_fn(0.0))


# ----------------------------------------------------------------------------
# Discrete timestep spacings (DDPM / diffusers), for samplers.
# ----------------------------------------------------------------------------

SPACINGS = ("uniform", "leading", "trailing")


def discrete_t_grid(num_timesteps: int, num_steps: int, spacing: str) -> np.ndarray:
    """Sampling times of a discrete T-step schedule, from noise to data: float64 [N + 1].

    Discrete timestep k (1..T, diffusers index k - 1) sits at t = k / T, and the
    chain ends at the clean t = 0. With step ratio r = T // N:
      'leading' (diffusers DDIM/DDPM default): k = r (N - 1) + 1, ..., r + 1, 1.
      'trailing': k = round(T - j T / N), j = 0..N-1 (T, ..., T / N).
      'uniform': t = linspace(1, 0, N + 1), this project's continuous-time grid.
    'leading' and 'trailing' are not consecutive steps of one linspace, so a
    sampler must take the grid explicitly to match diffusers step for step.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"need 1 <= num_steps <= num_timesteps, got {num_steps}, {num_timesteps}")
    if spacing == "uniform":
        return np.linspace(1.0, 0.0, num_steps + 1)
    if spacing == "leading":
        ratio = num_timesteps // num_steps
        k = np.arange(num_steps)[::-1] * ratio + 1
    else:
        k = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)).astype(np.int64)
    return np.concatenate([k / num_timesteps, [0.0]])


# ----------------------------------------------------------------------------
# Config (``config.schedule``): every family's fields are declared, so a run can
# switch schedule on the command line; each name reads only its own fields.
# ----------------------------------------------------------------------------

# Field -> default. `logsnr_max` is also the clamp of the DDPM tables at t = 0.
CONFIG_DEFAULTS = dict(
    name="cosine_shifted", logsnr_min=-15.0, logsnr_max=15.0, image_d=64, noise_d=64,
    noise_d_low=32, noise_d_high=256, shift_mode="after_clip", interp_orientation="pseudocode",
    num_timesteps=1000, beta_start=1e-4, beta_end=0.02, cosine_s=0.008, max_beta=0.999,
    sigma_min=0.002, sigma_max=80.0, rho=7.0)


def kwargs_from_config(config) -> tuple[str, dict]:
    """(name, kwargs of `get_logsnr_fn`) from a ``config.schedule`` mapping.

    Fields the named schedule does not use are ignored; fields missing from
    the mapping (configs of older runs) take `get_logsnr_fn`'s defaults.
    """
    name = config["name"]
    if name not in _ACCEPTED:
        raise ValueError(f"config.schedule.name={name!r}; use one of {sorted(_ACCEPTED)}.")
    return name, {k: config[k] for k in _ACCEPTED[name] if k in config}


def from_config(config) -> Callable[[jax.Array], jax.Array]:
    """The schedule t -> logsnr described by ``config.schedule`` (see CONFIG_DEFAULTS)."""
    name, kwargs = kwargs_from_config(config)
    return get_logsnr_fn(name, **kwargs)


def num_timesteps_from_config(config) -> int | None:
    """T of a discrete ``ddpm_*`` schedule in ``config.schedule``, else None."""
    name, kwargs = kwargs_from_config(config)
    return kwargs.get("num_timesteps", 1000) if name.startswith("ddpm_") else None
