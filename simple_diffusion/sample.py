r"""Draws samples from a run's checkpoint (EMA weights) with any sampler.

  python -m simple_diffusion.sample --workdir=workdirs/demo --num_samples=64 \
      [--sampler=ddpm --steps=256] [--step=N] [--guidance=1.0] [--labels=0,1,2] [--seed=0]

Every sampler option of the library is a flag (simple_diffusion/sampler_flags.py:
--guidance_logsnr_min/max for a guidance interval, --clip_x, --eta, --s_churn,
--sigma_min/max, --spacing, ...); unset flags take the run's ``config.sample``,
i.e. the sampler of its recipe. Writes to
<workdir>/samples_cli/step_<N>_<sampler>_<steps>_g<guidance>_s<seed>/ (or
--output_dir): one PNG per image, grid.png, and samples.npz with uint8 ``images``
[K, H, W, C] and int32 ``labels`` [K]. Generation is sharded over all devices
(and hosts); the same seed gives the same images.
"""

from simple_diffusion import cli_start

if __name__ == "__main__":
    # Before the imports below: it may restart the process (execve), which would
    # otherwise redo them (~2 s of jax, flax and TensorFlow imports per command).
    cli_start.prepare_process()

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax

from simple_diffusion import checkpointing
from simple_diffusion import config_validation
from simple_diffusion import distributed
from simple_diffusion import models
from simple_diffusion import sampler_flags
from simple_diffusion import sampling
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import train_step as train_step_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with config.json and checkpoints.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Number of images.")
_LABELS = flags.DEFINE_string(
    "labels", None, "Comma-separated class ids, cycled over the samples (default: all classes).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Images per sampler call (0: num_samples, "
                              "rounded up to the device count).")
_EMA_INDEX = flags.DEFINE_integer("ema_index", 0, "EMA copy (config.ema_decays order); -1 = raw.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where to write (default under the workdir).")
flags.mark_flags_as_required(["workdir"])


def run() -> str:
    """Samples as the flags say; returns the output directory."""
    config = sampling.load_run_config(_WORKDIR.value)
    options = sampler_flags.options_from_flags(config, "sample")
    labels = sampling.parse_labels(_LABELS.value, config.model.num_classes)
    if _NUM_SAMPLES.value < 1:
        raise ValueError(f"--num_samples={_NUM_SAMPLES.value} must be >= 1.")
    if _BATCH.value < 0:
        raise ValueError(f"--batch_size={_BATCH.value} must be >= 0 (0: all in one call).")
    ema_index = None if _EMA_INDEX.value < 0 else _EMA_INDEX.value
    gan = "gan" in config  # A DCGAN run (gan_train.py): one generator call, no sampler.
    if gan:
        from simple_diffusion import gan_train  # pylint: disable=g-import-not-at-top
        step, params, mesh = gan_train.load_generator(_WORKDIR.value, config, _STEP.value,
                                                      ema_index)
    else:
        ckpt = checkpointing.Checkpointer(_WORKDIR.value, async_save=False)
        try:
            step = ckpt.resolve_step(_STEP.value)
            mesh = sharding_lib.create_mesh(-1, 1)
            abstract, _ = train_step_lib.sharded_abstract_params(
                models.create_model(config.model), config, mesh)
            params = ckpt.restore_params(step, abstract, ema_index=ema_index)
        finally:
            ckpt.close()
    logging.info("Sampling %d images from step %d with %s", _NUM_SAMPLES.value, step, options)
    images, used_labels = sampling.generate(
        config, params, mesh, options, num_samples=_NUM_SAMPLES.value, labels=labels,
        seed=_SEED.value, batch_size=_BATCH.value,
        progress=sampler_flags.progress_logger("sample"),
        sample_fn=gan_train.make_sample_fn(config, mesh) if gan else _latent_sample_fn(
            config, mesh, options))
    name = (f"step_{step}_{options.sampler}_{options.num_steps}_g{options.guidance_scale:g}"
            f"_s{_SEED.value}")
    if gan:
        which = "raw" if ema_index is None else f"ema{ema_index}"
        name = f"step_{step}_gan_{which}_s{_SEED.value}"
    out_dir = _OUTPUT.value or os.path.join(_WORKDIR.value, "samples_cli", name)
    if jax.process_index() == 0:
        sampling.write_outputs(out_dir, images, used_labels)
        with open(os.path.join(out_dir, "sampler.json"), "w") as f:
            record = (dict(generator="raw" if ema_index is None else f"ema{ema_index}") if gan
                      else dataclasses.asdict(options))
            json.dump(dict(step=step, seed=_SEED.value, **record), f, indent=2)
    what = (f"{options.sampler}, {options.num_steps} steps, guidance {options.guidance_scale:g}"
            if not gan else "GAN generator, one call per image")
    print(f"Wrote {len(images)} samples (step {step}, {what}) to {out_dir}")
    return out_dir


def _latent_sample_fn(config, mesh, options):
    """For a latent-diffusion run (latent.py): the sampler's latents decoded to pixels."""
    if "latent" not in config:
        return None
    from simple_diffusion import latent  # pylint: disable=g-import-not-at-top
    return latent.load(config, mesh).decoding(
        sampling.make_sample_fn(models.create_model(config.model), config, mesh, options))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    distributed.initialize()
    try:
        run()
    except (config_validation.ConfigError, ValueError, FileNotFoundError) as e:
        # Expected errors (flags, config, checkpoint): one line, no traceback.
        sys.exit(f"sample: error: {e}")


if __name__ == "__main__":
    app.run(main)
