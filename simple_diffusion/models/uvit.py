"""U-ViT of simple diffusion (Hoogeboom et al. 2023) with the SiD2 residual switch.

Layout, for an image of side S and a stem with downsampling factor P (patch size, or
2^levels for the 5/3 DWT):

  stem        patch: P x P conv, stride P.   dwt: 5/3 DWT (levels L) then a 3x3 conv.
  conv levels resolution S/P, S/(2P), ...: `num_res_blocks[i]` ResBlocks with
              `channels[i]` channels each, then a 2x2 stride-2 conv to the next level.
  transformer at S / (P * 2^len(channels)) (16x16 for the ImageNet presets): tokens plus
              a fixed 2-D sin-cos position embedding, `transformer_depth` pre-norm blocks
              (attention with the `qk_norm` choice + MLP, adaLN conditioning with the
              `modulation` choice), a final RMSNorm.
  up levels   a 2x2 stride-2 transposed conv back to each level, then ResBlocks.
  head        GroupNorm, SiLU, then the stem's mirror: P x P transposed conv stride P,
              or a 3x3 conv to C * 4^L channels followed by the exact inverse DWT.
              The parameter-free parts of stem and head are `UViT.stem_transform` and
              `UViT.head_transform`, exact inverses of each other (tested).

Transformer conditioning (`layers.TransformerBlock`):
  modulation='shared' (default, adaLN-single): one Dense `transformer_modulation` from
      SiLU(emb) to [4, D] shared by all blocks, plus a learned [4, D] offset per block.
  modulation='per_block' (DiT-style adaLN): every block has its own zero-initialised
      Dense(SiLU(emb)) -> [4, D]; no `transformer_modulation`.
QK-norm (`layers.Attention`): qk_norm='rms_learned' (default; RMSNorm with learned
  scale), 'l2' (lucidrains: l2-normalised q, k with learned scales, logit scale 8) or
  'none'. True / False (configs written before the choice) mean 'rms_learned' / 'none'.

Skip connections:
  residual=False (simple diffusion): every down ResBlock output is concatenated onto
      the input of the matching up ResBlock (U-Net skips).
  residual=True (SiD2 "residual U-ViT"): no blockwise skips; one residual per resolution
      change, x = Up(x - h_after_down) + h_before_down.

Dropout (rate `dropout`) is applied only in blocks whose resolution is
<= `dropout_from_resolution` (simple diffusion §3.4: low resolutions only).

Call: `apply(variables, z, logsnr, labels, train=..., rngs={'dropout': key})` with z
[B, S, S, C] float32, logsnr [B] float32, labels [B] int32 (or None when num_classes is
0). Returns the raw prediction [B, S, S, C] float32.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from simple_diffusion.models import dwt
from simple_diffusion.models import layers

Dtype = Any


class TransformerStack(nn.Module):
    """`depth` TransformerBlocks over [B, T, D]; optionally scanned and/or rematerialised.

    With `scan_layers` the block parameters are stacked on a leading axis named 'layers'
    and the block is traced once, so compile time does not grow with depth.
    """
    depth: int
    num_heads: int
    mlp_ratio: float
    dropout: float
    qk_norm: str
    modulation: str
    scan_layers: bool
    remat: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, cond: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x [B, T, D] -> [B, T, D]; cond: [B, 4, D] ('shared') or [B, emb_dim] ('per_block')."""
        block_cls = layers.TransformerBlock
        if self.remat:
            # prevent_cse only matters outside scan (scan already blocks CSE across steps).
            block_cls = nn.remat(block_cls, prevent_cse=not self.scan_layers)
        kwargs = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout,
                      qk_norm=self.qk_norm, modulation=self.modulation, train=train,
                      dtype=self.dtype, param_dtype=self.param_dtype)
        if self.scan_layers:
            stack = nn.scan(
                block_cls, variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(**kwargs, name="blocks")(x, cond)
        else:
            for i in range(self.depth):
                x, _ = block_cls(**kwargs, name=f"block_{i}")(x, cond)
        return x


class UViT(nn.Module):
    """The U-ViT; see the module docstring for the layout and call convention."""
    image_size: int
    in_channels: int
    num_classes: int
    stem: str = "patch"
    patch_size: int = 2
    dwt_levels: int = 1
    channels: tuple[int, ...] = (128,)
    num_res_blocks: tuple[int, ...] = (2,)
    transformer_width: int = 256
    transformer_depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qk_norm: str = "rms_learned"
    modulation: str = "shared"
    emb_dim: int = 256
    logsnr_scale: float = 10.0
    dropout: float = 0.0
    dropout_from_resolution: int = 16
    residual: bool = False
    scan_layers: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def stem_factor(self) -> int:
        return self.patch_size if self.stem == "patch" else 2**self.dwt_levels

    def stem_transform(self, z: jnp.ndarray) -> jnp.ndarray:
        """The stem's parameter-free part, before its learned conv. Float32 in and out.

        stem='dwt': [B, H, W, C] -> [B, H/2^L, W/2^L, C * 4^L], the L-level 5/3 DWT with
        sub-bands on channels (dwt.dwt53_forward). stem='patch': the identity (patching is
        the learned P x P stride-P conv).
        """
        z = z.astype(jnp.float32)
        if self.stem == "dwt":
            return dwt.dwt53_forward(z, self.dwt_levels)
        return z

    def head_transform(self, y: jnp.ndarray) -> jnp.ndarray:
        """The head's parameter-free part, after its learned conv: the inverse of `stem_transform`.

        stem='dwt': [B, h, w, C * 4^L] -> [B, h * 2^L, w * 2^L, C], the exact inverse DWT,
        computed in float32 (bfloat16 would lose the exactness). stem='patch': identity.
        Returns float32.
        """
        y = y.astype(jnp.float32)
        if self.stem == "dwt":
            return dwt.dwt53_inverse(y, self.dwt_levels)
        return y

    def _rate(self, resolution: int) -> float:
        return self.dropout if resolution <= self.dropout_from_resolution else 0.0

    @nn.compact
    def __call__(self, z: jnp.ndarray, logsnr: jnp.ndarray, labels: jnp.ndarray | None = None,
                 train: bool = False) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = layers.ConditioningEmbedding(self.emb_dim, self.num_classes, self.logsnr_scale,
                                           param_dtype=self.param_dtype,
                                           name="conditioning")(logsnr, labels)
        widths = tuple(self.channels) + (self.transformer_width,)
        # Argument 3 (counting self) is `train`, a Python bool.
        res_block = (nn.remat(layers.ResBlock, static_argnums=(3,)) if self.remat
                     else layers.ResBlock)

        x = self.stem_transform(z).astype(self.dtype)
        if self.stem == "patch":
            x = layers.conv(widths[0], self.patch_size, strides=self.patch_size, **kw,
                            name="stem")(x)
        else:
            x = layers.conv(widths[0], 3, **kw, name="stem")(x)

        res = self.image_size // self.stem_factor
        skips, before_down, after_down = [], [], []
        for i, ch in enumerate(self.channels):
            for j in range(self.num_res_blocks[i]):
                x = res_block(ch, self._rate(res), **kw, name=f"down{res}_block{j}")(
                    x, emb, train)
                if not self.residual:
                    skips.append(x)
            before_down.append(x)
            x = layers.conv(widths[i + 1], 2, strides=2, **kw, name=f"down{res}_to{res // 2}")(x)
            after_down.append(x)
            res //= 2

        x = self._transformer(x, emb, res, train)

        for i in reversed(range(len(self.channels))):
            if self.residual:
                x = x - after_down.pop()
            x = layers.conv_transpose(self.channels[i], 2, **kw, name=f"up{res}_to{res * 2}")(x)
            res *= 2
            if self.residual:
                x = x + before_down.pop()
            for j in range(self.num_res_blocks[i]):
                if not self.residual:
                    x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = res_block(self.channels[i], self._rate(res), **kw,
                                    name=f"up{res}_block{j}")(x, emb, train)

        x = nn.silu(layers.GroupNorm32(**kw, name="head_norm")(x))
        if self.stem == "patch":
            x = layers.conv_transpose(self.in_channels, self.patch_size, **kw, name="head")(x)
        else:
            x = layers.conv(self.in_channels * 4**self.dwt_levels, 3, **kw, name="head")(x)
        return self.head_transform(x)

    def _transformer(self, x: jnp.ndarray, emb: jnp.ndarray, res: int, train: bool) -> jnp.ndarray:
        """[B, res, res, D] -> [B, res, res, D] through the transformer stack."""
        b, h, w, d = x.shape
        tokens = x.reshape(b, h * w, d)
        tokens = tokens + layers.sincos_position_embedding_2d(h, w, d)[None].astype(self.dtype)
        if self.modulation == "shared":
            # adaLN-single: one projection for every block (the blocks add their offsets).
            cond = nn.DenseGeneral(
                (4, d), dtype=jnp.float32, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_uniform(),
                                                         (None, None, "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                       (None, "embed")),
                name="transformer_modulation")(nn.silu(emb))
        else:
            cond = emb  # each block projects it itself
        tokens = TransformerStack(
            self.transformer_depth, self.num_heads, self.mlp_ratio, self._rate(res),
            self.qk_norm, self.modulation, self.scan_layers, self.remat, dtype=self.dtype,
            param_dtype=self.param_dtype, name="transformer")(tokens, cond, train)
        tokens = layers.RMSNorm("embed", dtype=self.dtype, param_dtype=self.param_dtype,
                                name="transformer_norm")(tokens)
        return tokens.reshape(b, h, w, d)


# Model-specific config fields read by `from_config` (besides the common ones).
CONFIG_FIELDS = ("stem", "patch_size", "dwt_levels", "channels", "num_res_blocks",
                 "transformer_width", "transformer_depth", "num_heads", "mlp_ratio", "qk_norm",
                 "modulation", "emb_dim", "logsnr_scale", "dropout", "dropout_from_resolution",
                 "residual", "scan_layers", "remat")
# Fields configs of older runs may lack; from_config defaults them to the old behaviour.
OPTIONAL_FIELDS = ("modulation",)


def from_config(config, dtype: Dtype, param_dtype: Dtype) -> UViT:
    """Builds a UViT from a validated-common `config` (see models.create_model).

    Raises:
      ValueError: naming the offending field and how to fix it.
    """
    stem = config.stem
    if stem not in ("patch", "dwt"):
        raise ValueError(f"config.stem={stem!r}: use 'patch' or 'dwt'.")
    if stem == "patch" and config.patch_size < 1:
        raise ValueError(f"config.patch_size={config.patch_size}: must be >= 1.")
    if stem == "dwt" and config.dwt_levels < 1:
        raise ValueError(f"config.dwt_levels={config.dwt_levels}: must be >= 1.")
    channels = tuple(int(c) for c in config.channels)
    num_res_blocks = tuple(int(n) for n in config.num_res_blocks)
    if len(channels) != len(num_res_blocks):
        raise ValueError(
            f"config.num_res_blocks={num_res_blocks} must have one entry per conv level, like "
            f"config.channels={channels}.")
    if any(c < 1 for c in channels) or any(n < 0 for n in num_res_blocks):
        raise ValueError("config.channels must be positive and config.num_res_blocks >= 0.")
    factor = (config.patch_size if stem == "patch" else 2**config.dwt_levels) * 2**len(channels)
    if config.image_size % factor:
        raise ValueError(
            f"config.image_size={config.image_size} is not divisible by the total downsampling "
            f"{factor} (stem x 2^len(config.channels)); change image_size, the stem "
            "(patch_size / dwt_levels) or the number of conv levels.")
    width, heads = config.transformer_width, config.num_heads
    if heads < 1 or width % heads:
        raise ValueError(
            f"config.transformer_width={width} must be divisible by config.num_heads={heads}.")
    if width % 4:
        raise ValueError(
            f"config.transformer_width={width} must be divisible by 4 (2-D sin-cos positions).")
    if config.transformer_depth < 1:
        raise ValueError(f"config.transformer_depth={config.transformer_depth}: must be >= 1.")
    if config.emb_dim < 1 or config.mlp_ratio <= 0:
        raise ValueError("config.emb_dim and config.mlp_ratio must be positive.")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"config.dropout={config.dropout}: must be in [0, 1).")
    qk_norm = config.qk_norm
    # Run workdirs written before the choice existed store a bool in config.json.
    if isinstance(qk_norm, (bool, np.bool_)):
        qk_norm = "rms_learned" if qk_norm else "none"
    elif not (isinstance(qk_norm, str) and qk_norm in layers.QK_NORMS):
        raise ValueError(
            f"config.qk_norm={qk_norm!r}: use one of {', '.join(map(repr, layers.QK_NORMS))} "
            "(True / False from older configs mean 'rms_learned' / 'none').")
    # A config without the field predates it and means today's default.
    modulation = config.get("modulation", "shared")
    if not (isinstance(modulation, str) and modulation in layers.MODULATIONS):
        raise ValueError(
            f"config.modulation={modulation!r}: use one of "
            f"{', '.join(map(repr, layers.MODULATIONS))} ('shared': one adaLN projection for "
            "all transformer blocks; 'per_block': one per block).")
    return UViT(
        image_size=config.image_size, in_channels=config.in_channels,
        num_classes=config.num_classes, stem=stem, patch_size=config.patch_size,
        dwt_levels=config.dwt_levels, channels=channels, num_res_blocks=num_res_blocks,
        transformer_width=width, transformer_depth=config.transformer_depth, num_heads=heads,
        mlp_ratio=float(config.mlp_ratio), qk_norm=qk_norm, modulation=modulation,
        emb_dim=config.emb_dim,
        logsnr_scale=float(config.logsnr_scale), dropout=float(config.dropout),
        dropout_from_resolution=config.dropout_from_resolution, residual=bool(config.residual),
        scan_layers=bool(config.scan_layers), remat=bool(config.remat), dtype=dtype,
        param_dtype=param_dtype)
