"""Building blocks shared by the U-ViT and the U-Net.

Conventions:
  * Activations are NHWC (conv levels) or [B, T, D] (token levels), computed in
    `dtype` (float32 or bfloat16); parameters are stored in `param_dtype`.
  * Normalisations, their statistics, attention softmax statistics and the noise / class
    embedding are computed in float32 whatever `dtype` is, because these are where
    bfloat16 loses the precision that matters (QK-norm in half precision is a known NaN
    source in ViT diffusion models).
  * Every parameter is boxed with `nn.with_logical_partitioning` using the logical axis
    names 'embed', 'mlp', 'heads', 'head_dim', 'conv_in', 'conv_out', 'classes' (and
    'layers', added by the scanned transformer stack) or None.
  * The last layer of every residual branch is zero-initialised, so each block starts
    as the identity; conditioning therefore has no effect on a freshly initialised
    network until the branches have been trained.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()
# Uniform rather than (truncated) normal: it compiles about twice as fast on XLA:CPU,
# which dominates `init` time for small models.
_default_kernel = nn.initializers.lecun_uniform()


def _boxed(init, names):
    return nn.with_logical_partitioning(init, names)


def sinusoidal_embedding(x: jnp.ndarray, dim: int, max_period: float = 10_000.0) -> jnp.ndarray:
    """Transformer-style sinusoidal features of a scalar per example.

    Args:
      x: [B] float array (any float dtype; promoted to float32).
      dim: even feature width.
      max_period: longest period; frequencies are max_period^(-k / (dim/2)),
        k = 0 .. dim/2 - 1.

    Returns:
      [B, dim] float32: [cos(x * f_k) for all k] followed by [sin(x * f_k) for all k].
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = x.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_position_embedding_2d(height: int, width: int, dim: int) -> jnp.ndarray:
    """Fixed 2-D sin-cos position embedding, [height * width, dim] float32 (row-major).

    Half the features encode the row index and half the column index, each with
    `sinusoidal_embedding` (dim must be divisible by 4). Parameter-free, so a model can be
    run at another resolution without resizing a learned table.
    """
    rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    return jnp.concatenate(
        [sinusoidal_embedding(rows.reshape(-1), dim // 2),
         sinusoidal_embedding(cols.reshape(-1), dim // 2)], axis=-1)


def conv(features: int, kernel: int, *, strides: int = 1, zero_init: bool = False,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         name: str | None = None) -> nn.Conv:
    """A kernel x kernel conv ('SAME' padding, or 'VALID' when it is a strided patching conv).

    Kernel [k, k, in, out] named (None, None, 'conv_in', 'conv_out'); bias ('conv_out',).
    """
    padding = "VALID" if strides == kernel and strides > 1 else "SAME"
    return nn.Conv(
        features, (kernel, kernel), strides=(strides, strides), padding=padding,
        dtype=dtype, param_dtype=param_dtype,
        kernel_init=_boxed(_zeros if zero_init else _default_kernel,
                           (None, None, "conv_in", "conv_out")),
        bias_init=_boxed(_zeros, ("conv_out",)), name=name)


def conv_transpose(features: int, stride: int, *, dtype: Dtype = jnp.float32,
                   param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.ConvTranspose:
    """A stride x stride transposed conv with stride `stride`: [B,h,w,*] -> [B,h*s,w*s,features]."""
    return nn.ConvTranspose(
        features, (stride, stride), strides=(stride, stride), padding="VALID",
        dtype=dtype, param_dtype=param_dtype,
        kernel_init=_boxed(_default_kernel, (None, None, "conv_in", "conv_out")),
        bias_init=_boxed(_zeros, ("conv_out",)), name=name)


class GroupNorm32(nn.Module):
    """GroupNorm over NHWC with statistics and affine in float32, result cast to `dtype`.

    Uses gcd(32, C) groups so that any channel count works.
    """
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = nn.GroupNorm(
            num_groups=math.gcd(32, x.shape[-1]), dtype=jnp.float32, param_dtype=self.param_dtype,
            scale_init=_boxed(_ones, ("conv_out",)), bias_init=_boxed(_zeros, ("conv_out",)),
            name="norm")(x.astype(jnp.float32))
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis in float32 with a learned scale, cast to `dtype`.

    The scale is named (`axis_name`,).
    """
    axis_name: str | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", _boxed(_ones, (self.axis_name,)), (x.shape[-1],),
                           self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return (x * scale.astype(jnp.float32)).astype(self.dtype)


def layer_norm_f32(x: jnp.ndarray, epsilon: float = 1e-6) -> jnp.ndarray:
    """Parameter-free LayerNorm over the last axis, float32 in and out."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + epsilon)


class ConditioningEmbedding(nn.Module):
    """Noise-level and class embedding: [B] logsnr (+ [B] labels) -> [B, emb_dim] float32.

    emb = MLP(sinusoidal(logsnr_scale * logsnr)) + class_table[labels]. The class table has
    num_classes + 1 rows; row num_classes is the null class for classifier-free guidance.
    With num_classes == 0 there is no table and labels are ignored. Computed in float32.
    """
    emb_dim: int
    num_classes: int
    logsnr_scale: float
    frequency_dim: int = 256
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, logsnr: jnp.ndarray, labels: jnp.ndarray | None) -> jnp.ndarray:
        features = sinusoidal_embedding(self.logsnr_scale * logsnr.astype(jnp.float32),
                                        self.frequency_dim)
        h = nn.Dense(self.emb_dim, dtype=jnp.float32, param_dtype=self.param_dtype,
                     kernel_init=_boxed(_default_kernel, (None, "embed")),
                     bias_init=_boxed(_zeros, ("embed",)), name="logsnr_in")(features)
        h = nn.Dense(self.emb_dim, dtype=jnp.float32, param_dtype=self.param_dtype,
                     kernel_init=_boxed(_default_kernel, (None, "embed")),
                     bias_init=_boxed(_zeros, ("embed",)), name="logsnr_out")(nn.silu(h))
        if self.num_classes > 0:
            if labels is None:
                raise ValueError(
                    f"labels are required for a class-conditional model (num_classes="
                    f"{self.num_classes}); pass labels={self.num_classes} (the null class) "
                    "for unconditional samples.")
            table = nn.Embed(self.num_classes + 1, self.emb_dim, dtype=jnp.float32,
                             param_dtype=self.param_dtype,
                             embedding_init=_boxed(nn.initializers.normal(1.0),
                                                   ("classes", "embed")),
                             name="class_embedding")
            h = h + table(labels.astype(jnp.int32))
        return h


class ResBlock(nn.Module):
    """Conv residual block: GN-SiLU-conv3x3, scale/shift from emb, GN-SiLU-dropout-conv3x3.

    [B, H, W, C_in] -> [B, H, W, out_channels]; a 1x1 conv maps the skip when C_in differs.
    The conditioning is h = GN(h) * (1 + scale) + shift with (scale, shift) = Dense(emb).
    """
    out_channels: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray, train: bool) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm32(**kw, name="norm1")(x))
        h = conv(self.out_channels, 3, **kw, name="conv1")(h)
        mod = nn.Dense(2 * self.out_channels, dtype=jnp.float32, param_dtype=self.param_dtype,
                       kernel_init=_boxed(_default_kernel, ("embed", "conv_out")),
                       bias_init=_boxed(_zeros, ("conv_out",)), name="emb_proj")(nn.silu(emb))
        scale, shift = jnp.split(mod[:, None, None, :], 2, axis=-1)
        h = GroupNorm32(dtype=jnp.float32, param_dtype=self.param_dtype, name="norm2")(h)
        h = nn.silu(h * (1.0 + scale) + shift).astype(self.dtype)
        if self.dropout > 0.0:
            h = nn.Dropout(self.dropout, name="dropout")(h, deterministic=not train)
        h = conv(self.out_channels, 3, zero_init=True, **kw, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, **kw, name="skip")(x)
        return x + h


class Attention(nn.Module):
    """Multi-head self-attention over [B, T, D] with optional query/key RMS normalisation.

    QK-norm (ViT-22B style, used by simple diffusion) normalises q and k per head in
    float32 with learned per-head-dim scales; the softmax runs through
    `jax.nn.dot_product_attention` (float32 logits and softmax for bfloat16 inputs).
    The output projection is zero-initialised.

    Params: query/key/value kernels (`embed_axis`, 'heads', 'head_dim'), output kernel
    ('heads', 'head_dim', `embed_axis`).
    """
    num_heads: int
    qk_norm: bool = True
    embed_axis: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        width = x.shape[-1]
        head_dim = width // self.num_heads

        def project(name):
            return nn.DenseGeneral(
                (self.num_heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=_boxed(_default_kernel, (self.embed_axis, "heads", "head_dim")),
                bias_init=_boxed(_zeros, ("heads", "head_dim")), name=name)(x)

        q, k, v = project("query"), project("key"), project("value")
        if self.qk_norm:
            q = RMSNorm("head_dim", dtype=self.dtype, param_dtype=self.param_dtype,
                        name="query_norm")(q)
            k = RMSNorm("head_dim", dtype=self.dtype, param_dtype=self.param_dtype,
                        name="key_norm")(k)
        out = jax.nn.dot_product_attention(q, k, v)
        return nn.DenseGeneral(
            width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_boxed(_zeros, ("heads", "head_dim", self.embed_axis)),
            bias_init=_boxed(_zeros, (self.embed_axis,)), name="out")(out)


class MLP(nn.Module):
    """Dense(hidden) - GELU - dropout - Dense(D) over [B, T, D]; the last Dense is zero-init."""
    hidden: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        width = x.shape[-1]
        h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=_boxed(_default_kernel, ("embed", "mlp")),
                     bias_init=_boxed(_zeros, ("mlp",)), name="in")(x)
        h = nn.gelu(h)
        if self.dropout > 0.0:
            h = nn.Dropout(self.dropout, name="dropout")(h, deterministic=not train)
        return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=_boxed(_zeros, ("mlp", "embed")),
                        bias_init=_boxed(_zeros, ("embed",)), name="out")(h)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block over tokens [B, T, D], conditioned by adaptive LayerNorm.

    `modulation` [B, 4, D] float32 is a shared projection of the conditioning embedding
    (adaLN-single, as in PixArt-alpha); each block adds its own learned [4, D] offset,
    which keeps per-block conditioning at 4D parameters instead of emb_dim * 4D. Rows are
    (shift, scale) before attention and (shift, scale) before the MLP.

    `train` is an attribute rather than a call argument so that the block can be wrapped
    by `nn.scan` / `nn.remat` without static-argument plumbing. Returns (x, None) so that
    it is directly scannable.
    """
    num_heads: int
    mlp_ratio: float
    dropout: float = 0.0
    qk_norm: bool = True
    train: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, modulation: jnp.ndarray):
        width = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        offset = self.param("modulation_offset", _boxed(_zeros, (None, "embed")), (4, width),
                            self.param_dtype)
        mod = modulation + offset.astype(jnp.float32)[None]
        shift1, scale1, shift2, scale2 = (mod[:, i, None, :] for i in range(4))

        h = (layer_norm_f32(x) * (1.0 + scale1) + shift1).astype(self.dtype)
        h = Attention(self.num_heads, qk_norm=self.qk_norm, **kw, name="attention")(h)
        if self.dropout > 0.0:
            h = nn.Dropout(self.dropout, name="attention_dropout")(h, deterministic=not self.train)
        x = x + h
        h = (layer_norm_f32(x) * (1.0 + scale2) + shift2).astype(self.dtype)
        h = MLP(int(self.mlp_ratio * width), dropout=self.dropout, **kw, name="mlp")(
            h, train=self.train)
        return x + h, None
