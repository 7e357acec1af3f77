"""``stable_diffusion``: the original's own UNet + a noise scheduler + an optional CLIP text encoder (§3.8.4).

Components of :class:`StableDiffusion`:

* ``unet``: :class:`~vla_foundry_jax.models.unet.UNet`, or with ``use_diffusers_unet`` the diffusers-layout
  :class:`~vla_foundry_jax.models.diffusers_unet.DiffusersUNet` (:func:`make_unet`; ``unet.hf_pretrained`` names a
  diffusers checkpoint, loaded by the ``unet`` weight loader at prefix ``unet.``; text-conditioned when it is a
  ``UNet2DConditionModel``, which the original could not do);
* ``clip``: :class:`~vla_foundry_jax.models.clip.CLIPModel` built from ``clip.hf_pretrained`` (filled by the
  ``clip_hf`` weight loader at prefix ``clip.``), or None when ``clip.hf_pretrained`` is None (no text
  conditioning, reference §1.3). Text embeddings are the text tower's ``last_hidden_state [B, S, D_t]``
  (``unet.text_emb_dim`` must equal ``D_t``). The whole CLIP model is built as the original does; its vision
  tower is unused (zero gradients; an AdamW weight decay still shrinks it, torch skips parameters without grads);
* ``scheduler`` (property): :func:`~vla_foundry_jax.models.noise_scheduler.make_scheduler_from` of the params.

Training (:func:`stable_diffusion_loss`, registered for ``stable_diffusion``; batch ``pixel_values
[B, H, W, in_channels]`` in [-1, 1], plus ``input_ids [B, S]`` and optional ``attention_mask`` when
text-conditioned): ``k_t, k_noise, k_drop = split(rng, 3)``; ``t ~ U{0..T-1}`` per sample (``randint(k_t)``),
``noise = normal(k_noise)`` (float32); with ``do_classifier_free_guidance`` each sample's ids / mask are replaced
with probability ``dropout_percent`` (``bernoulli(k_drop)``) by the empty prompt padded to the same length;
``x_t = add_noise(x0, noise, t)`` (clamped, as the original); loss = MSE between ``unet(x_t, t, text)`` and
``scheduler.training_target`` (epsilon for the DDPMs, ``noise - x0`` for flow matching).

The empty prompt is the CLIP tokenizer's tokenisation of ``""`` (``[bos, eos]``) padded with its pad id, read
with ``transformers.AutoTokenizer`` from ``clip.hf_pretrained``; when the checkpoint has no tokenizer files it
falls back to the text config's ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (logged).

Sampling (:func:`sample_images`, one ``jax.jit`` over every step via ``NoiseScheduler.sample``): from
``x ~ N(0, I)`` ``[B, image_size, image_size, in_channels]``; prompt text encoded with the prompt's attention
mask when one is given (``apps.stable_diffusion.encode_prompts`` gives ids and mask; the empty prompt of
guidance is then masked too, exactly as in training), else **without attention mask** (the original's
``generate``, whose text tower then sees pad positions differently from training: the UNet's cross-attention and
max-pooling read every position, pads included); with guidance the UNet runs on ``[uncond; cond]`` and
``out = uncond + s (cond - uncond)`` (:func:`cfg_combine`); returns ``clip(x, -1, 1)``.
**Quirk fixed** (reference §8 item 14): the original's loop ``t = T-1 .. 1`` never runs ``t = 0`` (flow ends at
time ``1/T``); here the scheduler's inclusive schedule runs ``t = 0`` too.

Guidance or CFG training without a text encoder is a :class:`ParamsError`.

Data and runs. Training data is ``image_caption`` read with ``image_caption.processor = "stable_diffusion"``
(``data.processor.StableDiffusionProcessor``: resize to ``unet.image_size``, random horizontal flip, [-1, 1],
caption -> CLIP token ids); ``training.resolve.resolve_stable_diffusion`` ties the data to the model before building.
**Prompts longer than the padded length ``data.seq_len + 1`` are truncated** to it (keeping the final end-of-text
token, as HF's ``CLIPTokenizer(truncation=True)``), in training and in ``apps.stable_diffusion.encode_prompts``;
``seq_len + 1`` may not exceed the text tower's ``max_position_embeddings`` (77 for OpenAI CLIP, 16 for
``tiny_data/tiny_clip``). Run loading, prompt tokenisation and PNG grids are application code:
:mod:`vla_foundry_jax.apps.stable_diffusion`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vla_foundry_jax.layers.losses import masked_mse
from vla_foundry_jax.models.clip import CLIPModel, clip_config
from vla_foundry_jax.models.diffusers_unet import build_diffusers_unet
from vla_foundry_jax.models.noise_scheduler import NoiseScheduler, scheduler_from_key, scheduler_key
from vla_foundry_jax.models.unet import UNet
from vla_foundry_jax.params.base import ParamsError
from vla_foundry_jax.params.model_params import StableDiffusionParams
from vla_foundry_jax.registry import ModelRecord, register_model

logger = logging.getLogger(__name__)


def empty_prompt_tokens(hf_pretrained: str) -> tuple[tuple[int, ...], int]:
    """``(ids of "", pad id)`` of the CLIP checkpoint's tokenizer (config fallback; see the module docstring)."""
    from vla_foundry_jax.configs.hf_hub import load_hf_config, resolve_hf_path

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_hf_path(hf_pretrained))
        ids = tuple(int(i) for i in tok("")["input_ids"])
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return ids, int(pad)
    except Exception as e:  # no tokenizer files next to the config
        tc = load_hf_config(hf_pretrained).text_config
        ids = (int(tc.bos_token_id), int(tc.eos_token_id))
        pad = int(tc.pad_token_id if tc.pad_token_id is not None else tc.eos_token_id)
        logger.warning(
            "stable_diffusion: no tokenizer at clip.hf_pretrained = %s (%s); the empty prompt is the text config's "
            "[bos, eos] = %s padded with pad_token_id = %s.",
            hf_pretrained,
            type(e).__name__,
            ids,
            pad,
        )
        return ids, pad


class StableDiffusion(nnx.Module):
    """See the module docstring."""

    def __init__(
        self,
        params: StableDiffusionParams,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat_policy: str | None = None,
    ):
        has_text = params.clip.hf_pretrained is not None
        if params.do_classifier_free_guidance and not has_text:
            raise ParamsError(
                "stable_diffusion.do_classifier_free_guidance needs a text encoder: set stable_diffusion.clip."
                "hf_pretrained (None means no text conditioning)."
            )
        if not 0.0 <= params.dropout_percent <= 1.0:
            raise ParamsError(f"stable_diffusion.dropout_percent = {params.dropout_percent} must be in [0, 1].")
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype, "remat_policy": remat_policy}
        cfg = clip_config(params.clip) if has_text else None
        self.unet = make_unet(params, None if cfg is None else cfg.text.hidden_size, **kw)
        clip, self.empty_prompt = None, None
        if has_text:
            if not params.use_diffusers_unet and cfg.text.hidden_size != params.unet.text_emb_dim:
                raise ParamsError(
                    f"stable_diffusion.unet.text_emb_dim = {params.unet.text_emb_dim} must equal the CLIP text "
                    f"hidden size {cfg.text.hidden_size} of clip.hf_pretrained = {params.clip.hf_pretrained!r}."
                )
            clip = CLIPModel(cfg, where="stable_diffusion.clip", **kw)
            self.empty_prompt = empty_prompt_tokens(params.clip.hf_pretrained)
        self.clip = clip
        self.scheduler_key = scheduler_key(params)
        scheduler_from_key(self.scheduler_key)  # raise configuration errors now
        self.do_classifier_free_guidance = bool(params.do_classifier_free_guidance)
        self.guidance_scale = float(params.guidance_scale)
        self.dropout_percent = float(params.dropout_percent)
        self.image_size = int(params.unet.image_size)
        self.in_channels = int(params.unet.in_channels)
        self.out_channels = int(params.unet.out_channels)

    @property
    def scheduler(self) -> NoiseScheduler:
        return scheduler_from_key(self.scheduler_key)

    @property
    def has_text(self) -> bool:
        return self.clip is not None

    def empty_prompt_batch(self, batch: int, seq_len: int) -> tuple[jax.Array, jax.Array]:
        """The empty prompt's ``(ids, mask)`` ``[batch, seq_len]``, right-padded (or truncated) to ``seq_len``."""
        ids, pad = self.empty_prompt
        n = min(len(ids), seq_len)
        row = np.full((seq_len,), pad, np.int32)
        row[:n] = ids[:n]
        mask = (np.arange(seq_len) < n).astype(np.int32)
        return jnp.broadcast_to(row, (batch, seq_len)), jnp.broadcast_to(mask, (batch, seq_len))

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """CLIP text tower's ``last_hidden_state [B, S, D_t]``."""
        return self.clip.text_model(input_ids, attention_mask)[0]

    def __call__(self, x_t: jax.Array, t: jax.Array, text: jax.Array | None = None) -> jax.Array:
        return self.unet(x_t, t, text)


def make_unet(params: StableDiffusionParams, text_width: int | None, **kw: Any) -> nnx.Module:
    """The own UNet, or the diffusers-layout one with ``use_diffusers_unet`` (``text_width``: CLIP's, or None)."""
    where = "stable_diffusion.unet"
    if params.use_diffusers_unet:
        return build_diffusers_unet(params.unet, text_width=text_width, where=where, **kw)
    if params.unet.hf_pretrained:
        raise ParamsError(
            f"{where}.hf_pretrained = {params.unet.hf_pretrained!r} names a diffusers UNet: set "
            "stable_diffusion.use_diffusers_unet = True (or unset it for the own UNet)."
        )
    return UNet(params.unet, where=where, **kw)


def build_stable_diffusion(params: StableDiffusionParams, *, rngs: nnx.Rngs, **kwargs: Any) -> StableDiffusion:
    """Registry builder for ``type = "stable_diffusion"``."""
    return StableDiffusion(params, rngs=rngs, **kwargs)


def training_forward(
    model: StableDiffusion, batch: dict[str, jax.Array], rng: jax.Array
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """``(prediction, target, extras)`` of one training forward (draws as in the module docstring)."""
    if rng is None:
        raise ValueError("stable_diffusion training needs an rng (timesteps, noise, condition dropout).")
    x0 = batch["pixel_values"]
    B = x0.shape[0]
    sched = model.scheduler
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    t = jax.random.randint(k_t, (B,), 0, sched.num_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32).astype(x0.dtype)
    text = None
    extras: dict[str, jax.Array] = {"t": t, "noise": noise}
    if model.has_text:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = jnp.ones_like(ids) if mask is None else mask
        if model.do_classifier_free_guidance and model.dropout_percent > 0:
            drop = jax.random.bernoulli(k_drop, model.dropout_percent, (B,))
            e_ids, e_mask = model.empty_prompt_batch(B, ids.shape[1])
            ids = jnp.where(drop[:, None], e_ids.astype(ids.dtype), ids)
            mask = jnp.where(drop[:, None], e_mask.astype(mask.dtype), mask)
            extras["dropped"] = drop
        text = model.encode_text(ids, mask)
    x_t = sched.add_noise(x0, noise, t)
    pred = model.unet(x_t, t, text)
    return pred, sched.training_target(x0, noise), extras


def stable_diffusion_loss(
    model: StableDiffusion, batch: dict[str, jax.Array], *, hparams: Any = None, rng: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MSE to the scheduler's target (epsilon or velocity); see the module docstring."""
    del hparams
    pred, target, _ = training_forward(model, batch, rng)
    loss = masked_mse(pred, target)
    return loss, {"mse": loss}


def check_stable_diffusion_batch(params: StableDiffusionParams, batch: dict[str, Any]) -> None:
    """Host-side shape checks of a training batch."""
    u = params.unet
    want = (u.image_size, u.image_size, u.in_channels)
    px = batch.get("pixel_values")
    if px is None or np.ndim(px) != 4 or tuple(np.shape(px)[1:]) != want:
        got = None if px is None else tuple(np.shape(px))
        raise ValueError(
            f"stable_diffusion needs pixel_values [B, {want[0]}, {want[1]}, {want[2]}] (unet.image_size, "
            f"unet.in_channels; channels-last, in [-1, 1]), got {got}."
        )
    if params.clip.hf_pretrained is not None and "input_ids" not in batch:
        raise ValueError("stable_diffusion with a text encoder (clip.hf_pretrained set) needs input_ids in the batch.")


def cfg_combine(uncond: jax.Array, cond: jax.Array, scale: jax.Array | float) -> jax.Array:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def guided_denoiser(
    unet_fn: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array],
    text: jax.Array | None,
    uncond_text: jax.Array | None,
    scale: jax.Array | float | None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``denoise(x, t)`` for the scheduler: with ``scale`` the batch is doubled as ``[uncond; cond]`` and the two
    halves combined by :func:`cfg_combine`; otherwise ``unet_fn(x, t, text)``."""
    if scale is None:
        return lambda x, t: unet_fn(x, t, text)

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        B = x.shape[0]
        out = unet_fn(jnp.concatenate([x, x]), t, jnp.concatenate([uncond_text, text]))
        return cfg_combine(out[:B], out[B:], scale)

    return denoise


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps", "batch_size", "guided"))
def _sample(graphdef, state, prompt_ids, prompt_mask, rng, scale, *, num_steps, batch_size, guided):
    model = nnx.merge(graphdef, state)
    text = uncond = None
    if prompt_ids is not None:
        text = model.encode_text(prompt_ids, prompt_mask)  # mask None: the original's generate
        if guided:
            e_ids, e_mask = model.empty_prompt_batch(*prompt_ids.shape)
            uncond = model.encode_text(e_ids, None if prompt_mask is None else e_mask)
    denoise = guided_denoiser(model.unet, text, uncond, scale if guided else None)
    s = model.image_size
    x = model.scheduler.sample(denoise, (batch_size, s, s, model.in_channels), rng, num_steps)
    return jnp.clip(x, -1.0, 1.0)


def sample_images(
    model: StableDiffusion,
    prompt_ids: jax.Array | None,
    rng: jax.Array,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    *,
    batch_size: int | None = None,
    prompt_mask: jax.Array | None = None,
) -> jax.Array:
    """Generate ``[B, image_size, image_size, in_channels]`` images in [-1, 1] (one jit over every step).

    ``prompt_ids [B, S]`` (None: unconditional, then ``batch_size`` is required;
    ``apps.stable_diffusion.encode_prompts`` makes them from text); ``prompt_mask [B, S]``: the prompt's
    attention mask, then the empty prompt of guidance is masked too, exactly as in training (None: no mask, the
    original's ``generate``); ``num_steps`` None runs all ``T`` timesteps (DDPM needs that; flow matching may
    stride); ``guidance_scale`` None uses the model's ``guidance_scale`` when ``do_classifier_free_guidance`` is
    on, else no guidance. Guidance needs a text encoder and a prompt.
    """
    if model.in_channels != model.out_channels:
        raise ValueError(
            f"sampling needs unet.out_channels = in_channels, got {model.out_channels} / {model.in_channels}."
        )
    if guidance_scale is None and model.do_classifier_free_guidance and prompt_ids is not None:
        guidance_scale = model.guidance_scale
    if guidance_scale is not None and (not model.has_text or prompt_ids is None):
        raise ParamsError(
            "classifier-free guidance needs a text encoder (stable_diffusion.clip.hf_pretrained) and prompt_ids."
        )
    if prompt_ids is not None:
        if not model.has_text:
            raise ValueError("prompt_ids given but the model has no text encoder (clip.hf_pretrained is None).")
        prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
        if batch_size is not None and batch_size != prompt_ids.shape[0]:
            raise ValueError(f"batch_size = {batch_size} differs from prompt_ids' batch {prompt_ids.shape[0]}.")
        batch_size = prompt_ids.shape[0]
        if prompt_mask is not None:
            prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
            if prompt_mask.shape != prompt_ids.shape:
                raise ValueError(f"prompt_mask {prompt_mask.shape} must have prompt_ids' shape {prompt_ids.shape}.")
    elif batch_size is None:
        raise ValueError("unconditional sampling (prompt_ids None) needs batch_size.")
    model.scheduler.inference_step_size(num_steps)  # clear error before tracing
    graphdef, state = nnx.split(model)
    scale = jnp.asarray(0.0 if guidance_scale is None else guidance_scale, jnp.float32)
    return _sample(
        graphdef,
        state,
        prompt_ids,
        prompt_mask,
        rng,
        scale,
        num_steps=num_steps,
        batch_size=int(batch_size),
        guided=guidance_scale is not None,
    )


register_model(
    ModelRecord(
        params=StableDiffusionParams,
        builder=build_stable_diffusion,
        loss=stable_diffusion_loss,
        batch_check=check_stable_diffusion_batch,
    )
)
