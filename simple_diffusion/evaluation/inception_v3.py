"""The FID InceptionV3 of pytorch-fid, in Flax.

This is the network of the `pt_inception-2015-12-05-6726825d.pth` weights
that pytorch-fid ported from the 2015 TensorFlow graph used by the original
FID and Inception Score code. It differs from torchvision's InceptionV3 in
the ways that graph does:

* `Mixed_5b..5d` / `Mixed_6b..6e` / `Mixed_7b` average-pool without counting
  the zero padding (`count_include_pad=False`);
* `Mixed_7c` max-pools (not average-pools) in its pool branch;
* the classifier has 1008 outputs (1000 ImageNet classes plus 8 unused);
* no auxiliary classifier.

Module and parameter names mirror the PyTorch state dict (`Mixed_6b`,
`branch7x7dbl_3`, `conv`, `bn`, `fc`), so conversion is a pure renaming of
leaves (see `convert_inception_weights.py`).

Inputs follow pytorch-fid: pixel values in [0, 255] are bilinearly resized to
299 x 299 (half-pixel centres, no antialiasing: `F.interpolate(...,
mode="bilinear", align_corners=False)`) and mapped to [-1, 1] (see
`preprocess`).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simple_diffusion.evaluation import torch_pickle

IMAGE_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008
# Counted from torchvision's Inception3 (27,161,264 with its auxiliary head of
# 3,326,696) with the classifier widened from 1000 to 1008 outputs.
NUM_PARAMS = 23_850_960
_BN_EPSILON = 1e-3
# FID features are compared across papers, so keep float32 convolutions even
# where the backend would default to bf16 / TF32 passes.
_PRECISION = jax.lax.Precision.HIGHEST


def preprocess(images: jax.Array) -> jax.Array:
    """Pixel values in [0, 255], float [N, H, W, 3] -> net input [N, 299, 299, 3]."""
    n, _, _, c = images.shape
    images = jax.image.resize(images, (n, IMAGE_SIZE, IMAGE_SIZE, c),
                              method="bilinear", antialias=False)
    return images / 127.5 - 1.0


class _BasicConv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, running stats) + ReLU."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                    padding=((ph, ph), (pw, pw)), use_bias=False,
                    precision=_PRECISION, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON,
                         name="bn")(x)
        return jax.nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class _InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = _BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = _BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = _BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = _BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = _BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = _BasicConv(self.pool_features, (1, 1), name="branch_pool")(
            _avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):

    @nn.compact
    def __call__(self, x):
        b3 = _BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = _BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = _BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = _BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class _InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        conv_1x7 = functools.partial(_BasicConv, kernel_size=(1, 7), padding=(0, 3))
        conv_7x1 = functools.partial(_BasicConv, kernel_size=(7, 1), padding=(3, 0))
        b1 = _BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = _BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv_1x7(c7, name="branch7x7_2")(b7)
        b7 = conv_7x1(192, name="branch7x7_3")(b7)
        bd = _BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv_7x1(c7, name="branch7x7dbl_2")(bd)
        bd = conv_1x7(c7, name="branch7x7dbl_3")(bd)
        bd = conv_7x1(c7, name="branch7x7dbl_4")(bd)
        bd = conv_1x7(192, name="branch7x7dbl_5")(bd)
        bp = _BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):

    @nn.compact
    def __call__(self, x):
        b3 = _BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = _BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = _BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = _BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = _BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = _BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class _InceptionE(nn.Module):
    """`Mixed_7b` pools by averaging (no padding counted), `Mixed_7c` by max."""

    max_pool: bool

    @nn.compact
    def __call__(self, x):
        conv_1x3 = functools.partial(_BasicConv, kernel_size=(1, 3), padding=(0, 1))
        conv_3x1 = functools.partial(_BasicConv, kernel_size=(3, 1), padding=(1, 0))
        b1 = _BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = _BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv_1x3(384, name="branch3x3_2a")(b3),
                              conv_3x1(384, name="branch3x3_2b")(b3)], axis=-1)
        bd = _BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = _BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv_1x3(384, name="branch3x3dbl_3a")(bd),
                              conv_3x1(384, name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1),
                                 padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = _BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3 (inference only: BatchNorm uses stats).

    Call with `images`: float32 [N, 299, 299, 3] in [-1, 1] (see
    `preprocess`). Returns `(features, logits)`: the pool3 features, float32
    [N, 2048], and the classifier logits, float32 [N, 1008].
    """

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = _BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(images)
        x = _BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = _BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = _BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = _BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = _InceptionA(32, name="Mixed_5b")(x)
        x = _InceptionA(64, name="Mixed_5c")(x)
        x = _InceptionA(64, name="Mixed_5d")(x)
        x = _InceptionB(name="Mixed_6a")(x)
        x = _InceptionC(128, name="Mixed_6b")(x)
        x = _InceptionC(160, name="Mixed_6c")(x)
        x = _InceptionC(160, name="Mixed_6d")(x)
        x = _InceptionC(192, name="Mixed_6e")(x)
        x = _InceptionD(name="Mixed_7a")(x)
        x = _InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = _InceptionE(max_pool=True, name="Mixed_7c")(x)
        features = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_CLASSES, precision=_PRECISION, name="fc")(features)
        return features, logits


def variable_shapes() -> dict[str, Any]:
    """The model's variables as `jax.ShapeDtypeStruct`s (no computation)."""
    return jax.eval_shape(
        FIDInceptionV3().init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))


def variables_from_torch_file(path: str) -> dict[str, Any]:
    """Reads a pytorch-fid InceptionV3 state dict as Flax variables.

    Args:
      path: a `torch.save` file (zip or legacy) of FID InceptionV3 weights
        with pytorch-fid's names (`Conv2d_1a_3x3.conv.weight`,
        `Mixed_7c.branch_pool.bn.running_var`, `fc.bias`, ...).

    Returns:
      `{"params": ..., "batch_stats": ...}` of float32 NumPy arrays.

    Raises:
      ValueError: a tensor is missing, unexpected, or of the wrong shape.
    """
    return torch_pickle.to_flax_variables(
        torch_pickle.load_state_dict(path), lambda module: module.split("."),
        variable_shapes())


def load_variables(path: str) -> dict[str, Any]:
    """Loads converted weights (see `convert_inception_weights.py`).

    Args:
      path: an `.npz` written by the converter; its keys are `/`-joined
        variable paths such as `params/Mixed_6b/branch7x7_2/conv/kernel`.

    Returns:
      `{"params": ..., "batch_stats": ...}` of float32 NumPy arrays.

    Raises:
      ValueError: a variable is missing, unexpected, or of the wrong shape.
    """
    expected = {"/".join(str(getattr(k, "key", k)) for k in p): v.shape
                for p, v in jax.tree_util.tree_leaves_with_path(variable_shapes())}
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    if arrays.keys() != expected.keys():
        raise ValueError(
            f"{path}: missing {sorted(expected.keys() - arrays.keys())}, "
            f"unexpected {sorted(arrays.keys() - expected.keys())}")
    variables: dict[str, Any] = {}
    for key, value in arrays.items():
        if value.shape != expected[key]:
            raise ValueError(f"{path}: {key} has shape {value.shape}, "
                             f"expected {expected[key]}")
        node = variables
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value.astype(np.float32)
    return variables
