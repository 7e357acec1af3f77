"""The original's own conditional UNet (reference §3.8.3), channels-last, in Flax NNX.

``UNet(params: UNetParams)``; ``__call__(x [B, H, W, in_channels], t (int scalar or [B]), text=None [B, S, txt])
-> [B, H, W, out_channels]`` (the original takes channels-first ``[B, C, H, W]``). With ``C = channels``,
``E = 4 * time_emb_dim``, ``txt = text_emb_dim``, ``L = len(channels)``:

* time MLP: :func:`sinusoidal_embedding` (``time_emb_dim``) -> Linear(te, E) -> SiLU -> Linear(E, E); with
  ``time_mlp_float32`` its parameters and arithmetic are float32 (the original's ``Float32Module``); the result is
  cast to the compute dtype. A scalar ``t`` is broadcast to ``[B]``.
* :class:`ResnetBlock` (in, out): ``h = conv3x3(SiLU(GN8(x)))``; ``h += Linear(E, out)(t_emb)``;
  ``h += Linear(txt, out)(pooled_text)`` when text is given; ``h = conv3x3(SiLU(GN8(h)))``; ``h + shortcut(x)``
  (1x1 conv when in != out). GroupNorm: 8 groups, eps 1e-5, statistics in float32.
* :class:`SelfAttentionBlock`: single-head attention over the ``H * W`` tokens of ``GN8(x)`` (1x1-conv q/k/v,
  scale ``1/sqrt(c)``), ``x + proj_out(.)``; :class:`CrossAttentionBlock`: q from ``GN8(x)``, k/v =
  Linear(txt, c) of the text tokens (no text mask, as the original), ``x + proj_out(.)``. Scores in float32.
* layout: ``init_conv`` 3x3 (in -> C0); down level i: Resnet(prev, Ci), Resnet(Ci, Ci), SelfAttn if i >= 2,
  CrossAttn if i >= 1; for i < L-1 push a skip and downsample (3x3 conv, stride 2, pad 1). Middle: Resnet,
  SelfAttn, CrossAttn, Resnet. Up level i over reversed C: for i > 0 concatenate ``[x, skip]`` on channels;
  Resnet(in, c), Resnet(c, c), SelfAttn if L-1-i >= 2, CrossAttn if L-1-i >= 1; for i < L-1 upsample
  (ConvTranspose 4x4, stride 2, pad 1). Output: GN8 -> SiLU -> conv3x3 (C0 -> out).
* text conditioning: ``pooled_text = max over the sequence`` feeds every ResnetBlock; the full sequence feeds the
  cross-attention blocks. Cross-attention blocks and the pooled-text projections exist when ``text_emb_dim > 0``
  and are skipped at call time when ``text`` is None (the original's "if text embeddings given").

Parameters (kernels channels-last, ``[kh, kw, in, out]``; a torch ``Conv2d.weight [out, in, kh, kw]`` maps by
``transpose(2, 3, 1, 0)``; the upsampler's ``ConvTranspose2d.weight [in, out, 4, 4]`` by
``[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)``: a transposed conv is the conv over the 2-dilated input, computed
here as one ordinary conv per output phase, interleaved, because XLA's CPU backend differentiates input-dilated
convolutions about 100x slower). Init: PyTorch's default (``U(+-1/sqrt(fan_in))`` for weights and biases),
GroupNorm 1 / 0.
Logical axes: conv kernels ``(None, None, "conv_in", "conv_out")``, dense kernels ``("embed", "mlp")`` and
biases ``("mlp",)`` / ``("conv_out",)``, norms ``("norm",)``; only "embed"/"mlp" are sharded by the mesh rules.

Checks (``ValueError`` naming the field): ``unet.channels`` empty or not multiples of 8 (GroupNorm's 8 groups),
``unet.image_size`` not divisible by ``2 ** (len(channels) - 1)``, ``time_emb_dim`` < 4 (the sinusoidal
embedding divides by ``half - 1``); at call time an input whose spatial size or channels differ from
``image_size`` / ``in_channels``, and text whose width differs from ``text_emb_dim``.

No registry builder: the original builds the UNet only inside ``stable_diffusion`` (``unet`` params are never a
top-level model), and a bare UNet has no loss; :func:`build_unet` is the plain constructor.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.convert.diffusers_unet_maps import load_unet_weights
from vla_foundry_jax.layers.attention import softmax_attention
from vla_foundry_jax.layers.conv import Conv2d
from vla_foundry_jax.layers.dense import Dense
from vla_foundry_jax.layers.norms import GroupNorm
from vla_foundry_jax.layers.positional import sinusoidal_embedding
from vla_foundry_jax.layers.stack import check_remat_policy, remat
from vla_foundry_jax.params.model_params import UNetParams
from vla_foundry_jax.registry import ModelRecord, register_model

GN_GROUPS = 8
GN_EPS = 1e-5


def _dense(din: int, dout: int, *, rngs: nnx.Rngs, **kw: Any) -> Dense:
    """``nn.Linear(din, dout)`` (torch-default init), logical axes ``("embed", "mlp")``."""
    return Dense(din, dout, names=("embed", "mlp"), init="torch", rngs=rngs, **kw)


def _group_norm(c: int, **kw: Any) -> GroupNorm:
    return GroupNorm(c, GN_GROUPS, GN_EPS, **kw)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Single-head ``softmax(q k^T / sqrt(c)) v`` for ``q [B, N, c]``, ``k, v [B, M, c]``; scores float32."""
    return softmax_attention(q[:, :, None], k[:, :, None], v[:, :, None], upcast=False)[:, :, 0]


class ResnetBlock(nnx.Module):
    def __init__(self, din: int, dout: int, time_dim: int, text_dim: int, *, rngs: nnx.Rngs, **kw: Any):
        self.norm1 = _group_norm(din, **kw)
        self.conv1 = Conv2d(din, dout, 3, rngs=rngs, **kw)
        self.time_proj = _dense(time_dim, dout, rngs=rngs, **kw)
        self.text_proj = _dense(text_dim, dout, rngs=rngs, **kw) if text_dim > 0 else None
        self.norm2 = _group_norm(dout, **kw)
        self.conv2 = Conv2d(dout, dout, 3, rngs=rngs, **kw)
        self.shortcut = Conv2d(din, dout, 1, rngs=rngs, **kw) if din != dout else None

    def __call__(self, x: jax.Array, t_emb: jax.Array, pooled_text: jax.Array | None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.time_proj(t_emb)[:, None, None, :]
        if pooled_text is not None and self.text_proj is not None:
            h = h + self.text_proj(pooled_text)[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.shortcut is None else self.shortcut(x))


class SelfAttentionBlock(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs, **kw: Any):
        self.norm = _group_norm(c, **kw)
        self.q = Conv2d(c, c, 1, rngs=rngs, **kw)
        self.k = Conv2d(c, c, 1, rngs=rngs, **kw)
        self.v = Conv2d(c, c, 1, rngs=rngs, **kw)
        self.proj_out = Conv2d(c, c, 1, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(B, H * W, C) for m in (self.q, self.k, self.v))
        return x + self.proj_out(_attend(q, k, v).reshape(B, H, W, C))


class CrossAttentionBlock(nnx.Module):
    def __init__(self, c: int, text_dim: int, *, rngs: nnx.Rngs, **kw: Any):
        self.norm = _group_norm(c, **kw)
        self.q = Conv2d(c, c, 1, rngs=rngs, **kw)
        self.k = _dense(text_dim, c, rngs=rngs, **kw)
        self.v = _dense(text_dim, c, rngs=rngs, **kw)
        self.proj_out = Conv2d(c, c, 1, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, text: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        q = self.q(self.norm(x)).reshape(B, H * W, C)
        return x + self.proj_out(_attend(q, self.k(text), self.v(text)).reshape(B, H, W, C))


class Level(nnx.Module):
    """Two ResnetBlocks, optional self- and cross-attention, optional down/upsampler."""

    def __init__(
        self,
        din: int,
        c: int,
        time_dim: int,
        text_dim: int,
        *,
        self_attn: bool,
        cross_attn: bool,
        resample: str | None,
        rngs: nnx.Rngs,
        **kw: Any,
    ):
        self.res1 = ResnetBlock(din, c, time_dim, text_dim, rngs=rngs, **kw)
        self.res2 = ResnetBlock(c, c, time_dim, text_dim, rngs=rngs, **kw)
        self.self_attn = SelfAttentionBlock(c, rngs=rngs, **kw) if self_attn else None
        self.cross_attn = CrossAttentionBlock(c, text_dim, rngs=rngs, **kw) if cross_attn and text_dim > 0 else None
        if resample == "down":
            self.resample = Conv2d(c, c, 3, stride=2, padding=1, rngs=rngs, **kw)
        elif resample == "up":
            self.resample = Conv2d(c, c, 4, stride=2, padding=1, transpose=True, rngs=rngs, **kw)
        else:
            self.resample = None


class UNet(nnx.Module):
    """See the module docstring."""

    def __init__(
        self,
        params: UNetParams,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat_policy: str | None = None,
        where: str = "unet",
    ):
        check_unet_params(params, where)
        check_remat_policy(remat_policy)
        self.remat_policy = remat_policy
        self.dtype = dtype
        self.in_channels = int(params.in_channels)
        self.image_size = int(params.image_size)
        self.time_emb_dim = int(params.time_emb_dim)
        self.text_emb_dim = int(params.text_emb_dim)
        self.time_mlp_float32 = bool(params.time_mlp_float32)
        self.where = where
        C = [int(c) for c in params.channels]
        L = len(C)
        E = 4 * self.time_emb_dim
        txt = self.text_emb_dim
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        tkw = {"dtype": jnp.float32, "param_dtype": jnp.float32} if self.time_mlp_float32 else kw
        self.time_fc1 = _dense(self.time_emb_dim, E, rngs=rngs, **tkw)
        self.time_fc2 = _dense(E, E, rngs=rngs, **tkw)
        self.init_conv = Conv2d(self.in_channels, C[0], 3, rngs=rngs, **kw)

        def level(din: int, c: int, depth: int, resample: str | None) -> Level:
            """A level at ``depth`` (0 = full resolution): self-attention from depth 2, cross-attention from 1."""
            return Level(
                din, c, E, txt, self_attn=depth >= 2, cross_attn=depth >= 1, resample=resample, rngs=rngs, **kw
            )

        down, prev = [], C[0]
        for i, c in enumerate(C):
            down.append(level(prev, c, i, "down" if i < L - 1 else None))
            prev = c
        self.down = nnx.List(down)
        self.mid_res1 = ResnetBlock(C[-1], C[-1], E, txt, rngs=rngs, **kw)
        self.mid_self_attn = SelfAttentionBlock(C[-1], rngs=rngs, **kw)
        self.mid_cross_attn = CrossAttentionBlock(C[-1], txt, rngs=rngs, **kw) if txt > 0 else None
        self.mid_res2 = ResnetBlock(C[-1], C[-1], E, txt, rngs=rngs, **kw)
        up, rev = [], C[::-1]
        for i, c in enumerate(rev):
            din = rev[0] if i == 0 else rev[i - 1] + c  # [x, skip]: skip of this resolution has c channels
            up.append(level(din, c, L - 1 - i, "up" if i < L - 1 else None))
        self.up = nnx.List(up)
        self.out_norm = _group_norm(C[0], **kw)
        self.out_conv = Conv2d(C[0], int(params.out_channels), 3, rngs=rngs, **kw)

    def time_embedding(self, t: jax.Array, batch: int) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        e = sinusoidal_embedding(t, self.time_emb_dim)
        e = self.time_fc2(jax.nn.silu(self.time_fc1(e)))  # float32 throughout with time_mlp_float32
        return e.astype(self.dtype)

    def _res(self, block: ResnetBlock, x: jax.Array, t_emb: jax.Array, pooled: jax.Array | None) -> jax.Array:
        return remat(lambda b, h, te, p: b(h, te, p), self.remat_policy)(block, x, t_emb, pooled)

    def _level(self, lvl: Level, x: jax.Array, t_emb: jax.Array, text: jax.Array | None, pooled: Any) -> jax.Array:
        x = self._res(lvl.res1, x, t_emb, pooled)
        x = self._res(lvl.res2, x, t_emb, pooled)
        if lvl.self_attn is not None:
            x = lvl.self_attn(x)
        if lvl.cross_attn is not None and text is not None:
            x = lvl.cross_attn(x, text)
        return x

    def __call__(self, x: jax.Array, t: jax.Array | int, text: jax.Array | None = None) -> jax.Array:
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, self.in_channels):
            raise ValueError(
                f"{self.where}: expected images [B, {self.image_size}, {self.image_size}, {self.in_channels}] "
                f"(image_size, in_channels; channels-last), got {tuple(x.shape)}."
            )
        if text is not None:
            if self.text_emb_dim <= 0:
                raise ValueError(f"{self.where}: text given but {self.where}.text_emb_dim = {self.text_emb_dim}.")
            if text.ndim != 3 or text.shape[0] != x.shape[0] or text.shape[-1] != self.text_emb_dim:
                raise ValueError(
                    f"{self.where}: text embeddings must be [B={x.shape[0]}, S, text_emb_dim={self.text_emb_dim}], "
                    f"got {tuple(text.shape)}."
                )
            text = text.astype(self.dtype)
        pooled = None if text is None else jnp.max(text, axis=1)
        t_emb = self.time_embedding(t, x.shape[0])
        x = self.init_conv(x.astype(self.dtype))
        skips = []
        for lvl in self.down:
            x = self._level(lvl, x, t_emb, text, pooled)
            if lvl.resample is not None:
                skips.append(x)
                x = lvl.resample(x)
        x = self._res(self.mid_res1, x, t_emb, pooled)
        x = self.mid_self_attn(x)
        if self.mid_cross_attn is not None and text is not None:
            x = self.mid_cross_attn(x, text)
        x = self._res(self.mid_res2, x, t_emb, pooled)
        for i, lvl in enumerate(self.up):
            if i > 0:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self._level(lvl, x, t_emb, text, pooled)
            if lvl.resample is not None:
                x = lvl.resample(x)
        return self.out_conv(jax.nn.silu(self.out_norm(x)))


def check_unet_params(params: UNetParams, where: str = "unet") -> None:
    """Clear errors for UNet settings the architecture cannot build (see the module docstring)."""
    C = list(params.channels)
    if not C:
        raise ValueError(f"{where}.channels is empty; give one width per level, e.g. [128, 256, 512, 1024].")
    bad = [c for c in C if int(c) <= 0 or int(c) % GN_GROUPS]
    if bad:
        raise ValueError(f"{where}.channels = {C}: every width must be a positive multiple of {GN_GROUPS} (GroupNorm).")
    factor = 2 ** (len(C) - 1)
    if params.image_size <= 0 or params.image_size % factor:
        raise ValueError(
            f"{where}.image_size = {params.image_size} must be divisible by 2 ** (len({where}.channels) - 1) = "
            f"{factor} ({len(C)} levels, {len(C) - 1} downsamplings)."
        )
    if params.time_emb_dim < 4:
        raise ValueError(f"{where}.time_emb_dim = {params.time_emb_dim} must be >= 4 (sinusoidal embedding).")
    if params.in_channels <= 0 or params.out_channels <= 0:
        raise ValueError(
            f"{where}.in_channels / out_channels must be positive, got {params.in_channels} / {params.out_channels}."
        )


def build_unet(params: UNetParams, *, rngs: nnx.Rngs, **kwargs: Any) -> UNet:
    """Plain constructor (not registered; see the module docstring)."""
    return UNet(params, rngs=rngs, **kwargs)


# Built inside stable_diffusion (as the original); the record carries the diffusers weight loader.
register_model(ModelRecord(params=UNetParams, builder=None, weight_loader=load_unet_weights))
