"""The 5/3 (LeGall / CDF 5/3, JPEG 2000) discrete wavelet transform and its exact inverse.

Used as the U-ViT's first-layer downsampling stem (simple diffusion §3.3): the image is
transformed with `levels` 2-D DWT levels and the sub-bands are stacked on channels, so a
[B, H, W, C] image becomes [B, H/2^L, W/2^L, C * 4^L]; the output head inverts it.

The transform is the float (non-rounding) lifting scheme with whole-sample symmetric
boundary extension, so it is linear and `dwt53_inverse(dwt53_forward(x)) == x` up to
float rounding. Per 1-D step on a signal x of even length n (s = x[0::2], d = x[1::2]):

  predict:  d[i] <- x[2i+1] - (x[2i] + x[2i+2]) / 2        (x[n] := x[n-2])
  update:   s[i] <- x[2i]   + (d[i-1] + d[i]) / 4           (d[-1] := d[0])

This is JPEG 2000's normalisation: the low band has DC gain 1 (a [-1, 1] image keeps
its range) and the high band has DC gain 0. Analysis filters: low
[-1, 2, 6, 2, -1] / 8, high [-1, 2, -1] / 2.

Channel layout of one 2-D level applied to C channels: [LL, LH, HL, HH], each C wide,
where the first letter is the filter along H and the second along W. With several
levels, the output is [LL_L, bands_L, bands_{L-1}, ..., bands_1]; the finer bands_l
([B, H/2^l, W/2^l, 3C]) are moved to the coarsest grid by space-to-depth with block
f = 2^(L-l), laid out as [..., f_h, f_w, 3C] -> channels.
"""

from jax import lax
import jax.numpy as jnp


def _shift_next(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    """y[i] = x[i+1], with the last element repeated (whole-sample symmetric extension)."""
    n = x.shape[axis]
    return jnp.concatenate(
        [lax.slice_in_dim(x, 1, n, axis=axis), lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)


def _shift_prev(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    """y[i] = x[i-1], with the first element repeated (whole-sample symmetric extension)."""
    n = x.shape[axis]
    return jnp.concatenate(
        [lax.slice_in_dim(x, 0, 1, axis=axis), lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)


def _lift_forward(x: jnp.ndarray, axis: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One 1-D 5/3 analysis step along `axis` (even length n): returns (low, high), n/2 each."""
    n = x.shape[axis]
    even = lax.slice_in_dim(x, 0, n, stride=2, axis=axis)
    odd = lax.slice_in_dim(x, 1, n, stride=2, axis=axis)
    high = odd - 0.5 * (even + _shift_next(even, axis))
    low = even + 0.25 * (_shift_prev(high, axis) + high)
    return low, high


def _lift_inverse(low: jnp.ndarray, high: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Exact inverse of `_lift_forward`: undoes update then predict and re-interleaves."""
    even = low - 0.25 * (_shift_prev(high, axis) + high)
    odd = high + 0.5 * (even + _shift_next(even, axis))
    stacked = jnp.stack([even, odd], axis=axis + 1)
    shape = list(low.shape)
    shape[axis] *= 2
    return stacked.reshape(shape)


def _space_to_depth(x: jnp.ndarray, f: int) -> jnp.ndarray:
    """[B, H, W, C] -> [B, H/f, W/f, f*f*C], block laid out as (f_h, f_w, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // f, w // f, f * f * c)


def _depth_to_space(x: jnp.ndarray, f: int) -> jnp.ndarray:
    """Inverse of `_space_to_depth`."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, f, f, c // (f * f)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * f, w * f, c // (f * f))


def _check_shape(shape: tuple[int, ...], levels: int) -> None:
    if levels < 1:
        raise ValueError(f"dwt levels must be >= 1, got {levels}.")
    factor = 2**levels
    if len(shape) != 4 or shape[1] % factor or shape[2] % factor:
        raise ValueError(
            f"5/3 DWT with {levels} levels needs a [B, H, W, C] input with H and W divisible "
            f"by {factor}; got shape {tuple(shape)}.")


def dwt53_forward(x: jnp.ndarray, levels: int = 1) -> jnp.ndarray:
    """Multi-level 2-D 5/3 DWT with sub-bands stacked on channels.

    Args:
      x: [B, H, W, C] float array; H and W divisible by 2**levels.
      levels: number of DWT levels L >= 1.

    Returns:
      [B, H/2^L, W/2^L, C*4^L] array of x's dtype, channel layout as in the module
      docstring.
    """
    _check_shape(x.shape, levels)
    details = []
    low = x
    for _ in range(levels):
        l_rows, h_rows = _lift_forward(low, axis=1)
        ll, lh = _lift_forward(l_rows, axis=2)
        hl, hh = _lift_forward(h_rows, axis=2)
        details.append(jnp.concatenate([lh, hl, hh], axis=-1))
        low = ll
    outputs = [low]
    for level in range(levels, 0, -1):
        outputs.append(_space_to_depth(details[level - 1], 2**(levels - level)))
    return jnp.concatenate(outputs, axis=-1)


def dwt53_inverse(y: jnp.ndarray, levels: int = 1) -> jnp.ndarray:
    """Exact inverse of `dwt53_forward`: [B, h, w, C*4^L] -> [B, h*2^L, w*2^L, C]."""
    if y.shape[-1] % (4**levels):
        raise ValueError(
            f"inverse 5/3 DWT with {levels} levels needs channels divisible by {4**levels}; "
            f"got shape {tuple(y.shape)}.")
    c = y.shape[-1] // 4**levels
    low = y[..., :c]
    offset = c
    for level in range(levels, 0, -1):
        f = 2**(levels - level)
        width = 3 * c * f * f
        bands = _depth_to_space(y[..., offset:offset + width], f)
        offset += width
        lh, hl, hh = bands[..., :c], bands[..., c:2 * c], bands[..., 2 * c:]
        l_rows = _lift_inverse(low, lh, axis=2)
        h_rows = _lift_inverse(hl, hh, axis=2)
        low = _lift_inverse(l_rows, h_rows, axis=1)
    return low
