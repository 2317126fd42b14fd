"""Command-line flags for every `samplers.SamplerOptions` field (sample and evaluate CLIs).

Each flag defaults to None, meaning "as the run's config says" (``config.sample``
for the sample CLI, ``config.eval`` for evaluate), so a run samples with the
sampler of its recipe unless told otherwise.
"""

import math
import time

from absl import flags
from absl import logging

from simple_diffusion import config_validation
from simple_diffusion import samplers

# flag name -> SamplerOptions field (the short names are the CLIs' historical ones).
_FIELD = {"steps": "num_steps", "guidance": "guidance_scale"}

flags.DEFINE_enum("sampler", None, list(samplers.SAMPLERS), "Sampler.")
flags.DEFINE_integer("steps", None, "Denoising steps N (Heun: 2N - 1 network evaluations).")
flags.DEFINE_float("guidance", None, "Guidance w: (1 + w) * cond - w * uncond (0 = off).")
flags.DEFINE_float("guidance_logsnr_min", None,
                   "Guidance interval: lowest logSNR at which guidance is applied (-inf: none).")
flags.DEFINE_float("guidance_logsnr_max", None,
                   "Guidance interval: highest logSNR at which guidance is applied (inf: none).")
flags.DEFINE_enum("clip_x", None, ["auto", "true", "false"],
                  "Clip x_hat to [-1, 1]; auto = on for ddpm/ddim, off for euler/heun.")
flags.DEFINE_float("eta", None, "DDIM eta in [0, 1].")
flags.DEFINE_float("s_churn", None, "EDM stochastic churn (euler/heun).")
flags.DEFINE_float("s_tmin", None, "EDM churn: lowest sigma with churn.")
flags.DEFINE_float("s_tmax", None, "EDM churn: highest sigma with churn.")
flags.DEFINE_float("s_noise", None, "EDM churn noise scale.")
flags.DEFINE_float("sigma_min", None, "euler/heun grid: lowest sigma (0: the trained schedule's).")
flags.DEFINE_float("sigma_max", None, "euler/heun grid: highest sigma (0: the trained schedule's).")
flags.DEFINE_float("rho", None, "euler/heun Karras grid exponent.")
flags.DEFINE_enum("spacing", None, ["uniform", "leading", "trailing"],
                  "Timesteps: uniform in t, or diffusers' leading/trailing (ddpm_* schedules).")


def options_from_flags(config, section_name: str) -> samplers.SamplerOptions:
    """``config.<section_name>``'s sampler options with any given flag applied, validated.

    Raises:
      config_validation.ConfigError: naming the bad value.
    """
    section = dict(config[section_name])
    for name in samplers.SamplerOptions.field_names() + tuple(_FIELD):
        field = _FIELD.get(name, name)
        if name in flags.FLAGS and flags.FLAGS[name].value is not None:
            section[field] = flags.FLAGS[name].value
    where = "sampler flags / config." + section_name
    return config_validation.validate_sampler(section, where, config.schedule)


def progress_logger(what: str):
    """A ``progress(done, total)`` callback that logs count, rate and ETA."""
    start = time.time()

    def progress(done: int, total: int) -> None:
        elapsed = max(time.time() - start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else math.inf
        logging.info("%s: %d/%d images, %.2f images/s, ETA %.0f s", what, done, total, rate, eta)

    return progress
