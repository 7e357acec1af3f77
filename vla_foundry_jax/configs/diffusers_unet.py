"""The diffusers UNet architecture (:class:`DiffusersUNetConfig`): from a diffusers ``config.json`` or the ``unet``
seed fields.

A diffusers model directory holds ``config.json`` (read here as plain JSON: diffusers is never imported) and the
weights. ``hf_pretrained`` is such a directory, a pipeline directory with a ``unet/`` subfolder, or a hub id whose
root holds the UNet (:func:`diffusers_model_dir`). Which layouts are supported, and how the seed fields map to a
layout: :mod:`vla_foundry_jax.models.diffusers_unet`. Unsupported settings raise
:class:`~vla_foundry_jax.params.base.ParamsError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from vla_foundry_jax.configs.hf_hub import HFLoadError, resolve_hf_path
from vla_foundry_jax.params.base import ParamsError
from vla_foundry_jax.params.model_params import UNetParams

logger = logging.getLogger(__name__)

DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D")
MID_TYPES = ("UNetMidBlock2D", "UNetMidBlock2DCrossAttn")
# activations the port implements (the functions: ``models.diffusers_unet.ACTIVATIONS``)
ACTIVATION_NAMES = ("silu", "swish", "mish", "gelu", "relu")


@dataclasses.dataclass(frozen=True)
class DiffusersUNetConfig:
    """The diffusers config fields the architecture depends on, per level where diffusers allows lists."""

    conditional: bool  # UNet2DConditionModel (True) or UNet2DModel
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block_type: str | None
    layers_per_block: tuple[int, ...]
    attention_head_dim: tuple[int | None, ...]
    transformer_layers_per_block: tuple[int, ...] = ()
    reverse_transformer_layers_per_block: tuple[int, ...] = ()
    cross_attention_dim: int | None = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embed_dim: int | None = None  # None: 4 * block_out_channels[0]
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    center_input_sample: bool = False
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    use_linear_projection: bool = False
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True  # UNet2DModel's mid-block attention
    attn_norm_num_groups: int | None = None  # UNet2DModel's mid-block attention GroupNorm
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    dropout: float = 0.0
    sample_size: int | tuple[int, int] | None = None

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def temb_dim(self) -> int:
        return int(self.time_embed_dim or 4 * self.block_out_channels[0])

    def validate(self, where: str = "unet") -> None:
        """Raise :class:`ParamsError` for a layout this module (or diffusers) cannot build."""
        L = self.num_levels
        if L == 0:
            raise ParamsError(f"{where}: block_out_channels is empty.")
        per_level = {
            "down_block_types": self.down_block_types,
            "up_block_types": self.up_block_types,
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": self.attention_head_dim,
        }
        if self.conditional:
            per_level["transformer_layers_per_block"] = self.transformer_layers_per_block
            per_level["reverse_transformer_layers_per_block"] = self.reverse_transformer_layers_per_block
        for key, value in per_level.items():
            if len(value) != L:
                raise ParamsError(f"{where}: {key} has {len(value)} entries for {L} block_out_channels.")
        allowed = {"down_block_types": DOWN_TYPES, "up_block_types": UP_TYPES}
        for key, names in allowed.items():
            for name in getattr(self, key):
                if name not in names or (name.startswith("CrossAttn") and not self.conditional):
                    ok = [n for n in names if self.conditional or not n.startswith("CrossAttn")]
                    raise ParamsError(f"{where}: {key} entry {name!r} is not supported; choose among {ok}.")
        mids = MID_TYPES if self.conditional else MID_TYPES[:1]
        if self.mid_block_type is not None and self.mid_block_type not in mids:
            raise ParamsError(f"{where}: mid_block_type {self.mid_block_type!r} is not supported; use {mids} or None.")
        uses_cross = any(n.startswith("CrossAttn") for n in (*self.down_block_types, *self.up_block_types))
        uses_cross = uses_cross or self.mid_block_type == "UNetMidBlock2DCrossAttn"
        if uses_cross and not self.cross_attention_dim:
            raise ParamsError(f"{where}: cross-attention blocks need cross_attention_dim.")
        for name in ("act_fn", "time_embedding_act_fn", "timestep_post_act"):
            act = getattr(self, name)
            if act is not None and act not in ACTIVATION_NAMES:
                raise ParamsError(
                    f"{where}: {name} = {act!r} is not supported; choose one of {list(ACTIVATION_NAMES)}."
                )
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ParamsError(
                f"{where}: resnet_time_scale_shift = {self.resnet_time_scale_shift!r} is not supported; use "
                f"'default' or 'scale_shift'."
            )
        G = self.norm_num_groups
        bad = [c for c in self.block_out_channels if c <= 0 or c % G]
        if bad:
            raise ParamsError(
                f"{where}: block_out_channels {list(self.block_out_channels)} must be positive multiples of "
                f"norm_num_groups = {G}."
            )
        for i, (c, a) in enumerate(zip(self.block_out_channels, self.attention_head_dim, strict=True)):
            heads = a if a is not None else c
            if c % heads:
                raise ParamsError(f"{where}: attention_head_dim[{i}] = {a} does not divide the level width {c}.")
        if self.mid_block_type == "UNetMidBlock2D" and not self.conditional and self.add_attention:
            a = self.attention_head_dim[-1]
            if a is not None and self.block_out_channels[-1] % a:
                raise ParamsError(f"{where}: attention_head_dim = {a} does not divide {self.block_out_channels[-1]}.")
        for k in (self.conv_in_kernel, self.conv_out_kernel):
            if k <= 0 or k % 2 == 0:
                raise ParamsError(f"{where}: conv_in_kernel / conv_out_kernel must be odd, got {k}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_unet_params(params: UNetParams, *, conditional: bool, where: str = "unet") -> DiffusersUNetConfig:
    """The diffusers layout built from the ``unet`` seed fields (mapping in the module docstring)."""
    C = tuple(int(c) for c in params.channels)
    if not C:
        raise ParamsError(f"{where}.channels is empty; give one width per level, e.g. [128, 256, 512, 1024].")
    if params.time_emb_dim <= 0:
        raise ParamsError(f"{where}.time_emb_dim = {params.time_emb_dim} must be positive.")
    L = len(C)
    if conditional:
        if params.text_emb_dim <= 0:
            raise ParamsError(f"{where}.text_emb_dim = {params.text_emb_dim} must be the text encoder's width.")
        down = tuple("CrossAttnDownBlock2D" if i >= 1 else "DownBlock2D" for i in range(L))
        mid = "UNetMidBlock2DCrossAttn"
    else:
        down = tuple("AttnDownBlock2D" if i >= 2 else "DownBlock2D" for i in range(L))
        mid = "UNetMidBlock2D"
    up = tuple(d.replace("Down", "Up") for d in reversed(down))
    return DiffusersUNetConfig(
        conditional=conditional,
        in_channels=int(params.in_channels),
        out_channels=int(params.out_channels),
        block_out_channels=C,
        down_block_types=down,
        up_block_types=up,
        mid_block_type=mid,
        layers_per_block=(2,) * L,
        attention_head_dim=(8,) * L,
        transformer_layers_per_block=(1,) * L if conditional else (),
        reverse_transformer_layers_per_block=(1,) * L if conditional else (),
        cross_attention_dim=int(params.text_emb_dim) if conditional else None,
        norm_num_groups=8,
        time_embed_dim=4 * int(params.time_emb_dim),
        sample_size=int(params.image_size),
    )


# Config keys: those the port reads, those that must keep diffusers' default (value), and those ignored because
# they do not affect the supported blocks (diffusers passes them only to Simple* / class-embedding paths).
_READ_KEYS = {
    "sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
    "down_block_types", "up_block_types", "mid_block_type", "block_out_channels", "layers_per_block",
    "downsample_padding", "mid_block_scale_factor", "dropout", "act_fn", "norm_num_groups", "norm_eps",
    "attention_head_dim", "resnet_time_scale_shift", "time_embedding_dim", "cross_attention_dim",
    "transformer_layers_per_block", "reverse_transformer_layers_per_block", "use_linear_projection",
    "time_embedding_act_fn", "timestep_post_act", "conv_in_kernel", "conv_out_kernel", "add_attention",
    "attn_norm_num_groups",
}  # fmt: skip
_DEFAULT_KEYS = {
    "time_embedding_type": "positional",
    "downsample_type": "conv",
    "upsample_type": "conv",
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "time_cond_proj_dim": None,
    "attention_type": "default",
}
_IGNORED_KEYS = {
    "num_train_timesteps", "upcast_attention", "resnet_skip_time_act", "resnet_out_scale_factor",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim", "class_embeddings_concat",
    "mid_block_only_cross_attention", "cross_attention_norm", "addition_embed_type_num_heads",
}  # fmt: skip
CLASS_NAMES = ("UNet2DModel", "UNet2DConditionModel")


def _per_level(value: Any, L: int) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * L


def config_from_diffusers(cfg: dict[str, Any], where: str = "unet.hf_pretrained") -> DiffusersUNetConfig:
    """Parse a diffusers ``config.json`` dict of a ``UNet2DModel`` / ``UNet2DConditionModel`` (defaults as
    diffusers' constructors); unsupported settings raise :class:`ParamsError` naming the key."""
    cls = cfg.get("_class_name")
    if cls not in CLASS_NAMES:
        raise ParamsError(f"{where}: config _class_name = {cls!r}; only {list(CLASS_NAMES)} are supported.")
    conditional = cls == "UNet2DConditionModel"
    unknown = sorted(
        k for k in cfg if not k.startswith("_") and k not in _READ_KEYS | set(_DEFAULT_KEYS) | _IGNORED_KEYS
    )
    if unknown:
        raise ParamsError(f"{where}: config keys {unknown} are not known to the diffusers UNet port.")
    for key, default in _DEFAULT_KEYS.items():
        value = cfg.get(key, default)
        if isinstance(value, (list, tuple)) and all(v == default for v in value):
            continue  # e.g. only_cross_attention given per level
        if value != default:
            raise ParamsError(f"{where}: {key} = {cfg[key]!r} is not supported (only {default!r}).")
    if cfg.get("reverse_transformer_layers_per_block") is not None:
        raise ParamsError(f"{where}: reverse_transformer_layers_per_block (asymmetric UNets) is not supported.")

    def get(key: str, uncond: Any, cond: Any) -> Any:
        return cfg.get(key, cond if conditional else uncond)

    C = tuple(int(c) for c in get("block_out_channels", (224, 448, 672, 896), (320, 640, 1280, 1280)))
    L = len(C)
    down = get(
        "down_block_types",
        ("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
        ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    )
    up = get("up_block_types", ("AttnUpBlock2D",) * 3 + ("UpBlock2D",), ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    strip = lambda names: tuple(n[7:] if n.startswith("UNetRes") else n for n in names)  # noqa: E731  (diffusers)
    tl = _per_level(cfg.get("transformer_layers_per_block", 1), L) if conditional else ()
    if any(isinstance(n, (list, tuple)) for n in tl):
        raise ParamsError(f"{where}: per-layer transformer_layers_per_block lists are not supported.")
    cross = cfg.get("cross_attention_dim", 1280) if conditional else None
    if isinstance(cross, (list, tuple)):
        if len(set(cross)) != 1:
            raise ParamsError(f"{where}: cross_attention_dim = {cross}: different widths per level are not supported.")
        cross = cross[0]
    groups = get("norm_num_groups", 32, 32)
    if groups is None:
        raise ParamsError(f"{where}: norm_num_groups = None is not supported.")
    if float(cfg.get("dropout", 0.0)) > 0:
        logger.warning("%s: dropout = %s is not applied by the JAX port.", where, cfg["dropout"])
    return DiffusersUNetConfig(
        conditional=conditional,
        in_channels=int(get("in_channels", 3, 4)),
        out_channels=int(get("out_channels", 3, 4)),
        block_out_channels=C,
        down_block_types=strip(down),
        up_block_types=strip(up),
        mid_block_type=get("mid_block_type", "UNetMidBlock2D", "UNetMidBlock2DCrossAttn"),
        layers_per_block=tuple(int(n) for n in _per_level(cfg.get("layers_per_block", 2), L)),
        attention_head_dim=_per_level(cfg.get("attention_head_dim", 8), L),
        transformer_layers_per_block=tuple(int(n) for n in tl),
        reverse_transformer_layers_per_block=tuple(int(n) for n in reversed(tl)),
        cross_attention_dim=None if cross is None else int(cross),
        norm_num_groups=int(groups),
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        act_fn=cfg.get("act_fn", "silu"),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=float(cfg.get("freq_shift", 0)),
        time_embed_dim=cfg.get("time_embedding_dim"),
        time_embedding_act_fn=cfg.get("time_embedding_act_fn") if conditional else None,
        timestep_post_act=cfg.get("timestep_post_act") if conditional else None,
        center_input_sample=bool(cfg.get("center_input_sample", False)),
        downsample_padding=int(cfg.get("downsample_padding", 1)),
        mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1)),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        resnet_time_scale_shift=cfg.get("resnet_time_scale_shift", "default"),
        add_attention=bool(cfg.get("add_attention", True)),
        attn_norm_num_groups=cfg.get("attn_norm_num_groups"),
        conv_in_kernel=int(cfg.get("conv_in_kernel", 3)),
        conv_out_kernel=int(cfg.get("conv_out_kernel", 3)),
        dropout=float(cfg.get("dropout", 0.0)),
        sample_size=tuple(size) if isinstance(size := cfg.get("sample_size"), list) else size,
    )


def diffusers_model_dir(hf_pretrained: str) -> str:
    """The directory holding the UNet's ``config.json`` (a pipeline directory's ``unet/`` subfolder if needed)."""
    path = resolve_hf_path(hf_pretrained)
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
        os.path.join(path, "unet", "config.json")
    ):
        path = os.path.join(path, "unet")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise HFLoadError(f"unet.hf_pretrained = {hf_pretrained!r}: {path} has no config.json (nor unet/config.json).")
    return path


def read_diffusers_config(hf_pretrained: str) -> tuple[str, dict[str, Any]]:
    """``(model directory, config.json as a dict)`` of a diffusers UNet."""
    path = diffusers_model_dir(hf_pretrained)
    with open(os.path.join(path, "config.json")) as f:
        try:
            return path, json.load(f)
        except ValueError as e:
            raise HFLoadError(f"{path}/config.json is not JSON: {e}") from e
