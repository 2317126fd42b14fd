"""The full set of config fields with defaults; ``configs/*.py`` start from here.

Every field a run reads is declared here, so a typo in a ``--config.x=y``
override is an error (configs are locked), and ``config_validation`` can check
each value.
"""

import ml_collections

from simple_diffusion.models import presets


def base_config() -> ml_collections.ConfigDict:
    """Returns the default config. Config files override fields and set ``model``."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 64  # Global batch over all devices and processes.
    c.num_train_steps = 1000

    c.model = ml_collections.ConfigDict()  # From models.presets.get_preset(...).

    c.data = ml_collections.ConfigDict(dict(
        source="tfds",            # 'tfds' | 'folder'
        name="fashion_mnist_local",
        split="train",
        data_dir=ml_collections.FieldReference(None, field_type=str),
        folder=ml_collections.FieldReference(None, field_type=str),
        random_flip=False,
        prefetch=2,
    ))

    # t -> logSNR (t = 1 is noise). See simple_diffusion/schedules.py.
    c.schedule = ml_collections.ConfigDict(dict(
        name="cosine_shifted", image_d=64, noise_d=64, logsnr_min=-15.0, logsnr_max=15.0))

    # Keyword arguments of losses.diffusion_loss.
    c.loss = ml_collections.ConfigDict(dict(
        prediction="v", weighting="eps_mse", noise_sampling="stratified", multiscale_min_res=0))

    c.cond_drop_prob = 0.1  # Label dropout to the null class, for guidance.

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, warmup_steps=1000, schedule="constant", final_lr_fraction=0.0,
        b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0, grad_accum_steps=1))
    c.ema_decays = (0.9999,)

    # Device mesh: -1 fills in the remaining devices. fsdp > 1 shards params.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

    # Sample grids during training (EMA params of ema_decays[0]).
    c.sample = ml_collections.ConfigDict(dict(
        every_steps=1000, num_images=64, sampler="ddpm", num_steps=256,
        guidance_scale=0.0, clip_x=True))

    # Sample-quality evaluation (simple_diffusion/evaluate.py), EMA params of
    # ema_decays[0]. 'effnet_lite0' reports fd_effnet_lite0 / kid_effnet_lite0;
    # 'inception_v3' (needs the converted pt_inception weights) reports FID/IS.
    c.eval = ml_collections.ConfigDict(dict(
        every_steps=0, num_samples=1000, num_reference=2000, reference_split="test",
        sampler="ddpm", num_steps=128, guidance_scale=0.0, feature="effnet_lite0",
        inception_weights=ml_collections.FieldReference(None, field_type=str), seed=0,
        batch_size=256))

    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3          # Keep the last N ...
    c.keep_every_steps = 0          # ... plus every K-th step forever (0 = off).
    c.async_checkpoints = True

    # jax.profiler trace of a few steps into <workdir>/plugins/profile (-1 = off);
    # view it in TensorBoard's profile tab or Perfetto (docs/benchmarks.md).
    c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=5))
    return c


def imagenet_config(resolution: int) -> ml_collections.ConfigDict:
    """The simple diffusion recipe for class-conditional ImageNet at ``resolution``.

    Shifted cosine schedule with reference resolution 64 (logSNR + 2 log(64/d)),
    v-prediction trained with the unweighted eps-MSE, the multiscale loss from
    32x32 up at resolutions >= 256 (it helps there and slightly hurts at low
    resolution, paper Table 6), the U-ViT preset ``imagenet<resolution>``,
    label dropout for guidance, EMA 0.9999 and batch 2048 (the paper's 500K x
    2048 at 256). Learning rate and EMA decay are not in the paper (paper.md §8).
    FSDP over 8 devices for the ~2B-parameter 256/512 models.
    """
    c = base_config()
    c.model = presets.get_preset(f"imagenet{resolution}")
    c.model.dtype = "bfloat16"  # bf16 compute, float32 params and statistics.
    c.data.name = "imagenet2012"
    c.data.split = "train"
    c.data.random_flip = True
    c.schedule = ml_collections.ConfigDict(dict(
        name="cosine_shifted", image_d=resolution, noise_d=64, logsnr_min=-15.0,
        logsnr_max=15.0))
    c.loss.multiscale_min_res = 32 if resolution >= 256 else 0
    c.batch_size = 2048
    c.num_train_steps = 500_000
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 10_000
    c.ema_decays = (0.9999,)
    c.mesh.fsdp = 8 if resolution >= 256 else 1
    c.sample.every_steps = 10_000
    c.sample.num_images = 64
    c.sample.num_steps = 256
    c.sample.guidance_scale = 4.0  # The paper's figures use guidance 4.
    c.eval.reference_split = "validation"
    c.eval.num_samples = 10_000
    c.eval.num_reference = 10_000
    c.eval.num_steps = 256
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5_000
    c.keep_every_steps = 50_000
    return c
