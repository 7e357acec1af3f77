"""layers/conv: every CPU route of ``conv2d`` (Winograd F(2x2, 3x3), patch matmul, XLA convolution with the per-tap
kernel gradient, XLA's strided convolution) against torch's ``conv2d``: values, input gradient and kernel gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_foundry_jax.layers.conv import (
    MATMUL_CONV_MAX_POSITIONS,
    WINOGRAD_MIN_CHANNELS,
    WINOGRAD_MIN_TILES,
    conv2d,
    kernel_grad_by_taps,
)

# (batch, height, width, in, out, k, stride, padding): maps above and below the patch-matmul limit, 1x1 / 2x2 /
# 3x3 kernels, asymmetric padding (the transposed conv's phases), more input than output channels and the reverse;
# the last two are wide enough for Winograd, with an odd output (a cropped tile row / column).
CASES = [
    (2, 17, 19, 5, 7, 3, 1, ((1, 1), (1, 1))),
    (2, 20, 18, 9, 4, 3, 1, ((1, 1), (1, 1))),
    (1, 18, 17, 3, 6, 2, 1, ((1, 0), (0, 1))),
    (2, 17, 17, 6, 3, 1, 1, ((0, 0), (0, 0))),
    (2, 19, 18, 4, 4, 3, 1, ((0, 2), (2, 0))),
    (2, 6, 6, 4, 5, 3, 1, ((1, 1), (1, 1))),
    (2, 9, 11, 5, 7, 3, 2, ((1, 1), (1, 1))),
    (2, 34, 33, 3, 4, 3, 2, ((1, 1), (1, 1))),
    (1, 31, 33, 256, 5, 3, 1, ((1, 1), (1, 1))),
    (1, 34, 33, 6, 256, 3, 1, ((0, 2), (2, 0))),
]


def _winograd(b, h, w, cin, cout, k, stride, padding):
    tiles = b * -(-(h + sum(padding[0]) - 2) // 2) * -(-(w + sum(padding[1]) - 2) // 2)
    return (k, stride) == (3, 1) and tiles >= WINOGRAD_MIN_TILES and max(cin, cout) >= WINOGRAD_MIN_CHANNELS


def _torch_conv(x, w, stride, padding):
    import torch

    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_()
    (top, bottom), (left, right) = padding
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(xt, (left, right, top, bottom)), wt, stride=stride)
    (y**2).sum().backward()
    return (
        y.detach().numpy().transpose(0, 2, 3, 1),
        xt.grad.numpy().transpose(0, 2, 3, 1),
        wt.grad.numpy().transpose(2, 3, 1, 0),
    )


@pytest.mark.parametrize("b,h,w,cin,cout,k,stride,padding", CASES)
def test_conv2d_values_and_gradients_match_torch(b, h, w, cin, cout, k, stride, padding):
    rng = np.random.default_rng(h * w + k)
    x = rng.normal(size=(b, h, w, cin)).astype(np.float32)
    kernel = (rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    want_y, want_dx, want_dw = _torch_conv(x, kernel, stride, padding)

    def loss(x, kernel):
        y = conv2d(x, kernel, stride, padding)
        return jnp.sum(y**2), y

    (_, y), (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(jnp.asarray(x), jnp.asarray(kernel))
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=2e-3)


def test_the_cases_cover_each_route():
    assert sum(_winograd(*c) for c in CASES) == 2
    cases = [c for c in CASES if not _winograd(*c)]
    positions = [((h + sum(p[0]) - k) // s + 1) * ((w + sum(p[1]) - k) // s + 1) for _, h, w, _, _, k, s, p in cases]
    strides = [s for *_, s, _ in cases]
    assert any(n <= MATMUL_CONV_MAX_POSITIONS for n in positions)  # patch matmul
    assert any(
        n > MATMUL_CONV_MAX_POSITIONS and s == 1 for n, s in zip(positions, strides, strict=True)
    )  # per-tap grad
    assert any(
        n > MATMUL_CONV_MAX_POSITIONS and s > 1 for n, s in zip(positions, strides, strict=True)
    )  # XLA's strided conv


def test_kernel_grad_by_taps_is_the_sum_over_positions():
    """Against the definition, in NumPy: ``dW[i, j, c, o] = sum_{b, y, x} xpad[b, y + i, x + j, c] g[b, y, x, o]``."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 7, 8, 4)).astype(np.float32)
    padding = ((2, 0), (1, 1))
    g = rng.normal(size=(3, 7, 8, 5)).astype(np.float32)  # output of a 3x3 conv with that padding
    xp = np.pad(x, ((0, 0), *padding, (0, 0)))
    want = np.zeros((3, 3, 4, 5), np.float32)
    for i in range(3):
        for j in range(3):
            want[i, j] = np.einsum("byxc,byxo->co", xp[:, i : i + 7, j : j + 8], g)
    got = kernel_grad_by_taps(jnp.asarray(x), jnp.asarray(g), (3, 3), padding)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
