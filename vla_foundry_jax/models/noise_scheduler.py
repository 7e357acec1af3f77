"""Noise schedulers of the diffusion models (reference §3.8.2), as a frozen pytree of tables plus pure functions.

:func:`make_scheduler` picks one of three kinds, in the original's order (``create_noise_scheduler``):

* ``"ddpm_diffusers"`` when ``use_diffusers_scheduler`` (wins over ``use_flow_matching_scheduler``): a
  re-implementation of diffusers' ``DDPMScheduler`` exactly as the original builds it,
  ``DDPMScheduler(num_train_timesteps=T, clip_sample=clamp_range is not None, clip_sample_range=clamp_range[1])``
  with every other argument at diffusers' default (linear betas, epsilon prediction, ``fixed_small`` variance,
  no thresholding, no ``set_timesteps`` call, so ``prev_t = t - 1``).
  **Quirk kept**: the original does not pass ``beta_start``/``beta_end`` to diffusers, so this kind always uses
  diffusers' defaults ``1e-4``/``0.02`` whatever ``noise_scheduler.beta_start``/``beta_end`` say (a warning is
  logged when they differ). diffusers' ``clip_sample_range`` is one number, so an asymmetric ``clamp_range`` is a
  :class:`ParamsError` ("Asymmetric clamp range with the diffusers scheduler").
* ``"flow_matching"`` when ``use_flow_matching_scheduler``: no tables (the original's is a plain object with
  nothing in the state dict).
* ``"ddpm"`` otherwise: the original's own ``NoiseSchedulerDDPM``.

Tables are built on the host in float32 the way torch builds them (``linspace`` in float32, ``1 - beta`` in
float32, ``cumprod`` accumulated in float64 and rounded per element as torch's CPU kernel does); torch's
vectorised float32 ``linspace`` may differ from the numpy one by 1 ulp in some betas, which is far below any
test tolerance. The own DDPM's tables are buffers in the original's state dict; here they are plain constants
(a checkpoint converter should drop or compare ``scheduler.*`` keys, not load them). Under ``amp_bfloat16``
without FSDP the original casts those buffers to bf16; here they stay float32 and every DDPM computation is done
in float32 and cast back to the sample's dtype (flow matching computes in the sample's dtype, as the original).

Functions (all pure, traceable under ``jax.jit``; ``t`` is an integer scalar or a ``[B]`` vector broadcast over
the trailing dims; the scheduler itself is a pytree with static kind / ``T`` / clamp range and array tables, so it
can be closed over or passed through ``jit``):

* ``add_noise(x0, noise, t, mask=None)``: DDPM ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; flow
  ``x0 + s (noise - x0)`` with ``s = t / T`` computed in x0's dtype. With a mask (``[B, Ta]`` for ``[B, Ta, A]``,
  broadcast by appending singleton dims): DDPM ``mask * noisy + (1 - mask) * x0``, flow
  ``x0 + s (noise - x0) * mask`` (the original's two formulas). Then the clamp to ``clamp_range`` — **the clamp is
  applied to training inputs too** (the original's behaviour, kept). The original's diffusers wrapper's mask
  handling is not described by the reference; here it uses the own DDPM's blend.
* ``training_target(x0, noise)``: epsilon ``noise`` for both DDPMs, velocity ``noise - x0`` for flow matching —
  the stable-diffusion batch handler's rule. The diffusion policy's target is *always* ``noise - x0`` whatever the
  scheduler (reference §3.9, §8 item 6): it must not call this.
* ``step(model_output, t, x_t, rng=None, *, noise=None, step_size=1)``: one reverse step.
  Own DDPM: ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``, posterior mean
  ``sqrt(abar_prev_t) beta_t / (1 - abar_t) x0_hat + sqrt(alpha_t) (1 - abar_prev_t) / (1 - abar_t) x_t``, plus
  ``sqrt(post_var_t) z`` where ``t > 0``, then the clamp (no x0 clipping). diffusers DDPM: the same with diffusers'
  formulation (``alpha_t = abar_t / abar_prev_t``), ``x0_hat`` clipped to ``±clamp_range[1]`` (``clip_sample``),
  variance ``max(beta_t (1 - abar_prev_t) / (1 - abar_t), 1e-20)``, then the original's clamp of the result.
  ``z`` is ``noise`` when given (to replay another implementation's draws) else ``normal(rng)``; a DDPM step
  with neither is an error (``t`` may be traced, so whether noise is needed is not known at trace time).
  Flow: ``x - v_hat * step_size / T`` then the clamp; ``t`` and ``rng`` are ignored. A DDPM step only goes
  from ``t`` to ``t - 1`` (``step_size`` must be 1): the original's DDPM ``step`` has no ``step_size`` argument,
  so its diffusion-policy inference raises ``TypeError`` with a DDPM scheduler; here the policy's strided loop
  raises a ``ValueError`` instead, and the full ``T``-step DDPM loop works.
* ``timesteps(num_inference_steps=None)`` / ``inference_step_size(...)``: host-side int32 schedule
  ``T - 1, T - 1 - k, T - 1 - 2k, ... >= 0`` with ``k = max(1, T // n)`` (``n = T`` when None).
  **Quirk fixed**: the original's loops stop *before* 0 (``range(T - 1, 0, -k)``): stable-diffusion sampling runs
  ``T - 1`` steps, never executes ``t = 0`` (DDPM: the final ``x0_hat`` step; flow: ends at time ``1/T``); the
  stop is inclusive here, so ``t = 0`` runs whenever the schedule reaches it. That only changes schedules where
  ``k`` divides ``T - 1`` (``k = 1``, i.e. stable diffusion and ``n > T // 2``); the diffusion policy's usual
  schedules (``T = 1000``, ``n = 8`` or ``10``: ``999 .. 124`` / ``999 .. 99``) are the original's.
* ``sample(denoise_fn, shape, rng, num_inference_steps=None, *, dtype, x_init=None, after_step=None)``: starts
  from ``x_init`` or ``N(0, I)``, runs every timestep above in one ``jax.lax.fori_loop`` with
  ``x = step(denoise_fn(x, t), t, x, fold_in(key, i), step_size=k)`` (then ``after_step(x)``, e.g. the policy's
  past-action inpainting) and returns ``x``. Classifier-free guidance belongs in ``denoise_fn``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from vla_foundry_jax.params.base import ParamsError
from vla_foundry_jax.params.model_params import NoiseSchedulerParams
from vla_foundry_jax.registry import ModelRecord, register_model

logger = logging.getLogger(__name__)

SchedulerKind = Literal["ddpm", "ddpm_diffusers", "flow_matching"]

# diffusers' DDPMScheduler defaults, which the original's wrapper uses whatever the params say (quirk kept).
DIFFUSERS_BETA_START = 0.0001
DIFFUSERS_BETA_END = 0.02
_DIFFUSERS_MIN_VARIANCE = 1e-20


def _linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    return np.linspace(start, end, num, dtype=np.float64).astype(np.float32)


def _ddpm_tables(beta_start: float, beta_end: float, num_timesteps: int) -> dict[str, np.ndarray]:
    """float32 tables built as torch builds them (cumprod accumulated in float64 like torch's CPU kernel)."""
    betas = _linspace_f32(beta_start, beta_end, num_timesteps)
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    alphas_cumprod_prev = np.concatenate([np.ones(1, np.float32), alphas_cumprod[:-1]])
    # the own DDPM's posterior variance, in the original's operation order (the diffusers kind recomputes its own)
    posterior_variance = (betas * (np.float32(1.0) - alphas_cumprod_prev) / (np.float32(1.0) - alphas_cumprod)).astype(
        np.float32
    )
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "posterior_variance": posterior_variance,
    }


def _expand_to(v: jax.Array, ndim: int) -> jax.Array:
    """Append singleton dims so ``v`` (scalar or ``[B, ...]``) broadcasts over a rank-``ndim`` sample."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _gather(table: np.ndarray | jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    return _expand_to(jnp.asarray(table)[jnp.asarray(t)], ndim)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoiseScheduler:
    """Tables (pytree leaves; None for flow matching) and static settings of one scheduler (see module doc)."""

    kind: SchedulerKind = dataclasses.field(metadata={"static": True})
    num_timesteps: int = dataclasses.field(metadata={"static": True})
    clamp_range: tuple[float, float] | None = dataclasses.field(metadata={"static": True})
    betas: np.ndarray | jax.Array | None = None
    alphas: np.ndarray | jax.Array | None = None
    alphas_cumprod: np.ndarray | jax.Array | None = None
    alphas_cumprod_prev: np.ndarray | jax.Array | None = None
    posterior_variance: np.ndarray | jax.Array | None = None

    @property
    def is_ddpm(self) -> bool:
        return self.kind != "flow_matching"

    # ---------------------------------------------------------------- training side
    def clamp(self, x: jax.Array) -> jax.Array:
        if self.clamp_range is None:
            return x
        return jnp.clip(x, self.clamp_range[0], self.clamp_range[1]).astype(x.dtype)

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        nd = x0.ndim
        if self.kind == "flow_matching":
            s = _expand_to(jnp.asarray(t).astype(x0.dtype) / self.num_timesteps, nd).astype(x0.dtype)
            delta = s * (noise.astype(x0.dtype) - x0)
            if mask is not None:
                delta = delta * _expand_to(mask, nd).astype(x0.dtype)
            return self.clamp(x0 + delta)
        if self.kind == "ddpm_diffusers":
            # diffusers casts alphas_cumprod to the sample dtype before the square roots
            abar = _gather(self.alphas_cumprod, t, nd).astype(x0.dtype)
            noisy = (abar**0.5 * x0 + (1 - abar) ** 0.5 * noise.astype(x0.dtype)).astype(x0.dtype)
        else:
            abar = _gather(self.alphas_cumprod, t, nd)
            x32 = x0.astype(jnp.float32)
            noisy = (jnp.sqrt(abar) * x32 + jnp.sqrt(1.0 - abar) * noise.astype(jnp.float32)).astype(x0.dtype)
        if mask is not None:
            m = _expand_to(mask, nd).astype(x0.dtype)
            noisy = m * noisy + (1 - m) * x0
        return self.clamp(noisy)

    def training_target(self, x0: jax.Array, noise: jax.Array, t: jax.Array | None = None) -> jax.Array:
        del t  # neither target depends on t
        if self.kind == "flow_matching":
            return noise - x0
        return noise

    # ---------------------------------------------------------------- sampling side
    def step(
        self,
        model_output: jax.Array,
        t: jax.Array | int,
        x_t: jax.Array,
        rng: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
        step_size: int = 1,
    ) -> jax.Array:
        if self.kind == "flow_matching":
            return self.clamp(x_t - model_output.astype(x_t.dtype) * step_size / self.num_timesteps)
        if step_size != 1:
            raise ValueError(
                f"A DDPM step goes from t to t - 1 only (got step_size={step_size}); the original's DDPM schedulers "
                "have no step_size (its strided diffusion-policy inference raises TypeError with them). "
                "Use use_flow_matching_scheduler for strided sampling."
            )
        if noise is None and rng is None:
            raise ValueError("A DDPM step needs rng (or an explicit noise array) for the posterior-variance noise.")
        nd = x_t.ndim
        t = jnp.asarray(t)
        x = x_t.astype(jnp.float32)
        eps = model_output.astype(jnp.float32)
        abar = _gather(self.alphas_cumprod, t, nd)
        abar_prev = _gather(self.alphas_cumprod_prev, t, nd)
        if noise is None:
            noise = jax.random.normal(rng, x_t.shape, jnp.float32)
        z = noise.astype(jnp.float32)
        if self.kind == "ddpm_diffusers":
            beta_prod = 1.0 - abar
            beta_prod_prev = 1.0 - abar_prev
            cur_alpha = abar / abar_prev
            cur_beta = 1.0 - cur_alpha
            x0_hat = (x - beta_prod**0.5 * eps) / abar**0.5
            if self.clamp_range is not None:  # clip_sample=True, clip_sample_range=clamp_range[1]
                r = self.clamp_range[1]
                x0_hat = jnp.clip(x0_hat, -r, r)
            mean = (abar_prev**0.5 * cur_beta) / beta_prod * x0_hat + cur_alpha**0.5 * beta_prod_prev / beta_prod * x
            var = jnp.maximum(beta_prod_prev / beta_prod * cur_beta, _DIFFUSERS_MIN_VARIANCE)
        else:
            beta = _gather(self.betas, t, nd)
            alpha = _gather(self.alphas, t, nd)
            x0_hat = (x - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
            mean = (
                jnp.sqrt(abar_prev) * beta / (1.0 - abar) * x0_hat
                + jnp.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar) * x
            )
            var = _gather(self.posterior_variance, t, nd)
        out = jnp.where(_expand_to(t, nd) > 0, mean + var**0.5 * z, mean)
        return self.clamp(out.astype(x_t.dtype))

    def inference_step_size(self, num_inference_steps: int | None = None) -> int:
        T = self.num_timesteps
        n = T if num_inference_steps is None else int(num_inference_steps)
        if not 0 < n <= T:
            raise ValueError(f"num_inference_steps must be in [1, num_timesteps={T}], got {num_inference_steps}.")
        k = max(1, T // n)
        if self.is_ddpm and k != 1:
            raise ValueError(
                f"DDPM sampling runs every timestep (num_inference_steps = num_timesteps = {T}, got {n}); strided "
                "sampling needs use_flow_matching_scheduler."
            )
        return k

    def timesteps(self, num_inference_steps: int | None = None) -> np.ndarray:
        k = self.inference_step_size(num_inference_steps)
        return np.arange(self.num_timesteps - 1, -1, -k, dtype=np.int32)

    def sample(
        self,
        denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
        shape: tuple[int, ...],
        rng: jax.Array,
        num_inference_steps: int | None = None,
        *,
        dtype: jnp.dtype = jnp.float32,
        x_init: jax.Array | None = None,
        after_step: Callable[[jax.Array], jax.Array] | None = None,
    ) -> jax.Array:
        k = self.inference_step_size(num_inference_steps)
        ts = jnp.asarray(self.timesteps(num_inference_steps))
        init_key, loop_key = jax.random.split(rng)
        x = jax.random.normal(init_key, shape, dtype) if x_init is None else jnp.asarray(x_init, dtype)

        def body(i, x):
            t = ts[i]
            x = self.step(denoise_fn(x, t), t, x, jax.random.fold_in(loop_key, i), step_size=k)
            return x if after_step is None else after_step(x)

        return jax.lax.fori_loop(0, ts.shape[0], body, x)


def make_scheduler(
    params: NoiseSchedulerParams, *, use_diffusers_scheduler: bool, use_flow_matching_scheduler: bool
) -> NoiseScheduler:
    """The original's ``create_noise_scheduler``: diffusers DDPM > flow matching > own DDPM (module doc)."""
    T = int(params.num_timesteps)
    clamp = None if params.clamp_range is None else (float(params.clamp_range[0]), float(params.clamp_range[1]))
    if use_diffusers_scheduler:
        if clamp is not None and clamp[0] != -clamp[1]:
            raise ParamsError(
                f"Asymmetric clamp range with the diffusers scheduler: noise_scheduler.clamp_range = "
                f"{params.clamp_range} but use_diffusers_scheduler needs (-r, r) (diffusers' clip_sample_range is "
                "one bound)."
            )
        if (params.beta_start, params.beta_end) != (DIFFUSERS_BETA_START, DIFFUSERS_BETA_END):
            logger.warning(
                "use_diffusers_scheduler ignores noise_scheduler.beta_start/beta_end = %s/%s and uses diffusers' "
                "defaults %s/%s, as the original does.",
                params.beta_start,
                params.beta_end,
                DIFFUSERS_BETA_START,
                DIFFUSERS_BETA_END,
            )
        return NoiseScheduler("ddpm_diffusers", T, clamp, **_ddpm_tables(DIFFUSERS_BETA_START, DIFFUSERS_BETA_END, T))
    if use_flow_matching_scheduler:
        return NoiseScheduler("flow_matching", T, clamp)
    return NoiseScheduler("ddpm", T, clamp, **_ddpm_tables(params.beta_start, params.beta_end, T))


def make_scheduler_from(model_params) -> NoiseScheduler:
    """:func:`make_scheduler` from a ``StableDiffusionParams`` / ``DiffusionPolicyParams``."""
    return make_scheduler(
        model_params.noise_scheduler,
        use_diffusers_scheduler=model_params.use_diffusers_scheduler,
        use_flow_matching_scheduler=model_params.use_flow_matching_scheduler,
    )


def scheduler_key(model_params: Any) -> tuple[Any, ...]:
    """A hashable key of a ``StableDiffusionParams`` / ``DiffusionPolicyParams``'s scheduler settings (kept on the
    module instead of the params); :func:`scheduler_from_key` builds its scheduler."""
    ns = model_params.noise_scheduler
    clamp = None if ns.clamp_range is None else tuple(float(c) for c in ns.clamp_range)
    return (
        int(ns.num_timesteps),
        float(ns.beta_start),
        float(ns.beta_end),
        clamp,
        bool(model_params.use_diffusers_scheduler),
        bool(model_params.use_flow_matching_scheduler),
    )


@functools.lru_cache(maxsize=32)
def scheduler_from_key(key: tuple[Any, ...]) -> NoiseScheduler:
    """:func:`make_scheduler` of a :func:`scheduler_key` (cached)."""
    T, b0, b1, clamp, use_diffusers, use_flow = key
    ns = NoiseSchedulerParams(num_timesteps=T, beta_start=b0, beta_end=b1, clamp_range=clamp)
    return make_scheduler(ns, use_diffusers_scheduler=use_diffusers, use_flow_matching_scheduler=use_flow)


# Tables, not weights: built inside its parent by make_scheduler, never by build_model.
register_model(ModelRecord(params=NoiseSchedulerParams, builder=None))
