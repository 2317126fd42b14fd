"""The full set of config fields with defaults; ``configs/*.py`` start from here.

Every field a run reads is declared here, so a typo in a ``--config.x=y``
override is an error (configs are locked), and ``config_validation`` can check
each value.
"""

import ml_collections

from simple_diffusion import losses
from simple_diffusion import samplers
from simple_diffusion import schedules


def base_config() -> ml_collections.ConfigDict:
    """Returns the default config. Config files (via ``recipes``) override fields and set ``model``.

    ``schedule``, ``loss`` and the sampler fields of ``sample`` and ``eval``
    declare the fields of every family (``schedules.CONFIG_DEFAULTS``,
    ``losses.CONFIG_DEFAULTS``, ``samplers.SamplerOptions``), so switching
    family on the command line needs no new keys; each family reads only its own.
    """
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
        # An unreadable image in a folder: 'fail' (stop, naming it) | 'skip'
        # (log it once, use the next readable image, count it); docs/data.md.
        on_bad_image="fail",
        # grain worker processes decoding images (0: grain threads in the trainer's
        # process); for large images, where one process cannot keep up. docs/data.md.
        worker_processes=0,
    ))

    # t -> logSNR (t = 1 is noise); `name` picks the family. See schedules.py.
    c.schedule = ml_collections.ConfigDict(dict(schedules.CONFIG_DEFAULTS))

    # Parametrisation, weighting and noise sampling; see losses.py.
    c.loss = ml_collections.ConfigDict(dict(losses.CONFIG_DEFAULTS))

    c.cond_drop_prob = 0.1  # Label dropout to the null class, for guidance.

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, warmup_steps=1000, schedule="constant", final_lr_fraction=0.0,
        b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0, grad_accum_steps=1))
    c.ema_decays = (0.9999,)

    # Device mesh: -1 fills in the remaining devices. fsdp > 1 shards params.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

    # Sample grids during training (EMA params of ema_decays[0]); the sampler
    # fields are samplers.SamplerOptions.
    c.sample = ml_collections.ConfigDict(dict(
        every_steps=1000, num_images=64, **samplers.config_fields()))

    # Sample-quality evaluation (simple_diffusion/evaluate.py), EMA params of
    # ema_decays[0]. 'effnet_lite0' reports fd_effnet_lite0 / kid_effnet_lite0;
    # 'inception_v3' (needs the converted pt_inception weights) reports FID/IS.
    # classifier: 'fashion_mnist' adds the classification accuracy of
    # class-conditional samples (evaluation/classifier.py); '' = off.
    c.eval = ml_collections.ConfigDict(dict(
        every_steps=0, num_samples=1000, num_reference=2000, reference_split="test",
        feature="effnet_lite0", classifier="",
        inception_weights=ml_collections.FieldReference(None, field_type=str), seed=0,
        batch_size=256, **dict(samplers.config_fields(), num_steps=128)))

    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3          # Keep the last N ...
    c.keep_every_steps = 0          # ... plus every K-th step forever (0 = off).
    c.async_checkpoints = True

    # jax.profiler trace of a few steps into <workdir>/plugins/profile (-1 = off);
    # view it in TensorBoard's profile tab or Perfetto (docs/benchmarks.md).
    c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=5))
    return c
