"""A jitted, sharded sampling function over a model and its params.

Used by the trainer (sample grids), the sampling CLI and evaluation. The
sampler loop itself (``samplers.sample``) is a ``lax.scan``: one compile per
(sampler, step count, batch shape).
"""

import io
from typing import Any, Callable

from etils import epath
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from PIL import Image

from simple_diffusion import samplers
from simple_diffusion import schedules
from simple_diffusion import sharding as sharding_lib


def make_sample_fn(model: nn.Module, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   *, sampler: str, num_steps: int, guidance_scale: float = 0.0,
                   clip_x: bool = True, **sampler_kwargs) -> Callable:
    """Builds ``sample_fn(params, rng, labels) -> images``.

    Args:
      model: the Flax module.
      config: the run config (model, schedule, loss.prediction).
      mesh: device mesh; the batch of samples is sharded over all devices.
      sampler: 'ddpm' | 'ddim' | 'euler' | 'heun'.
      num_steps: denoising steps.
      guidance_scale: w in (1 + w) * cond - w * uncond; 0 = plain conditional.
      clip_x: clip the predicted x to [-1, 1] (ddpm/ddim).
      **sampler_kwargs: passed on to ``samplers.sample`` (eta, churn, ...).

    Returns:
      A jitted function. ``labels``: int32 [N] (ignored for unconditional
      models; N must be a multiple of the device count). Output: float32
      [N, H, W, C] in roughly [-1, 1], sharded over the batch.
    """
    size, channels = config.model.image_size, config.model.in_channels
    num_classes = config.model.num_classes
    logsnr_fn = schedules.get_logsnr_fn(**config.schedule)
    batch_sharding = sharding_lib.batch_sharding(mesh)

    def sample_fn(params, rng, labels):
        def model_fn(z, logsnr, lab):
            return model.apply({"params": params}, z, logsnr, lab, train=False)

        return samplers.sample(
            model_fn, rng, shape=(labels.shape[0], size, size, channels), sampler=sampler,
            num_steps=num_steps, logsnr_fn=logsnr_fn, prediction=config.loss.prediction,
            labels=labels if num_classes else None,
            null_label=num_classes if num_classes else None,
            guidance_scale=guidance_scale if num_classes else 0.0, clip_x=clip_x,
            **sampler_kwargs)

    return jax.jit(sample_fn, in_shardings=(None, None, batch_sharding),
                   out_shardings=batch_sharding)


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

