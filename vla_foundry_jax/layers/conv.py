"""2-D convolution, channels-last (``NHWC`` input, ``HWIO`` kernel), with PyTorch's layout conventions.

``Conv2d(din, dout, k)`` is torch's ``nn.Conv2d(din, dout, k, stride, padding)`` (a torch ``weight [out, in, kh, kw]``
maps by ``transpose(2, 3, 1, 0)``); ``transpose=True`` is ``nn.ConvTranspose2d(din, dout, k, stride, padding)``
(a torch ``weight [in, out, kh, kw]`` maps by ``[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)``): the convolution over
the stride-dilated input, computed as one ordinary convolution per output phase, interleaved, because XLA's CPU
backend differentiates input-dilated convolutions about 100x slower. Init: PyTorch's default ``U(+-1/sqrt(fan_in))``
for kernel and bias (a transposed conv's fan-in counts its *output* channels, as torch's). Logical axes
``(None, None, "conv_in", "conv_out")`` and ``("conv_out",)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.layers.dense import torch_uniform

Padding = int | tuple[tuple[int, int], tuple[int, int]]


class Conv2d(nnx.Module):
    """Channels-last convolution (module docstring); ``padding``: symmetric int (default ``(k - 1) // 2``) or
    ``((top, bottom), (left, right))`` (not with ``transpose``)."""

    def __init__(
        self,
        din: int,
        dout: int,
        k: int,
        *,
        stride: int = 1,
        padding: Padding | None = None,
        transpose: bool = False,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
    ):
        p = (k - 1) // 2 if padding is None else padding
        if transpose and not isinstance(p, int):
            raise ValueError(f"a transposed Conv2d takes a symmetric int padding, got {p!r}.")
        self.dtype = dtype
        self.stride = stride
        self.transpose = transpose
        self.padding = ((p, p), (p, p)) if isinstance(p, int) else tuple(tuple(q) for q in p)
        fan_in = (dout if transpose else din) * k * k
        self.kernel = nnx.Param(
            torch_uniform(rngs.params(), (k, k, din, dout), fan_in, param_dtype),
            out_sharding=(None, None, "conv_in", "conv_out"),
        )
        self.bias = nnx.Param(torch_uniform(rngs.params(), (dout,), fan_in, param_dtype), out_sharding=("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        kernel = self.kernel[...].astype(dt)
        if self.transpose:
            y = transposed_conv_by_phases(x.astype(dt), kernel, self.stride, self.padding[0][0])
        else:
            y = conv2d(x.astype(dt), kernel, self.stride, self.padding)
        return y + self.bias[...].astype(dt)


# Output positions up to which a CPU convolution runs as one matmul over gathered patches (below).
MATMUL_CONV_MAX_POSITIONS = 256
# A float32 3x3 stride-1 CPU convolution runs as Winograd F(2x2, 3x3) (:func:`winograd_conv3x3`) when it has at least
# this many 2x2 output tiles over the batch (rows of each of its 16 matmuls) and this many channels on its wider side:
# there the 2.25x fewer multiplies outweigh the transforms' extra passes over memory.
WINOGRAD_MIN_TILES = 256
WINOGRAD_MIN_CHANNELS = 256


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """``NHWC`` x ``HWIO`` cross-correlation. On CPU, float32 3x3 stride-1 convolutions with enough tiles and
    channels (the constants above) run as :func:`winograd_conv3x3` (fwd + bwd on 4 x 32 x 32, 256 -> 256: 25 -> 18
    ms; 4 x 16 x 16, 1536 -> 512: 76 -> 53 ms; level on 4 x 64 x 64, 128 -> 128 and slower on 4 x 8 x 8, which the
    constants exclude). Other maps of at most :data:`MATMUL_CONV_MAX_POSITIONS` output positions (a UNet's 8x8
    level) go through :func:`conv_as_matmul`: there the kernel outweighs the activations, and XLA's CPU convolution
    gradient spends most of its time reversing and transposing the kernel (fwd + bwd of a 3x3 conv on 4 x 8 x 8,
    1024 -> 1024: 57 -> 25 ms; no gain at 32 x 32). Larger stride-1 maps keep XLA's convolution but take their
    kernel gradient from :func:`kernel_grad_by_taps`."""
    kh, kw, C, O = kernel.shape
    ho = (x.shape[1] + sum(padding[0]) - kh) // stride + 1
    wo = (x.shape[2] + sum(padding[1]) - kw) // stride + 1
    if jax.default_backend() == "cpu":
        tiles = x.shape[0] * -(-ho // 2) * -(-wo // 2)
        winograd = (kh, kw, stride) == (3, 3, 1) and x.dtype == kernel.dtype == jnp.float32
        if winograd and tiles >= WINOGRAD_MIN_TILES and max(C, O) >= WINOGRAD_MIN_CHANNELS:
            return winograd_conv3x3(x, kernel, padding)
        if ho * wo <= MATMUL_CONV_MAX_POSITIONS:
            return conv_as_matmul(x, kernel, stride, padding)
        if stride == 1:
            return _conv_with_tap_kernel_grad(x, kernel, padding)
    return _conv(x, kernel, stride, padding)


def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_with_tap_kernel_grad(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]):
    """A stride-1 :func:`_conv` whose kernel gradient is :func:`kernel_grad_by_taps` (input gradient: XLA's)."""
    return _conv(x, kernel, 1, padding)


def _tap_fwd(x, kernel, padding):
    return _conv(x, kernel, 1, padding), (x, kernel)


def _tap_bwd(padding, res, g):
    x, kernel = res
    (dx,) = jax.vjp(lambda x: _conv(x, kernel, 1, padding), x)[1](g)
    return dx, kernel_grad_by_taps(x, g, kernel.shape[:2], padding).astype(kernel.dtype)


_conv_with_tap_kernel_grad.defvjp(_tap_fwd, _tap_bwd)


def kernel_grad_by_taps(
    x: jax.Array, g: jax.Array, taps: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]
) -> jax.Array:
    """Kernel gradient ``[kh, kw, C, O]`` of a stride-1 ``NHWC`` conv with output gradient ``g``, as ``kh * kw``
    plain matmuls. Flattened over ``(batch, padded row, padded column)``, tap ``(i, j)`` pairs input position
    ``q + i * Wp + j`` with output position ``q`` (``g`` zero-padded to the padded map, so no pair crosses a row or
    an image), so each tap is one ``[C, N] @ [N, O]`` product with one operand shifted by whole rows. The larger of
    ``x`` / ``g`` is transposed once (held by an optimization barrier: XLA:CPU would otherwise fold the transpose
    into the dot and run it on its slow transposed-operand path) and the smaller is shifted per tap. XLA:CPU's own
    kernel gradient, a convolution whose window is the whole map, ran 1.0-5.4x slower than this on a UNet's shapes
    (2 threads; equal only for 3x3 512 -> 512 on 16 x 16, which now runs as a patch matmul anyway)."""
    kh, kw = taps
    B, _, _, C = x.shape
    Ho, Wo, O = g.shape[1:]
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    Hp, Wp = xp.shape[1:3]
    n = B * Hp * Wp
    xf = xp.reshape(n, C)
    gf = jnp.pad(g, ((0, 0), (0, Hp - Ho), (0, Wp - Wo), (0, 0))).reshape(n, O)
    offsets = [i * Wp + j for i in range(kh) for j in range(kw)]
    last = offsets[-1]
    if C >= O:  # transpose x, shift g down by each offset: sum_q x[q] g[q - o]
        xT = jax.lax.optimization_barrier(xf.T)
        gs = jnp.pad(gf, ((last, 0), (0, 0)))
        grads = [xT @ gs[last - o : last - o + n] for o in offsets]
        return jnp.stack(grads).reshape(kh, kw, C, O)
    gT = jax.lax.optimization_barrier(gf.T)  # transpose g, shift x up by each offset: sum_q x[q + o] g[q]
    xs = jnp.pad(xf, ((0, last), (0, 0)))
    grads = [gT @ xs[o : o + n] for o in offsets]
    return jnp.stack(grads).reshape(kh, kw, O, C).transpose(0, 1, 3, 2)


def _winograd_input(d0: jax.Array, d1: jax.Array, d2: jax.Array, d3: jax.Array) -> tuple[jax.Array, ...]:
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3  # B^T d


def _winograd_kernel(g0: jax.Array, g1: jax.Array, g2: jax.Array) -> tuple[jax.Array, ...]:
    mid = 0.5 * (g0 + g2)
    return g0, mid + 0.5 * g1, mid - 0.5 * g1, g2  # G g


def _winograd_output(m0: jax.Array, m1: jax.Array, m2: jax.Array, m3: jax.Array) -> tuple[jax.Array, ...]:
    return m0 + m1 + m2, m1 - m2 - m3  # A^T m


def winograd_conv3x3(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """A 3x3 stride-1 ``NHWC`` x ``HWIO`` cross-correlation by Winograd's minimal filtering F(2x2, 3x3) (Lavin &
    Gray, 2015): each 2x2 output tile is ``A^T [(G g G^T) * (B^T d B)] A`` over its 4x4 input tile ``d``, so the
    convolution becomes 16 ``[tiles, C] @ [C, O]`` matmuls, 2.25x fewer multiplies than the direct form. The
    transforms are adds of strided slices; autodiff of this function is Winograd-form again (the gradients of the
    16 matmuls, through the transposed transforms), so both gradients get the same saving."""
    B, H, W, C = x.shape
    ho, wo = H + sum(padding[0]) - 2, W + sum(padding[1]) - 2
    th, tw = -(-ho // 2), -(-wo // 2)
    # pad so the tiles cover the output exactly; the extra row / column of an odd output is cropped at the end
    xp = jnp.pad(
        x, ((0, 0), (padding[0][0], 2 * th - ho + padding[0][1]), (padding[1][0], 2 * tw - wo + padding[1][1]), (0, 0))
    )
    rows = _winograd_input(*(xp[:, r : r + 2 * th : 2] for r in range(4)))
    tiles = [v for t in rows for v in _winograd_input(*(t[:, :, c : c + 2 * tw : 2] for c in range(4)))]
    v = jnp.stack(tiles).reshape(16, B * th * tw, C)
    rows = _winograd_kernel(*(kernel[i] for i in range(3)))
    u = jnp.stack([w for t in rows for w in _winograd_kernel(*(t[j] for j in range(3)))])  # [16, C, O]
    m = jnp.matmul(v, u).reshape(4, 4, B, th, tw, -1)
    rows = _winograd_output(*(m[r] for r in range(4)))
    y = jnp.stack([jnp.stack(_winograd_output(*(t[c] for c in range(4)))) for t in rows])  # [2, 2, B, th, tw, O]
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(B, 2 * th, 2 * tw, -1)
    return y[:, :ho, :wo]


def conv_as_matmul(
    x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[tuple[int, int], tuple[int, int]]
) -> jax.Array:
    """The same cross-correlation as one ``[B*Ho*Wo, kh*kw*C] @ [kh*kw*C, O]`` matmul: patches are the ``kh * kw``
    strided shifts of the padded input concatenated on channels in ``(row, col)`` order, matching the ``HWIO``
    kernel flattened to ``[kh*kw*C, O]``. Its gradient is plain matmuls and slices (no kernel transpose)."""
    kh, kw, C, O = kernel.shape
    B = x.shape[0]
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    taps = [
        xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
        for i in range(kh)
        for j in range(kw)
    ]
    cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    return (cols.reshape(B * ho * wo, kh * kw * C) @ kernel.reshape(kh * kw * C, O)).reshape(B, ho, wo, O)


def _phase_taps(k: int, s: int, p: int, a: int, n_in: int) -> tuple[list[int], tuple[int, int], int]:
    """Output phase ``a`` (outputs ``s * i + a``) of a transposed conv along one axis: kernel taps, input padding,
    output count. Output ``o`` reads the s-dilated input at ``o + m - (k - 1 - p)`` for tap ``m``; only taps
    landing on real (not inserted-zero) samples contribute, at input offset ``(a + m - P) // s``."""
    P = k - 1 - p
    taps = [m for m in range(k) if (a + m - P) % s == 0]
    n_out = (n_in - 1) * s - 2 * p + k
    count = len(range(a, n_out, s))
    lo = (a + taps[0] - P) // s
    hi = (a + taps[-1] - P) // s
    return taps, (max(0, -lo), max(0, count - 1 + hi - (n_in - 1))), count


def transposed_conv_by_phases(x: jax.Array, kernel: jax.Array, s: int, p: int) -> jax.Array:
    """``ConvTranspose2d(k, stride s, padding p)`` (the conv over the s-dilated input with ``kernel``) computed as
    ``s * s`` ordinary convolutions, one per output phase, interleaved. Same result; XLA's CPU backend runs the
    gradient of an input-dilated convolution about 100x slower than these plain convolutions."""
    k = kernel.shape[0]
    B, H, W, _ = x.shape
    if ((H - 1) * s - 2 * p + k) % s or ((W - 1) * s - 2 * p + k) % s:  # phases of unequal length: dilated conv
        pad = k - 1 - p
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), ((pad, pad), (pad, pad)), lhs_dilation=(s, s), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    rows = []
    for a in range(s):
        ta, pad_h, nh = _phase_taps(k, s, p, a, H)
        cols = []
        for b in range(s):
            tb, pad_w, nw = _phase_taps(k, s, p, b, W)
            sub = kernel[ta[0] : ta[-1] + 1 : s, tb[0] : tb[-1] + 1 : s]  # taps are s apart: a slice, not a gather
            y = conv2d(x, sub, 1, (pad_h, pad_w))
            cols.append(y[:, :nh, :nw])
        rows.append(cols)
    nh, nw = rows[0][0].shape[1:3]
    y = jnp.stack([jnp.stack(r, axis=3) for r in rows], axis=2)  # [B, nh, s, nw, s, C]
    return y.reshape(B, nh * s, nw * s, y.shape[-1])
