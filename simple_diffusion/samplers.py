"""Samplers as one `lax.scan` over a precomputed logSNR grid.

Every sampler walks a grid of logSNR values from noise to data (increasing
logSNR), by default derived from the schedule the model was trained on
(`logsnr_grid`). 'ddpm' and 'ddim' step the VP state z between grid points
lambda_t -> lambda_s; 'euler' and 'heun' (EDM) step the VE state
x_ve = z / alpha at sigma = exp(-lambda / 2), on a Karras rho-grid whose
sigma_min and sigma_max are the trained schedule's ends unless overridden (the
grid ends at lambda = +inf, sigma = 0). All call the network the same way (see
`make_denoiser`), so a model never needs to know which sampler runs it.

All sampler settings live in one object, `SamplerOptions`, shared by the
configs' ``sample`` and ``eval`` sections, the sample and evaluate CLIs and the
evaluator.

Each sampler is a per-step function `step(state, (i, cur, nxt)) -> (state, z)`;
`sample` runs it with `lax.scan` (compile time independent of the number of
steps) or, with `use_scan=False`, in an eager Python loop for debugging. Step i
draws its randomness from `jax.random.fold_in(rng, i)`, so both paths consume
identical noise. Everything is computed in the dtype of the initial noise
(float64 under `jax_enable_x64` when given float64 noise).
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from simple_diffusion import parametrization
from simple_diffusion import schedules

SAMPLERS = ("ddpm", "ddim", "euler", "heun")
_ODE = ("euler", "heun")


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """Every sampler setting (one home: configs, CLIs and the evaluator use this).

    Attributes:
      sampler: 'ddpm' (ancestral), 'ddim' (eta), 'euler' or 'heun' (EDM, churn).
      num_steps: N steps (Heun uses 2N - 1 network evaluations).
      guidance_scale: w in x_hat = (1 + w) cond - w uncond; 0 = plain conditional.
      guidance_logsnr_min, guidance_logsnr_max: the guidance interval (Kynkaanniemi
        et al. 2024) as a logSNR band; outside it the unconditional branch is not
        evaluated at all. (-inf, inf) = guidance at every step.
      clip_x: clip x_hat to [-1, 1] at every step. 'auto': on for ddpm/ddim (the
        simple diffusion sampler), off for the ODE samplers (EDM never clips).
      eta: DDIM stochasticity in [0, 1] (0 deterministic, 1 = ancestral).
      s_churn, s_tmin, s_tmax, s_noise: EDM stochastic churn (s_churn = 0 off).
      sigma_min, sigma_max: the VE range of the euler/heun Karras grid; 0 takes
        it from the trained schedule: sigma = exp(-logsnr / 2) at t = 0 and 1.
      rho: Karras grid exponent.
      spacing: 'uniform' (t = linspace(1, 0, N + 1)) or, for a discrete ddpm_*
        schedule, diffusers' 'leading' / 'trailing' timesteps.
    """
    sampler: str = "ddpm"
    num_steps: int = 256
    guidance_scale: float = 0.0
    guidance_logsnr_min: float = -math.inf
    guidance_logsnr_max: float = math.inf
    clip_x: Any = "auto"
    eta: float = 0.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    sigma_min: float = 0.0
    sigma_max: float = 0.0
    rho: float = 7.0
    spacing: str = "uniform"

    def __post_init__(self):
        if isinstance(self.clip_x, str) and self.clip_x.lower() in ("true", "false"):
            object.__setattr__(self, "clip_x", self.clip_x.lower() == "true")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_config(cls, section, **overrides) -> "SamplerOptions":
        """Options from a config section (``config.sample`` / ``config.eval``).

        Fields the section lacks (configs of older runs) take the defaults;
        ``overrides`` that are not None replace the section's values.
        """
        kwargs = {k: section[k] for k in cls.field_names() if k in section}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 0

    @property
    def clip(self) -> bool:
        """The resolved clip_x."""
        return self.sampler not in _ODE if self.clip_x == "auto" else bool(self.clip_x)

    @property
    def guidance_interval(self) -> tuple[float, float] | None:
        lo, hi = self.guidance_logsnr_min, self.guidance_logsnr_max
        return None if (lo == -math.inf and hi == math.inf) else (lo, hi)

    def validate(self, where: str = "sampler") -> "SamplerOptions":
        """Raises ValueError naming ``<where>.<field>`` for any invalid value."""
        def check(cond, field, rule):
            if not cond:
                raise ValueError(f"{where}.{field}={getattr(self, field)!r}: {rule}")
        finite = math.isfinite
        check(self.sampler in SAMPLERS, "sampler", f"use one of {SAMPLERS}.")
        check(isinstance(self.num_steps, int) and self.num_steps >= 1, "num_steps",
              "must be an integer >= 1.")
        check(finite(self.guidance_scale), "guidance_scale", "must be a finite number.")
        for f in ("guidance_logsnr_min", "guidance_logsnr_max"):
            check(not math.isnan(getattr(self, f)), f, "must be a number (+-inf for no bound).")
        check(self.guidance_logsnr_min <= self.guidance_logsnr_max, "guidance_logsnr_min",
              f"must be <= guidance_logsnr_max={self.guidance_logsnr_max}.")
        check(self.clip_x in (True, False, "auto"), "clip_x", "use True, False or 'auto'.")
        check(finite(self.eta) and 0.0 <= self.eta <= 1.0, "eta",
              "DDIM eta must be in [0, 1] (above 1 the step's noise variance is negative).")
        check(finite(self.s_churn) and self.s_churn >= 0, "s_churn", "must be >= 0.")
        check(finite(self.s_noise) and self.s_noise >= 0, "s_noise", "must be >= 0.")
        check(self.s_tmin <= self.s_tmax, "s_tmin", f"must be <= s_tmax={self.s_tmax}.")
        for f in ("sigma_min", "sigma_max"):
            check(finite(getattr(self, f)) and getattr(self, f) >= 0, f,
                  "must be >= 0 (0 = from the trained schedule).")
        if self.sigma_min and self.sigma_max:
            check(self.sigma_min < self.sigma_max, "sigma_min",
                  f"must be < sigma_max={self.sigma_max}.")
        check(finite(self.rho) and self.rho > 0, "rho", "must be > 0.")
        check(self.spacing in schedules.SPACINGS, "spacing",
              f"use one of {schedules.SPACINGS}.")
        check(self.spacing == "uniform" or self.sampler not in _ODE, "spacing",
              "'leading'/'trailing' are discrete DDPM timesteps: use them with ddpm or ddim.")
        return self


def config_fields() -> dict[str, Any]:
    """The sampler fields of a config section, with their defaults."""
    return dataclasses.asdict(SamplerOptions())


def make_denoiser(model_fn: Callable, *, prediction: str = "v", labels=None, null_label=None,
                  guidance_scale=0.0, guidance_interval=None, clip_x: bool = False,
                  sigma_data: float = 0.5) -> Callable[[jax.Array, jax.Array], tuple]:
    """Wraps a network as denoise(z, logsnr) -> (x_hat, eps_hat).

    Args:
      model_fn: (net_in [B', H, W, C], logsnr [B'], labels [B'] int32 or None)
        -> raw output per `prediction`. net_in is
        `parametrization.network_input(z, logsnr)` (z itself except for 'edm').
      prediction: 'eps' | 'x' | 'v' | 'edm'.
      labels: [B] int32 class labels or None.
      null_label: the unconditional label (`num_classes`), needed for guidance.
      guidance_scale: w in x_hat = (1 + w) x_cond - w x_uncond (0 = off). The
        conditional and unconditional halves go through ONE model call with
        B' = 2B (labels concatenated with null_label). x_hat and eps_hat are
        affine in the raw output, so guiding them equals guiding the raw output.
      guidance_interval: None or (lo, hi): guidance only where lo <= logsnr <= hi.
        Outside the band only the conditional batch (B' = B) is evaluated, under
        `lax.cond`, so the interval saves the compute of the skipped branch.
        Needs a scalar logsnr (one noise level for the batch).
      clip_x: clip x_hat to [-1, 1] (eps_hat is then recomputed from it).
      sigma_data: EDM data std (only for 'edm').

    Returns:
      denoise(z [B, H, W, C], logsnr scalar or [B]) -> (x_hat, eps_hat), both
      like z. Samplers step one scalar logSNR; distillation gives one per example.
    """
    guided = not (isinstance(guidance_scale, (int, float)) and guidance_scale == 0)
    if guided and (labels is None or null_label is None):
        raise ValueError("guidance_scale != 0 needs labels and null_label")

    def evaluate(net_z, logsnr_vec, net_labels):
        logsnr_b = logsnr_vec[:, None, None, None]
        net_in = parametrization.network_input(net_z, logsnr_b, prediction, sigma_data)
        raw = model_fn(net_in, logsnr_vec, net_labels).astype(net_z.dtype)
        return parametrization.predict_x_eps(raw, net_z, logsnr_b, prediction, sigma_data)

    def conditional(z, logsnr_vec):
        return evaluate(z, logsnr_vec, labels)

    def guided_pair(z, logsnr_vec):
        net_labels = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
        x_hat, eps_hat = evaluate(jnp.concatenate([z, z]),
                                  jnp.concatenate([logsnr_vec, logsnr_vec]), net_labels)
        w = jnp.asarray(guidance_scale, z.dtype)
        x_cond, x_uncond = jnp.split(x_hat, 2)
        eps_cond, eps_uncond = jnp.split(eps_hat, 2)
        return (1.0 + w) * x_cond - w * x_uncond, (1.0 + w) * eps_cond - w * eps_uncond

    def denoise(z, logsnr):
        logsnr_vec = jnp.broadcast_to(jnp.asarray(logsnr, z.dtype), (z.shape[0],))
        if not guided:
            x_hat, eps_hat = conditional(z, logsnr_vec)
        elif guidance_interval is None:
            x_hat, eps_hat = guided_pair(z, logsnr_vec)
        else:
            lo, hi = guidance_interval
            x_hat, eps_hat = jax.lax.cond((logsnr >= lo) & (logsnr <= hi), guided_pair,
                                          conditional, z, logsnr_vec)
        if clip_x:
            alpha, sigma = schedules.alpha_sigma(logsnr_vec[:, None, None, None])
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


def _make_step(options: SamplerOptions, denoise, rng, num_steps):
    """Per-step function step(state, (i, cur, nxt)) -> (state, VP z after the step).

    cur/nxt are logSNR grid values (nxt = +inf on the ODE samplers' last step).
    """
    last = num_steps - 1

    if options.sampler in ("ddpm", "ddim"):
        def step(z, xs):
            i, logsnr_t, logsnr_s = xs
            # No noise is added on the final step.
            noise = jnp.where(i == last, 0.0, 1.0).astype(z.dtype) * jax.random.normal(
                jax.random.fold_in(rng, i), z.shape, z.dtype)
            x_hat, eps_hat = denoise(z, logsnr_t)
            if options.sampler == "ddpm":
                z = ddpm_step(z, x_hat, logsnr_t, logsnr_s, noise)
            else:
                z = ddim_step(x_hat, eps_hat, logsnr_t, logsnr_s, options.eta, noise)
            return z, z
        return step

    gamma_max = min(options.s_churn / num_steps, math.sqrt(2.0) - 1.0)

    def step(x, xs):
        i, logsnr, logsnr_next = xs
        sigma = schedules.sigma_ve_from_logsnr(logsnr)
        sigma_next = schedules.sigma_ve_from_logsnr(logsnr_next)
        in_band = (sigma >= options.s_tmin) & (sigma <= options.s_tmax)
        gamma = jnp.where(in_band, gamma_max, 0.0).astype(x.dtype)
        sigma_hat = sigma * (1.0 + gamma)
        noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
        # sqrt(sigma_hat^2 - sigma^2) written so that gamma = 0 gives exactly 0 (the
        # direct difference can round below 0 under FMA contraction and yield NaN).
        x_hat = x + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * options.s_noise * noise
        d = (x_hat - _ve_denoise(denoise, x_hat, sigma_hat)) / sigma_hat
        x_next = x_hat + (sigma_next - sigma_hat) * d
        if options.sampler == "heun":
            def correct():
                d_next = (x_next - _ve_denoise(denoise, x_next, sigma_next)) / sigma_next
                return x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
            # The step to sigma = 0 stays a first-order Euler step.
            x_next = jax.lax.cond(sigma_next > 0, correct, lambda: x_next)
        return x_next, x_next / jnp.sqrt(1.0 + sigma_next**2)
    return step


def logsnr_grid(options: SamplerOptions, logsnr_fn=None, *, num_timesteps: int | None = None,
                dtype=jnp.float32) -> jax.Array:
    """The sampler's default logSNR grid, `dtype` [N + 1], from noise to data.

    'ddpm'/'ddim': logsnr_fn(t) on t = linspace(1, 0, N + 1), or on the discrete
      'leading'/'trailing' timesteps of a `num_timesteps`-step DDPM schedule.
    'euler'/'heun': the Karras rho-grid in VE sigma between sigma_min and
      sigma_max (by default the trained range exp(-logsnr_fn(t) / 2) at t = 0
      and t = 1), as logSNR, ending at +inf (sigma = 0).

    Args:
      options: the sampler settings.
      logsnr_fn: the trained schedule t -> logsnr; may be None only for the ODE
        samplers with both sigma_min and sigma_max given.
      num_timesteps: T of a discrete schedule (needed for non-uniform spacing).
      dtype: float dtype of the grid.
    """
    n = options.num_steps
    if options.sampler in _ODE:
        sigma_min, sigma_max = options.sigma_min, options.sigma_max
        if not (sigma_min and sigma_max):
            if logsnr_fn is None:
                raise ValueError(f"sampler {options.sampler!r} needs a logsnr_fn (the trained "
                                 "schedule) unless sigma_min and sigma_max are both given")
            lo, hi = schedules.logsnr_range(logsnr_fn)
            sigma_max = sigma_max or math.exp(-0.5 * lo)
            sigma_min = sigma_min or math.exp(-0.5 * hi)
        sigmas = schedules.karras_sigmas(n, sigma_min, sigma_max, options.rho, dtype)
        return schedules.logsnr_from_sigma_ve(sigmas)
    if logsnr_fn is None:
        raise ValueError(f"sampler {options.sampler!r} needs a logsnr_fn")
    if options.spacing == "uniform":
        t = jnp.linspace(1.0, 0.0, n + 1, dtype=dtype)
    else:
        if num_timesteps is None:
            raise ValueError(f"spacing={options.spacing!r} needs a discrete ddpm_* schedule "
                             "(its num_timesteps)")
        t = jnp.asarray(schedules.discrete_t_grid(num_timesteps, n, options.spacing), dtype)
    return jnp.asarray(logsnr_fn(t), dtype)


def num_model_evaluations(options: SamplerOptions, grid) -> int:
    """Examples' worth of network calls per sample (a guided call counts 2),
    for the grid `grid` ([N + 1] logSNR): the cost the guidance interval saves."""
    grid = np.asarray(grid, np.float64)
    if options.sampler in _ODE:
        # Euler: one call at each sigma_hat (= sigma without churn); Heun adds one at
        # every next sigma but the final 0.
        points = list(grid[:-1]) + (list(grid[1:-1]) if options.sampler == "heun" else [])
        if options.s_churn:
            raise ValueError("with churn the evaluation points depend on s_churn; count "
                             "them by instrumenting the model instead")
    else:
        points = list(grid[:-1])
    if not options.guided:
        return len(points)
    interval = options.guidance_interval or (-math.inf, math.inf)
    return sum(2 if interval[0] <= p <= interval[1] else 1 for p in points)


def sample(model_fn: Callable, rng: jax.Array, options: SamplerOptions, *, logsnr_fn=None,
           shape=None, noise=None, prediction: str = "v", labels=None, null_label=None,
           sigma_data: float = 0.5, grid=None, num_timesteps: int | None = None,
           return_trajectory: bool = False, use_scan: bool = True):
    """Draws samples from a diffusion model.

    Args:
      model_fn: (net_in [B', H, W, C], logsnr [B'], labels [B'] int32 or None)
        -> raw output per `prediction`; see `make_denoiser` for net_in and for
        the guided batch B' = 2B.
      rng: PRNGKey for the initial noise (when `noise` is None) and every step.
      options: a validated `SamplerOptions`.
      logsnr_fn: the trained schedule t -> logsnr (t = 1 noise); sets the grid
        (see `logsnr_grid`).
      shape: [B, H, W, C] of the samples, or None when `noise` is given.
      noise: optional standard-normal initial noise [B, H, W, C]; its dtype is
        the compute dtype. The start state is `noise` (ddpm/ddim) or
        `noise * sigma_max` (euler/heun).
      prediction: 'eps' | 'x' | 'v' | 'edm'.
      labels, null_label: class conditioning; null_label (`num_classes`) is the
        unconditional label used by guidance.
      sigma_data: EDM data std (only for 'edm' prediction).
      grid: optional explicit logSNR grid [N' + 1] from noise to data (e.g. a
        diffusers timestep list mapped through the schedule); overrides the
        default grid and options.num_steps. ODE samplers read it as
        sigma = exp(-logsnr / 2) (+inf -> 0).
      num_timesteps: T of a discrete schedule, for options.spacing.
      return_trajectory: also return the VP state after every step.
      use_scan: False runs the same step function in an eager Python loop.

    Returns:
      x [B, H, W, C] in the noise dtype: the final state (z at logsnr_fn(0) for
      ddpm/ddim, x at sigma = 0 for euler/heun). With return_trajectory,
      (x, trajectory) where trajectory is [N, B, H, W, C] VP states
      z = alpha * x + sigma * eps after each step.
    """
    options.validate()
    init_rng, step_rng = jax.random.split(rng)
    if noise is None:
        if shape is None:
            raise ValueError("give either shape or noise")
        noise = jax.random.normal(init_rng, shape, jnp.float32)
    state = jnp.asarray(noise)
    dtype = state.dtype
    if grid is None:
        grid = logsnr_grid(options, logsnr_fn, num_timesteps=num_timesteps, dtype=dtype)
    grid = jnp.asarray(grid, dtype)
    num_steps = grid.shape[0] - 1
    denoise = make_denoiser(model_fn, prediction=prediction, labels=labels, null_label=null_label,
                            guidance_scale=options.guidance_scale,
                            guidance_interval=options.guidance_interval, clip_x=options.clip,
                            sigma_data=sigma_data)
    step = _make_step(options, denoise, step_rng, num_steps)
    if options.sampler in _ODE:
        state = state * schedules.sigma_ve_from_logsnr(grid[0])
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
