"""Checks a run's config before any work starts, with messages that say the fix."""

import ml_collections

from simple_diffusion import sharding

PREDICTIONS = ("eps", "x", "v", "edm")
SAMPLERS = ("ddpm", "ddim", "euler", "heun")


class ConfigError(ValueError):
    """A config value is wrong; the message says which and how to fix it."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int,
                    process_count: int) -> tuple[int, int]:
    """Validates ``config`` for this device layout.

    Args:
      config: the run config (see config_defaults.base_config).
      num_devices: global device count.
      process_count: number of JAX processes.

    Returns:
      The resolved (data, fsdp) mesh shape.

    Raises:
      ConfigError: with the field, the bad value and the fix.
    """
    mesh_shape = sharding.mesh_shape(num_devices, config.mesh.data, config.mesh.fsdp)
    b, accum = config.batch_size, config.optimizer.grad_accum_steps
    _check(b > 0, f"config.batch_size={b} must be positive.")
    _check(accum >= 1, f"config.optimizer.grad_accum_steps={accum} must be >= 1.")
    _check(b % process_count == 0,
           f"config.batch_size={b} is not divisible by the {process_count} processes: each "
           f"process loads batch_size / processes examples. Use a multiple of {process_count}.")
    _check(b % accum == 0,
           f"config.batch_size={b} is not divisible by grad_accum_steps={accum}.")
    micro = b // accum
    _check(micro % num_devices == 0,
           f"The (micro-)batch of {micro} examples (batch_size={b} / grad_accum_steps={accum}) is "
           f"not divisible by the {num_devices} devices ({num_devices // process_count} per "
           f"process x {process_count} processes): per host {b // process_count}, per device "
           f"{micro / num_devices:.2f}. Use a batch_size that is a multiple of "
           f"{num_devices * accum}.")
    _check(config.num_train_steps > 0, f"config.num_train_steps={config.num_train_steps} must be > 0.")

    m = config.model
    _check("name" in m, "config.model is empty: set it from models.presets.get_preset(...).")
    _check(m.image_size > 0, f"config.model.image_size={m.image_size} must be positive.")
    if config.schedule.name in ("cosine_shifted", "cosine_interpolated"):
        _check(config.schedule.image_d == m.image_size,
               f"config.schedule.image_d={config.schedule.image_d} differs from "
               f"config.model.image_size={m.image_size}; the SNR shift must use the trained "
               f"resolution. Set --config.schedule.image_d={m.image_size}.")
    _check(config.loss.prediction in PREDICTIONS,
           f"config.loss.prediction={config.loss.prediction!r}; use one of {PREDICTIONS}.")
    ms = config.loss.get("multiscale_min_res", 0)
    if ms:
        _check(ms & (ms - 1) == 0 and ms <= m.image_size,
               f"config.loss.multiscale_min_res={ms} must be a power of two <= image size "
               f"{m.image_size} (or 0 to disable the multiscale loss).")
    _check(0.0 <= config.cond_drop_prob < 1.0,
           f"config.cond_drop_prob={config.cond_drop_prob} must be in [0, 1).")
    for d in config.ema_decays:
        _check(0.0 < d < 1.0, f"config.ema_decays has {d}; each decay must be in (0, 1).")
    _check(len(config.ema_decays) >= 1, "config.ema_decays needs at least one decay.")
    _check(config.optimizer.learning_rate > 0,
           f"config.optimizer.learning_rate={config.optimizer.learning_rate} must be > 0.")
    s = config.sample
    _check(s.sampler in SAMPLERS, f"config.sample.sampler={s.sampler!r}; use one of {SAMPLERS}.")
    if s.every_steps:
        _check(s.num_images % num_devices == 0,
               f"config.sample.num_images={s.num_images} must be a multiple of the {num_devices} "
               "devices (samples are generated sharded over all devices).")
        _check(s.num_steps >= 1, f"config.sample.num_steps={s.num_steps} must be >= 1.")
    e = config.eval
    if e.every_steps:
        _check(e.sampler in SAMPLERS, f"config.eval.sampler={e.sampler!r}; use one of {SAMPLERS}.")
        _check(e.feature in ("effnet_lite0", "inception_v3"),
               f"config.eval.feature={e.feature!r}; use 'effnet_lite0' or 'inception_v3'.")
        _check(e.feature != "inception_v3" or bool(e.inception_weights),
               "config.eval.feature='inception_v3' needs --config.eval.inception_weights=PATH "
               "(the converted pt_inception-2015-12-05 weights, docs/evaluation.md).")
        _check(e.num_samples >= 2 and e.num_reference >= 2,
               "config.eval.num_samples and num_reference must be >= 2.")
    _check(config.log_every_steps > 0, "config.log_every_steps must be > 0.")
    _check(config.checkpoint_every_steps > 0, "config.checkpoint_every_steps must be > 0.")
    _check(config.keep_checkpoints >= 1, "config.keep_checkpoints must be >= 1.")
    _check(config.data.source in ("tfds", "folder"),
           f"config.data.source={config.data.source!r}; use 'tfds' or 'folder'.")
    if config.data.source == "folder":
        _check(bool(config.data.folder), "config.data.source='folder' needs --config.data.folder=PATH.")
    return mesh_shape
