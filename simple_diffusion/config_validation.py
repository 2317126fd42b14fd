"""Checks a run's config before any work starts, with messages that say the fix."""

import difflib
import importlib
import math

import ml_collections

from simple_diffusion import config_defaults
from simple_diffusion import losses
from simple_diffusion import parametrization
from simple_diffusion import samplers
from simple_diffusion import schedules
from simple_diffusion import sharding


class ConfigError(ValueError):
    """A config value is wrong; the message says which and how to fix it."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def suggest(name: str, choices) -> str:
    """' Did you mean X?' for the closest of `choices` to a misspelt `name`, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_declared_fields(config: ml_collections.ConfigDict,
                          declared: ml_collections.ConfigDict, where: str = "config") -> None:
    """Raises ConfigError for a field of `config` that `declared` does not have.

    A config file is Python and can add any key, so a misspelt field
    (``c.optimizer.learning_rte = 3e-4``) would be read by nothing and the run would
    silently use the default; the command line already refuses unknown keys (configs
    are locked). Sections are compared recursively; ``config.model`` is left to its
    builder (``models.create_model`` and the GAN / autoencoder builders check theirs).
    """
    for key in config.keys():
        path = f"{where}.{key}"
        _check(key in declared,
               f"{path} is not a field of this config, so nothing would read it."
               f"{suggest(key, declared.keys())} The fields and their defaults are declared in "
               "simple_diffusion/config_defaults.py and in the default_section() of the "
               "config.gan / latent / distill / autoencoder sections.")
        if path == "config.model":
            continue
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(
                declared[key], ml_collections.ConfigDict):
            check_declared_fields(config[key], declared[key], path)


# Optional sections of a diffusion run's config: section -> (module, function declaring it).
_OPTIONAL_SECTIONS = {"gan": ("gan_train", "default_section"),
                      "latent": ("latent", "default_section"),
                      "distill": ("distill", "default_section"),
                      "distillation": ("distill", "round_section")}  # A distilled round's run.


def _declared_run_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The fields a diffusion / GAN / latent / distillation run may have."""
    declared = config_defaults.base_config()
    for section, (module, function) in _OPTIONAL_SECTIONS.items():
        if section in config:
            declared[section] = getattr(
                importlib.import_module(f"simple_diffusion.{module}"), function)()
    return declared


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
    check_declared_fields(config, _declared_run_fields(config))
    mesh_shape = _validate_batch(config, num_devices, process_count)

    m = config.model
    _check("name" in m, "config.model is empty: set it from models.presets.get_preset(...).")
    _check(m.image_size > 0, f"config.model.image_size={m.image_size} must be positive.")
    if "gan" in config:  # configs/dcgan_*.py (gan_train.py).
        validate_gan(config)
    _validate_schedule(config.schedule, m.image_size)
    _validate_loss(config.loss, config.schedule, m.image_size)
    _check(0.0 <= config.cond_drop_prob < 1.0,
           f"config.cond_drop_prob={config.cond_drop_prob} must be in [0, 1).")
    _check(len(config.ema_decays) >= 1, "config.ema_decays needs at least one decay.")
    for d in config.ema_decays:
        _check(0.0 < d < 1.0, f"config.ema_decays has {d}; each decay must be in (0, 1).")
    _validate_optimizer(config.optimizer)
    s = config.sample
    if s.every_steps:
        validate_sampler(s, "config.sample", config.schedule)
        _check(s.num_images % num_devices == 0,
               f"config.sample.num_images={s.num_images} must be a multiple of the {num_devices} "
               "devices (samples are generated sharded over all devices).")
    e = config.eval
    if e.every_steps:
        validate_sampler(e, "config.eval", config.schedule)
        _validate_scoring(config)
    _validate_run_fields(config)
    if "latent" in config:
        _validate_latent(config)
    return mesh_shape


def _validate_batch(config: ml_collections.ConfigDict, num_devices: int,
                    process_count: int) -> tuple[int, int]:
    """Batch, accumulation and step count for this device layout; the mesh shape."""
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

    return mesh_shape


def _validate_scoring(config: ml_collections.ConfigDict) -> None:
    """``config.eval``'s feature network, sample counts and classifier (any generator)."""
    e = config.eval
    _check(e.feature in ("effnet_lite0", "inception_v3"),
           f"config.eval.feature={e.feature!r}; use 'effnet_lite0' or 'inception_v3'.")
    _check(e.feature != "inception_v3" or bool(e.inception_weights),
           "config.eval.feature='inception_v3' needs --config.eval.inception_weights=PATH "
           "(the converted pt_inception-2015-12-05 weights, docs/evaluation.md).")
    _check(e.num_samples >= 2 and e.num_reference >= 2,
           "config.eval.num_samples and num_reference must be >= 2.")
    if e.get("classifier"):
        from simple_diffusion.evaluation import classifier  # pylint: disable=g-import-not-at-top
        try:
            classifier.check_compatible(e.classifier, config)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _validate_run_fields(config: ml_collections.ConfigDict) -> None:
    """Data, logging and checkpoint fields every trainer reads."""
    _check(config.data.prefetch >= 0,
           f"config.data.prefetch={config.data.prefetch} must be >= 0 (0 = no prefetching).")
    _check(config.data.get("worker_processes", 0) >= 0,
           f"config.data.worker_processes={config.data.get('worker_processes')} must be >= 0 "
           "(0 = decode in the trainer's process).")
    _check(config.log_every_steps > 0, "config.log_every_steps must be > 0.")
    _check(config.checkpoint_every_steps > 0, "config.checkpoint_every_steps must be > 0.")
    _check(config.keep_checkpoints >= 1, "config.keep_checkpoints must be >= 1.")
    _check(config.data.source in ("tfds", "folder"),
           f"config.data.source={config.data.source!r}; use 'tfds' or 'folder'.")
    if config.data.source == "folder":
        _check(bool(config.data.folder), "config.data.source='folder' needs --config.data.folder=PATH.")
    _check(config.data.on_bad_image in ("fail", "skip"),
           f"config.data.on_bad_image={config.data.on_bad_image!r}; use 'fail' (stop at an "
           "unreadable image, naming it) or 'skip' (use the next readable image instead).")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _validate_schedule(schedule: ml_collections.ConfigDict, image_size: int) -> None:
    """The named schedule builds, its fields are valid and its logSNR decreases in t."""
    _check(schedule.name in schedules.NAMES,
           f"config.schedule.name={schedule.name!r}; use one of {schedules.NAMES}.")
    if schedule.name in ("cosine_shifted", "cosine_interpolated"):
        _check(schedule.image_d == image_size,
               f"config.schedule.image_d={schedule.image_d} differs from "
               f"config.model.image_size={image_size}; the SNR shift must use the trained "
               f"resolution. Set --config.schedule.image_d={image_size}.")
    try:
        logsnr_fn = schedules.from_config(schedule)
        lo, hi = schedules.logsnr_range(logsnr_fn)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(f"config.schedule (name={schedule.name!r}) is invalid: {e}") from None
    _check(math.isfinite(lo) and math.isfinite(hi) and hi > lo,
           f"config.schedule (name={schedule.name!r}) gives logSNR {hi} at t=0 and {lo} at t=1; "
           "it must be finite and decrease from t=0 (data) to t=1 (noise). Check its fields.")


def _validate_loss(loss: ml_collections.ConfigDict, schedule: ml_collections.ConfigDict,
                   image_size: int) -> None:
    """Every loss field is valid for its family, before anything is traced."""
    _check(loss.prediction in parametrization.PREDICTIONS,
           f"config.loss.prediction={loss.prediction!r}; use one of "
           f"{parametrization.PREDICTIONS}.")
    _check(loss.weighting in losses.WEIGHTINGS,
           f"config.loss.weighting={loss.weighting!r}; use one of {losses.WEIGHTINGS}.")
    _check(loss.noise_sampling in losses.NOISE_SAMPLINGS,
           f"config.loss.noise_sampling={loss.noise_sampling!r}; use one of "
           f"{losses.NOISE_SAMPLINGS}.")
    if loss.noise_sampling == "discrete":
        _check(schedules.num_timesteps_from_config(schedule) is not None,
               "config.loss.noise_sampling='discrete' draws DDPM timesteps k/T: it needs a "
               f"ddpm_* schedule, not config.schedule.name={schedule.name!r}.")
    if loss.noise_sampling == "edm_lognormal":
        _check(_finite(loss.p_mean) and _finite(loss.p_std) and loss.p_std > 0,
               f"config.loss.p_mean={loss.p_mean}, p_std={loss.p_std}: need finite values "
               "and p_std > 0.")
    if loss.weighting == "sigmoid":
        _check(_finite(loss.sigmoid_bias),
               f"config.loss.sigmoid_bias={loss.sigmoid_bias} must be finite.")
        _check(loss.sigmoid_bias_ref_d >= 0,
               f"config.loss.sigmoid_bias_ref_d={loss.sigmoid_bias_ref_d} must be >= 0 (0: the "
               "bias is used as given; r > 0: given at resolution r, shifted by 2 log(r / d)).")
    if loss.weighting == "min_snr":
        _check(_finite(loss.min_snr_gamma) and loss.min_snr_gamma > 0,
               f"config.loss.min_snr_gamma={loss.min_snr_gamma} must be > 0.")
    if "edm" in (loss.prediction, loss.weighting):
        _check(_finite(loss.sigma_data) and loss.sigma_data > 0,
               f"config.loss.sigma_data={loss.sigma_data} must be > 0.")
    ms = loss.multiscale_min_res
    if ms:
        _check(ms > 0 and ms & (ms - 1) == 0 and ms <= image_size,
               f"config.loss.multiscale_min_res={ms} must be a power of two <= image size "
               f"{image_size} (or 0 to disable the multiscale loss).")


def _validate_optimizer(o: ml_collections.ConfigDict) -> None:
    _check(_finite(o.learning_rate) and o.learning_rate > 0,
           f"config.optimizer.learning_rate={o.learning_rate} must be > 0.")
    _check(o.warmup_steps >= 0, f"config.optimizer.warmup_steps={o.warmup_steps} must be >= 0.")
    for name in ("b1", "b2"):
        value = o[name]
        _check(_finite(value) and 0.0 <= value < 1.0,
               f"config.optimizer.{name}={value} must be in [0, 1) (Adam's decay rate).")
    _check(_finite(o.eps) and o.eps > 0, f"config.optimizer.eps={o.eps} must be > 0.")
    _check(_finite(o.weight_decay) and o.weight_decay >= 0,
           f"config.optimizer.weight_decay={o.weight_decay} must be >= 0.")
    _check(_finite(o.grad_clip_norm) and o.grad_clip_norm >= 0,
           f"config.optimizer.grad_clip_norm={o.grad_clip_norm} must be >= 0 (0 = off).")
    _check(_finite(o.final_lr_fraction) and 0.0 <= o.final_lr_fraction <= 1.0,
           f"config.optimizer.final_lr_fraction={o.final_lr_fraction} must be in [0, 1].")


def validate_sampler(section: ml_collections.ConfigDict, where: str,
                     schedule: ml_collections.ConfigDict) -> samplers.SamplerOptions:
    """The validated `SamplerOptions` of ``section`` (e.g. ``config.sample``) for a
    run trained with ``schedule``; raises ConfigError naming ``<where>.<field>``."""
    try:
        options = samplers.SamplerOptions.from_config(section).validate(where)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(options.spacing == "uniform" or schedules.num_timesteps_from_config(schedule),
           f"{where}.spacing={options.spacing!r} needs a discrete ddpm_* schedule, not "
           f"config.schedule.name={schedule.name!r}.")
    return options


def validate_gan(config: ml_collections.ConfigDict) -> None:
    """``config.gan`` (gan_train.default_section) and its DCGAN ``config.model``."""
    from simple_diffusion import gan  # pylint: disable=g-import-not-at-top
    from simple_diffusion.models import dcgan  # pylint: disable=g-import-not-at-top
    g, m = config.gan, config.model
    _check(m.name == "dcgan", f"config.model.name={m.name!r}: a GAN config needs a DCGAN "
           "model (models.dcgan.default_config).")
    try:
        levels = dcgan.num_levels(m.image_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in ("g_channels", "d_channels"):
        widths = tuple(m[name])
        _check(len(widths) == levels and all(isinstance(w, int) and w > 0 for w in widths),
               f"config.model.{name}={widths}: need {levels} positive widths for image_size="
               f"{m.image_size} (one per 2x resolution change between 4x4 and it).")
    _check(m.latent_dim > 0, f"config.model.latent_dim={m.latent_dim} must be > 0.")
    _check(g.loss in gan.LOSSES, f"config.gan.loss={g.loss!r}; use one of {gan.LOSSES}.")
    for name in ("d_steps_per_g_step", "g_steps_per_d_step"):
        _check(isinstance(g[name], int) and g[name] >= 1,
               f"config.gan.{name}={g[name]} must be an integer >= 1.")
    _check(min(g.d_steps_per_g_step, g.g_steps_per_d_step) == 1,
           f"config.gan.d_steps_per_g_step={g.d_steps_per_g_step} and g_steps_per_d_step="
           f"{g.g_steps_per_d_step}: set one of them to 1 (the ratio is the other).")
    _check(_finite(g.r1_gamma) and g.r1_gamma >= 0,
           f"config.gan.r1_gamma={g.r1_gamma} must be >= 0 (0 = off).")
    _check(g.d_optimizer.grad_accum_steps == 1 and config.optimizer.grad_accum_steps == 1,
           "GAN training has no gradient accumulation: set grad_accum_steps=1.")
    try:
        _validate_optimizer(g.d_optimizer)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config.optimizer.", "config.gan.d_optimizer.")) from None


def validate_autoencoder_config(config: ml_collections.ConfigDict, *, num_devices: int,
                                process_count: int) -> tuple[int, int]:
    """An autoencoder / VAE run (``config.autoencoder``, autoencoder_train.py); returns
    the mesh shape."""
    from simple_diffusion import autoencoder as ae_lib  # pylint: disable=g-import-not-at-top
    from simple_diffusion import autoencoder_train  # pylint: disable=g-import-not-at-top
    from simple_diffusion.models import autoencoder as ae_models  # pylint: disable=g-import-not-at-top
    check_declared_fields(config, autoencoder_train.base_config())
    mesh_shape = _validate_batch(config, num_devices, process_count)
    _check(mesh_shape[1] == 1, f"config.mesh.fsdp={config.mesh.fsdp}: autoencoder runs are "
           "data-parallel (parameters replicated); set --config.mesh.fsdp=1.")
    try:
        ae_models.from_config(config.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    a = config.autoencoder
    _check(a.rec_loss in ae_lib.REC_LOSSES,
           f"config.autoencoder.rec_loss={a.rec_loss!r}; use one of {ae_lib.REC_LOSSES}.")
    for name in ("kl_weight", "perceptual_weight", "disc_weight"):
        _check(_finite(a[name]) and a[name] >= 0,
               f"config.autoencoder.{name}={a[name]} must be finite and >= 0 (0: off).")
    _check(a.disc_start >= 0, f"config.autoencoder.disc_start={a.disc_start} must be >= 0.")
    _check(a.disc_layers >= 1 and a.disc_channels >= 1,
           "config.autoencoder.disc_layers and disc_channels must be >= 1.")
    _check(a.perceptual_size >= 32, f"config.autoencoder.perceptual_size={a.perceptual_size} "
           "must be >= 32 (EfficientNet-Lite0 downsamples 32x).")
    _check(a.disc_learning_rate is None or (_finite(a.disc_learning_rate) and
                                            a.disc_learning_rate > 0),
           f"config.autoencoder.disc_learning_rate={a.disc_learning_rate} must be > 0 (or None "
           "for config.optimizer.learning_rate).")
    _check(len(config.ema_decays) >= 1, "config.ema_decays needs at least one decay.")
    for d in config.ema_decays:
        _check(0.0 < d < 1.0, f"config.ema_decays has {d}; each decay must be in (0, 1).")
    _validate_optimizer(config.optimizer)
    _check(config.sample.num_images % num_devices == 0,
           f"config.sample.num_images={config.sample.num_images} must be a multiple of the "
           f"{num_devices} devices.")
    e = config.eval
    if e.every_steps:
        _validate_scoring(config)
    _validate_run_fields(config)
    return mesh_shape


LATENT_DATA = ("cached", "on_the_fly")


def _validate_latent(config: ml_collections.ConfigDict) -> None:
    """``config.latent`` of a latent-diffusion run (latent.default_section); the
    autoencoder workdir itself is checked when the run starts
    (``check_autoencoder_workdir``)."""
    l = config.latent
    _check(bool(l.autoencoder_workdir),
           "config.latent.autoencoder_workdir is required: the workdir of a trained "
           "autoencoder, e.g. --config.latent.autoencoder_workdir=workdirs/"
           "autoencoder_fashion_mnist.")
    _check(l.data in LATENT_DATA, f"config.latent.data={l.data!r}; use one of {LATENT_DATA}.")
    _check(l.scale_factor is None or (_finite(l.scale_factor) and l.scale_factor > 0),
           f"config.latent.scale_factor={l.scale_factor} must be > 0 (or None: 1/std of the "
           "latents of the first scale_num_batches batches).")
    _check(l.scale_num_batches >= 1,
           f"config.latent.scale_num_batches={l.scale_num_batches} must be >= 1.")
    _check(l.pixel_size > 0 and l.pixel_size % config.model.image_size == 0,
           f"config.latent.pixel_size={l.pixel_size} must be a multiple of the latent size "
           f"config.model.image_size={config.model.image_size} (pixel_size / f).")
    _check(l.data != "cached" or not config.data.random_flip,
           "config.latent.data='cached' stores latents of unflipped images: set "
           "--config.data.random_flip=False or --config.latent.data=on_the_fly.")


def check_autoencoder_workdir(workdir: str) -> None:
    """ConfigError unless ``workdir`` holds a trained autoencoder run."""
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = epath.Path(workdir)
    trained = (path / "config.json").exists() and any(
        p.name.isdigit() for p in (path / "checkpoints").glob("*")) if path.exists() else False
    _check(trained, f"config.latent.autoencoder_workdir={workdir} holds no trained autoencoder "
           "(config.json and checkpoints/); train it first: python -m simple_diffusion.main "
           f"--config=configs/autoencoder_fashion_mnist.py --workdir={workdir} (or the "
           "autoencoder config of this latent config's docstring).")
