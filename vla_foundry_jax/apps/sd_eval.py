"""Colour accuracy of a trained stable-diffusion run on the coloured-shapes task (``launch.eval_sd``).

For each colour of the shapes dataset (``testbeds.tiny_datasets.SHAPE_COLORS``) :func:`evaluate_run` samples
``samples_per_color`` images of ``"a <colour> <shape> ."`` (shapes cycling through ball, box, kite, hat) and
classifies each image's dominant non-background colour with :func:`classify_color`. ``color_accuracy`` is the
fraction whose colour is the prompt's; ``untrained_color_accuracy`` is the same figure for the run's model before
training (:func:`~vla_foundry_jax.apps.stable_diffusion.fresh_model`: fresh init of the same params with the run's
seed, text encoder weights loaded as training starts; same prompts, same sampling seed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from vla_foundry_jax.apps.stable_diffusion import (
    encode_prompts,
    fresh_model,
    images_to_uint8,
    load_sd_model,
    save_image_grid,
)
from vla_foundry_jax.errors import UsageError
from vla_foundry_jax.models.stable_diffusion import sample_images
from vla_foundry_jax.testbeds.tiny_datasets import SHAPE_COLORS, SHAPE_NAMES

FOREGROUND_MIN_DIFF = 60  # a pixel differs from the background by more than this in some channel (0..255)
MIN_FOREGROUND_FRACTION = 0.02


def classify_color(image: np.ndarray, palette: Mapping[str, tuple[int, int, int]]) -> str | None:
    """The dominant non-background colour of a uint8 ``[H, W, 3]`` image, as a name of ``palette``, or None.

    Background = the per-channel median of the border pixels. Foreground = pixels differing from it by more than
    ``FOREGROUND_MIN_DIFF`` in some channel (None when under ``MIN_FOREGROUND_FRACTION`` of the image). The
    farther half of the foreground (by that difference: shape interiors, not edges blended with the background)
    votes, each pixel for its nearest palette colour (Euclidean RGB); the most voted colour wins.
    """
    img = np.asarray(image, np.int32)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise UsageError(f"classify_color expects [H, W, 3], got {img.shape}.")
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    diff = np.abs(img - background).max(axis=-1)
    fg = diff > FOREGROUND_MIN_DIFF
    if fg.sum() < max(1, MIN_FOREGROUND_FRACTION * diff.size):
        return None
    strong = fg & (diff >= np.median(diff[fg]))
    names = list(palette)
    colours = np.asarray([palette[n] for n in names], np.float64)
    pixels = img[strong].astype(np.float64)
    nearest = np.argmin(((pixels[:, None, :] - colours[None]) ** 2).sum(-1), axis=1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def color_prompts(samples_per_color: int) -> tuple[list[str], list[str]]:
    """``(prompts, target colours)``: ``samples_per_color`` per colour, shapes cycling."""
    prompts, targets = [], []
    for colour in SHAPE_COLORS:
        for i in range(samples_per_color):
            prompts.append(f"a {colour} {SHAPE_NAMES[i % len(SHAPE_NAMES)]} .")
            targets.append(colour)
    return prompts, targets


def color_accuracy(images_uint8: np.ndarray, targets: list[str]) -> tuple[float, dict[str, float]]:
    """Overall and per-colour fraction of images classified as their target colour."""
    hits = np.asarray([classify_color(im, SHAPE_COLORS) == t for im, t in zip(images_uint8, targets, strict=True)])
    per = {c: float(hits[[t == c for t in targets]].mean()) for c in dict.fromkeys(targets)}
    return float(hits.mean()), per


def evaluate_run(
    run_dir: str,
    *,
    samples_per_color: int = 8,
    guidance_scale: float | None = None,
    num_steps: int | None = 50,
    seed: int = 0,
    use_ema: bool = True,
    grid_out: str | None = None,
) -> dict[str, Any]:
    """Sample the colour prompts with the trained and the untrained model (see the module docstring); with
    ``grid_out`` the trained model's samples are also written there as a PNG grid (one row per colour).

    Returns ``color_accuracy``, ``untrained_color_accuracy``, ``num_samples``, ``per_color``,
    ``untrained_per_color``, ``ema`` (whether the EMA weights were used) and ``num_steps``.
    """
    model, exp, used_ema = load_sd_model(run_dir, use_ema=use_ema)
    if not model.has_text:
        raise UsageError(f"{run_dir}: the model has no text encoder, so it cannot be prompted with colours.")
    prompts, targets = color_prompts(samples_per_color)
    ids, mask = encode_prompts(exp, prompts)

    def draw(m: Any) -> np.ndarray:
        key = jax.random.PRNGKey(seed)
        x = sample_images(m, ids, key, num_steps=num_steps, guidance_scale=guidance_scale, prompt_mask=mask)
        return np.asarray(x)

    trained = draw(model)
    untrained = draw(fresh_model(exp))
    acc, per = color_accuracy(images_to_uint8(trained), targets)
    base, base_per = color_accuracy(images_to_uint8(untrained), targets)
    if grid_out:
        save_image_grid(trained, grid_out, ncols=samples_per_color, scale=4)
    return {
        "color_accuracy": acc,
        "untrained_color_accuracy": base,
        "num_samples": len(prompts),
        "per_color": per,
        "untrained_per_color": base_per,
        "ema": used_ema,
        "num_steps": num_steps,
    }
