"""A Flax NNX UNet with the layout and numerics of diffusers' ``UNet2DModel`` / ``UNet2DConditionModel``.

Used by ``stable_diffusion`` when ``use_diffusers_unet = True`` (reference §3.8.3 ``UNetDiffusers``).
``DiffusersUNet(config)``; ``__call__(x [B, H, W, in_channels], t (scalar or [B], int or float), text=None
[B, S, cross_attention_dim]) -> [B, H, W, out_channels]``, channels-last throughout (diffusers is channels-first).
``text`` is required by a conditional model and refused by an unconditional one (no text mask: every token is
attended, as the original's own UNet). Module and parameter paths mirror diffusers' state-dict names
(``down_blocks.0.resnets.1.conv1.kernel`` <-> ``down_blocks.0.resnets.1.conv1.weight``), which is what
:mod:`vla_foundry_jax.convert.diffusers_unet_maps` relies on.

Blocks (diffusers' forward, channels-last):

* time: ``Timesteps(C0, flip_sin_to_cos, freq_shift)``: ``half = C0 // 2``, ``f_i = exp(-ln(10000) i / (half -
  freq_shift))`` (float32), ``[sin(t f), cos(t f)]`` (``[cos, sin]`` when flipped; odd widths zero-padded), then
  ``time_embedding`` = ``linear_1 -> act -> linear_2`` (conditional model: optional ``timestep_post_act`` and
  ``time_embedding_act_fn`` after it). ``UNet2DModel`` always uses SiLU in the time MLP and before ``conv_out``;
  the conditional model uses ``act_fn``.
* ``ResnetBlock2D``: ``h = conv1(act(norm1(x)))``; ``e = time_emb_proj(act(temb))``; ``"default"``:
  ``h = norm2(h + e)``, ``"scale_shift"``: ``h = norm2(h) * (1 + e[:C]) + e[C:]``; ``h = conv2(act(h))``;
  ``(shortcut(x) + h) / output_scale_factor`` (1x1 ``conv_shortcut`` when widths differ).
* ``Attention`` (Attn*Block2D, ``UNetMidBlock2D``): GroupNorm over the ``H * W`` tokens, ``to_q/k/v`` with bias,
  ``heads = C // attention_head_dim``, ``to_out.0``, residual, ``/ rescale_output_factor``.
* ``Transformer2DModel`` (CrossAttn*Block2D, ``UNetMidBlock2DCrossAttn``): GroupNorm (eps 1e-6), ``proj_in``
  (1x1 conv, or Linear with ``use_linear_projection``), ``transformer_layers_per_block`` x
  ``BasicTransformerBlock`` (LayerNorm -> self-attention (no q/k/v bias) -> LayerNorm -> cross-attention to the
  text -> LayerNorm -> GEGLU feed-forward ``proj(dim, 8 dim)``, ``x * gelu(gate)``, ``Linear(4 dim, dim)``, each
  residual), ``proj_out``, residual. Heads: the conditional model's ``attention_head_dim`` entry is the number of
  heads (diffusers' naming quirk), head width ``C // heads``.
* ``Downsample2D``: 3x3 conv, stride 2, ``downsample_padding`` (0: pad bottom/right by 1 first, as diffusers);
  ``Upsample2D``: nearest x2 then 3x3 conv.
* Down blocks push every resnet / attention output and the downsampled output as skips (``conv_in``'s output
  first); up block ``i`` runs ``layers_per_block[::-1][i] + 1`` resnets, each on ``[x, skips.pop()]``.

Supported configurations (else :class:`~vla_foundry_jax.params.base.ParamsError` naming the key): the block types
``DownBlock2D``, ``AttnDownBlock2D``, ``CrossAttnDownBlock2D`` (conditional only), ``UpBlock2D``,
``AttnUpBlock2D``, ``CrossAttnUpBlock2D`` (conditional only), mid ``UNetMidBlock2D``, ``UNetMidBlock2DCrossAttn``
(conditional only) or none; positional time embedding; ``resnet_time_scale_shift`` ``default`` / ``scale_shift``;
per-level ``layers_per_block`` / ``transformer_layers_per_block`` / ``attention_head_dim``; one
``cross_attention_dim`` for every level; activations silu/swish, mish, gelu, relu. Not ported: class / addition
embeddings, ``encoder_hid_proj``, GLIGEN / dual / only-cross attention, Fourier or learned time embeddings,
``resnet`` up/downsamplers, Simple* / Skip* / K* blocks. ``dropout`` is not applied (a warning says so).

Without ``unet.hf_pretrained`` the architecture comes from the ``unet`` seed fields
(``configs.diffusers_unet.config_from_unet_params``): ``channels -> block_out_channels``; ``in/out_channels``,
``image_size -> sample_size``; two resnets per level
(``layers_per_block = 2``, as the original's ``UNetDiffusers`` and its own UNet); ``time_embedding_dim =
4 * time_emb_dim`` (the own UNet's time-MLP width; the sinusoid is ``C0`` wide, as diffusers); ``norm_num_groups
= 8`` (the own UNet's GroupNorm); attention where the own UNet has it: unconditional (no text encoder):
``AttnDownBlock2D`` / ``AttnUpBlock2D`` at levels >= 2 and an attention ``UNetMidBlock2D`` (``UNet2DModel``,
``attention_head_dim = 8``: heads of width 8); conditional (a text encoder): ``CrossAttnDownBlock2D`` /
``CrossAttnUpBlock2D`` at levels >= 1 and ``UNetMidBlock2DCrossAttn`` (``UNet2DConditionModel``,
``cross_attention_dim = text_emb_dim``, 8 heads); everything else at diffusers' defaults.

Parameters: conv kernels ``[kh, kw, in, out]`` (torch ``OIHW`` transposed), linear kernels ``[in, out]``,
GroupNorm / LayerNorm ``scale`` / ``bias``; PyTorch default init (``U(+-1/sqrt(fan_in))``), norms 1 / 0; float32
parameters unless ``param_dtype``; GroupNorm / LayerNorm statistics in float32; attention through
``jax.nn.dot_product_attention``. ``time_mlp_float32`` keeps the time MLP in float32.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.configs.diffusers_unet import (
    ACTIVATION_NAMES,
    DiffusersUNetConfig,
    config_from_diffusers,
    config_from_unet_params,
    read_diffusers_config,
)
from vla_foundry_jax.layers.activations import activations
from vla_foundry_jax.layers.attention import dot_product_attention
from vla_foundry_jax.layers.conv import Conv2d
from vla_foundry_jax.layers.dense import Dense
from vla_foundry_jax.layers.norms import GroupNorm
from vla_foundry_jax.layers.positional import sinusoidal_embedding
from vla_foundry_jax.layers.stack import check_remat_policy, remat
from vla_foundry_jax.params.base import ParamsError
from vla_foundry_jax.params.model_params import UNetParams

logger = logging.getLogger(__name__)

ACTIVATIONS = activations(*ACTIVATION_NAMES)  # the config reader accepts exactly these
TRANSFORMER_GN_EPS = 1e-6  # Transformer2DModel's GroupNorm
LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock's LayerNorms


# ---------------------------------------------------------------------------------------------------- layers


def _linear(din: int, dout: int, *, bias: bool = True, rngs: nnx.Rngs, **kw: Any) -> Dense:
    """``nn.Linear(din, dout, bias)`` (torch-default init), kernel ``[in, out]``, logical axes ``("embed", "mlp")``."""
    return Dense(din, dout, bias=bias, names=("embed", "mlp"), init="torch", rngs=rngs, **kw)


class LayerNorm(nnx.Module):
    """``nn.LayerNorm(c, eps)``; statistics in float32."""

    def __init__(self, c: int, eps: float, *, dtype: Any, param_dtype: Any):
        self.dtype = dtype
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((c,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((c,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Identity(nnx.Module):
    """Parameter-free placeholder (diffusers' Dropout slots keep the module indices of its state dict)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class ResnetBlock2D(nnx.Module):
    def __init__(
        self,
        din: int,
        dout: int,
        temb: int,
        *,
        groups: int,
        eps: float,
        act: str,
        scale_shift: bool,
        output_scale_factor: float,
        rngs: nnx.Rngs,
        **kw: Any,
    ):
        self.act = act
        self.scale_shift = scale_shift
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(din, groups, eps, **kw)
        self.conv1 = Conv2d(din, dout, 3, rngs=rngs, **kw)
        self.time_emb_proj = _linear(temb, 2 * dout if scale_shift else dout, rngs=rngs, **kw)
        self.norm2 = GroupNorm(dout, groups, eps, **kw)
        self.conv2 = Conv2d(dout, dout, 3, rngs=rngs, **kw)
        self.conv_shortcut = Conv2d(din, dout, 1, rngs=rngs, **kw) if din != dout else None

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act]
        h = self.conv1(act(self.norm1(x)))
        e = self.time_emb_proj(act(temb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(act(h))
        x = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Attention(nnx.Module):
    """diffusers' ``Attention`` (AttnProcessor2_0) over ``[B, N, C]`` tokens or a ``[B, H, W, C]`` map."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        context_dim: int | None = None,
        bias: bool,
        norm: tuple[int, float] | None = None,
        residual: bool = False,
        rescale: float = 1.0,
        rngs: nnx.Rngs,
        **kw: Any,
    ):
        inner = heads * head_dim
        self.heads = heads
        self.residual = residual
        self.rescale = rescale
        self.group_norm = None if norm is None else GroupNorm(dim, norm[0], norm[1], **kw)
        self.to_q = _linear(dim, inner, bias=bias, rngs=rngs, **kw)
        self.to_k = _linear(context_dim or dim, inner, bias=bias, rngs=rngs, **kw)
        self.to_v = _linear(context_dim or dim, inner, bias=bias, rngs=rngs, **kw)
        self.to_out = nnx.List([_linear(inner, dim, rngs=rngs, **kw)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        shape = x.shape
        B = shape[0]
        h = x.reshape(B, -1, shape[-1])
        if self.group_norm is not None:
            h = self.group_norm(h)
        ctx = h if context is None else context
        q, k, v = self.to_q(h), self.to_k(ctx), self.to_v(ctx)
        split = lambda a: a.reshape(B, a.shape[1], self.heads, -1)  # noqa: E731
        o = dot_product_attention(split(q), split(k), split(v), causal=False, impl="xla")
        o = self.to_out[0](o.reshape(B, o.shape[1], -1)).reshape(shape)
        if self.residual:
            o = o + x
        return o / self.rescale if self.rescale != 1.0 else o


class GEGLU(nnx.Module):
    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, **kw: Any):
        self.proj = _linear(din, 2 * dout, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """``net = [GEGLU(dim, 4 dim), Dropout, Linear(4 dim, dim)]`` (the Dropout slot is an :class:`Identity`)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, **kw: Any):
        self.net = nnx.List([GEGLU(dim, 4 * dim, rngs=rngs, **kw), Identity(), _linear(4 * dim, dim, rngs=rngs, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, *, rngs: nnx.Rngs, **kw: Any):
        self.norm1 = LayerNorm(dim, LAYER_NORM_EPS, **kw)
        self.attn1 = Attention(dim, heads, head_dim, bias=False, rngs=rngs, **kw)
        self.norm2 = LayerNorm(dim, LAYER_NORM_EPS, **kw)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, bias=False, rngs=rngs, **kw)
        self.norm3 = LayerNorm(dim, LAYER_NORM_EPS, **kw)
        self.ff = FeedForward(dim, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
    def __init__(
        self,
        heads: int,
        head_dim: int,
        c: int,
        *,
        num_layers: int,
        context_dim: int,
        groups: int,
        linear_projection: bool,
        rngs: nnx.Rngs,
        **kw: Any,
    ):
        inner = heads * head_dim
        self.linear_projection = linear_projection
        self.norm = GroupNorm(c, groups, TRANSFORMER_GN_EPS, **kw)
        proj = (lambda a, b: _linear(a, b, rngs=rngs, **kw)) if linear_projection else (
            lambda a, b: Conv2d(a, b, 1, rngs=rngs, **kw)
        )  # fmt: skip
        self.proj_in = proj(c, inner)
        self.transformer_blocks = nnx.List(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim, rngs=rngs, **kw) for _ in range(num_layers)]
        )
        self.proj_out = proj(inner, c)

    def __call__(self, x: jax.Array, context: jax.Array, remat: Callable[..., Any]) -> jax.Array:
        B, H, W, _ = x.shape
        h = self.proj_in(self.norm(x))  # a 1x1 conv and a linear map are the same on channels-last input
        h = h.reshape(B, H * W, h.shape[-1])
        for blk in self.transformer_blocks:
            h = remat(blk, h, context)
        return self.proj_out(h.reshape(B, H, W, h.shape[-1])) + x


class Downsample2D(nnx.Module):
    def __init__(self, c: int, padding: int, *, rngs: nnx.Rngs, **kw: Any):
        pad = ((0, 1), (0, 1)) if padding == 0 else padding  # diffusers pads bottom/right when padding = 0
        self.conv = Conv2d(c, c, 3, stride=2, padding=pad, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs, **kw: Any):
        self.conv = Conv2d(c, c, 3, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
    """Shared resnet / attention settings of a whole UNet."""

    temb: int
    groups: int
    eps: float
    act: str
    scale_shift: bool
    context_dim: int | None
    linear_projection: bool


def _resnet(s: _BlockSpec, din: int, dout: int, osf: float, rngs: nnx.Rngs, kw: dict[str, Any]) -> ResnetBlock2D:
    return ResnetBlock2D(
        din, dout, s.temb, groups=s.groups, eps=s.eps, act=s.act, scale_shift=s.scale_shift,
        output_scale_factor=osf, rngs=rngs, **kw,
    )  # fmt: skip


def _attention(s: _BlockSpec, kind: str, c: int, a: int | None, n_tl: int, rngs: nnx.Rngs, kw: dict[str, Any]):
    """The attention of an ``Attn*`` block (``a``: head width) or a ``CrossAttn*`` block (``a``: heads)."""
    if kind == "CrossAttn":
        return Transformer2DModel(
            a, c // a, c, num_layers=n_tl, context_dim=s.context_dim, groups=s.groups,
            linear_projection=s.linear_projection, rngs=rngs, **kw,
        )  # fmt: skip
    head = a if a is not None else c
    return Attention(c, c // head, head, bias=True, norm=(s.groups, s.eps), residual=True, rngs=rngs, **kw)


def _kind(block_type: str) -> str:
    return "CrossAttn" if block_type.startswith("CrossAttn") else "Attn" if block_type.startswith("Attn") else ""


class UNetBlock(nnx.Module):
    """A down or up block: ``resnets``, optional ``attentions`` and ``downsamplers`` / ``upsamplers``."""

    def __init__(
        self,
        s: _BlockSpec,
        block_type: str,
        in_channels: list[int],
        c: int,
        *,
        attn: int | None,
        n_tl: int,
        resample: str | None,
        downsample_padding: int = 1,
        rngs: nnx.Rngs,
        **kw: Any,
    ):
        self.kind = _kind(block_type)
        self.resnets = nnx.List([_resnet(s, din, c, 1.0, rngs, kw) for din in in_channels])
        self.attentions = (
            nnx.List([_attention(s, self.kind, c, attn, n_tl, rngs, kw) for _ in in_channels]) if self.kind else None
        )
        self.downsamplers = (
            nnx.List([Downsample2D(c, downsample_padding, rngs=rngs, **kw)]) if resample == "down" else None
        )
        self.upsamplers = nnx.List([Upsample2D(c, rngs=rngs, **kw)]) if resample == "up" else None

    def _layer(self, j: int, x: jax.Array, temb: jax.Array, context: Any, remat: Callable[..., Any]) -> jax.Array:
        x = remat(self.resnets[j], x, temb)
        if self.kind == "CrossAttn":
            x = self.attentions[j](x, context, remat)
        elif self.kind == "Attn":
            x = self.attentions[j](x)
        return x

    def down(self, x: jax.Array, temb: jax.Array, context: Any, remat: Callable[..., Any]) -> tuple[jax.Array, list]:
        skips = []
        for j in range(len(self.resnets)):
            x = self._layer(j, x, temb, context, remat)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips

    def up(self, x: jax.Array, skips: list, temb: jax.Array, context: Any, remat: Callable[..., Any]) -> jax.Array:
        for j in range(len(self.resnets)):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self._layer(j, x, temb, context, remat)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nnx.Module):
    """``resnets[0]``, then (attention, resnet) pairs: ``UNetMidBlock2D`` / ``UNetMidBlock2DCrossAttn``."""

    def __init__(self, s: _BlockSpec, cfg: DiffusersUNetConfig, *, rngs: nnx.Rngs, **kw: Any):
        c = cfg.block_out_channels[-1]
        osf = cfg.mid_block_scale_factor
        cross = cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
        # UNet2DModel: one attention (optional); the conditional model's "UNetMidBlock2D" has no layer after resnet 0
        n = 0 if cfg.conditional and not cross else 1
        self.kind = "CrossAttn" if cross else "Attn" if cfg.add_attention and n else ""
        self.resnets = nnx.List([_resnet(s, c, c, osf, rngs, kw) for _ in range(n + 1)])
        if cross:
            heads = cfg.attention_head_dim[-1]
            n_tl = cfg.transformer_layers_per_block[-1]
            self.attentions = nnx.List([_attention(s, "CrossAttn", c, heads, n_tl, rngs, kw)])
        elif self.kind == "Attn":
            a = cfg.attention_head_dim[-1]
            head = a if a is not None else c
            groups = cfg.attn_norm_num_groups or (s.groups if not s.scale_shift else None)
            norm = None if groups is None else (int(groups), s.eps)
            self.attentions = nnx.List(
                [Attention(c, c // head, head, bias=True, norm=norm, residual=True, rescale=osf, rngs=rngs, **kw)]
            )
        else:
            self.attentions = None

    def __call__(self, x: jax.Array, temb: jax.Array, context: Any, remat: Callable[..., Any]) -> jax.Array:
        x = remat(self.resnets[0], x, temb)
        for j in range(1, len(self.resnets)):
            if self.kind == "CrossAttn":
                x = self.attentions[j - 1](x, context, remat)
            elif self.kind == "Attn":
                x = self.attentions[j - 1](x)
            x = remat(self.resnets[j], x, temb)
        return x


class TimestepEmbedding(nnx.Module):
    def __init__(self, din: int, dim: int, *, rngs: nnx.Rngs, **kw: Any):
        self.linear_1 = _linear(din, dim, rngs=rngs, **kw)
        self.linear_2 = _linear(dim, dim, rngs=rngs, **kw)


class DiffusersUNet(nnx.Module):
    """See the module docstring."""

    def __init__(
        self,
        config: DiffusersUNetConfig,
        *,
        image_size: int | None = None,
        time_mlp_float32: bool = False,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat_policy: str | None = None,
        where: str = "unet",
    ):
        config.validate(where)
        check_remat_policy(remat_policy)
        cfg = config
        self.config = cfg
        self.where = where
        self.dtype = dtype
        self.remat_policy = remat_policy
        self.time_mlp_float32 = time_mlp_float32
        self.image_size = image_size
        L = cfg.num_levels
        self.resolution_factor = 2 ** (L - 1)
        if image_size is not None and (image_size <= 0 or image_size % self.resolution_factor):
            raise ParamsError(
                f"{where}.image_size = {image_size} must be a positive multiple of {self.resolution_factor} "
                f"({L - 1} downsamplings of the diffusers layout)."
            )
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        C = cfg.block_out_channels
        s = _BlockSpec(
            temb=cfg.temb_dim,
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            act=cfg.act_fn,
            scale_shift=cfg.resnet_time_scale_shift == "scale_shift",
            context_dim=cfg.cross_attention_dim,
            linear_projection=cfg.use_linear_projection,
        )
        self.conv_in = Conv2d(cfg.in_channels, C[0], cfg.conv_in_kernel, rngs=rngs, **kw)
        tkw = {"dtype": jnp.float32, "param_dtype": jnp.float32} if time_mlp_float32 else kw
        self.time_embedding = TimestepEmbedding(C[0], cfg.temb_dim, rngs=rngs, **tkw)
        down, out = [], C[0]
        for i, block_type in enumerate(cfg.down_block_types):
            din, out = out, C[i]
            n = cfg.layers_per_block[i]
            down.append(
                UNetBlock(
                    s,
                    block_type,
                    [din] + [out] * (n - 1),
                    out,
                    attn=cfg.attention_head_dim[i],
                    n_tl=cfg.transformer_layers_per_block[i] if cfg.conditional else 1,
                    resample="down" if i < L - 1 else None,
                    downsample_padding=cfg.downsample_padding,
                    rngs=rngs,
                    **kw,
                )
            )
        self.down_blocks = nnx.List(down)
        self.mid_block = None if cfg.mid_block_type is None else MidBlock(s, cfg, rngs=rngs, **kw)
        rev = C[::-1]
        up, out = [], rev[0]
        rev_layers = cfg.layers_per_block[::-1]
        rev_heads = cfg.attention_head_dim[::-1]
        for i, block_type in enumerate(cfg.up_block_types):
            prev, out = out, rev[i]
            skip_in = rev[min(i + 1, L - 1)]
            n = rev_layers[i] + 1
            ins = [(prev if j == 0 else out) + (skip_in if j == n - 1 else out) for j in range(n)]
            # diffusers: cross-attention heads come reversed, an Attn block's head width does not
            attn = (
                rev_heads[i] if _kind(block_type) == "CrossAttn" or not cfg.conditional else cfg.attention_head_dim[i]
            )
            up.append(
                UNetBlock(
                    s,
                    block_type,
                    ins,
                    out,
                    attn=attn,
                    n_tl=cfg.reverse_transformer_layers_per_block[i] if cfg.conditional else 1,
                    resample="up" if i < L - 1 else None,
                    rngs=rngs,
                    **kw,
                )
            )
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = GroupNorm(C[0], cfg.norm_num_groups, cfg.norm_eps, **kw)
        self.conv_out = Conv2d(C[0], cfg.out_channels, cfg.conv_out_kernel, rngs=rngs, **kw)

    def _remat(self, module: nnx.Module, *args: Any) -> jax.Array:
        return remat(lambda m, *a: m(*a), self.remat_policy)(module, *args)

    def time_embed(self, t: jax.Array | int | float, batch: int) -> jax.Array:
        """``[B, temb]`` time embedding (compute dtype) of scalar or ``[B]`` timesteps."""
        cfg = self.config
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        e = sinusoidal_embedding(
            t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        )
        te = self.time_embedding
        e = te.linear_1(e.astype(te.linear_1.dtype))
        e = te.linear_2(ACTIVATIONS[cfg.act_fn if cfg.conditional else "silu"](e))
        for act in (cfg.timestep_post_act, cfg.time_embedding_act_fn):
            if act is not None:
                e = ACTIVATIONS[act](e)
        return e.astype(self.dtype)

    def __call__(self, x: jax.Array, t: jax.Array | int | float, text: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        w = self.where
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"{w}: expected images [B, H, W, {cfg.in_channels}] (channels-last), got {x.shape}.")
        if self.image_size is not None and x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"{w}: expected {self.image_size}x{self.image_size} images (image_size), got {x.shape}.")
        if x.shape[1] % self.resolution_factor or x.shape[2] % self.resolution_factor:
            raise ValueError(f"{w}: image height and width must be multiples of {self.resolution_factor}.")
        if cfg.conditional:
            if text is None:
                raise ValueError(f"{w}: the diffusers UNet2DConditionModel needs text embeddings.")
            if text.ndim != 3 or text.shape[0] != x.shape[0] or text.shape[-1] != cfg.cross_attention_dim:
                raise ValueError(
                    f"{w}: text must be [B={x.shape[0]}, S, cross_attention_dim={cfg.cross_attention_dim}], "
                    f"got {tuple(text.shape)}."
                )
            text = text.astype(self.dtype)
        elif text is not None:
            raise ValueError(f"{w}: the diffusers UNet2DModel takes no text (it has no cross-attention).")
        temb = self.time_embed(t, x.shape[0])
        x = x.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = self.conv_in(x)
        skips = [x]
        for blk in self.down_blocks:
            x, s = blk.down(x, temb, text, self._remat)
            skips += s
        if self.mid_block is not None:
            x = self.mid_block(x, temb, text, self._remat)
        for blk in self.up_blocks:
            x = blk.up(x, skips, temb, text, self._remat)
        act = ACTIVATIONS[cfg.act_fn if cfg.conditional else "silu"]
        return self.conv_out(act(self.conv_norm_out(x)))


def build_diffusers_unet(
    params: UNetParams,
    *,
    text_width: int | None,
    rngs: nnx.Rngs,
    where: str = "unet",
    **kwargs: Any,
) -> DiffusersUNet:
    """The diffusers-layout UNet of ``params``: from ``params.hf_pretrained``'s ``config.json`` (weights come from
    the ``unet`` weight loader) or from the seed fields; ``text_width`` is the text encoder's width (None: none).

    A conditional model needs a text encoder whose width equals its ``cross_attention_dim``; an unconditional one
    refuses a text encoder (the original's crash, made a clear error); ``in_channels`` / ``out_channels`` must
    equal the checkpoint's.
    """
    if params.hf_pretrained:
        src = f"{where}.hf_pretrained = {params.hf_pretrained!r}"
        cfg = config_from_diffusers(read_diffusers_config(params.hf_pretrained)[1], src)
        for name in ("in_channels", "out_channels"):
            if getattr(params, name) != getattr(cfg, name):
                raise ParamsError(
                    f"{where}.{name} = {getattr(params, name)} but {src} has {name} = {getattr(cfg, name)}; set "
                    f"{where}.{name} = {getattr(cfg, name)}."
                )
        if cfg.conditional and text_width is None:
            raise ParamsError(
                f"{src} is a UNet2DConditionModel (cross_attention_dim = {cfg.cross_attention_dim}): it needs a "
                f"text encoder; set stable_diffusion.clip.hf_pretrained."
            )
        if not cfg.conditional and text_width is not None:
            raise ParamsError(
                f"{src} is a UNet2DModel, which cannot take text; use a UNet2DConditionModel or unset "
                f"stable_diffusion.clip.hf_pretrained."
            )
        if cfg.conditional and cfg.cross_attention_dim != text_width:
            raise ParamsError(
                f"{src} has cross_attention_dim = {cfg.cross_attention_dim} but the CLIP text width is {text_width}; "
                f"they must be equal."
            )
    else:
        cfg = config_from_unet_params(params, conditional=text_width is not None, where=where)
        if text_width is not None and cfg.cross_attention_dim != text_width:
            raise ParamsError(
                f"{where}.text_emb_dim = {params.text_emb_dim} (the diffusers UNet's cross_attention_dim) must equal "
                f"the CLIP text width {text_width}."
            )
    return DiffusersUNet(
        cfg,
        image_size=int(params.image_size),
        time_mlp_float32=bool(params.time_mlp_float32),
        rngs=rngs,
        where=where,
        **kwargs,
    )
