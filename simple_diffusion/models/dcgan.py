"""DCGAN generator and discriminator (Radford et al. 2016), class-conditional by choice.

Layout for an image of side S = 4 * 2^L (L = len(g_channels) = len(d_channels)):

  Generator      z [B, latent_dim] (+ a learned label embedding of width latent_dim,
                 concatenated) -> Dense to 4x4 x g_channels[0] -> GroupNorm, ReLU ->
                 L-1 times [4x4 stride-2 transposed conv to g_channels[i], GroupNorm, ReLU]
                 -> a 4x4 stride-2 transposed conv to in_channels -> tanh, in [-1, 1].
  Discriminator  x [B, S, S, C] -> L times [4x4 stride-2 conv to d_channels[i], LeakyReLU
                 0.2] (S -> 4) -> flatten -> Dense to one logit; conditional models add
                 the projection term <embed(y), sum-pooled features> (Miyato & Koyama
                 2018). Returns float32 logits [B] (no sigmoid: the losses in gan.py take
                 logits).

Normalisation [project]: the generator uses GroupNorm instead of DCGAN's BatchNorm and
the discriminator has none. BatchNorm would add running statistics to the train state,
make an example's output depend on the rest of its (sharded, per-step) batch, behave
differently in train and eval mode, and leave the EMA generator without matching
statistics (they would need recomputing before every evaluation). GroupNorm is
per-example and stateless, so the generator is a pure function of (params, z, y), its
EMA params are a complete generator, and any device layout gives the same images. A
discriminator without BatchNorm also sees real and fake batches independently.

num_classes = 0 gives unconditional models (labels are ignored and may be None).
Parameters carry logical axis names ('conv_in', 'conv_out', 'embed', 'classes'), so
sharding.param_shardings can shard them for FSDP like the diffusion models.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from simple_diffusion import models
from simple_diffusion.models import layers

Dtype = Any
_DTYPES = models._DTYPES  # pylint: disable=protected-access
# Fields of config.model for name='dcgan' (besides image_size, in_channels, num_classes).
CONFIG_FIELDS = ("latent_dim", "g_channels", "d_channels", "dtype", "param_dtype")
_kernel = nn.initializers.lecun_uniform()
_zeros = nn.initializers.zeros_init()


def default_config(image_size: int = 32, in_channels: int = 1,
                   num_classes: int = 10) -> ml_collections.ConfigDict:
    """``config.model`` of a DCGAN; widths sized for the 2-core-CPU demo at 32x32 [project]."""
    levels = num_levels(image_size)
    return ml_collections.ConfigDict(dict(
        name="dcgan", image_size=image_size, in_channels=in_channels, num_classes=num_classes,
        latent_dim=64, g_channels=tuple(128 // 2**i for i in range(levels)),
        d_channels=tuple(32 * 2**i for i in range(levels)), dtype="float32",
        param_dtype="float32"))


def num_levels(image_size: int) -> int:
    """L with image_size = 4 * 2^L; ValueError unless image_size is such a power of two."""
    levels = (image_size // 4).bit_length() - 1
    if image_size < 8 or 4 * 2**levels != image_size:
        raise ValueError(f"config.model.image_size={image_size}: a DCGAN needs 4 * 2^L >= 8 "
                         "(8, 16, 32, 64, ...).")
    return levels


def _dense(features: int, names: tuple, dtype, param_dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(_kernel, names),
                    bias_init=nn.with_logical_partitioning(_zeros, names[-1:]))


def _embed(num: int, features: int, param_dtype, name: str) -> nn.Embed:
    init = nn.initializers.normal(stddev=features ** -0.5)
    return nn.Embed(num, features, param_dtype=param_dtype, name=name,
                    embedding_init=nn.with_logical_partitioning(init, ("classes", "embed")))


class Generator(nn.Module):
    """z [B, latent_dim] float32, labels [B] int32 or None -> images [B, S, S, C] in [-1, 1]."""
    image_size: int
    in_channels: int
    num_classes: int
    latent_dim: int
    channels: tuple[int, ...]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jnp.ndarray, labels: jnp.ndarray | None) -> jnp.ndarray:
        if len(self.channels) != num_levels(self.image_size):
            raise ValueError(f"g_channels={self.channels} needs {num_levels(self.image_size)} "
                             f"entries for image_size={self.image_size}.")
        h = z.astype(jnp.float32)
        if self.num_classes:
            h = jnp.concatenate(
                [h, _embed(self.num_classes, self.latent_dim, self.param_dtype, "label_embed")(
                    labels)], axis=-1)
        c0 = self.channels[0]
        h = _dense(4 * 4 * c0, (None, "conv_out"), self.dtype, self.param_dtype, "project")(
            h.astype(self.dtype))
        h = h.reshape(h.shape[0], 4, 4, c0)
        h = nn.relu(layers.GroupNorm32(self.dtype, self.param_dtype, name="norm_0")(h))
        outs = self.channels[1:] + (self.in_channels,)
        for i, features in enumerate(outs):
            h = nn.ConvTranspose(
                features, (4, 4), strides=(2, 2), padding="SAME", dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"up_{i}",
                kernel_init=nn.with_logical_partitioning(_kernel, (None, None, "conv_in",
                                                                   "conv_out")),
                bias_init=nn.with_logical_partitioning(_zeros, ("conv_out",)))(h)
            if i < len(outs) - 1:
                h = nn.relu(layers.GroupNorm32(self.dtype, self.param_dtype,
                                               name=f"norm_{i + 1}")(h))
        return jnp.tanh(h.astype(jnp.float32))


class Discriminator(nn.Module):
    """images [B, S, S, C], labels [B] int32 or None -> float32 logits [B] (real > 0)."""
    image_size: int
    in_channels: int
    num_classes: int
    channels: tuple[int, ...]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, labels: jnp.ndarray | None) -> jnp.ndarray:
        if len(self.channels) != num_levels(self.image_size):
            raise ValueError(f"d_channels={self.channels} needs {num_levels(self.image_size)} "
                             f"entries for image_size={self.image_size}.")
        h = x.astype(self.dtype)
        for i, features in enumerate(self.channels):
            h = layers.conv(features, 4, strides=2, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=f"down_{i}")(h)
            h = nn.leaky_relu(h, 0.2)
        logits = _dense(1, ("embed", None), jnp.float32, self.param_dtype, "logit")(
            h.reshape(h.shape[0], -1).astype(jnp.float32))[:, 0]
        if self.num_classes:
            pooled = jnp.sum(h.astype(jnp.float32), axis=(1, 2))
            proj = _embed(self.num_classes, pooled.shape[-1], self.param_dtype, "projection")
            logits = logits + jnp.sum(proj(labels).astype(jnp.float32) * pooled, axis=-1)
        return logits


def _check(config: ml_collections.ConfigDict) -> None:
    required = ("image_size", "in_channels", "num_classes") + CONFIG_FIELDS
    missing = [f for f in required if f not in config]
    if missing:
        raise ValueError(f"dcgan model config is missing fields {missing}; start from "
                         "models.dcgan.default_config(...) and override.")
    models.reject_unknown_fields(config, ("name",) + required)
    for field in ("dtype", "param_dtype"):
        if config[field] not in _DTYPES:
            raise ValueError(f"config.model.{field}={config[field]!r}: use one of "
                             f"{sorted(_DTYPES)}.")


def create_generator(config: ml_collections.ConfigDict) -> Generator:
    """The generator of ``config.model`` (name 'dcgan')."""
    _check(config)
    return Generator(config.image_size, config.in_channels, config.num_classes,
                     config.latent_dim, tuple(config.g_channels), _DTYPES[config.dtype],
                     _DTYPES[config.param_dtype])


def create_discriminator(config: ml_collections.ConfigDict) -> Discriminator:
    """The discriminator of ``config.model`` (name 'dcgan')."""
    _check(config)
    return Discriminator(config.image_size, config.in_channels, config.num_classes,
                         tuple(config.d_channels), _DTYPES[config.dtype],
                         _DTYPES[config.param_dtype])
