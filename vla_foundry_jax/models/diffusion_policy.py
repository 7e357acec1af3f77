"""``diffusion_policy``: a vision-language backbone conditioning a transformer action denoiser (reference §3.11).

Components of :class:`DiffusionPolicy` (``D_bb`` = backbone ``conditioning_dim``, ``H_t`` = denoiser hidden size,
``A`` = ``action_dim``, ``P`` = ``proprioception_dim``, ``T`` = ``noise_scheduler.num_timesteps``):

* ``vision_language_backbone``: any backbone of :mod:`vla_foundry_jax.models.backbones` (built through the
  registry; ``[B, Nc, D_bb]`` conditioning tokens);
* ``transformer``: the denoiser run on ``inputs_embeds`` (no token ids). The own ``transformer``: its attention is
  non-causal when ``is_causal = False`` and the prediction is read from the last block output **before** the
  final norm (the original's ``hidden_states[-1]``); ``post_embed_norm`` and RoPE positions ``0 .. len-1`` apply to
  the whole concatenated sequence. Its token table and vocabulary head are never read, so it is built with
  ``vocab_size = 1`` (one dead row; the original allocates ``V x H_t`` dead parameters twice, and Orbax cannot
  save zero-size arrays) unless ``transformer.resume_from_checkpoint`` is set (then the full vocabulary is kept so
  an LLM run's weights load).
  A ``transformer_hf`` denoiser (causal, as HF) gives its post-final-norm last hidden state, as the original.
  Denoiser parameters that are never read (token tables, heads, the own transformer's final norm) are kept out of
  the optimizer by the ``diffusion_policy`` frozen-paths hook, as torch's AdamW skips parameters without grads;
* ``time_encoding [T, D_bb]`` (trainable, initialised with the ``[sin | cos]`` sinusoids of §3.8.1 at
  ``t = 0 .. T-1``), ``action_encode`` (A -> H_t), ``condition_encode`` (D_bb -> H_t), ``proprioception_encode``
  (P -> H_t, only when P > 0), ``output_layer`` (H_t -> A): biased linears with torch's default init;
* ``scheduler`` (property): :func:`~vla_foundry_jax.models.noise_scheduler.make_scheduler` of the params.

Token layout (:meth:`DiffusionPolicy.build_sequence`): ``concat``: ``condition_encode([time; backbone tokens])``
(``1 + Nc`` tokens, time first); ``add``: ``condition_encode(backbone + time)`` (``Nc`` tokens); then the
proprioception tokens (``past + 1``), then the ``Ta`` action tokens. The prediction is ``output_layer`` of the last
``Ta`` positions.

Training (:func:`diffusion_policy_loss`, registered; batch as the robotics contract: ``input_ids``,
``attention_mask``, ``pixel_values [B, N, H, W, 3]``, ``attention_mask_images``, ``actions [B, Ta, A]``,
``past_mask`` / ``future_mask [B, Ta]``, ``proprioception [B, p, P]``; with a Qwen-VL processor ``pixel_values [B,
P, D]`` flat patches and ``image_grid_thw [B, N, 3]``, passed on to the backbone): with ``R =
num_action_head_repeats`` (None = 1) the action side (actions, masks, proprioception) is repeated ``R`` times per
sample (rows ``iR .. iR+R-1``, ``jnp.repeat``) with fresh noise while the backbone runs once per unrepeated sample
and its tokens are repeated; ``t ~ U{0..T-1}`` per action row; ``noisy = add_noise(actions, noise, t,
mask=future_mask)`` (clamped), past / padded steps reset to the clean actions; ``input_noise_std`` adds ``N(0,
std^2)`` to the noisy actions *before* ``action_encode`` (every position) and to the proprioception tokens *after*
``proprioception_encode``; a ViT backbone's dropout (``vit_backbone.dropout``) is active (sampling is
deterministic). Loss = masked MSE over ``future_mask`` (mean over valid elements). **Difference**: the original's
target is the velocity ``noise - actions`` whatever the scheduler, which is the wrong target for its
epsilon-predicting DDPM step; here the target is the scheduler's own (:meth:`NoiseScheduler.training_target`:
velocity for flow matching, as the original, epsilon for both DDPMs). ``hparams.loss_function`` is not read (the
loss is MSE by definition).

Sampling (:func:`sample_actions`, one ``jax.jit``, one ``lax.fori_loop``): backbone tokens and proprioception
tokens computed once (no input noise, no repeats); ``x = where(past_mask, actions, N(0, 1))``; for
``t = T-1, T-1-k, ... >= 0`` with ``k = max(1, T // n)`` (``n = num_inference_steps or T``):
``x = step(denoise(x, t))`` then ``x = where(past_mask, actions, x)`` (past actions re-imposed exactly).
Flow matching: Euler ``x - v k / T`` then clamp; the schedule is the original's (``T = 1000, n = 10``: ``999 ..
99``) except that ``t = 0`` is run too when ``k`` divides ``T - 1`` (``n > T // 2``; the original stops before 0).
DDPM (**the original raises TypeError**, its DDPM step has no stride): ``k = 1`` is the scheduler's own posterior
step; ``k > 1`` is the strided DDPM posterior from ``t`` to ``t - k`` (``abar_prev = 1`` below 0):
``alpha' = abar_t / abar_prev``, ``x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (clipped for the diffusers
kind), mean ``sqrt(abar_prev) (1 - alpha') / (1 - abar_t) x0 + sqrt(alpha') (1 - abar_prev) / (1 - abar_t) x``,
variance ``(1 - alpha') (1 - abar_prev) / (1 - abar_t)``, noise only where ``t > 0``, then the clamp — diffusers'
``DDPMScheduler`` with ``timestep_spacing = "trailing"`` after ``set_timesteps(n)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vla_foundry_jax.layers.dense import Dense
from vla_foundry_jax.layers.losses import masked_mse
from vla_foundry_jax.layers.positional import sinusoidal_embedding
from vla_foundry_jax.models.backbones import ViTBackbone
from vla_foundry_jax.models.noise_scheduler import NoiseScheduler, scheduler_from_key, scheduler_key
from vla_foundry_jax.params.base import ParamsError
from vla_foundry_jax.params.model_params import DiffusionPolicyParams
from vla_foundry_jax.registry import ModelRecord, build_module, register_model

ACTION_KEYS = ("actions", "past_mask", "future_mask", "proprioception")  # repeated R times per sample


def check_policy_params(params: DiffusionPolicyParams) -> None:
    """Clear errors for a configuration the policy cannot be built from."""
    if params.transformer is None:
        raise ParamsError(
            "diffusion_policy.transformer is not set; bind the denoiser, e.g. "
            "`diffusion_policy.transformer = @head/transformer()` (the original has no default either)."
        )
    if params.transformer.type not in ("transformer", "transformer_hf"):
        raise ParamsError(
            f"diffusion_policy.transformer must be a transformer or transformer_hf, got {params.transformer.type!r}."
        )
    if params.action_dim is None or params.action_dim <= 0:
        raise ParamsError(
            f"diffusion_policy.action_dim = {params.action_dim} must be a positive int; robotics data fills it from "
            "its stats.json (training/resolve.py), otherwise bind `diffusion_policy.action_dim`."
        )
    if params.proprioception_dim < 0:
        raise ParamsError(f"diffusion_policy.proprioception_dim = {params.proprioception_dim} must be >= 0.")
    if params.diffusion_step_conditioning not in ("add", "concat"):
        raise ParamsError(
            f"diffusion_policy.diffusion_step_conditioning = {params.diffusion_step_conditioning!r} must be 'add' or "
            "'concat'."
        )
    if params.num_action_head_repeats is not None and params.num_action_head_repeats < 1:
        raise ParamsError(
            f"diffusion_policy.num_action_head_repeats = {params.num_action_head_repeats} must be None or >= 1."
        )
    if params.input_noise_std < 0:
        raise ParamsError(f"diffusion_policy.input_noise_std = {params.input_noise_std} must be >= 0.")


class DiffusionPolicy(nnx.Module):
    """See the module docstring. Constructor as every model: ``(params, *, rngs, dtype, param_dtype, remat_policy)``."""

    def __init__(
        self,
        params: DiffusionPolicyParams,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat_policy: str | None = None,
    ):
        check_policy_params(params)
        kw = {"dtype": dtype, "param_dtype": param_dtype, "remat_policy": remat_policy}
        self.dtype = dtype
        self.vision_language_backbone = build_module(params.vision_language_backbone, rngs=rngs, **kw)
        D_bb = int(self.vision_language_backbone.conditioning_dim)
        if D_bb % 2 or D_bb < 4:
            raise ParamsError(
                f"diffusion_policy: the backbone's conditioning dim {D_bb} must be even and >= 4 (the time table is "
                "initialised with [sin | cos] sinusoids of that width)."
            )
        tp = params.transformer
        if tp.type == "transformer" and not tp.resume_from_checkpoint:
            tp = tp.replace(vocab_size=1)  # the token table and head are never read (module docstring)
        self.transformer = build_module(tp, rngs=rngs, **kw)
        H = int(self.transformer.hidden_dim)
        A, P = int(params.action_dim), int(params.proprioception_dim)
        T = int(params.noise_scheduler.num_timesteps)
        lin = {"rngs": rngs, "init": "torch", "dtype": dtype, "param_dtype": param_dtype}  # nn.Linear's init
        table = sinusoidal_embedding(jnp.arange(T), D_bb)
        self.time_encoding = nnx.Param(table.astype(param_dtype), out_sharding=("pos", "embed"))
        self.action_encode = Dense(A, H, names=(None, "embed"), **lin)
        self.condition_encode = Dense(D_bb, H, names=("mlp", "embed"), **lin)
        self.proprioception_encode = Dense(P, H, names=(None, "embed"), **lin) if P > 0 else None
        self.output_layer = Dense(H, A, names=("embed", None), **lin)
        self.scheduler_key = scheduler_key(params)
        self.conditioning = params.diffusion_step_conditioning
        self.num_action_head_repeats = int(params.num_action_head_repeats or 1)
        self.input_noise_std = float(params.input_noise_std)
        self.action_dim, self.proprioception_dim, self.num_timesteps = A, P, T
        self.conditioning_dim, self.hidden_dim = D_bb, H
        scheduler_from_key(self.scheduler_key)  # configuration errors now

    @property
    def scheduler(self) -> NoiseScheduler:
        return scheduler_from_key(self.scheduler_key)

    # ------------------------------------------------------------------ pieces
    def condition(
        self,
        input_ids: jax.Array | None,
        pixel_values: jax.Array | None,
        attention_mask: jax.Array | None = None,
        attention_mask_images: jax.Array | None = None,
        **kwargs: Any,
    ) -> jax.Array:
        """Backbone conditioning tokens ``[B, Nc, D_bb]``."""
        return self.vision_language_backbone(input_ids, pixel_values, attention_mask, attention_mask_images, **kwargs)

    def encode_proprioception(
        self, proprioception: jax.Array | None, noise: jax.Array | None = None
    ) -> jax.Array | None:
        """``[B, p, P] -> [B, p, H_t]`` (+ ``noise``, already scaled, after the linear layer); None without P."""
        if self.proprioception_encode is None:
            return None
        if proprioception is None:
            raise ValueError(
                f"diffusion_policy.proprioception_dim = {self.proprioception_dim} but the batch has no "
                "proprioception; give proprioception [B, past + 1, P] or set proprioception_dim = 0."
            )
        if proprioception.shape[-1] != self.proprioception_dim:
            raise ValueError(
                f"proprioception has {proprioception.shape[-1]} features but diffusion_policy.proprioception_dim = "
                f"{self.proprioception_dim}."
            )
        out = self.proprioception_encode(proprioception)
        return out if noise is None else out + noise.astype(out.dtype)

    def build_sequence(
        self, cond: jax.Array, t: jax.Array, actions_embed: jax.Array, proprio: jax.Array | None
    ) -> jax.Array:
        """``[cond tokens, proprio tokens, action tokens]`` ``[B, S, H_t]`` (module docstring, token layout).

        ``cond [B, Nc, D_bb]``, ``t`` int ``[B]`` or scalar, ``actions_embed [B, Ta, H_t]``, ``proprio [B, p, H_t]``.
        """
        B = actions_embed.shape[0]
        te = jnp.take(self.time_encoding[...], jnp.broadcast_to(jnp.asarray(t, jnp.int32), (B,)), axis=0)
        te = te[:, None].astype(self.dtype)
        cond = cond.astype(self.dtype)
        if self.conditioning == "concat":
            cond = self.condition_encode(jnp.concatenate([te, cond], axis=1))
        else:
            cond = self.condition_encode(cond + te)
        parts = [cond] + ([] if proprio is None else [proprio.astype(self.dtype)]) + [actions_embed]
        return jnp.concatenate(parts, axis=1)

    def denoise(self, cond: jax.Array, t: jax.Array, x: jax.Array, proprio: jax.Array | None) -> jax.Array:
        """Prediction ``[B, Ta, A]`` (velocity or epsilon) for noisy actions ``x [B, Ta, A]`` at timestep ``t``."""
        Ta = x.shape[1]
        seq = self.build_sequence(cond, t, self.action_encode(x), proprio)
        hidden = self.transformer(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1]
        return self.output_layer(hidden[:, -Ta:])

    def __call__(
        self,
        input_ids: jax.Array | None,
        pixel_values: jax.Array | None,
        noisy_actions: jax.Array,
        t: jax.Array,
        attention_mask: jax.Array | None = None,
        attention_mask_images: jax.Array | None = None,
        proprioception: jax.Array | None = None,
        *,
        proprio_noise: jax.Array | None = None,
        train: bool = False,
        rngs: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
    ) -> jax.Array:
        """One denoiser forward: ``noisy_actions [B*R, Ta, A]`` at ``t [B*R]`` -> prediction ``[B*R, Ta, A]``.

        The backbone runs on the ``B`` unrepeated samples and its tokens are repeated ``R`` times per sample
        (``R = num_action_head_repeats``): the action side (``noisy_actions``, ``t``, ``proprioception``,
        ``proprio_noise``) must hold exactly ``B * R`` rows. ``train`` turns a ViT backbone's dropout
        (``vit_backbone.dropout``) on, with the key ``rngs``; the other backbones have no dropout.
        ``image_grid_thw`` goes to a Qwen-VL backbone with its flat ``pixel_values``.
        """
        extra = {} if image_grid_thw is None else {"image_grid_thw": image_grid_thw}
        if train and isinstance(self.vision_language_backbone, ViTBackbone):
            extra |= {"deterministic": False, "rngs": rngs}
        cond = self.condition(input_ids, pixel_values, attention_mask, attention_mask_images, **extra)
        R, B = self.num_action_head_repeats, cond.shape[0]
        if noisy_actions.shape[0] != B * R:
            raise ValueError(
                f"diffusion_policy: the action side has {noisy_actions.shape[0]} rows but the backbone batch is {B} "
                f"and num_action_head_repeats = {R}; the action batch must be {B} * {R} = {B * R}."
            )
        if R > 1:
            cond = jnp.repeat(cond, R, axis=0)
        proprio = self.encode_proprioception(proprioception, proprio_noise)
        return self.denoise(cond, t, noisy_actions, proprio)


def build_diffusion_policy(params: DiffusionPolicyParams, *, rngs: nnx.Rngs, **kwargs: Any) -> DiffusionPolicy:
    """Registry builder for ``type = "diffusion_policy"``."""
    return DiffusionPolicy(params, rngs=rngs, **kwargs)


def policy_frozen_paths(params: DiffusionPolicyParams) -> list[tuple[str, ...]]:
    """The denoiser's parameters the policy never reads, kept out of the optimizer (torch's AdamW skips
    parameters without gradients): the own transformer's token table, head and final norm; an HF denoiser's
    token table and head (its final norm is used)."""
    tp = params.transformer
    if tp is None:
        return []
    if tp.type == "transformer_hf":
        return [("transformer", "embed_tokens"), ("transformer", "lm_head")]
    return [("transformer", "embeddings"), ("transformer", "output"), ("transformer", "norm")]


# ---------------------------------------------------------------------- training
def repeat_action_side(batch: dict[str, jax.Array], R: int) -> dict[str, jax.Array]:
    """The action-side keys repeated ``R`` times per sample (rows ``iR .. iR+R-1``); other keys unchanged."""
    if R == 1:
        return dict(batch)
    return {k: (jnp.repeat(v, R, axis=0) if k in ACTION_KEYS else v) for k, v in batch.items()}


def training_forward(
    model: DiffusionPolicy, batch: dict[str, jax.Array], rng: jax.Array
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """``(prediction, target, extras)`` of one training forward (draws as in the module docstring).

    ``extras`` holds ``t``, ``noise`` and the repeated ``future_mask`` (the loss mask).
    """
    if rng is None:
        raise ValueError("diffusion_policy training needs an rng (timesteps, noise).")
    sched = model.scheduler
    R = model.num_action_head_repeats
    rep = repeat_action_side(batch, R)
    actions = rep["actions"]
    future = rep["future_mask"].astype(bool)
    Bp = actions.shape[0]
    k_t, k_noise, k_in, k_prop, k_drop = jax.random.split(rng, 5)
    t = jax.random.randint(k_t, (Bp,), 0, sched.num_timesteps)
    noise = jax.random.normal(k_noise, actions.shape, jnp.float32).astype(actions.dtype)
    noisy = sched.add_noise(actions, noise, t, mask=future)
    noisy = jnp.where(future[..., None], noisy, actions)  # past / padded steps are given clean (unclamped)
    prop_noise = None
    if model.input_noise_std > 0:
        noisy = noisy + model.input_noise_std * jax.random.normal(k_in, noisy.shape, jnp.float32).astype(noisy.dtype)
        if model.proprioception_dim > 0 and rep.get("proprioception") is not None:
            shape = (*rep["proprioception"].shape[:-1], model.hidden_dim)
            prop_noise = model.input_noise_std * jax.random.normal(k_prop, shape, jnp.float32)
    pred = model(
        batch.get("input_ids"),
        batch.get("pixel_values"),
        noisy,
        t,
        batch.get("attention_mask"),
        batch.get("attention_mask_images"),
        rep.get("proprioception"),
        proprio_noise=prop_noise,
        train=True,
        rngs=k_drop,
        image_grid_thw=batch.get("image_grid_thw"),
    )
    return pred, sched.training_target(actions, noise), {"t": t, "noise": noise, "future_mask": future}


def diffusion_policy_loss(
    model: DiffusionPolicy, batch: dict[str, jax.Array], *, hparams: Any = None, rng: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked MSE over ``future_mask`` to the scheduler's target (module docstring)."""
    del hparams
    pred, target, extras = training_forward(model, batch, rng)
    mask = extras["future_mask"]
    loss = masked_mse(pred, target, mask)
    n = jnp.sum(mask.astype(jnp.float32))
    return loss, {"mse": loss, "num_future_steps": n, "pred_abs_mean": jnp.mean(jnp.abs(pred.astype(jnp.float32)))}


def check_policy_batch(params: DiffusionPolicyParams, batch: dict[str, Any]) -> None:
    """Host-side shape checks of a robotics training batch against the policy's params."""
    A, P = params.action_dim, params.proprioception_dim
    acts = batch.get("actions")
    if acts is None or np.ndim(acts) != 3:
        raise ValueError(
            f"diffusion_policy needs actions [B, Ta, A] in the batch, got {None if acts is None else np.shape(acts)}."
        )
    B, Ta, a = np.shape(acts)
    if a != A:
        raise ValueError(
            f"the batch's actions have {a} features but diffusion_policy.action_dim = {A}; they must match (robotics "
            "data resolves action_dim from stats.json)."
        )
    for key in ("past_mask", "future_mask"):
        if key not in batch or tuple(np.shape(batch[key])) != (B, Ta):
            got = tuple(np.shape(batch[key])) if key in batch else None
            raise ValueError(f"diffusion_policy needs {key} [B, Ta] = {(B, Ta)}, got {got}.")
    if P > 0:
        prop = batch.get("proprioception")
        if prop is None or np.ndim(prop) != 3 or np.shape(prop)[0] != B or np.shape(prop)[2] != P:
            got = None if prop is None else tuple(np.shape(prop))
            raise ValueError(
                f"diffusion_policy.proprioception_dim = {P} needs proprioception [B, past + 1, {P}] with B = {B}, "
                f"got {got}."
            )
    px, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
    if px is not None and grid is not None:  # a Qwen-VL processor's flat patches, per sample
        m = batch.get("attention_mask_images")
        if np.ndim(px) != 3 or np.shape(px)[0] != B or np.ndim(grid) != 3 or np.shape(grid)[0] != B:
            raise ValueError(
                f"diffusion_policy with image_grid_thw needs per-sample flat patches pixel_values [B, P, D] and "
                f"image_grid_thw [B, N, 3] with B = {B}, got {np.shape(px)} and {np.shape(grid)}."
            )
        if m is not None and tuple(np.shape(m)) != tuple(np.shape(grid)[:2]):
            raise ValueError(
                f"attention_mask_images has shape {tuple(np.shape(m))} but image_grid_thw has [B, N] = "
                f"{tuple(np.shape(grid)[:2])}."
            )
    elif px is not None:
        if np.ndim(px) not in (4, 5) or np.shape(px)[0] != B or np.shape(px)[-1] != 3:
            raise ValueError(
                f"diffusion_policy needs channels-last pixel_values [B, N, H, W, 3] with B = {B}, got {np.shape(px)}."
            )
        m = batch.get("attention_mask_images")
        if m is not None and np.ndim(px) == 5 and tuple(np.shape(m)) != tuple(np.shape(px)[:2]):
            raise ValueError(
                f"attention_mask_images has shape {tuple(np.shape(m))} but pixel_values has [B, N] = "
                f"{tuple(np.shape(px)[:2])}."
            )
    ids = batch.get("input_ids")
    if ids is not None and np.shape(ids)[0] != B:
        raise ValueError(f"input_ids has {np.shape(ids)[0]} rows but actions have {B}.")


# ---------------------------------------------------------------------- sampling
def strided_ddpm_step(
    sched: NoiseScheduler, eps: jax.Array, t: jax.Array, x: jax.Array, k: int, noise: jax.Array
) -> jax.Array:
    """One DDPM posterior step from ``t`` to ``t - k`` (module docstring); ``k = 1`` is the scheduler's own."""
    if k == 1:
        return sched.step(eps, t, x, noise=noise)
    nd = x.ndim
    t = jnp.asarray(t)
    ac = jnp.asarray(sched.alphas_cumprod)
    abar = ac[t]
    abar_prev = jnp.where(t - k >= 0, ac[jnp.maximum(t - k, 0)], 1.0)
    abar, abar_prev = (jnp.reshape(v, jnp.shape(v) + (1,) * (nd - jnp.ndim(v))) for v in (abar, abar_prev))
    xf, ef = x.astype(jnp.float32), eps.astype(jnp.float32)
    alpha = abar / abar_prev
    beta = 1.0 - alpha
    x0 = (xf - jnp.sqrt(1.0 - abar) * ef) / jnp.sqrt(abar)
    if sched.kind == "ddpm_diffusers" and sched.clamp_range is not None:
        x0 = jnp.clip(x0, -sched.clamp_range[1], sched.clamp_range[1])
    mean = jnp.sqrt(abar_prev) * beta / (1.0 - abar) * x0 + jnp.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar) * xf
    var = beta * (1.0 - abar_prev) / (1.0 - abar)
    if sched.kind == "ddpm_diffusers":
        var = jnp.maximum(var, 1e-20)
    t_b = jnp.reshape(t, jnp.shape(t) + (1,) * (nd - jnp.ndim(t)))
    out = jnp.where(t_b > 0, mean + jnp.sqrt(var) * noise.astype(jnp.float32), mean)
    return sched.clamp(out.astype(x.dtype))


def inference_timesteps(sched: NoiseScheduler, num_inference_steps: int | None) -> tuple[np.ndarray, int]:
    """``(timesteps T-1, T-1-k, ... >= 0, k)`` with ``k = max(1, T // n)``; ``n`` in ``[1, T]``."""
    T = sched.num_timesteps
    n = T if num_inference_steps is None else int(num_inference_steps)
    if not 0 < n <= T:
        raise ValueError(f"num_inference_steps must be in [1, num_timesteps = {T}], got {num_inference_steps}.")
    k = max(1, T // n)
    return np.arange(T - 1, -1, -k, dtype=np.int32), k


def _sample_body(graphdef: Any, state: Any, batch: dict[str, jax.Array], rng: jax.Array, *, num_inference_steps: Any):
    model = nnx.merge(graphdef, state)
    sched = model.scheduler
    ts_np, k = inference_timesteps(sched, num_inference_steps)
    ts = jnp.asarray(ts_np)
    actions = batch["actions"]
    grid = {"image_grid_thw": batch["image_grid_thw"]} if "image_grid_thw" in batch else {}
    cond = model.condition(
        batch.get("input_ids"),
        batch.get("pixel_values"),
        batch.get("attention_mask"),
        batch.get("attention_mask_images"),
        **grid,
    )
    proprio = model.encode_proprioception(batch.get("proprioception"))
    per_row = rng.ndim == 2  # one key per row: each row's noise does not depend on the rest of the batch
    if per_row:
        init_key, loop_key = rng, jax.vmap(lambda k: jax.random.fold_in(k, 1))(rng)
        x = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), actions.shape[1:], jnp.float32))(rng)
    else:
        init_key, loop_key = jax.random.split(rng)
        x = jax.random.normal(init_key, actions.shape, jnp.float32)
    x = x.astype(actions.dtype)
    past = batch.get("past_mask")
    past = None if past is None else past.astype(bool)[..., None]
    if past is not None:
        x = jnp.where(past, actions, x)

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t = ts[i]
        # NNX Variables must be created at the loop's trace level: rebuild the module inside the body.
        pred = nnx.merge(graphdef, jax.tree.map(lambda v: v, state)).denoise(cond, t, x, proprio)
        if sched.is_ddpm:
            if per_row:
                z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], jnp.float32))(loop_key)
            else:
                z = jax.random.normal(jax.random.fold_in(loop_key, i), x.shape, jnp.float32)
            x_new = strided_ddpm_step(sched, pred, t, x, k, z)
        else:
            x_new = sched.step(pred, t, x, step_size=k)
        return x_new if past is None else jnp.where(past, actions, x_new)

    return jax.lax.fori_loop(0, ts.shape[0], body, x)


_sample = jax.jit(_sample_body, static_argnames=("graphdef", "num_inference_steps"))


def sample_actions(
    model: DiffusionPolicy,
    batch: dict[str, Any],
    rng: jax.Array,
    *,
    num_inference_steps: int | None = None,
) -> jax.Array:
    """Denoised actions ``[B, Ta, A]`` in the normalised action space (module docstring, sampling).

    ``batch``: ``input_ids`` / ``pixel_values`` (+ masks) for the backbone, ``actions [B, Ta, A]`` (gives ``Ta``;
    its past steps are kept where ``past_mask`` is True, the rest is ignored), optional ``past_mask [B, Ta]`` and
    ``proprioception``. Other keys (``future_mask``, ...) are ignored. One jit per (model graph, steps, shapes).
    """
    _check_actions(model, batch)
    inference_timesteps(model.scheduler, num_inference_steps)  # clear error before tracing
    graphdef, state = nnx.split(model)  # the jit below is cached by graph (a static argument)
    return _sample(graphdef, state, _sampler_inputs(model, batch), rng, num_inference_steps=num_inference_steps)


def _check_actions(model: DiffusionPolicy, batch: dict[str, Any]) -> None:
    if "actions" not in batch:
        raise ValueError(
            "sampling needs batch['actions'] [B, Ta, A]: it fixes Ta and carries the known past actions "
            "(zeros are fine where past_mask is False)."
        )
    acts = np.shape(batch["actions"])
    if len(acts) != 3 or acts[-1] != model.action_dim:
        raise ValueError(f"batch['actions'] must be [B, Ta, {model.action_dim}] (action_dim), got {acts}.")


def _sampler_inputs(model: DiffusionPolicy, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """The batch entries the sampler reads, as arrays."""
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "attention_mask_images", "actions")
    keys += ("past_mask",)
    keys += ("proprioception",) if model.proprioception_dim > 0 else ()
    return {k: jnp.asarray(batch[k]) for k in keys if batch.get(k) is not None}


def action_sampler(
    model: DiffusionPolicy, *, num_inference_steps: int | None = None
) -> Callable[[dict[str, Any], jax.Array], jax.Array]:
    """``sample(batch, rng) -> actions`` as :func:`sample_actions`, with the model split once (for a serving loop).

    ``rng``: one key for the batch, or one key per row (``[B, 2]``): then each row's noise depends only on its key,
    so a row samples the same actions whatever else is in the batch.
    """
    inference_timesteps(model.scheduler, num_inference_steps)  # clear error before tracing
    graphdef, state = nnx.split(model)
    # one jit bound to this graph, so a call does not hash the graph as a static argument (~0.2 ms at batch 1)
    run = jax.jit(functools.partial(_sample_body, graphdef, num_inference_steps=num_inference_steps))

    def sample(batch: dict[str, Any], rng: jax.Array) -> jax.Array:
        _check_actions(model, batch)
        return run(state, _sampler_inputs(model, batch), rng)

    return sample


def policy_eval_metrics(model: DiffusionPolicy, batch: dict[str, Any], rng: jax.Array) -> dict[str, jax.Array]:
    """``val_action_mse``: actions sampled with the model's default inference steps against the data's, masked MSE
    over the future steps in the normalised action space."""
    pred = sample_actions(model, batch, rng)
    return {"val_action_mse": masked_mse(pred, batch["actions"], batch["future_mask"])}


register_model(
    ModelRecord(
        params=DiffusionPolicyParams,
        builder=build_diffusion_policy,
        loss=diffusion_policy_loss,
        batch_check=check_policy_batch,
        frozen_paths=policy_frozen_paths,
        eval_metrics=policy_eval_metrics,
    )
)
