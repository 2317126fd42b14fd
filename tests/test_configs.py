"""Every file in configs/ builds, validates, trains one step and samples one step.

ImageNet-scale models are shrunk to a tiny width (same family, stem, number of
levels, residual/scan/remat switches, dtype, mesh and method) and fed a
synthetic batch, so each recipe's code path runs on 8 simulated CPU devices.
"""

import importlib.util
import math
import pathlib

import jax
import numpy as np
import pytest

from simple_diffusion import config_validation
from simple_diffusion import losses
from simple_diffusion import models
from simple_diffusion import optimizer as optimizer_lib
from simple_diffusion import samplers
from simple_diffusion import sampling
from simple_diffusion import schedules
from simple_diffusion import sharding
from simple_diffusion import train_step as train_step_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted(p.stem for p in (REPO / "configs").glob("*.py"))
# Config files that take an argument (`--config=configs/<file>.py:<arg>`).
ARGS = {"ddpm_unet_demo": ("linear", "cosine", "sigmoid"),
        "ddpm_unet_imagenet64": ("linear", "cosine", "sigmoid")}
# One train + sample run per file (its first argument); every argument is validated.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Distillation configs run the distillation loop, not the train step: their runs are
# tested in test_distillation.py; here they are validated.
DISTILL = [name for name in CONFIG_FILES if name.startswith("distill_")]
# GAN configs train through gan_train (no denoiser): validated here, their shrunk
# copies train, resume and sample in test_gan.py.
GAN = [name for name in CONFIG_FILES if name.startswith("dcgan_")]
# Autoencoder / VAE configs run autoencoder_train, not the diffusion step: validated here,
# trained (shrunk) in test_autoencoder.py. Latent-diffusion configs run here as diffusion
# on latents (their decoding is tested in test_autoencoder.py).
AUTOENCODER = [name for name in CONFIG_FILES if name.startswith(("autoencoder_", "vae_"))]
CASES = [(name, ARGS.get(name, (None,))[0]) for name in CONFIG_FILES
         if name not in DISTILL + GAN + AUTOENCODER]


def _load(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _shrink(config):
    """The same recipe at a tiny width (in place)."""
    m = config.model
    if m.name == "uvit":
        levels = len(m.channels)
        m.channels, m.num_res_blocks = (8,) * levels, (1,) * levels
        m.transformer_width, m.transformer_depth, m.num_heads = 16, 2, 2
        m.emb_dim, m.mlp_ratio = 16, 2.0
        stem = m.patch_size if m.stem == "patch" else 2 ** m.dwt_levels
        m.image_size = stem * 2 ** levels * 2  # A 2x2 transformer.
    else:
        m.base_channels, m.num_res_blocks, m.emb_dim = 8, 1, 16
        m.image_size = 32
    config.schedule.image_d = m.image_size
    config.batch_size = 8
    # FSDP over 8 devices is tested in test_train; here it multiplies compile time ~2x.
    config.mesh.data, config.mesh.fsdp = -1, 1
    m.dtype = "float32"  # XLA:CPU compiles bf16 programs slowly; bf16 is tested in test_models.
    for section in (config.sample, config.eval):
        section.num_steps = 2
    config.sample.num_images = 8
    return config


def test_every_config_file_is_covered():
    assert {"fashion_mnist_demo", "sid2_demo", "edm_demo", "ddpm_unet_demo", "tiny",
            "edm_imagenet64", "ddpm_unet_imagenet64"} <= set(CONFIG_FILES)
    assert {f"{p}imagenet{r}" for p in ("", "sid2_") for r in (64, 128, 256, 512)} <= set(
        CONFIG_FILES)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_config_arguments_validate(name, arg):
    config = _load(name, arg)
    config_validation.validate_config(config, num_devices=8, process_count=1)
    assert config.schedule.name == f"ddpm_{arg}"
    with pytest.raises(ValueError, match="beta schedule"):
        _load(name, "quadratic")


@pytest.mark.parametrize("name", DISTILL)
def test_distillation_configs_validate(name):
    config = _load(name)
    config_validation.validate_config(config, num_devices=8, process_count=1)
    assert config.distill


@pytest.mark.parametrize("name", GAN)
def test_gan_configs_validate(name):
    config = _load(name)
    config_validation.validate_config(config, num_devices=8, process_count=1)
    assert config.gan and config.model.name == "dcgan"


@pytest.mark.parametrize("name", AUTOENCODER)
def test_autoencoder_configs_validate(name):
    config = _load(name)
    config_validation.validate_autoencoder_config(config, num_devices=8, process_count=1)
    assert config.autoencoder and config.model.name == "kl_autoencoder"


@pytest.mark.parametrize("name,arg", CASES)
def test_config_validates_trains_and_samples(name, arg):
    config = _load(name, arg)
    # The file as shipped validates on 8 devices.
    config_validation.validate_config(config, num_devices=8, process_count=1)
    config = _shrink(config)
    mesh_shape = config_validation.validate_config(config, num_devices=8, process_count=1)
    mesh = sharding.create_mesh(*mesh_shape)
    model = models.create_model(config.model)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
    _, state_sh = train_step_lib.state_shardings(model, tx, config, mesh)
    state = train_step_lib.create_sharded_state(model, tx, config, state_sh)
    step = train_step_lib.jit_train_step(model, tx, config, mesh, state_sh)
    rs = np.random.RandomState(0)
    size, ch = config.model.image_size, config.model.in_channels
    batch = jax.device_put({
        "image": rs.uniform(-1, 1, (8, size, size, ch)).astype(np.float32),
        "label": rs.randint(0, max(config.model.num_classes, 1), (8,)).astype(np.int32),
    }, sharding.batch_sharding(mesh))
    # This test asks "does the recipe run", not "how fast": XLA:CPU's unoptimised
    # backend halves the compile time (the U-Net's train step: 24 s -> 16 s).
    step = step.lower(state, batch).compile(compiler_options=_FAST_COMPILE)
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    assert int(state["step"]) == 1
    options = samplers.SamplerOptions.from_config(config.sample)
    sample_fn = sampling.make_sample_fn(model, config, mesh, options)
    labels = sampling.replicate_labels(
        sampling.default_labels(8, config.model.num_classes), mesh)
    args = (state["ema"][0], jax.random.key(0), labels)
    sample_fn = sample_fn.lower(*args).compile(compiler_options=_FAST_COMPILE)
    images = np.asarray(sample_fn(*args))
    assert images.shape == (8, size, size, ch) and np.isfinite(images).all()


def test_switching_families_on_the_command_line_needs_no_new_keys(tiny_config):
    config = tiny_config
    config.schedule.name = "ddpm_linear"  # Keys of cosine_shifted are still there.
    config.loss.weighting = "sigmoid"
    config.loss.sigmoid_bias = -3.0
    config.sample.sampler = "heun"
    config.sample.guidance_logsnr_min = -2.0
    config_validation.validate_config(config, num_devices=8, process_count=1)
    name, kwargs = schedules.kwargs_from_config(config.schedule)
    assert name == "ddpm_linear" and "noise_d" not in kwargs and kwargs["num_timesteps"] == 1000
    for name in schedules.NAMES:
        config.schedule.name = name
        config_validation.validate_config(config, num_devices=8, process_count=1)


def test_sigmoid_bias_shifts_with_resolution():
    config = _load("sid2_imagenet512")
    kw = losses.kwargs_from_config(config.loss, image_size=512, num_timesteps=None)
    # b = -3 at reference 64 moves with the schedule's shift 2 log(64/512) = -4.159.
    np.testing.assert_allclose(kw["sigmoid_bias"], -3.0 - 4.158883, atol=1e-5)
    kw = losses.kwargs_from_config(_load("sid2_imagenet64").loss, image_size=64,
                                   num_timesteps=None)
    assert kw["sigmoid_bias"] == -3.0
    # The guidance band is Kynkaanniemi et al.'s sigma in (0.28, 2.9] as logSNR.
    s = _load("sid2_imagenet256").sample
    np.testing.assert_allclose([s.guidance_logsnr_min, s.guidance_logsnr_max],
                               [-2 * math.log(2.9), -2 * math.log(0.28)])


@pytest.mark.parametrize("field,value,match", [
    ("schedule.name", "linear", "schedule.name"),
    ("schedule.logsnr_min", 20.0, "schedule"),
    ("schedule.beta_end", 2.0, "schedule"),
    ("loss.weighting", "lpips", "loss.weighting"),
    ("loss.noise_sampling", "sobol", "noise_sampling"),
    ("loss.noise_sampling", "discrete", "ddpm_"),
    ("optimizer.warmup_steps", -5, "warmup_steps"),
    ("optimizer.b2", 1.5, "b2"),
    ("data.prefetch", -1, "prefetch"),
    ("sample.eta", -5.0, "eta"),
    ("sample.guidance_scale", float("nan"), "guidance_scale"),
    ("sample.spacing", "trailing", "spacing"),
    ("sample.sigma_max", -1.0, "sigma_max"),
])
def test_bad_values_are_refused_before_any_work(tiny_config, field, value, match):
    section, key = field.split(".")
    if field == "schedule.beta_end":
        tiny_config.schedule.name = "ddpm_linear"
    tiny_config[section][key] = value
    with pytest.raises(config_validation.ConfigError, match=match):
        config_validation.validate_config(tiny_config, num_devices=8, process_count=1)


@pytest.mark.parametrize("name,section,typo,meant", [
    ("imagenet64", None, "num_train_step", "num_train_steps"),
    ("imagenet64", "optimizer", "learning_rte", "learning_rate"),
    ("sid2_demo", "sample", "guidance_scal", "guidance_scale"),
    ("dcgan_fashion_mnist", "gan", "r1_gama", "r1_gamma"),
    ("latent_fashion_mnist", "latent", "scale_factr", "scale_factor"),
    ("distill_demo", "distill", "final_num_step", "final_num_steps"),
    ("autoencoder_fashion_mnist", "autoencoder", "kl_wieght", "kl_weight"),
])
def test_a_misspelt_field_in_a_config_file_is_refused(name, section, typo, meant):
    """Config files can add keys the command line could not; a misspelt one would be read
    by nothing, so validation names it and the field that was probably meant."""
    config = _load(name)
    config.unlock()
    (config[section] if section else config)[typo] = 1
    validate = (config_validation.validate_autoencoder_config if name in AUTOENCODER
                else config_validation.validate_config)
    where = f"config.{section}.{typo}" if section else f"config.{typo}"
    with pytest.raises(config_validation.ConfigError, match=rf"{where} is not a field.*{meant!r}"):
        validate(config, num_devices=8, process_count=1)


@pytest.mark.parametrize("name,typo,meant", [
    ("imagenet64", "num_head", "num_heads"),
    ("ddpm_unet_demo", "num_res_block", "num_res_blocks"),
    ("dcgan_fashion_mnist", "latent_dims", "latent_dim"),
    ("autoencoder_fashion_mnist", "latent_channel", "latent_channels"),
])
def test_a_misspelt_model_field_is_refused_by_the_builder(name, typo, meant):
    from simple_diffusion.models import autoencoder as ae_models  # pylint: disable=g-import-not-at-top
    from simple_diffusion.models import dcgan  # pylint: disable=g-import-not-at-top
    config = _load(name, ARGS.get(name, (None,))[0])
    config.unlock()
    config.model[typo] = 3
    build = {"uvit": models.create_model, "unet": models.create_model,
             "dcgan": dcgan.create_generator,
             "kl_autoencoder": ae_models.from_config}[config.model.name]
    with pytest.raises(config_validation.ConfigError,
                       match=rf"config.model.{typo} is not a field.*{meant!r}"):
        build(config.model)
