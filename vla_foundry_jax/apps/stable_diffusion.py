"""Stable-diffusion runs as an application: loading a run, prompts, PNG grids (``launch.sample_sd``).

:func:`load_sd_model` rebuilds a trained run for sampling (EMA weights when the run kept them); :func:`fresh_model`
is its untrained baseline (the run's params built afresh, the text encoder's weights loaded as training starts).
:func:`encode_prompts` tokenises prompts with the run's tokenizer exactly like its training captions (**prompts
longer than ``data.seq_len + 1`` tokens are truncated**, keeping the end-of-text token). :func:`save_image_grid`
writes samples as one PNG (``round(255 * clip(x / 2 + 0.5, 0, 1))``, the original's conversion to uint8).
:func:`sample_grid` is ``launch.sample_sd``: one grid row per prompt. The model, its loss and the sampler are
:mod:`vla_foundry_jax.models.stable_diffusion`.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax import paths
from vla_foundry_jax.configs.hf_hub import resolve_hf_path
from vla_foundry_jax.data.processor import tokenize_prompts
from vla_foundry_jax.errors import UsageError
from vla_foundry_jax.models import build_model
from vla_foundry_jax.models.stable_diffusion import StableDiffusion, sample_images
from vla_foundry_jax.sampling import load_run_model
from vla_foundry_jax.training.state import model_kwargs

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("a red ball .",)


def load_sd_model(path: str, *, use_ema: bool = True) -> tuple[StableDiffusion, Any, bool]:
    """``(model, experiment params, used_ema)`` of a stable-diffusion run (run, checkpoints or step directory):
    :func:`vla_foundry_jax.sampling.load_run_model` after checking the model type."""
    kind = ckpt_lib.load_experiment_params(path).model.type
    if kind != "stable_diffusion":
        raise UsageError(f"{path} holds a {kind!r} model, not stable_diffusion.")
    return load_run_model(path, use_ema=use_ema)


def fresh_model(exp: Any, seed: int | None = None) -> StableDiffusion:
    """The run's model before training: fresh init with ``seed`` (None: the run's ``hparams.seed``, as training
    initialises) and the weights its params name loaded (the text encoder's ``clip.hf_pretrained``) by the library's
    ``build_model``, as training starts: the baseline of an evaluation."""
    seed = exp.hparams.seed if seed is None else seed
    return build_model(exp.model, rngs=nnx.Rngs(seed), load_weights=True, **model_kwargs(exp.hparams))


def prompt_tokenizer(exp: Any) -> Any:
    """The run's prompt tokenizer: ``data.tokenizer`` (resolved to ``clip.hf_pretrained``), else the CLIP path."""
    from transformers import AutoTokenizer

    name = getattr(exp.data, "tokenizer", None) or exp.model.clip.hf_pretrained
    if not name:
        raise UsageError("the run has no text encoder (stable_diffusion.clip.hf_pretrained is None): no prompts.")
    return AutoTokenizer.from_pretrained(resolve_hf_path(name))


def encode_prompts(exp: Any, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int32 ``[n, seq_len + 1]`` of ``prompts`` with the run's tokenizer, padded
    and truncated exactly like its training captions (``data.processor.tokenize_prompts``)."""
    length = int(exp.data.seq_len) + 1
    tok = prompt_tokenizer(exp)
    for p in prompts:
        n = len(tok(p)["input_ids"])
        if n > length:
            logger.warning("prompt %r has %d tokens: truncated to %d (data.seq_len + 1).", p, n, length)
    return tokenize_prompts(tok, list(prompts), length)


def images_to_uint8(images: Any) -> np.ndarray:
    """``[-1, 1]`` float images -> uint8 ``round(255 * clip(x / 2 + 0.5, 0, 1))``."""
    x = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.round(255 * x).astype(np.uint8)


def save_image_grid(images: Any, path: str, ncols: int | None = None, *, scale: int = 1) -> str:
    """Write ``images [N, H, W, C]`` (C = 1 or 3, values in [-1, 1]) as one PNG grid, row-major; returns ``path``.
    ``scale`` > 1 enlarges every pixel to a ``scale x scale`` block (nearest) so tiny samples stay visible."""
    from PIL import Image

    imgs = images_to_uint8(images)
    if scale < 1:
        raise UsageError(f"save_image_grid: scale must be >= 1, got {scale}.")
    if scale > 1:
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    if imgs.ndim != 4 or imgs.shape[-1] not in (1, 3):
        raise UsageError(f"save_image_grid expects [N, H, W, 1 or 3] images, got shape {imgs.shape}.")
    N, H, W, C = imgs.shape
    ncols = ncols or math.ceil(math.sqrt(N))
    nrows = math.ceil(N / ncols)
    grid = np.zeros((nrows * H, ncols * W, C), np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, ncols)
        grid[r * H : (r + 1) * H, c * W : (c + 1) * W] = img
    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if C == 1 else grid).save(buffer, format="PNG")
    paths.write_bytes(path, buffer.getvalue())  # local, s3:// or gs:// (beside a run on a store)
    return path


def sample_grid(
    run_dir: str,
    prompts: Sequence[str] | None = None,
    *,
    num_images: int = 8,
    guidance_scale: float | None = None,
    num_steps: int | None = 50,
    seed: int = 0,
    use_ema: bool = True,
    scale: int = 4,
    out: str | None = None,
) -> dict[str, Any]:
    """Sample ``num_images`` images per prompt from the run in ``run_dir`` and write them as one PNG grid (one row
    per prompt; ``out`` defaults to ``<run_dir>/samples.png``). ``prompts`` None: :data:`DEFAULT_PROMPTS` for a
    text-conditioned run, one unconditional row for a run without a text encoder (which takes no prompts).
    ``guidance_scale`` None: the model's when it was trained with guidance. Returns ``path``, ``num_prompts``,
    ``num_images`` and ``ema`` (whether the EMA weights were used)."""
    if num_images <= 0:
        raise UsageError(f"num_images must be positive, got {num_images}.")
    model, exp, used_ema = load_sd_model(run_dir, use_ema=use_ema)
    ids = mask = None
    if model.has_text:
        rows = list(DEFAULT_PROMPTS if prompts is None else prompts)
        ids, mask = encode_prompts(exp, [p for p in rows for _ in range(num_images)])
    elif prompts is not None:
        raise UsageError(
            f"{run_dir}: the run has no text encoder (clip.hf_pretrained is None): sample without prompts."
        )
    else:
        rows = [""]
    images = sample_images(
        model,
        ids,
        jax.random.PRNGKey(seed),
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        batch_size=len(rows) * num_images,
        prompt_mask=mask,
    )
    path = save_image_grid(np.asarray(images), out or paths.join(run_dir, "samples.png"), ncols=num_images, scale=scale)
    return {"path": path, "num_prompts": len(rows), "num_images": num_images, "ema": used_ema}
