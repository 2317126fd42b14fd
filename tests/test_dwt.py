"""Tests for the 5/3 DWT stem against float64 NumPy re-derivations."""

import jax
import numpy as np
import pytest

from simple_diffusion.models import dwt

# Jitted once per shape: op-by-op dispatch of the many slices costs more than compiling.
_forward = jax.jit(dwt.dwt53_forward, static_argnums=1)
_inverse = jax.jit(dwt.dwt53_inverse, static_argnums=1)


def _mirror(i: int, n: int) -> int:
    """Whole-sample symmetric extension index: x[-i] = x[i], x[n-1+i] = x[n-1-i]."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


def _lifting_1d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """5/3 lifting on a 1-D float64 signal, element by element, extending x symmetrically."""
    n = len(x)
    xe = lambda i: x[_mirror(i, n)]

    def high_at(i):  # predict step, valid for any i thanks to the extension of x
        return xe(2 * i + 1) - 0.5 * (xe(2 * i) + xe(2 * i + 2))

    high = np.array([high_at(i) for i in range(n // 2)])
    low = np.array([xe(2 * i) + 0.25 * (high_at(i - 1) + high_at(i)) for i in range(n // 2)])
    return low, high


def _filter_bank_1d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same transform as a 5-tap / 3-tap analysis filter bank (JPEG 2000 5/3 filters)."""
    n = len(x)
    lo_taps = np.array([-1.0, 2.0, 6.0, 2.0, -1.0]) / 8.0
    hi_taps = np.array([-1.0, 2.0, -1.0]) / 2.0
    low = [sum(lo_taps[k + 2] * x[_mirror(2 * i + k, n)] for k in range(-2, 3))
           for i in range(n // 2)]
    high = [sum(hi_taps[k + 1] * x[_mirror(2 * i + 1 + k, n)] for k in range(-1, 2))
            for i in range(n // 2)]
    return np.array(low), np.array(high)


def _apply_1d(fn, x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    moved = np.moveaxis(x, axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    outs = [fn(row) for row in flat]
    low = np.stack([o[0] for o in outs]).reshape(moved.shape[:-1] + (-1,))
    high = np.stack([o[1] for o in outs]).reshape(moved.shape[:-1] + (-1,))
    return np.moveaxis(low, -1, axis), np.moveaxis(high, -1, axis)


def _reference_dwt(x: np.ndarray, levels: int, fn=_lifting_1d) -> np.ndarray:
    """Multi-level 2-D DWT with the layout documented in dwt.py, in float64 loops."""
    b, h, w, c = x.shape
    details, low = [], x.astype(np.float64)
    for _ in range(levels):
        l_rows, h_rows = _apply_1d(fn, low, axis=1)
        ll, lh = _apply_1d(fn, l_rows, axis=2)
        hl, hh = _apply_1d(fn, h_rows, axis=2)
        details.append(np.concatenate([lh, hl, hh], axis=-1))
        low = ll
    hc, wc = h // 2**levels, w // 2**levels
    out = [low]
    for level in range(levels, 0, -1):
        band = details[level - 1]
        f = 2**(levels - level)
        moved = np.zeros((b, hc, wc, f * f * band.shape[-1]))
        for i in range(hc):
            for j in range(wc):
                for fi in range(f):
                    for fj in range(f):
                        start = (fi * f + fj) * band.shape[-1]
                        moved[:, i, j, start:start + band.shape[-1]] = band[:, i * f + fi,
                                                                            j * f + fj]
        out.append(moved)
    return np.concatenate(out, axis=-1)


def test_lifting_reference_equals_filter_bank():
    # Ties the two NumPy references together, boundaries included.
    x = np.random.default_rng(0).normal(size=12)
    for a, b in zip(_lifting_1d(x), _filter_bank_1d(x)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("levels,shape", [(1, (2, 8, 12, 3)), (2, (1, 16, 8, 2)),
                                          (3, (1, 16, 16, 1))])
def test_forward_matches_float64_numpy(levels, shape):
    x = np.random.default_rng(levels).uniform(-1, 1, size=shape).astype(np.float32)
    got = np.asarray(_forward(x, levels))
    want = _reference_dwt(x.astype(np.float64), levels)
    assert got.shape == (shape[0], shape[1] // 2**levels, shape[2] // 2**levels,
                         shape[3] * 4**levels)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_forward_matches_filter_bank_two_levels():
    x = np.random.default_rng(7).uniform(-1, 1, size=(1, 8, 8, 2)).astype(np.float32)
    want = _reference_dwt(x.astype(np.float64), 2, fn=_filter_bank_1d)
    np.testing.assert_allclose(np.asarray(_forward(x, 2)), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("levels", [1, 3])
def test_inverse_is_exact_to_float32_precision(levels):
    x = np.random.default_rng(10 + levels).uniform(-1, 1, size=(2, 32, 16, 3)).astype(np.float32)
    y = _forward(x, levels)
    back = np.asarray(_inverse(y, levels))
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, x, rtol=0, atol=4 * np.finfo(np.float32).eps)


def test_inverse_of_arbitrary_coefficients_round_trips():
    # The transform is a bijection, so forward(inverse(y)) == y as well.
    y = np.random.default_rng(3).normal(size=(1, 4, 4, 16)).astype(np.float32)
    again = np.asarray(_forward(_inverse(y, 2), 2))
    np.testing.assert_allclose(again, y, rtol=0, atol=1e-5)


def test_constant_image_has_only_a_low_band():
    x = np.full((1, 8, 8, 2), 0.75, np.float32)
    y = np.asarray(_forward(x, 2))
    np.testing.assert_allclose(y[..., :2], 0.75, atol=1e-7)  # DC gain 1 in the LL band
    np.testing.assert_allclose(y[..., 2:], 0.0, atol=1e-7)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="divisible by 4"):
        dwt.dwt53_forward(np.zeros((1, 6, 8, 1), np.float32), 2)
    with pytest.raises(ValueError, match="channels divisible by 16"):
        dwt.dwt53_inverse(np.zeros((1, 2, 2, 8), np.float32), 2)
