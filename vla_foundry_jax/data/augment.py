"""Image augmentation (the original's decode_and_augment): crop, then colour jitter, in numpy on uint8 HWC.

Semantics follow torchvision v2 on uint8 images (the original augments CHW uint8 tensors):

* crop: ``center`` = ``CenterCrop`` (offset ``round((H - h) / 2)``, Python rounding), ``random`` =
  ``RandomCrop`` (offsets uniform in ``[0, H - h]``), ratio crop (both shape entries <= 1.0) =
  ``int(H * rh) x int(W * rw)`` at a random offset. An image smaller than the crop raises ``DataError``.
* colour jitter = ``ColorJitter(brightness, contrast, saturation, hue)``: factors uniform in
  ``[max(0, 1 - x), 1 + x]`` (hue uniform in ``hue``), the four adjustments in a random order; each
  adjustment blends in float and truncates back to uint8 (``float.to(uint8)``), grayscale =
  ``0.2989 R + 0.587 G + 0.114 B`` floored, contrast blends with the mean of that grayscale, hue goes
  through HSV in [0, 1] and back with ``x * 255.999`` truncated.

All images of one sample with the same shape get the same crop window; all get the same jitter (the original
augments them jointly). Randomness comes only from the ``numpy.random.Generator`` passed in (grain's
per-sample generator), so a sample's augmentation is fixed by (seed, index).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from vla_foundry_jax.data.shards import DataError
from vla_foundry_jax.params.data_params import ColorJitterParams, CropParams, DataAugmentationParams

_GRAY = (0.2989, 0.587, 0.114)


def crop_size(height: int, width: int, crop: CropParams) -> tuple[int, int]:
    """The ``(h, w)`` a crop takes from an ``height x width`` image (ratio crops scale with the image)."""
    rh, rw = crop.shape
    if crop.is_ratio:
        return max(1, int(height * rh)), max(1, int(width * rw))
    return int(rh), int(rw)


def crop_window(
    height: int,
    width: int,
    crop: CropParams,
    rng: np.random.Generator | None,
    *,
    center: bool = False,
    where: str = "image",
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the crop; centred for ``mode="center"`` or ``center=True`` (evaluation)."""
    h, w = crop_size(height, width, crop)
    if h > height or w > width:
        raise DataError(
            f"{where}: image of {height}x{width} pixels is smaller than the crop {h}x{w} (crop.shape = {crop.shape}); "
            "lower crop.shape or give it as ratios <= 1.0."
        )
    if center or crop.mode == "center":
        return round((height - h) / 2.0), round((width - w) / 2.0), h, w
    if rng is None:
        raise ValueError("a random crop needs a numpy Generator")
    return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w


@dataclasses.dataclass(frozen=True)
class JitterDraw:
    """One draw of ``ColorJitter`` parameters: the order of the four adjustments (0 brightness, 1 contrast,
    2 saturation, 3 hue) and their factors (None = that adjustment is off)."""

    order: tuple[int, ...]
    brightness: float | None
    contrast: float | None
    saturation: float | None
    hue: float | None


def _factor_range(x: float) -> tuple[float, float] | None:
    lo, hi = max(0.0, 1.0 - x), 1.0 + x
    return None if lo == hi == 1.0 else (lo, hi)


def draw_jitter(params: ColorJitterParams, rng: np.random.Generator) -> JitterDraw:
    """Draw the order and the factors (torchvision v2 ``ColorJitter.make_params``)."""
    order = tuple(int(i) for i in rng.permutation(4))
    factors = []
    for rng_range in (
        _factor_range(params.brightness),
        _factor_range(params.contrast),
        _factor_range(params.saturation),
        None if params.hue[0] == params.hue[1] == 0.0 else tuple(params.hue),
    ):
        factors.append(None if rng_range is None else float(rng.uniform(rng_range[0], rng_range[1])))
    return JitterDraw(order, *factors)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """torch ``float.clamp(0, 255).to(uint8)``: clamp then truncate."""
    return np.clip(x, 0.0, 255.0).astype(np.uint8)


def _grayscale(img: np.ndarray) -> np.ndarray:
    """Floored ``0.2989 R + 0.587 G + 0.114 B`` as float32 ``[H, W, 1]``."""
    x = img.astype(np.float32)
    g = x[..., 0] * np.float32(_GRAY[0]) + x[..., 1] * np.float32(_GRAY[1]) + x[..., 2] * np.float32(_GRAY[2])
    return np.floor(g)[..., None]


def _blend(img: np.ndarray, other: np.ndarray | float, ratio: float) -> np.ndarray:
    r = np.float32(ratio)
    return _to_uint8(img.astype(np.float32) * r + np.asarray(other, np.float32) * (np.float32(1.0) - r))


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    return _to_uint8(img.astype(np.float32) * np.float32(factor))


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    return _blend(img, np.mean(_grayscale(img), dtype=np.float32), factor)


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    return _blend(img, _grayscale(img), factor)


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """float ``[..., 3]`` RGB in [0, 1] -> HSV in [0, 1] (torchvision's formulas)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc, minc = x.max(-1), x.min(-1)
    eqc = maxc == minc
    rng_ = maxc - minc
    s = rng_ / np.where(eqc, 1.0, maxc)
    div = np.where(eqc, 1.0, rng_)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    neq_r = maxc != r
    eq_g = maxc == g
    h = (bc - gc) * ~neq_r + (2.0 + rc - bc) * (eq_g & neq_r) + (4.0 + gc - rc) * (neq_r & ~eq_g)
    h = np.fmod(h / 6.0 + 1.0, 1.0)
    return np.stack([h, s, maxc], -1).astype(np.float32)


def hsv_to_rgb(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = x[..., 0], x[..., 1], x[..., 2]
    h6 = h * 6.0
    i = np.floor(h6)
    f = h6 - i
    i = np.mod(i.astype(np.int32), 6)
    q = np.clip((1.0 - s * f) * v, 0.0, 1.0)
    t = np.clip((s * f + 1.0 - s) * v, 0.0, 1.0)
    p = np.clip((1.0 - s) * v, 0.0, 1.0)
    vpqt = np.stack([v, p, q, t], -1)
    select = np.array([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]])[:, i]  # [3, H, W]
    return np.take_along_axis(vpqt, np.moveaxis(select, 0, -1), axis=-1).astype(np.float32)


def adjust_hue(img: np.ndarray, factor: float) -> np.ndarray:
    if not -0.5 <= factor <= 0.5:
        raise ValueError(f"hue factor {factor} is not in [-0.5, 0.5].")
    hsv = rgb_to_hsv(img.astype(np.float32) * np.float32(1.0 / 255.0))  # torchvision: x * (1 / 255)
    hsv[..., 0] = np.mod(hsv[..., 0] + np.float32(factor), 1.0)
    return (hsv_to_rgb(hsv) * np.float32(255.0 + 1.0 - 1e-3)).astype(np.uint8)


def apply_jitter(img: np.ndarray, draw: JitterDraw) -> np.ndarray:
    """Apply one jitter draw to a uint8 ``[H, W, 3]`` image."""
    fns = (
        (adjust_brightness, draw.brightness),
        (adjust_contrast, draw.contrast),
        (adjust_saturation, draw.saturation),
        (adjust_hue, draw.hue),
    )
    out = img
    for k in draw.order:
        fn, factor = fns[k]
        if factor is not None:
            out = fn(out, factor)
    return out


def augment_images(
    images: Sequence[np.ndarray],
    augmentation: DataAugmentationParams | None,
    rng: np.random.Generator | None,
    *,
    train: bool = True,
    where: str = "sample",
) -> list[np.ndarray]:
    """Crop then jitter the uint8 ``[H, W, 3]`` images of one sample.

    ``train=False`` (evaluation) keeps only the crop, centred (ratio crops too), and skips the colour jitter.
    """
    out = [np.asarray(im) for im in images]
    if augmentation is None or not augmentation.enabled:
        return out
    crop, jitter = augmentation.image.crop, augmentation.image.color_jitter
    if crop.enabled:
        windows: dict[tuple[int, ...], tuple[int, int, int, int]] = {}
        for i, im in enumerate(out):
            if im.shape not in windows:
                windows[im.shape] = crop_window(im.shape[0], im.shape[1], crop, rng, center=not train, where=where)
            top, left, h, w = windows[im.shape]
            out[i] = im[top : top + h, left : left + w]
    if jitter.enabled and train:
        if rng is None:
            raise ValueError("colour jitter needs a numpy Generator")
        draw = draw_jitter(jitter, rng)
        out = [apply_jitter(im, draw) for im in out]
    return out
