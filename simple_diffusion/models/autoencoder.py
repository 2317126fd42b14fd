"""KL-regularised convolutional autoencoder (the LDM first stage, also a VAE) and a
patch-GAN discriminator, in Flax Linen.

The encoder maps images [B, H, W, C] to the mean and log-variance of a diagonal
Gaussian posterior over latents [B, H/f, W/f, c]; the decoder maps latents back
to images. f = 2^(len(channels) - 1): level i runs ``num_res_blocks`` residual
blocks at ``channels[i]`` and every level but the last halves the resolution
(as LDM's ``ch_mult``). The losses are pure functions in
``simple_diffusion/autoencoder.py``; docs/latent.md has the method.

Config fields (``models.presets``-style ConfigDict, ``config.model`` of an
autoencoder run): name='kl_autoencoder', image_size, in_channels, channels,
num_res_blocks, latent_channels, mid_attention, num_heads, dtype, param_dtype.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from simple_diffusion import models
from simple_diffusion.models import layers

Dtype = layers.Dtype
NAME = "kl_autoencoder"
CONFIG_FIELDS = ("image_size", "in_channels", "channels", "num_res_blocks", "latent_channels",
                 "mid_attention", "num_heads", "dtype", "param_dtype")
# LDM clamps the log-variance to keep exp() finite early in training.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def preset(image_size: int, in_channels: int, *, channels=(32, 64, 64), num_res_blocks: int = 1,
           latent_channels: int = 4, mid_attention: bool = False, num_heads: int = 1
           ) -> ml_collections.ConfigDict:
    """An autoencoder model config (f = 2^(len(channels) - 1))."""
    return ml_collections.ConfigDict(dict(
        name=NAME, image_size=image_size, in_channels=in_channels, channels=tuple(channels),
        num_res_blocks=num_res_blocks, latent_channels=latent_channels,
        mid_attention=mid_attention, num_heads=num_heads, dtype="float32",
        param_dtype="float32"))


def downsampling_factor(config: ml_collections.ConfigDict) -> int:
    return 2 ** (len(config.channels) - 1)


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(h, w, c) of the latents of a ``config.model`` autoencoder."""
    size = config.image_size // downsampling_factor(config)
    return size, size, config.latent_channels


class ResBlock(nn.Module):
    """GN-SiLU-conv3x3-GN-SiLU-conv3x3 (zero-init) plus a (1x1-mapped) skip; unconditioned."""
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.conv(self.out_channels, 3, **kw, name="conv1")(
            nn.silu(layers.GroupNorm32(**kw, name="norm1")(x)))
        h = layers.conv(self.out_channels, 3, zero_init=True, **kw, name="conv2")(
            nn.silu(layers.GroupNorm32(**kw, name="norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, 1, **kw, name="skip")(x)
        return x + h


class MidBlock(nn.Module):
    """ResBlock, optional full self-attention over the h*w positions, ResBlock."""
    attention: bool
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = h.shape[-1]
        h = ResBlock(ch, **kw, name="res1")(h)
        if self.attention:
            b, hh, ww, _ = h.shape
            t = layers.GroupNorm32(**kw, name="attn_norm")(h).reshape(b, hh * ww, ch)
            t = layers.Attention(self.num_heads, qk_norm="none", embed_axis="conv_out", **kw,
                                 name="attn")(t)
            h = h + t.reshape(b, hh, ww, ch)
        return ResBlock(ch, **kw, name="res2")(h)


class Encoder(nn.Module):
    channels: tuple[int, ...]
    num_res_blocks: int
    latent_channels: int
    mid_attention: bool
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.conv(self.channels[0], 3, **kw, name="conv_in")(x.astype(self.dtype))
        for i, ch in enumerate(self.channels):
            for j in range(self.num_res_blocks):
                h = ResBlock(ch, **kw, name=f"down_{i}_res_{j}")(h)
            if i < len(self.channels) - 1:  # 3x3 stride 2, padded (0, 1) like LDM.
                h = layers.conv(ch, 3, strides=2, **kw, name=f"down_{i}_downsample")(h)
        h = MidBlock(self.mid_attention, self.num_heads, **kw, name="mid")(h)
        h = nn.silu(layers.GroupNorm32(**kw, name="norm_out")(h))
        moments = layers.conv(2 * self.latent_channels, 3, **kw, name="conv_out")(h)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


class Decoder(nn.Module):
    channels: tuple[int, ...]
    num_res_blocks: int
    out_channels: int
    mid_attention: bool
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.conv(self.channels[-1], 3, **kw, name="conv_in")(z.astype(self.dtype))
        h = MidBlock(self.mid_attention, self.num_heads, **kw, name="mid")(h)
        for i in reversed(range(len(self.channels))):
            for j in range(self.num_res_blocks + 1):  # One more than the encoder, as LDM.
                h = ResBlock(self.channels[i], **kw, name=f"up_{i}_res_{j}")(h)
            if i > 0:  # Nearest-neighbour 2x, then a 3x3 conv.
                b, hh, ww, ch = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, ch), method="nearest")
                h = layers.conv(ch, 3, **kw, name=f"up_{i}_upsample")(h)
        h = nn.silu(layers.GroupNorm32(**kw, name="norm_out")(h))
        return layers.conv(self.out_channels, 3, **kw, name="conv_out")(h).astype(jnp.float32)


class KLAutoencoder(nn.Module):
    """``encode(x) -> (mean, logvar)``, ``decode(z) -> x``; ``__call__`` does both.

    ``__call__(x, sample=True)`` draws z = mean + exp(logvar / 2) * eps with the
    'latent' rng; ``sample=False`` decodes the mean. Returns (reconstruction,
    mean, logvar), all float32.
    """
    channels: tuple[int, ...]
    num_res_blocks: int
    latent_channels: int
    out_channels: int
    mid_attention: bool = False
    num_heads: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(channels=tuple(self.channels), num_res_blocks=self.num_res_blocks,
                  mid_attention=self.mid_attention, num_heads=self.num_heads, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **kw)
        self.decoder = Decoder(out_channels=self.out_channels, **kw)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, x, sample: bool = True):
        mean, logvar = self.encode(x)
        z = mean
        if sample:
            eps = jax.random.normal(self.make_rng("latent"), mean.shape, jnp.float32)
            z = mean + jnp.exp(0.5 * logvar) * eps
        return self.decode(z), mean, logvar


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / LDM's NLayerDiscriminator): ``num_layers`` 4x4 stride-2
    convs (width doubling up to 8x), a 4x4 stride-1 conv, then a 4x4 conv to one
    logit per patch: [B, H, W, C] -> [B, H/2^L, W/2^L, 1]. GroupNorm instead of
    BatchNorm keeps the step a pure function."""
    channels: int = 64
    num_layers: int = 3

    @nn.compact
    def __call__(self, x):
        h = nn.leaky_relu(layers.conv(self.channels, 4, strides=2, name="conv_0")(x), 0.2)
        for n in range(1, self.num_layers + 1):
            ch = self.channels * min(2 ** n, 8)
            h = layers.conv(ch, 4, strides=2 if n < self.num_layers else 1, name=f"conv_{n}")(h)
            h = nn.leaky_relu(layers.GroupNorm32(name=f"norm_{n}")(h), 0.2)
        return layers.conv(1, 4, name="logits")(h)


def from_config(config: ml_collections.ConfigDict) -> KLAutoencoder:
    """The autoencoder of ``config`` (see the module docstring); ValueError naming the field."""
    missing = [f for f in CONFIG_FIELDS if f not in config]
    if config.get("name") != NAME or missing:
        raise ValueError(f"config.model must be a {NAME!r} config (autoencoder.preset(...)); "
                         f"name={config.get('name')!r}, missing fields {missing}.")
    models.reject_unknown_fields(config, ("name",) + CONFIG_FIELDS)
    f = downsampling_factor(config)
    if config.image_size % f:
        raise ValueError(f"config.model.image_size={config.image_size} is not divisible by the "
                         f"downsampling factor f={f} (2^(len(channels) - 1)).")
    if min(config.channels) < 1 or config.num_res_blocks < 0 or config.latent_channels < 1:
        raise ValueError("config.model.channels, latent_channels must be positive and "
                         "num_res_blocks >= 0.")
    for field in ("dtype", "param_dtype"):
        if config[field] not in _DTYPES:
            raise ValueError(f"config.model.{field}={config[field]!r}: use one of "
                             f"{sorted(_DTYPES)}.")
    return KLAutoencoder(
        channels=tuple(config.channels), num_res_blocks=config.num_res_blocks,
        latent_channels=config.latent_channels, out_channels=config.in_channels,
        mid_attention=config.mid_attention, num_heads=config.num_heads,
        dtype=_DTYPES[config.dtype], param_dtype=_DTYPES[config.param_dtype])
