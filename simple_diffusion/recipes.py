"""The methods as configs: simple diffusion, SiD2, EDM and DDPM recipes.

Each recipe starts from ``config_defaults.base_config()`` and sets the fields
that define the method; ``configs/<name>.py`` files call one recipe (plus
``fashion_mnist`` for the 2-core-CPU demo variants) and hold the run command.

Where a number is not from the method's paper or code it is marked
"[project]": the papers leave it unstated (``../shared/notes/paper.md`` §8).

| recipe | schedule | network / loss | sampler |
| --- | --- | --- | --- |
| simple diffusion | cosine shifted to reference 64 | U-ViT, v-pred, eps-MSE, multiscale >= 256 | DDPM ancestral |
| SiD2 | cosine shifted to reference 64 [project] | residual U-ViT, v-pred, sigmoid weighting | DDPM + guidance interval |
| EDM | Karras sigma in [0.002, 80] | EDM preconditioning, log-normal sigma, EDM weight | Heun (churn) |
| DDPM | discrete linear / cosine / sigmoid betas, T = 1000 | U-Net, eps-pred, eps-MSE | ancestral, all 1000 steps |
"""

import math

import ml_collections

from simple_diffusion import config_defaults
from simple_diffusion.models import presets

# Kynkaanniemi et al. 2024 apply guidance for EDM2 on sigma in (0.28, 2.9]; as
# logSNR = -2 ln sigma that is [-2.13, 2.55]. SiD2's own band is unpublished, so
# the SiD2 recipes use this one [project].
GUIDANCE_INTERVAL_LOGSNR = (-2.0 * math.log(2.9), -2.0 * math.log(0.28))


def _imagenet(c: ml_collections.ConfigDict, resolution: int) -> None:
    """Data, budget and logging shared by every ImageNet recipe."""
    c.data.name = "imagenet2012"
    c.data.split = "train"
    c.data.random_flip = True
    c.schedule.image_d = resolution
    c.batch_size = 2048
    c.num_train_steps = 500_000
    c.sample.every_steps = 10_000
    c.sample.num_images = 64
    c.eval.reference_split = "validation"
    c.eval.num_samples = 10_000
    c.eval.num_reference = 10_000
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5_000
    c.keep_every_steps = 50_000


def simple_diffusion_imagenet(resolution: int) -> ml_collections.ConfigDict:
    """Simple diffusion (Hoogeboom et al. 2023) on class-conditional ImageNet.

    Shifted cosine schedule with reference resolution 64 (logSNR + 2 log(64/d),
    §3.1), v-prediction trained with the unweighted eps-MSE (appendix
    pseudocode), the multiscale loss from 32x32 up at resolutions >= 256 (it
    helps there and slightly hurts at low resolution, Table 6), the U-ViT preset
    ``imagenet<resolution>`` (~2B parameters at 256/512), guidance 4 for the
    sample grids (Fig. 2), batch 2048 x 500K steps (the 256 model, via citing
    papers), 512-step ancestral sampling for evaluation. [project]: learning
    rate 1e-4 with 10K warm-up, EMA 0.9999, label dropout 0.1, the preset's
    per-level widths, bf16 compute, FSDP over 8 devices at 256/512.
    """
    c = config_defaults.base_config()
    _imagenet(c, resolution)
    c.model = presets.get_preset(f"imagenet{resolution}")
    c.model.dtype = "bfloat16"  # bf16 compute, float32 params and statistics.
    c.schedule.name = "cosine_shifted"
    c.schedule.noise_d = 64
    c.loss.multiscale_min_res = 32 if resolution >= 256 else 0
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 10_000
    c.ema_decays = (0.9999,)
    c.mesh.fsdp = 8 if resolution >= 256 else 1
    c.sample.num_steps = 256
    c.sample.guidance_scale = 4.0
    c.eval.num_steps = 512
    return c


def sid2_imagenet(resolution: int) -> ml_collections.ConfigDict:
    """SiD2 (Hoogeboom et al. 2024) on class-conditional ImageNet.

    From the paper: the sigmoid loss weighting w = sigmoid(b - logsnr) on a
    v-prediction network with the bias shifted with resolution, the residual
    U-ViT (one skip per resolution change), "flop-heavy" patching (patch 2 at
    512), guidance limited to an interval. [project]: b = -3 at reference 64
    (so b + 2 log(64/d) at d), the cosine schedule shifted to 64, patch 2 at
    every resolution >= 128 with one more conv level where needed to reach a
    16x16 transformer, the widths of the simple-diffusion presets, no multiscale
    loss, the guidance band ``GUIDANCE_INTERVAL_LOGSNR`` and w = 1.
    """
    c = simple_diffusion_imagenet(resolution)
    m = c.model
    m.residual = True
    if resolution >= 128:
        m.stem, m.patch_size = "patch", 2
        levels = int(math.log2(resolution // 2 // 16))
        base = tuple(m.channels)
        m.channels = (base[0] // 2,) * (levels - len(base)) + base
        m.num_res_blocks = (2,) * levels
    c.loss.weighting = "sigmoid"
    c.loss.sigmoid_bias = -3.0
    c.loss.sigmoid_bias_ref_d = 64
    c.loss.multiscale_min_res = 0
    for section in (c.sample, c.eval):
        section.guidance_scale = 1.0
        section.guidance_logsnr_min, section.guidance_logsnr_max = GUIDANCE_INTERVAL_LOGSNR
    return c


def edm_imagenet64() -> ml_collections.ConfigDict:
    """EDM (Karras et al. 2022), its ImageNet-64 setup.

    Preconditioning with sigma_data = 0.5, training noise ln sigma ~ N(-1.2,
    1.2^2), the EDM loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    the ADM-style U-Net (preset ``unet_imagenet64``), Adam (0.9, 0.999) at lr
    2e-4, batch 4096, dropout 0.1, no label dropout (EDM has no guidance), EMA
    half-life 50 Mimg (decay 0.5^(4096 / 50e6) = 0.99994 per step), lr ramp-up
    over 10 Mimg (2441 steps), 2500 Mimg (610K steps). Sampling: Heun on the
    Karras grid sigma in [0.002, 80], rho = 7, 256 steps with S_churn = 40,
    S_min = 0.05, S_max = 50, S_noise = 1.003 (EDM's ImageNet-64 settings).
    [project]: bf16 instead of fp16, gradient clipping off as in EDM.
    """
    c = config_defaults.base_config()
    _imagenet(c, 64)
    c.model = presets.get_preset("unet_imagenet64")
    c.model.dtype = "bfloat16"
    c.schedule.name = "edm"
    c.loss.prediction = "edm"
    c.loss.weighting = "edm"
    c.loss.noise_sampling = "edm_lognormal"
    c.cond_drop_prob = 0.0
    c.batch_size = 4096
    c.num_train_steps = 610_000
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 2441
    c.optimizer.b2 = 0.999
    c.optimizer.grad_clip_norm = 0.0
    c.ema_decays = (0.5 ** (4096 / 50e6),)
    for section in (c.sample, c.eval):
        section.sampler = "heun"
        section.num_steps = 256
        section.s_churn, section.s_tmin, section.s_tmax, section.s_noise = 40.0, 0.05, 50.0, 1.003
    return c


BETA_SCHEDULES = ("linear", "cosine", "sigmoid")


def ddpm_unet(beta_schedule: str = "linear", preset: str = "unet_imagenet64"
              ) -> ml_collections.ConfigDict:
    """DDPM (Ho et al. 2020) as in the seeds: U-Net with attention at 16x16,
    eps-prediction trained with the eps-MSE on discrete timesteps k ~ U{1..T},
    T = 1000 betas ('linear': 1e-4 .. 0.02; 'cosine': improved DDPM, s = 0.008;
    'sigmoid': sigmoid(linspace(-6, 6)) rescaled to [1e-4, 0.02]), Adam 2e-4,
    dropout 0.1, EMA 0.999 (the seeds' choice), grad clip 1, 5000 warm-up steps,
    ancestral sampling over the full 1000-step chain with x clipped to [-1, 1].
    [project]: class conditioning with label dropout 0.1, batch 2048 on ImageNet.
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta schedule {beta_schedule!r}; use one of {BETA_SCHEDULES} "
                         "(e.g. --config=configs/ddpm_unet_imagenet64.py:cosine).")
    c = config_defaults.base_config()
    _imagenet(c, 64)
    c.model = presets.get_preset(preset)
    c.schedule.name = f"ddpm_{beta_schedule}"
    c.schedule.num_timesteps = 1000
    c.loss.prediction = "eps"
    c.loss.weighting = "eps_mse"
    c.loss.noise_sampling = "discrete"
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 5000
    c.ema_decays = (0.999,)
    for section in (c.sample, c.eval):
        section.sampler = "ddpm"
        section.num_steps = 1000
    return c


def fashion_mnist(c: ml_collections.ConfigDict, model_preset: str, *,
                  num_train_steps: int = 1200) -> ml_collections.ConfigDict:
    """The 2-core-CPU variant of a recipe: Fashion-MNIST at 32x32, offline.

    Keeps the recipe's method (schedule family, loss, sampler) and swaps data,
    network and budget: model preset ``model_preset`` at 32x32x1 with 10
    classes, batch 64, AdamW 1e-3 with 100 warm-up steps and cosine decay to
    0.1x, EMA 0.999, float32, one device group, sample grids every 400 steps
    and evaluation against 2000 test images, with the classification accuracy of
    the samples (``evaluation/classifier.py``). [project] throughout.
    """
    c.model = presets.get_preset(model_preset)
    c.model.image_size = 32
    c.model.in_channels = 1
    c.model.num_classes = 10
    c.data.name = "fashion_mnist_local"
    c.data.split = "train"
    c.data.random_flip = False
    c.schedule.image_d = 32
    c.batch_size = 64
    c.num_train_steps = num_train_steps
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.final_lr_fraction = 0.1
    c.ema_decays = (0.999,)
    c.mesh.fsdp = 1
    c.sample.every_steps = 400
    c.sample.num_images = 64
    c.eval.reference_split = "test"
    c.eval.num_samples = 1000
    c.eval.num_reference = 2000
    c.eval.classifier = "fashion_mnist"
    c.log_every_steps = 50
    c.checkpoint_every_steps = 400
    c.keep_every_steps = 0
    return c
