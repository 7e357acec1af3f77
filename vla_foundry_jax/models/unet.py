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

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vla_foundry_jax.convert.diffusers_unet_maps import load_unet_weights
from vla_foundry_jax.models.transformer import check_remat_policy
from vla_foundry_jax.params.model_params import UNetParams
from vla_foundry_jax.registry import ModelRecord, register_model

GN_GROUPS = 8
GN_EPS = 1e-5


def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
    """``concat(sin(t * f), cos(t * f))`` with ``f_i = exp(-i ln(10000) / (half - 1))``, ``half = dim // 2``
    (reference §3.8.1; sin block first; an odd ``dim`` gives ``dim - 1`` columns, as the original). float32."""
    half = dim // 2
    freqs = np.exp(-np.arange(half, dtype=np.float64) * math.log(10000.0) / (half - 1)).astype(np.float32)
    args = jnp.asarray(t, jnp.float32)[..., None] * jnp.asarray(freqs)
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, param_dtype: Any) -> jax.Array:
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound).astype(param_dtype)


class Dense(nnx.Module):
    """``x @ kernel + bias`` (kernel ``[in, out]``), torch-default init."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.dtype = dtype
        self.kernel = nnx.Param(_uniform(rngs, (din, dout), din, param_dtype), out_sharding=("embed", "mlp"))
        self.bias = nnx.Param(_uniform(rngs, (dout,), din, param_dtype), out_sharding=("mlp",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        return jnp.dot(x.astype(dt), self.kernel[...].astype(dt)) + self.bias[...].astype(dt)


class Conv(nnx.Module):
    """2-D convolution, channels-last; ``transpose=True`` is the original's ``ConvTranspose2d(k, stride, pad)``."""

    def __init__(
        self,
        din: int,
        dout: int,
        k: int,
        *,
        stride: int = 1,
        padding: int | None = None,
        transpose: bool = False,
        rngs: nnx.Rngs,
        dtype: Any,
        param_dtype: Any,
    ):
        self.dtype = dtype
        self.stride = stride
        self.padding = (k - 1) // 2 if padding is None else padding
        self.transpose = transpose
        fan_in = (dout if transpose else din) * k * k  # torch computes a transposed conv's fan-in from dim 1
        self.kernel = nnx.Param(
            _uniform(rngs, (k, k, din, dout), fan_in, param_dtype), out_sharding=(None, None, "conv_in", "conv_out")
        )
        self.bias = nnx.Param(_uniform(rngs, (dout,), fan_in, param_dtype), out_sharding=("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        kernel = self.kernel[...].astype(dt)
        if self.transpose:
            y = _transposed_conv_by_phases(x.astype(dt), kernel, self.stride, self.padding)
            return y + self.bias[...].astype(dt)
        p = self.padding
        kw = {"window_strides": (self.stride,) * 2, "padding": ((p, p), (p, p))}
        y = jax.lax.conv_general_dilated(x.astype(dt), kernel, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)
        return y + self.bias[...].astype(dt)


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


def _transposed_conv_by_phases(x: jax.Array, kernel: jax.Array, s: int, p: int) -> jax.Array:
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
            sub = kernel[np.asarray(ta)][:, np.asarray(tb)]
            y = jax.lax.conv_general_dilated(x, sub, (1, 1), (pad_h, pad_w), dimension_numbers=("NHWC", "HWIO", "NHWC"))
            cols.append(y[:, :nh, :nw])
        rows.append(cols)
    nh, nw = rows[0][0].shape[1:3]
    y = jnp.stack([jnp.stack(r, axis=3) for r in rows], axis=2)  # [B, nh, s, nw, s, C]
    return y.reshape(B, nh * s, nw * s, y.shape[-1])


class GroupNorm(nnx.Module):
    """``nn.GroupNorm(8, c)`` over channels-last input; statistics in float32."""

    def __init__(self, c: int, *, dtype: Any, param_dtype: Any):
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((c,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((c,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        g = x.astype(jnp.float32).reshape(B, H, W, GN_GROUPS, C // GN_GROUPS)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + GN_EPS)).reshape(B, H, W, C)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Single-head ``softmax(q k^T / sqrt(c)) v`` for ``q [B, N, c]``, ``k, v [B, M, c]``; scores float32."""
    scores = jnp.einsum("bnc,bmc->bnm", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bnm,bmc->bnc", probs, v)


class ResnetBlock(nnx.Module):
    def __init__(self, din: int, dout: int, time_dim: int, text_dim: int, *, rngs: nnx.Rngs, **kw: Any):
        self.norm1 = GroupNorm(din, **kw)
        self.conv1 = Conv(din, dout, 3, rngs=rngs, **kw)
        self.time_proj = Dense(time_dim, dout, rngs=rngs, **kw)
        self.text_proj = Dense(text_dim, dout, rngs=rngs, **kw) if text_dim > 0 else None
        self.norm2 = GroupNorm(dout, **kw)
        self.conv2 = Conv(dout, dout, 3, rngs=rngs, **kw)
        self.shortcut = Conv(din, dout, 1, rngs=rngs, **kw) if din != dout else None

    def __call__(self, x: jax.Array, t_emb: jax.Array, pooled_text: jax.Array | None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.time_proj(t_emb)[:, None, None, :]
        if pooled_text is not None and self.text_proj is not None:
            h = h + self.text_proj(pooled_text)[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.shortcut is None else self.shortcut(x))


class SelfAttentionBlock(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs, **kw: Any):
        self.norm = GroupNorm(c, **kw)
        self.q = Conv(c, c, 1, rngs=rngs, **kw)
        self.k = Conv(c, c, 1, rngs=rngs, **kw)
        self.v = Conv(c, c, 1, rngs=rngs, **kw)
        self.proj_out = Conv(c, c, 1, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(B, H * W, C) for m in (self.q, self.k, self.v))
        return x + self.proj_out(_attend(q, k, v).reshape(B, H, W, C))


class CrossAttentionBlock(nnx.Module):
    def __init__(self, c: int, text_dim: int, *, rngs: nnx.Rngs, **kw: Any):
        self.norm = GroupNorm(c, **kw)
        self.q = Conv(c, c, 1, rngs=rngs, **kw)
        self.k = Dense(text_dim, c, rngs=rngs, **kw)
        self.v = Dense(text_dim, c, rngs=rngs, **kw)
        self.proj_out = Conv(c, c, 1, rngs=rngs, **kw)

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
            self.resample = Conv(c, c, 3, stride=2, padding=1, rngs=rngs, **kw)
        elif resample == "up":
            self.resample = Conv(c, c, 4, stride=2, padding=1, transpose=True, rngs=rngs, **kw)
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
        self.time_fc1 = Dense(self.time_emb_dim, E, rngs=rngs, **tkw)
        self.time_fc2 = Dense(E, E, rngs=rngs, **tkw)
        self.init_conv = Conv(self.in_channels, C[0], 3, rngs=rngs, **kw)
        down, prev = [], C[0]
        for i, c in enumerate(C):
            down.append(
                Level(
                    prev,
                    c,
                    E,
                    txt,
                    self_attn=i >= 2,
                    cross_attn=i >= 1,
                    resample="down" if i < L - 1 else None,
                    rngs=rngs,
                    **kw,
                )
            )
            prev = c
        self.down = nnx.List(down)
        self.mid_res1 = ResnetBlock(C[-1], C[-1], E, txt, rngs=rngs, **kw)
        self.mid_self_attn = SelfAttentionBlock(C[-1], rngs=rngs, **kw)
        self.mid_cross_attn = CrossAttentionBlock(C[-1], txt, rngs=rngs, **kw) if txt > 0 else None
        self.mid_res2 = ResnetBlock(C[-1], C[-1], E, txt, rngs=rngs, **kw)
        up, rev = [], C[::-1]
        for i, c in enumerate(rev):
            din = rev[0] if i == 0 else rev[i - 1] + c  # [x, skip]: skip of this resolution has c channels
            depth = L - 1 - i
            up.append(
                Level(
                    din,
                    c,
                    E,
                    txt,
                    self_attn=depth >= 2,
                    cross_attn=depth >= 1,
                    resample="up" if i < L - 1 else None,
                    rngs=rngs,
                    **kw,
                )
            )
        self.up = nnx.List(up)
        self.out_norm = GroupNorm(C[0], **kw)
        self.out_conv = Conv(C[0], int(params.out_channels), 3, rngs=rngs, **kw)

    def time_embedding(self, t: jax.Array, batch: int) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        e = sinusoidal_embedding(t, self.time_emb_dim)
        e = self.time_fc2(jax.nn.silu(self.time_fc1(e)))  # float32 throughout with time_mlp_float32
        return e.astype(self.dtype)

    def _res(self, block: ResnetBlock, x: jax.Array, t_emb: jax.Array, pooled: jax.Array | None) -> jax.Array:
        if self.remat_policy is None:
            return block(x, t_emb, pooled)
        fn = nnx.remat(lambda b, h, te, p: b(h, te, p), policy=getattr(jax.checkpoint_policies, self.remat_policy))
        return fn(block, x, t_emb, pooled)

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
