"""Space-to-depth: image patches for the ViTs' patch embeddings, and the pixel shuffle of the VLM's modality
projector (reference §3.5).

:func:`patchify` cuts channels-last images into non-overlapping ``p x p`` patches, row-major over the patch grid,
each flattened in (row, col, channel) order: a stride-``p`` ``Conv2d(3, D, p)`` is then one matmul with the torch
weight ``[D, 3, p, p]`` transposed to ``[p, p, 3, D]`` and flattened.

Pixel shuffle:
A sequence of ``n = r * r`` tokens is read as an ``r x r`` grid (token ``t = row * r + col``). With factor ``s``
the output token ``(bi, bj)`` (row-major over the ``(r/s) x (r/s)`` block grid) carries the concatenation over
``di`` (outer), ``dj``, channel ``c`` (inner) of ``x[(bi*s + di) * r + (bj*s + dj), c]``: the channel order is
(row-offset, col-offset, channel), as the original's ``einops`` pattern
``"n (w w_scale h h_scale) c -> n (w h) (w_scale h_scale c)"``.
"""

from __future__ import annotations

import math

import jax


def pixel_shuffle(x: jax.Array, factor: int) -> jax.Array:
    """Space-to-depth of square token grids.

    Args:
      x: ``[B, n, C]`` (one grid per row) or ``[B, cams, n, C]`` (one grid per camera); ``n`` must be a perfect
        square ``r * r`` with ``r`` divisible by ``factor`` (except for the 3-D no-op case ``factor == 1``, which
        accepts any ``n``, e.g. a CLS token).
      factor: the shuffle factor ``s >= 1``.

    Returns:
      ``[B, n / s^2, s^2 * C]`` for 3-D input; ``[B, cams * n / s^2, s^2 * C]`` for 4-D input (each camera shuffled
      on its own, cameras concatenated along the token axis, camera-major).
    """
    if factor < 1:
        raise ValueError(f"pixel_shuffle factor must be >= 1, got {factor}.")
    if x.ndim not in (3, 4):
        raise ValueError(f"pixel_shuffle expects [B, n, C] or [B, cams, n, C] tokens, got shape {tuple(x.shape)}.")
    if x.ndim == 4:
        B, cams, n, C = x.shape
        if factor == 1:
            return x.reshape(B, cams * n, C)
        y = pixel_shuffle(x.reshape(B * cams, n, C), factor)
        return y.reshape(B, cams * y.shape[1], y.shape[2])
    if factor == 1:
        return x
    B, n, C = x.shape
    r = math.isqrt(n)
    if r * r != n:
        raise ValueError(
            f"pixel_shuffle needs a square token grid, but the sequence has {n} tokens (sqrt = {n**0.5:.2f}). "
            f"With a CLS token (vit.cls_flag) set vit.projector_pixel_shuffle_factor = 1."
        )
    if r % factor:
        raise ValueError(
            f"pixel_shuffle: the token grid side {r} is not divisible by the factor {factor} "
            f"(vit.projector_pixel_shuffle_factor); choose a factor that divides img_size / patch_size."
        )
    g = r // factor
    y = x.reshape(B, g, factor, g, factor, C)  # [B, bi, di, bj, dj, C]
    y = y.transpose(0, 1, 3, 2, 4, 5)  # [B, bi, bj, di, dj, C]
    return y.reshape(B, g * g, factor * factor * C)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """``[b, h, w, c] -> [b, (h/p) * (w/p), p * p * c]`` (module docstring); ``p`` must divide ``h`` and ``w``."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)
