"""A jitted, sharded sampling function over a model and its params.

Used by the trainer (sample grids), the sampling CLI and evaluation. The
sampler loop itself (``samplers.sample``) is a ``lax.scan``: one compile per
(sampler, step count, batch shape).
"""

import dataclasses
import io
import json
from typing import Any, Callable

from etils import epath
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from PIL import Image

from simple_diffusion import models
from simple_diffusion import samplers
from simple_diffusion import schedules
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import xla_cpu


def make_sample_fn(model: nn.Module, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   options: samplers.SamplerOptions) -> Callable:
    """Builds ``sample_fn(params, rng, labels) -> images``.

    The sampler follows the run's trained schedule (``config.schedule``):
    ddpm/ddim walk its t grid, euler/heun take their sigma range from it.

    Args:
      model: the Flax module.
      config: the run config (model, schedule, loss.prediction, loss.sigma_data).
      mesh: device mesh; the batch of samples is sharded over all devices.
      options: the sampler settings (validated here). Guidance is dropped for
        unconditional models.

    Returns:
      A jitted function. ``labels``: int32 [N] (ignored for unconditional
      models; N must be a multiple of the device count). Output: float32
      [N, H, W, C] in roughly [-1, 1], sharded over the batch.
    """
    options.validate()
    size, channels = config.model.image_size, config.model.in_channels
    num_classes = config.model.num_classes
    if not num_classes and options.guided:
        options = dataclasses.replace(options, guidance_scale=0.0)
    logsnr_fn = schedules.from_config(config.schedule)
    num_timesteps = schedules.num_timesteps_from_config(config.schedule)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    sigma_data = config.loss.get("sigma_data", 0.5)

    def sample_fn(params, rng, labels):
        def model_fn(z, logsnr, lab):
            return model.apply({"params": params}, z, logsnr, lab, train=False)

        return samplers.sample(
            model_fn, rng, options, logsnr_fn=logsnr_fn,
            shape=(labels.shape[0], size, size, channels), prediction=config.loss.prediction,
            labels=labels if num_classes else None,
            null_label=num_classes if num_classes else None, sigma_data=sigma_data,
            num_timesteps=num_timesteps)

    return jax.jit(sample_fn, in_shardings=(None, None, batch_sharding),
                   out_shardings=batch_sharding, compiler_options=xla_cpu.compiler_options())


def default_labels(num_images: int, num_classes: int) -> np.ndarray:
    """Labels cycling through the classes (zeros for unconditional models)."""
    if not num_classes:
        return np.zeros((num_images,), np.int32)
    return (np.arange(num_images) % num_classes).astype(np.int32)


def to_uint8(images: Any) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255], rounding as image tools do."""
    images = np.asarray(jax.device_get(images), np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, num_cols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles uint8 [N, H, W, C] images into one uint8 [rows*(H+pad)+pad, ..., C] grid."""
    n, h, w, c = images.shape
    cols = num_cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, C] (C = 1 or 3) image to ``path`` (local or gs://)."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(buf.getvalue())


def replicate_labels(labels: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
    """Host labels (identical on every process) -> a global batch-sharded array."""
    sh = sharding_lib.batch_sharding(mesh)
    return jax.make_array_from_callback(labels.shape, sh, lambda idx: labels[idx])


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


def generate(config: ml_collections.ConfigDict, params, mesh, options: samplers.SamplerOptions,
             *, num_samples: int, labels: np.ndarray | None, seed: int, batch_size: int = 0,
             sample_fn: Callable | None = None,
             progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``num_samples`` images with ``params``, sharded over ``mesh``.

    Args:
      config: the run config.
      params: model parameters (e.g. an EMA copy).
      mesh: device mesh.
      options: the sampler settings.
      num_samples: number of images K.
      labels: class ids cycled over the K samples; None cycles all classes.
      seed: batch i uses ``fold_in(key(seed), i)``: same seed, same images.
      batch_size: images per sampler call (0: K), rounded up to the devices.
      sample_fn: a prebuilt ``make_sample_fn`` result to reuse (periodic
        evaluation compiles once); it must have been built with ``options``.
      progress: called as ``progress(done, total)`` after every batch.

    Returns:
      (uint8 [K, H, W, C] images, int32 [K] labels).
    """
    options.validate()
    if num_samples <= 0:
        raise ValueError(f"num_samples={num_samples} must be positive.")
    if batch_size < 0:
        raise ValueError(f"batch_size={batch_size} must be >= 0 (0: all samples in one call).")
    num_classes = config.model.num_classes
    if labels is None:
        all_labels = default_labels(num_samples, num_classes)
    else:
        all_labels = np.resize(labels, num_samples).astype(np.int32)
    devices = mesh.size
    batch = batch_size or num_samples
    batch = -(-batch // devices) * devices  # Round up to a multiple of the devices.
    if sample_fn is None:
        sample_fn = make_sample_fn(models.create_model(config.model), config, mesh, options)
    images = []
    for i, start in enumerate(range(0, num_samples, batch)):
        chunk = all_labels[start:start + batch]
        padded = np.resize(chunk, batch).astype(np.int32)
        out = sample_fn(params, jax.random.fold_in(jax.random.key(seed), i),
                        replicate_labels(padded, mesh))
        out = multihost_utils.process_allgather(out, tiled=True)
        images.append(to_uint8(out)[:len(chunk)])
        if progress is not None:
            progress(start + len(chunk), num_samples)
    return np.concatenate(images), all_labels


def write_outputs(out_dir: str, images: np.ndarray, labels: np.ndarray) -> None:
    """PNG per image, grid.png and samples.npz (uint8 images, int32 labels)."""
    path = epath.Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_png(str(path / f"{i:06d}_class{labels[i]}.png"), image)
    save_png(str(path / "grid.png"), make_grid(images))
    with (path / "samples.npz").open("wb") as f:
        np.savez(f, images=images, labels=labels)
