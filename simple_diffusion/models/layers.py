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

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# QK-norm choices of `Attention` (see its docstring); True / False are legacy spellings of
# 'rms_learned' / 'none' from before the choice existed.
QK_NORMS = ("rms_learned", "l2", "none")
# Transformer conditioning choices of `TransformerBlock` (see its docstring).
MODULATIONS = ("shared", "per_block")
# Fixed attention-logit scale (inverse temperature) used with 'l2' QK-norm, as in
# lucidrains' simple_diffusion.py (`scale = 8`), replacing 1/sqrt(head_dim).
L2_ATTENTION_SCALE = 8.0

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
         name: str | None = None) -> nn.Module:
    """A kernel x kernel conv: 'SAME' padding, or a `PatchConv` when strides == kernel > 1.

    Kernel [k, k, in, out] named (None, None, 'conv_in', 'conv_out'); bias ('conv_out',).
    """
    kernel_init = _boxed(_zeros if zero_init else _default_kernel,
                         (None, None, "conv_in", "conv_out"))
    if strides == kernel > 1:
        return PatchConv(features, kernel, kernel_init=kernel_init, dtype=dtype,
                         param_dtype=param_dtype, name=name)
    return nn.Conv(
        features, (kernel, kernel), strides=(strides, strides), padding="SAME",
        dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
        bias_init=_boxed(_zeros, ("conv_out",)), name=name)


def conv_transpose(features: int, stride: int, *, dtype: Dtype = jnp.float32,
                   param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Module:
    """A stride x stride transposed conv with stride `stride`: [B,h,w,*] -> [B,h*s,w*s,features].

    A `PatchConv` with transpose=True: the parameters and values of
    nn.ConvTranspose(features, (s, s), strides=(s, s), padding='VALID').
    """
    return PatchConv(features, stride, transpose=True,
                     kernel_init=_boxed(_default_kernel, (None, None, "conv_in", "conv_out")),
                     dtype=dtype, param_dtype=param_dtype, name=name)


def patch_matmul_default(patch: int) -> bool:
    """Whether `PatchConv` computes with a matmul when not told: on the CPU backend, p > 1.

    XLA:CPU lowers the weight gradient of a stride-p conv to a convolution whose window is
    the whole (p-dilated) image, which runs at about 1 GFLOP/s: about a tenth of the U-ViT's
    train step at 64x64 (docs/benchmarks.md, "Results: CPU train step"). A 1x1 conv is
    faster as a conv there (its matmul's weight gradient needs a transposed copy). GPUs and
    TPUs keep their conv.
    """
    return jax.default_backend() == "cpu" and patch > 1


class PatchConv(nn.Module):
    """A p x p conv with stride p over non-overlapping patches, or (transpose=True) its mirror.

    transpose=False: [B, H, W, C] -> [B, H/p, W/p, features], the values and parameters of
        nn.Conv(features, (p, p), strides=(p, p), padding='VALID').
    transpose=True: [B, h, w, C] -> [B, h*p, w*p, features], those of
        nn.ConvTranspose(features, (p, p), strides=(p, p), padding='VALID'), which uses the
        kernel flipped: out[i*p + dy, j*p + dx] = x[i, j] @ kernel[p-1-dy, p-1-dx].
    Parameters: kernel [p, p, C, features], bias [features], created in nn.Conv's order with
    the given init, so checkpoints and initial values are interchangeable with the nn.Conv
    layers this replaces (tested).

    With `matmul` (default: `patch_matmul_default(p)`: on CPU for p > 1) the patches are
    moved to channels (space-to-depth) and multiplied by the kernel reshaped to
    [p*p*C, features]: the same arithmetic as the conv, whose gradients are then plain
    matmuls. Otherwise lax.conv_general_dilated / lax.conv_transpose, as nn.Conv /
    nn.ConvTranspose.
    """
    features: int
    patch: int
    transpose: bool = False
    kernel_init: Any = _default_kernel
    matmul: bool | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        p, channels = self.patch, x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (p, p, channels, self.features),
                            self.param_dtype)
        bias = self.param("bias", _boxed(_zeros, ("conv_out",)), (self.features,),
                          self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        matmul = patch_matmul_default(p) if self.matmul is None else self.matmul
        b, h, w, _ = x.shape
        if not matmul:
            if self.transpose:
                y = jax.lax.conv_transpose(x, kernel, (p, p), "VALID",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
            else:
                y = jax.lax.conv_general_dilated(x, kernel, (p, p), "VALID",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
        elif self.transpose:
            # [C, p*p*F] with columns ordered (dy, dx, f), of the flipped kernel.
            k = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(channels, p * p * self.features)
            y = (x @ k).reshape(b, h, w, p, p, self.features)
            y = y.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, self.features)
        else:
            patches = x.reshape(b, h // p, p, w // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
            y = patches.reshape(b, h // p, w // p, p * p * channels) @ kernel.reshape(
                p * p * channels, self.features)
        return y + bias


def group_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, num_groups: int,
               epsilon: float = 1e-6) -> jnp.ndarray:
    """GroupNorm of channels-last x [B, ..., C] in float32: the values of nn.GroupNorm.

    Statistics per (example, group) over the spatial axes and the group's C / num_groups
    channels, var = max(0, E[x²] − E[x]²) (flax's fast variance); then scale and bias [C].
    Computed as per-channel sums over the spatial axes (a reduction along the contiguous
    rows of NHWC), summed within groups on [B, C], and the normalisation folded into one
    multiply-add x * a + d with per-(example, channel) a, d [B, C]. flax's version reduces
    a [B, H, W, G, C/G] view; on XLA:CPU this one's backward was about a fifth faster
    (GroupNorm + SiLU, [8, 64, 64, 64]), its forward as fast. Returns float32, x's shape.
    """
    x = x.astype(jnp.float32)
    b, c = x.shape[0], x.shape[-1]
    rows = x.reshape(b, -1, c)
    mean, rstd, _ = _group_statistics(rows, num_groups, epsilon)
    a = rstd * scale.astype(jnp.float32)
    d = bias.astype(jnp.float32) - mean * a
    return (rows * a[:, None, :] + d[:, None, :]).reshape(x.shape)


def _group_statistics(rows: jnp.ndarray, num_groups: int, epsilon: float):
    """GroupNorm statistics of float32 rows [B, N, C]: (mean, rstd, group_mean).

    mean and rstd = 1 / sqrt(max(0, E[x²] − E[x]²) + epsilon) are [B, C], each channel
    holding its group's value; group_mean maps per-channel sums [B, C] over the N rows to
    their group's mean, [B, C] likewise.
    """
    b, n, c = rows.shape
    count = n * (c // num_groups)

    def group_mean(per_channel_sum):
        means = per_channel_sum.reshape(b, num_groups, -1).sum(-1) / count
        return jnp.repeat(means, c // num_groups, axis=1)

    mean = group_mean(jnp.sum(rows, axis=1))
    var = jnp.maximum(0.0, group_mean(jnp.sum(jnp.square(rows), axis=1)) - jnp.square(mean))
    return mean, jax.lax.rsqrt(var + epsilon), group_mean


def fused_norm_silu_default() -> bool:
    """Whether ResBlocks use `group_norm_silu`'s hand-written backward: on the CPU backend.

    XLA:CPU's autodiff of GroupNorm -> modulation -> SiLU takes 7-9 ms of value-and-grad at
    [8, 64, 64, 64] against 4.3-4.5 ms for the hand-written one (docs/benchmarks.md). GPUs
    and TPUs keep autodiff.
    """
    return jax.default_backend() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _group_norm_silu(num_groups, epsilon, rows, scale, bias, mod_scale, mod_shift):
    out, _ = _group_norm_silu_fwd(num_groups, epsilon, rows, scale, bias, mod_scale, mod_shift)
    return out


def _group_norm_silu_parts(num_groups, epsilon, rows, scale, bias, mod_scale, mod_shift):
    """`_group_statistics` plus the [B, C] multiplier k and offset d of z = rows * k + d,
    the pre-SiLU activation: (mean, rstd, k, d, group_mean)."""
    mean, rstd, group_mean = _group_statistics(rows, num_groups, epsilon)
    k = rstd * scale * (1.0 + mod_scale)
    d = (bias - mean * rstd * scale) * (1.0 + mod_scale) + mod_shift
    return mean, rstd, k, d, group_mean


def _group_norm_silu_fwd(num_groups, epsilon, rows, scale, bias, mod_scale, mod_shift):
    _, _, k, d, _ = _group_norm_silu_parts(num_groups, epsilon, rows, scale, bias,
                                           mod_scale, mod_shift)
    out = jax.nn.silu(rows * k[:, None, :] + d[:, None, :])
    return out, (rows, scale, bias, mod_scale, mod_shift)


def _group_norm_silu_bwd(num_groups, epsilon, residuals, dy):
    rows, scale, bias, mod_scale, mod_shift = residuals
    mean, rstd, k, d, group_mean = _group_norm_silu_parts(
        num_groups, epsilon, rows, scale, bias, mod_scale, mod_shift)
    z = rows * k[:, None, :] + d[:, None, :]  # recomputed: cheaper than storing it
    sig = jax.nn.sigmoid(z)
    dz = dy * sig * (1.0 + z * (1.0 - sig))
    sum_dz = jnp.sum(dz, axis=1)  # [B, C]
    sum_dz_xhat = (jnp.sum(dz * rows, axis=1) - mean * sum_dz) * rstd
    kk = scale * (1.0 + mod_scale)  # d(GroupNorm output)/d xhat, modulation included
    m1 = group_mean(kk * sum_dz)  # group means of dxhat and of dxhat * xhat
    m2 = group_mean(kk * sum_dz_xhat)
    # dx = rstd * (dxhat - m1 - xhat * m2), xhat = (x - mean) * rstd, as one multiply-add
    # (rstd * kk = k).
    dx = (dz * k[:, None, :] + rows * (-rstd * rstd * m2)[:, None, :]
          + (rstd * (mean * rstd * m2 - m1))[:, None, :])
    return (dx, jnp.sum((1.0 + mod_scale) * sum_dz_xhat, 0),
            jnp.sum((1.0 + mod_scale) * sum_dz, 0),
            scale * sum_dz_xhat + bias * sum_dz, sum_dz)


_group_norm_silu.defvjp(_group_norm_silu_fwd, _group_norm_silu_bwd)


def group_norm_silu(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, num_groups: int,
                    modulation: tuple[jnp.ndarray, jnp.ndarray] | None = None,
                    epsilon: float = 1e-6) -> jnp.ndarray:
    """silu(group_norm(x) * (1 + s) + t) in float32 with a hand-written backward.

    Args:
      x: channels-last [B, ..., C].
      scale, bias: GroupNorm's affine, [C].
      num_groups: groups of C / num_groups channels.
      modulation: optional (s, t), each [B, C]; none means s = t = 0.
      epsilon: added to the variance.

    Returns float32, x's shape; the values of `group_norm` then the modulation and SiLU (to
    float32 rounding). The backward recomputes the pre-SiLU activation from x and the
    [B, C] statistics and needs two passes over x (one reduction, one multiply-add) where
    XLA:CPU's autodiff of the same ops takes several.
    """
    b, c = x.shape[0], x.shape[-1]
    rows = x.astype(jnp.float32).reshape(b, -1, c)
    zeros = jnp.zeros((b, c), jnp.float32)
    s, t = (zeros, zeros) if modulation is None else (
        modulation[0].astype(jnp.float32), modulation[1].astype(jnp.float32))
    out = _group_norm_silu(num_groups, epsilon, rows, scale.astype(jnp.float32),
                           bias.astype(jnp.float32), s, t)
    return out.reshape(x.shape)


def cotangent_barrier_default() -> bool:
    """Whether transformer blocks put `cotangent_barrier` on their residual stream: on CPU.

    XLA:CPU fuses the residual stream's gradient (a chain of adds through every later
    block's LayerNorm backward) into each of its consumers instead of computing it once,
    so the backward of a depth-d stack does O(d^2) elementwise work: 6 blocks of the
    CPU-reference transformer took 220-255 ms of value-and-grad against 155-165 ms with
    the barrier, and its whole train step 1.17-1.28 s against 1.08-1.18 s
    (docs/benchmarks.md). With XLA:CPU's multi-output fusion (`xla_cpu.set_process_flags`,
    which the command lines call) the plain graph's fusions stay flat too and the two
    time the same (6 blocks: 129-160 ms either way); the barrier stays for processes
    without the flag (a user's own script). GPU and TPU fusion passes bound their fusion
    sizes; they keep the plain graph.
    """
    return jax.default_backend() == "cpu"


def _opaque_identity(x: jnp.ndarray) -> jnp.ndarray:
    """x itself, computed behind a conditional that XLA cannot fold away.

    `lax.optimization_barrier` is removed by XLA:CPU before fusion, and a conditional
    with identical branches is simplified away, so the predicate is one XLA cannot prove
    (a uint32 with its low bit set is never 0) and the never-taken branch differs.
    """
    # One element, indexed without a reshape (which could relayout a sharded x).
    first = x[(0,) * x.ndim].astype(jnp.float32)
    word = jax.lax.bitcast_convert_type(first, jnp.uint32)
    return jax.lax.cond((word | jnp.uint32(1)) != 0, lambda v: v, jnp.zeros_like, x)


@jax.custom_vjp
def cotangent_barrier(x: jnp.ndarray) -> jnp.ndarray:
    """The identity, whose backward materialises the incoming cotangent once.

    Forward: x unchanged (any shape and dtype). Backward: the cotangent unchanged in
    value, but computed into its own buffer, so XLA cannot fuse (and so recompute) the
    producers of the cotangent into each of its consumers.
    """
    return x


cotangent_barrier.defvjp(lambda x: (x, None), lambda _, g: (_opaque_identity(g),))


class _GroupNormParams(nn.Module):
    """`group_norm` with nn.GroupNorm's parameters: scale (ones) and bias (zeros), [C].

    With `silu=True` it returns `group_norm_silu` (optionally modulated) instead.
    """
    num_groups: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, silu: bool = False,
                 modulation: tuple[jnp.ndarray, jnp.ndarray] | None = None) -> jnp.ndarray:
        channels = x.shape[-1]
        scale = self.param("scale", _boxed(_ones, ("conv_out",)), (channels,), self.param_dtype)
        bias = self.param("bias", _boxed(_zeros, ("conv_out",)), (channels,), self.param_dtype)
        if silu:
            return group_norm_silu(x, scale, bias, self.num_groups, modulation)
        return group_norm(x, scale, bias, self.num_groups)


class GroupNorm32(nn.Module):
    """GroupNorm over NHWC with statistics and affine in float32, result cast to `dtype`.

    Uses gcd(32, C) groups so that any channel count works. Parameters norm/scale and
    norm/bias [C], as when this wrapped nn.GroupNorm (same checkpoints); see `group_norm`.
    """
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, silu: bool = False,
                 modulation: tuple[jnp.ndarray, jnp.ndarray] | None = None) -> jnp.ndarray:
        """GroupNorm of x; with silu=True, `group_norm_silu` (modulation (s, t) [B, C])."""
        y = _GroupNormParams(math.gcd(32, x.shape[-1]), param_dtype=self.param_dtype,
                             name="norm")(x, silu, modulation)
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


class L2Norm(nn.Module):
    """L2 normalisation over the last axis in float32 times a learned scale, cast to `dtype`.

    y = x / max(||x||_2, 1e-12) * scale, as `F.normalize` followed by lucidrains' q/k
    scales. The scale [last dim] starts at one and is named (`axis_name`,).
    """
    axis_name: str | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", _boxed(_ones, (self.axis_name,)), (x.shape[-1],),
                           self.param_dtype)
        x = x.astype(jnp.float32)
        # max(sum, eps^2) rather than sum + eps keeps F.normalize's exact semantics and a
        # finite gradient at x = 0.
        x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True),
                                          1e-24))
        return (x * scale.astype(jnp.float32)).astype(self.dtype)


def canonical_qk_norm(value: str | bool) -> str:
    """`value` as one of QK_NORMS: True -> 'rms_learned', False -> 'none' (legacy bools).

    Raises:
      ValueError: for anything else, listing the allowed values.
    """
    if isinstance(value, (bool, np.bool_)):
        return "rms_learned" if value else "none"
    if isinstance(value, str) and value in QK_NORMS:
        return value
    raise ValueError(f"qk_norm={value!r}: use one of {QK_NORMS} (True / False are accepted as "
                     "'rms_learned' / 'none').")


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
        fused = fused_norm_silu_default()
        if fused:
            h = GroupNorm32(**kw, name="norm1")(x, silu=True)
        else:
            h = nn.silu(GroupNorm32(**kw, name="norm1")(x))
        h = conv(self.out_channels, 3, **kw, name="conv1")(h)
        mod = nn.Dense(2 * self.out_channels, dtype=jnp.float32, param_dtype=self.param_dtype,
                       kernel_init=_boxed(_default_kernel, ("embed", "conv_out")),
                       bias_init=_boxed(_zeros, ("conv_out",)), name="emb_proj")(nn.silu(emb))
        scale, shift = jnp.split(mod, 2, axis=-1)  # [B, C] each
        if fused:
            h = GroupNorm32(**kw, name="norm2")(h, silu=True, modulation=(scale, shift))
        else:
            h = GroupNorm32(dtype=jnp.float32, param_dtype=self.param_dtype, name="norm2")(h)
            h = nn.silu(h * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]).astype(
                self.dtype)
        if self.dropout > 0.0:
            h = nn.Dropout(self.dropout, name="dropout")(h, deterministic=not train)
        h = conv(self.out_channels, 3, zero_init=True, **kw, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, **kw, name="skip")(x)
        return x + h


class Attention(nn.Module):
    """Multi-head self-attention over [B, T, D] with a choice of query/key normalisation.

    `qk_norm` (one of QK_NORMS; True / False mean 'rms_learned' / 'none'):
      'rms_learned'  ViT-22B style, used by simple diffusion: q and k are RMS-normalised per
                     head in float32 with learned per-head-dim scales (`query_norm`,
                     `key_norm`); logits scaled by 1/sqrt(head_dim).
      'l2'           lucidrains' U-ViT: q and k are l2-normalised per head in float32 with
                     learned per-head-dim scales (`query_l2norm`, `key_l2norm`, init 1);
                     logits scaled by the fixed L2_ATTENTION_SCALE = 8. Since
                     l2(q) = rms(q) / sqrt(head_dim), this is 'rms_learned' with the
                     logit temperature fixed at 8 instead of sqrt(head_dim).
      'none'         plain q, k; logits scaled by 1/sqrt(head_dim).
    The softmax runs through `jax.nn.dot_product_attention` (float32 logits and softmax for
    bfloat16 inputs). The output projection is zero-initialised.

    Params: query/key/value kernels (`embed_axis`, 'heads', 'head_dim'), output kernel
    ('heads', 'head_dim', `embed_axis`), norm scales ('head_dim',).
    """
    num_heads: int
    qk_norm: str | bool = "rms_learned"
    embed_axis: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        width = x.shape[-1]
        head_dim = width // self.num_heads
        qk_norm = canonical_qk_norm(self.qk_norm)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def project(name):
            return nn.DenseGeneral(
                (self.num_heads, head_dim), **kw,
                kernel_init=_boxed(_default_kernel, (self.embed_axis, "heads", "head_dim")),
                bias_init=_boxed(_zeros, ("heads", "head_dim")), name=name)(x)

        q, k, v = project("query"), project("key"), project("value")
        scale = None  # jax default: 1 / sqrt(head_dim)
        if qk_norm == "rms_learned":
            q = RMSNorm("head_dim", **kw, name="query_norm")(q)
            k = RMSNorm("head_dim", **kw, name="key_norm")(k)
        elif qk_norm == "l2":
            q = L2Norm("head_dim", **kw, name="query_l2norm")(q)
            k = L2Norm("head_dim", **kw, name="key_l2norm")(k)
            scale = L2_ATTENTION_SCALE
        out = jax.nn.dot_product_attention(q, k, v, scale=scale)
        return nn.DenseGeneral(
            width, axis=(-2, -1), **kw,
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

    The block's modulation is [B, 4, D] float32 with rows (shift, scale) before attention
    and (shift, scale) before the MLP: h = LN(x) * (1 + scale) + shift. Where it comes from
    is the `modulation` choice (one of MODULATIONS):
      'shared'     adaLN-single (PixArt-alpha): `cond` is [B, 4, D], one projection of the
                   conditioning embedding shared by every block (made by the caller); each
                   block adds its own learned [4, D] `modulation_offset`, so per-block
                   conditioning costs 4D parameters instead of emb_dim * 4D.
      'per_block'  DiT-style adaLN: `cond` is the conditioning embedding [B, E]; the block
                   has its own zero-initialised `modulation` Dense(SiLU(cond)) -> [4, D]
                   (lucidrains' U-ViT also gives every block its own zero-initialised
                   projection, there onto the MLP hidden layer).
    The two differ only in where the projection lives: 'per_block' with kernel W and bias b
    equals 'shared' given cond = SiLU(emb) W + b and a zero offset.

    `train` is an attribute rather than a call argument so that the block can be wrapped
    by `nn.scan` / `nn.remat` without static-argument plumbing. Returns (x, None) so that
    it is directly scannable.
    """
    num_heads: int
    mlp_ratio: float
    dropout: float = 0.0
    qk_norm: str | bool = "rms_learned"
    modulation: str = "shared"
    train: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, cond: jnp.ndarray):
        width = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.modulation == "shared":
            offset = self.param("modulation_offset", _boxed(_zeros, (None, "embed")), (4, width),
                                self.param_dtype)
            mod = cond.astype(jnp.float32) + offset.astype(jnp.float32)[None]
        elif self.modulation == "per_block":
            # Zero-init (adaLN-Zero style): the block starts unconditioned, like the shared
            # variant whose offsets start at zero on top of a random shared projection.
            mod = nn.DenseGeneral(
                (4, width), dtype=jnp.float32, param_dtype=self.param_dtype,
                kernel_init=_boxed(_zeros, (None, None, "embed")),
                bias_init=_boxed(_zeros, (None, "embed")),
                name="modulation")(nn.silu(cond.astype(jnp.float32)))
        else:
            raise ValueError(f"modulation={self.modulation!r}: use one of {MODULATIONS}.")
        shift1, scale1, shift2, scale2 = (mod[:, i, None, :] for i in range(4))
        barrier = cotangent_barrier if cotangent_barrier_default() else (lambda v: v)

        x = barrier(x)
        h = (layer_norm_f32(x) * (1.0 + scale1) + shift1).astype(self.dtype)
        h = Attention(self.num_heads, qk_norm=self.qk_norm, **kw, name="attention")(h)
        if self.dropout > 0.0:
            h = nn.Dropout(self.dropout, name="attention_dropout")(h, deterministic=not self.train)
        x = barrier(x + h)
        h = (layer_norm_f32(x) * (1.0 + scale2) + shift2).astype(self.dtype)
        h = MLP(int(self.mlp_ratio * width), dropout=self.dropout, **kw, name="mlp")(
            h, train=self.train)
        return x + h, None
