r"""Draws samples from a run's checkpoint (EMA weights) with any sampler.

  python -m simple_diffusion.sample --workdir=workdirs/demo --num_samples=64 \
      --sampler=ddpm --steps=256 [--step=N] [--guidance=1.0] [--labels=0,1,2] [--seed=0]

Writes to <workdir>/samples_cli/step_<N>_<sampler>_<steps>_g<guidance>_s<seed>/
(or --output_dir): one PNG per image, grid.png, and samples.npz with uint8
``images`` [K, H, W, C] and int32 ``labels`` [K]. Generation is sharded over
all devices (and hosts); the same seed gives the same images.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax

from simple_diffusion import checkpointing
from simple_diffusion import config_validation
from simple_diffusion import distributed
from simple_diffusion import models
from simple_diffusion import sampling
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import train_step as train_step_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with config.json and checkpoints.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Number of images.")
_SAMPLER = flags.DEFINE_string("sampler", "ddpm", f"One of {config_validation.SAMPLERS}.")
_STEPS = flags.DEFINE_integer("steps", 256, "Denoising steps.")
_GUIDANCE = flags.DEFINE_float("guidance", 0.0, "Guidance w: (1 + w) * cond - w * uncond.")
_LABELS = flags.DEFINE_string(
    "labels", None, "Comma-separated class ids, cycled over the samples (default: all classes).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Images per sampler call (0: num_samples, "
                              "rounded up to the device count).")
_EMA_INDEX = flags.DEFINE_integer("ema_index", 0, "EMA copy (config.ema_decays order); -1 = raw.")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta.")
_CHURN = flags.DEFINE_float("s_churn", 0.0, "EDM stochastic churn (euler/heun).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where to write (default under the workdir).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    distributed.initialize()
    config = sampling.load_run_config(_WORKDIR.value)
    labels = sampling.parse_labels(_LABELS.value, config.model.num_classes)
    if _SAMPLER.value not in config_validation.SAMPLERS:
        raise app.UsageError(
            f"--sampler={_SAMPLER.value!r}; use one of {config_validation.SAMPLERS}.")
    ckpt = checkpointing.Checkpointer(_WORKDIR.value, async_save=False)
    step = ckpt.resolve_step(_STEP.value)
    mesh = sharding_lib.create_mesh(-1, 1)
    abstract, _ = train_step_lib.sharded_abstract_params(
        models.create_model(config.model), config, mesh)
    params = ckpt.restore_params(step, abstract,
                                 ema_index=None if _EMA_INDEX.value < 0 else _EMA_INDEX.value)
    images, used_labels = sampling.generate(
        config, params, mesh, num_samples=_NUM_SAMPLES.value, sampler=_SAMPLER.value,
        steps=_STEPS.value, guidance=_GUIDANCE.value, labels=labels, seed=_SEED.value,
        batch_size=_BATCH.value, **_sampler_kwargs(_SAMPLER.value))
    out_dir = _OUTPUT.value or os.path.join(
        _WORKDIR.value, "samples_cli",
        f"step_{step}_{_SAMPLER.value}_{_STEPS.value}_g{_GUIDANCE.value:g}_s{_SEED.value}")
    if jax.process_index() == 0:
        sampling.write_outputs(out_dir, images, used_labels)
    logging.info("Wrote %d samples to %s", len(images), out_dir)
    ckpt.close()


def _sampler_kwargs(sampler: str) -> dict:
    if sampler == "ddim":
        return {"eta": _ETA.value}
    if sampler in ("euler", "heun"):
        return {"s_churn": _CHURN.value}
    return {}


if __name__ == "__main__":
    app.run(main)
