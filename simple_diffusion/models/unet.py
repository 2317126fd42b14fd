"""DDPM U-Net baseline (Ho et al. 2020), conditioned on logSNR and class labels.

The comparison point for the U-ViT. Layout for an image of side S:

  conv_in     3x3 conv to base_channels.
  down        per level i (resolution S / 2^i): `num_res_blocks` ResBlocks with
              base_channels * channel_mult[i] channels (+ self-attention at resolutions in
              `attention_resolutions`), then a 3x3 stride-2 conv (not after the last level).
  middle      ResBlock, self-attention, ResBlock.
  up          per level, `num_res_blocks + 1` ResBlocks each taking a concatenated skip
              (+ attention), then nearest-neighbour x2 and a 3x3 conv (not after level 0).
  head        GroupNorm, SiLU, 3x3 conv to in_channels.

Differences from the original DDPM: conditioning is on logSNR (sinusoidal embedding of
logsnr_scale * logsnr) and an optional class label rather than on the integer timestep;
ResBlocks use scale-and-shift conditioning; dropout can be limited to low resolutions with
`dropout_from_resolution` (set it to image_size for DDPM's dropout everywhere).

Same call convention and output as `uvit.UViT`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simple_diffusion.models import layers

Dtype = Any


class AttentionBlock(nn.Module):
    """Residual self-attention over the pixels of [B, H, W, C] (GroupNorm pre-norm)."""
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, h, w, c = x.shape
        y = layers.GroupNorm32(self.dtype, self.param_dtype, name="norm")(x)
        y = layers.Attention(self.num_heads, qk_norm="none", embed_axis="conv_out",
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             name="attention")(y.reshape(b, h * w, c))
        return x + y.reshape(b, h, w, c)


class UNet(nn.Module):
    """The DDPM U-Net; see the module docstring."""
    image_size: int
    in_channels: int
    num_classes: int
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    emb_dim: int = 512
    logsnr_scale: float = 10.0
    dropout: float = 0.1
    dropout_from_resolution: int = 1 << 30
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jnp.ndarray, logsnr: jnp.ndarray, labels: jnp.ndarray | None = None,
                 train: bool = False) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = layers.ConditioningEmbedding(self.emb_dim, self.num_classes, self.logsnr_scale,
                                           param_dtype=self.param_dtype,
                                           name="conditioning")(logsnr, labels)
        # Argument 3 (counting self) is `train`, a Python bool.
        res_block = (nn.remat(layers.ResBlock, static_argnums=(3,)) if self.remat
                     else layers.ResBlock)

        def block(x, ch, res, name):
            rate = self.dropout if res <= self.dropout_from_resolution else 0.0
            x = res_block(ch, rate, **kw, name=name)(x, emb, train)
            if res in self.attention_resolutions:
                x = AttentionBlock(self.num_heads, **kw, name=f"{name}_attention")(x)
            return x

        x = layers.conv(self.base_channels, 3, **kw, name="conv_in")(z.astype(self.dtype))
        res = self.image_size
        skips = [x]
        for i, mult in enumerate(self.channel_mult):
            for j in range(self.num_res_blocks):
                x = block(x, self.base_channels * mult, res, f"down{res}_block{j}")
                skips.append(x)
            if i < len(self.channel_mult) - 1:
                x = layers.conv(x.shape[-1], 3, strides=2, **kw, name=f"down{res}_to{res // 2}")(x)
                res //= 2
                skips.append(x)

        rate = self.dropout if res <= self.dropout_from_resolution else 0.0
        x = res_block(x.shape[-1], rate, **kw, name="mid_block0")(x, emb, train)
        x = AttentionBlock(self.num_heads, **kw, name="mid_attention")(x)
        x = res_block(x.shape[-1], rate, **kw, name="mid_block1")(x, emb, train)

        for i in reversed(range(len(self.channel_mult))):
            for j in range(self.num_res_blocks + 1):
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = block(x, self.base_channels * self.channel_mult[i], res, f"up{res}_block{j}")
            if i > 0:
                b, h, w, c = x.shape
                x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
                x = layers.conv(c, 3, **kw, name=f"up{res}_to{res * 2}")(x)
                res *= 2

        x = nn.silu(layers.GroupNorm32(**kw, name="head_norm")(x))
        x = layers.conv(self.in_channels, 3, **kw, name="head")(x)
        return x.astype(jnp.float32)


# Model-specific config fields read by `from_config` (besides the common ones).
CONFIG_FIELDS = ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                 "num_heads", "emb_dim", "logsnr_scale", "dropout", "dropout_from_resolution",
                 "remat")


def from_config(config, dtype: Dtype, param_dtype: Dtype) -> UNet:
    """Builds a UNet from a validated-common `config` (see models.create_model).

    Raises:
      ValueError: naming the offending field and how to fix it.
    """
    mult = tuple(int(m) for m in config.channel_mult)
    if not mult or any(m < 1 for m in mult):
        raise ValueError(f"config.channel_mult={mult}: needs >= 1 positive entries.")
    factor = 2**(len(mult) - 1)
    if config.image_size % factor:
        raise ValueError(
            f"config.image_size={config.image_size} is not divisible by {factor} "
            f"(2^(len(config.channel_mult) - 1)); change image_size or channel_mult.")
    resolutions = [config.image_size // 2**i for i in range(len(mult))]
    attention = tuple(int(r) for r in config.attention_resolutions)
    for r in attention:
        if r not in resolutions:
            raise ValueError(
                f"config.attention_resolutions contains {r}, which is not a level resolution "
                f"{resolutions}.")
        ch = config.base_channels * mult[resolutions.index(r)]
        if ch % config.num_heads:
            raise ValueError(
                f"config.num_heads={config.num_heads} must divide the {ch} channels at "
                f"resolution {r}.")
    if config.base_channels * mult[-1] % config.num_heads:
        raise ValueError(
            f"config.num_heads={config.num_heads} must divide the middle block's channels.")
    if config.num_res_blocks < 1:
        raise ValueError(f"config.num_res_blocks={config.num_res_blocks}: must be >= 1.")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"config.dropout={config.dropout}: must be in [0, 1).")
    return UNet(
        image_size=config.image_size, in_channels=config.in_channels,
        num_classes=config.num_classes, base_channels=config.base_channels, channel_mult=mult,
        num_res_blocks=config.num_res_blocks, attention_resolutions=attention,
        num_heads=config.num_heads, emb_dim=config.emb_dim,
        logsnr_scale=float(config.logsnr_scale), dropout=float(config.dropout),
        dropout_from_resolution=config.dropout_from_resolution, remat=bool(config.remat),
        dtype=dtype, param_dtype=param_dtype)
