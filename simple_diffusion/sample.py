r"""Draws samples from a run's checkpoint (EMA weights) with any sampler.

  python -m simple_diffusion.sample --workdir=workdirs/demo --num_samples=64 \
      --sampler=ddpm --steps=256 [--step=N] [--guidance=1.0] [--labels=0,1,2] [--seed=0]

Writes to <workdir>/samples_cli/step_<N>_<sampler>_<steps>_g<guidance>_s<seed>/
(or --output_dir): one PNG per image, grid.png, and samples.npz with uint8
``images`` [K, H, W, C] and int32 ``labels`` [K]. Generation is sharded over
all devices (and hosts); the same seed gives the same images.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

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


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config the run in ``workdir`` was trained with (its config.json)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a training workdir (train first with "
            "python -m simple_diffusion.main --config=... --workdir=...).")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def parse_labels(text: str | None, num_classes: int) -> np.ndarray | None:
    """'3,5' -> int32 [3, 5]; checks the range. None: cycle through all classes."""
    if text is None:
        return None
    if not num_classes:
        raise ValueError("--labels given, but the model is unconditional (num_classes=0).")
    try:
        labels = np.array([int(v) for v in text.split(",") if v.strip()], np.int32)
    except ValueError as e:
        raise ValueError(f"--labels={text!r}: expected comma-separated integers.") from e
    if labels.size == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"--labels={text!r}: class ids must be in [0, {num_classes - 1}].")
    return labels


def generate(config: ml_collections.ConfigDict, params, mesh, *, num_samples: int, sampler: str,
             steps: int, guidance: float, labels: np.ndarray | None, seed: int,
             batch_size: int = 0, **sampler_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``num_samples`` images. Returns (uint8 [K, H, W, C], int32 [K] labels)."""
    if sampler not in config_validation.SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; use one of {config_validation.SAMPLERS}.")
    if num_samples <= 0 or steps <= 0:
        raise ValueError("--num_samples and --steps must be positive.")
    num_classes = config.model.num_classes
    if labels is None:
        all_labels = sampling.default_labels(num_samples, num_classes)
    else:
        all_labels = np.resize(labels, num_samples).astype(np.int32)
    devices = mesh.size
    batch = batch_size or num_samples
    batch = -(-batch // devices) * devices  # Round up to a multiple of the devices.
    model = models.create_model(config.model)
    sample_fn = sampling.make_sample_fn(model, config, mesh, sampler=sampler, num_steps=steps,
                                        guidance_scale=guidance, **sampler_kwargs)
    images = []
    for i, start in enumerate(range(0, num_samples, batch)):
        chunk = all_labels[start:start + batch]
        padded = np.resize(chunk, batch).astype(np.int32)
        out = sample_fn(params, jax.random.fold_in(jax.random.key(seed), i),
                        sampling.replicate_labels(padded, mesh))
        out = multihost_utils.process_allgather(out, tiled=True)
        images.append(sampling.to_uint8(out)[:len(chunk)])
    return np.concatenate(images), all_labels


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    distributed.initialize()
    config = load_run_config(_WORKDIR.value)
    labels = parse_labels(_LABELS.value, config.model.num_classes)
    if _SAMPLER.value not in config_validation.SAMPLERS:
        raise app.UsageError(
            f"--sampler={_SAMPLER.value!r}; use one of {config_validation.SAMPLERS}.")
    ckpt = checkpointing.Checkpointer(_WORKDIR.value, async_save=False)
    step = _STEP.value if _STEP.value is not None else ckpt.latest_step()
    if step is None or step not in ckpt.all_steps():
        raise FileNotFoundError(
            f"No checkpoint {'' if step is None else step} in {ckpt.directory} "
            f"(available: {ckpt.all_steps()}).")
    mesh = sharding_lib.create_mesh(-1, 1)
    abstract, _ = train_step_lib.sharded_abstract_params(
        models.create_model(config.model), config, mesh)
    params = ckpt.restore_params(step, abstract,
                                 ema_index=None if _EMA_INDEX.value < 0 else _EMA_INDEX.value)
    images, used_labels = generate(
        config, params, mesh, num_samples=_NUM_SAMPLES.value, sampler=_SAMPLER.value,
        steps=_STEPS.value, guidance=_GUIDANCE.value, labels=labels, seed=_SEED.value,
        batch_size=_BATCH.value, **_sampler_kwargs(_SAMPLER.value))
    out_dir = _OUTPUT.value or os.path.join(
        _WORKDIR.value, "samples_cli",
        f"step_{step}_{_SAMPLER.value}_{_STEPS.value}_g{_GUIDANCE.value:g}_s{_SEED.value}")
    if jax.process_index() == 0:
        write_outputs(out_dir, images, used_labels)
    logging.info("Wrote %d samples to %s", len(images), out_dir)
    ckpt.close()


def _sampler_kwargs(sampler: str) -> dict:
    if sampler == "ddim":
        return {"eta": _ETA.value}
    if sampler in ("euler", "heun"):
        return {"s_churn": _CHURN.value}
    return {}


def write_outputs(out_dir: str, images: np.ndarray, labels: np.ndarray) -> None:
    """PNG per image, grid.png and samples.npz (uint8 images, int32 labels)."""
    path = epath.Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        sampling.save_png(str(path / f"{i:06d}_class{labels[i]}.png"), image)
    sampling.save_png(str(path / "grid.png"), sampling.make_grid(images))
    with (path / "samples.npz").open("wb") as f:
        np.savez(f, images=images, labels=labels)


if __name__ == "__main__":
    app.run(main)
