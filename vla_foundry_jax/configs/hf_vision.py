"""Vision tower architectures for ``vit_hf`` (and the towers inside ``clip_*`` / ``vlm_hf``): :class:`HFVisionConfig`.

Two sources:

* an HF SigLIP / CLIP config (``model_type`` in :data:`SUPPORTED_MODEL_TYPES`; ``siglip`` / ``clip`` take their
  ``vision_config``): :meth:`HFVisionConfig.from_hf`;
* a **timm** checkpoint (the original builds ``vit_hf`` with ``timm.create_model(hf_pretrained, num_classes=0)``,
  reference §3.4): a directory (or hub repo such as ``timm/vit_base_patch16_siglip_224.webli``) holding
  ``config.json`` with ``architecture`` (a timm model name), optional ``model_args`` (keyword arguments timm passes
  to the model, overriding the architecture's) and ``pretrained_cfg.input_size``, and ``model.safetensors`` with
  timm's ``VisionTransformer`` names: :func:`timm_vision_config`. timm is never imported; the architecture is read:

  * from the tensor shapes: width ``D`` and patch size (``patch_embed.proj.weight [D, 3, p, p]``), depth
    (``blocks.N``), MLP width (``fc1``), class token (``cls_token``), register tokens (``reg_token [1, R, D]``),
    whether the position embedding covers the prefix tokens (``pos_embed [1, n_p (+ prefix), D]``; timm's
    ``no_embed_class``), ``norm_pre`` (``pre_norm``), the final ``norm`` (absent with ``fc_norm`` /
    ``final_norm=False``), patch and qkv biases;
  * from ``model_args``, else :data:`TIMM_ARCHITECTURES` (facts the tensors cannot show, copied from timm 1.0.31's
    plain ``VisionTransformer`` architectures: heads, MLP activation, LayerNorm eps): ``num_heads``, ``act_layer``
    (``gelu`` exact, ``gelu_tanh``, ``quick_gelu``), LayerNorm eps (timm's default 1e-6; the CLIP models 1e-5);
  * image size: ``model_args.img_size``, else ``pretrained_cfg.input_size``, else the square position grid.

  Refused with :class:`UnsupportedArchitectureError`: layer scale (``ls1`` / ``ls2``, timm's ``init_values``),
  ``qk_norm``, the scale norms, SwiGLU / parallel blocks, patch-embedding norms.

:func:`load_vision_config` picks the source; :func:`hf_vision_config` reads a ``ViTHFParams``' checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

from vla_foundry_jax.configs.hf_decoder import ACTIVATION_NAMES as DECODER_ACTIVATION_NAMES
from vla_foundry_jax.configs.hf_decoder import UnsupportedArchitectureError, supported_model_type
from vla_foundry_jax.configs.hf_hub import HFLoadError, load_hf_config, resolve_hf_path
from vla_foundry_jax.configs.safetensors import tensor_shapes

SUPPORTED_MODEL_TYPES = ("siglip_vision_model", "siglip", "clip_vision_model", "clip")
# encoder activations the towers implement (the functions: ``models.hf_vision.ACTIVATIONS``)
ACTIVATION_NAMES = (*DECODER_ACTIVATION_NAMES, "quick_gelu")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The facts a stack of HF CLIP/SigLIP encoder layers needs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    activation: str
    qkv_bias: bool = True

    @staticmethod
    def fields_from_hf(config: Any) -> dict[str, Any]:
        act = getattr(config, "hidden_act", "gelu_pytorch_tanh")
        if act not in ACTIVATION_NAMES:
            raise UnsupportedArchitectureError(f"hidden_act {act!r} is not supported; choose {list(ACTIVATION_NAMES)}.")
        if config.hidden_size % config.num_attention_heads:
            raise UnsupportedArchitectureError(
                f"num_attention_heads = {config.num_attention_heads} does not divide hidden_size = "
                f"{config.hidden_size}."
            )
        return {
            "hidden_size": int(config.hidden_size),
            "intermediate_size": int(config.intermediate_size),
            "num_layers": int(config.num_hidden_layers),
            "num_heads": int(config.num_attention_heads),
            "layer_norm_eps": float(config.layer_norm_eps),
            "activation": act,
        }


@dataclasses.dataclass(frozen=True)
class HFVisionConfig(EncoderConfig):
    """A SigLIP (``family = "siglip"``), CLIP (``"clip"``) or timm (``"timm"``) vision tower's architecture.

    The layout fields left at None follow the family (CLIP: class token, ``pre_layrnorm``, bias-free patch
    projection; SigLIP: none of these); a timm ViT sets them from its checkpoint
    (:func:`timm_vision_config`).
    """

    family: str = "siglip"
    image_size: int = 224
    patch_size: int = 16
    class_token: bool | None = None
    reg_tokens: int = 0  # timm register tokens, after the class token
    pos_embed_prefix: bool = True  # the position embedding also covers the prefix tokens (timm ``no_embed_class``)
    pre_norm: bool | None = None
    final_norm: bool = True  # timm models with ``fc_norm`` / ``final_norm=False`` return un-normed tokens
    patch_bias: bool | None = None

    @property
    def cls_token(self) -> bool:
        return self.family == "clip" if self.class_token is None else self.class_token

    @property
    def has_pre_norm(self) -> bool:
        return self.cls_token if self.pre_norm is None else self.pre_norm

    @property
    def has_patch_bias(self) -> bool:
        return not self.cls_token if self.patch_bias is None else self.patch_bias

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token) + self.reg_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @classmethod
    def from_hf(cls, config: Any) -> HFVisionConfig:
        mt = supported_model_type(config, SUPPORTED_MODEL_TYPES, "vit_hf")
        if mt in ("siglip", "clip"):
            config = config.vision_config
        if getattr(config, "num_channels", 3) != 3:
            raise UnsupportedArchitectureError(f"vit_hf expects 3-channel images; config has {config.num_channels}.")
        if config.image_size % config.patch_size:
            raise UnsupportedArchitectureError(
                f"patch_size = {config.patch_size} does not divide image_size = {config.image_size}."
            )
        return cls(
            **cls.fields_from_hf(config),
            family="clip" if mt.startswith("clip") else "siglip",
            image_size=int(config.image_size),
            patch_size=int(config.patch_size),
        )


# timm model name -> (num_heads, act_layer, LayerNorm eps) for timm 1.0.31's plain VisionTransformer architectures
TIMM_ARCHITECTURES: dict[str, tuple[int, str, float]] = {
    "vit_base_patch16_224": (12, "gelu", 1e-06),
    "vit_base_patch16_224_miil": (12, "gelu", 1e-06),
    "vit_base_patch16_384": (12, "gelu", 1e-06),
    "vit_base_patch16_clip_224": (12, "gelu", 1e-05),
    "vit_base_patch16_clip_384": (12, "gelu", 1e-05),
    "vit_base_patch16_clip_quickgelu_224": (12, "quick_gelu", 1e-05),
    "vit_base_patch16_gap_224": (16, "gelu", 1e-06),
    "vit_base_patch16_plus_clip_240": (14, "gelu", 1e-05),
    "vit_base_patch16_reg4_gap_256": (12, "gelu", 1e-06),
    "vit_base_patch16_siglip_224": (12, "gelu", 1e-06),
    "vit_base_patch16_siglip_256": (12, "gelu", 1e-06),
    "vit_base_patch16_siglip_384": (12, "gelu", 1e-06),
    "vit_base_patch16_siglip_512": (12, "gelu", 1e-06),
    "vit_base_patch16_siglip_gap_224": (12, "gelu", 1e-06),
    "vit_base_patch16_siglip_gap_256": (12, "gelu", 1e-06),
    "vit_base_patch16_siglip_gap_384": (12, "gelu", 1e-06),
    "vit_base_patch16_siglip_gap_512": (12, "gelu", 1e-06),
    "vit_base_patch32_224": (12, "gelu", 1e-06),
    "vit_base_patch32_384": (12, "gelu", 1e-06),
    "vit_base_patch32_clip_224": (12, "gelu", 1e-05),
    "vit_base_patch32_clip_256": (12, "gelu", 1e-05),
    "vit_base_patch32_clip_384": (12, "gelu", 1e-05),
    "vit_base_patch32_clip_448": (12, "gelu", 1e-05),
    "vit_base_patch32_clip_quickgelu_224": (12, "quick_gelu", 1e-05),
    "vit_base_patch32_siglip_256": (12, "gelu_tanh", 1e-06),
    "vit_base_patch32_siglip_gap_256": (12, "gelu_tanh", 1e-06),
    "vit_base_patch8_224": (12, "gelu", 1e-06),
    "vit_betwixt_patch32_clip_224": (10, "gelu", 1e-05),
    "vit_giant_patch14_224": (16, "gelu", 1e-06),
    "vit_giant_patch14_clip_224": (16, "gelu", 1e-05),
    "vit_giant_patch16_gap_224": (16, "gelu", 1e-06),
    "vit_giantopt_patch16_siglip_256": (16, "gelu_tanh", 1e-06),
    "vit_giantopt_patch16_siglip_384": (16, "gelu_tanh", 1e-06),
    "vit_giantopt_patch16_siglip_gap_256": (16, "gelu_tanh", 1e-06),
    "vit_giantopt_patch16_siglip_gap_384": (16, "gelu_tanh", 1e-06),
    "vit_gigantic_patch14_224": (16, "gelu", 1e-06),
    "vit_gigantic_patch14_clip_224": (16, "gelu", 1e-05),
    "vit_gigantic_patch14_clip_378": (16, "gelu", 1e-05),
    "vit_gigantic_patch14_clip_quickgelu_224": (16, "quick_gelu", 1e-05),
    "vit_huge_patch14_224": (16, "gelu", 1e-06),
    "vit_huge_patch14_clip_224": (16, "gelu", 1e-05),
    "vit_huge_patch14_clip_336": (16, "gelu", 1e-05),
    "vit_huge_patch14_clip_378": (16, "gelu", 1e-05),
    "vit_huge_patch14_clip_quickgelu_224": (16, "quick_gelu", 1e-05),
    "vit_huge_patch14_clip_quickgelu_378": (16, "quick_gelu", 1e-05),
    "vit_huge_patch14_gap_224": (16, "gelu", 1e-06),
    "vit_huge_patch16_gap_448": (16, "gelu", 1e-06),
    "vit_large_patch14_224": (16, "gelu", 1e-06),
    "vit_large_patch14_clip_224": (16, "gelu", 1e-05),
    "vit_large_patch14_clip_336": (16, "gelu", 1e-05),
    "vit_large_patch14_clip_quickgelu_224": (16, "quick_gelu", 1e-05),
    "vit_large_patch14_clip_quickgelu_336": (16, "quick_gelu", 1e-05),
    "vit_large_patch16_224": (16, "gelu", 1e-06),
    "vit_large_patch16_384": (16, "gelu", 1e-06),
    "vit_large_patch16_siglip_256": (16, "gelu", 1e-06),
    "vit_large_patch16_siglip_384": (16, "gelu", 1e-06),
    "vit_large_patch16_siglip_512": (16, "gelu_tanh", 1e-06),
    "vit_large_patch16_siglip_gap_256": (16, "gelu", 1e-06),
    "vit_large_patch16_siglip_gap_384": (16, "gelu", 1e-06),
    "vit_large_patch16_siglip_gap_512": (16, "gelu_tanh", 1e-06),
    "vit_large_patch32_224": (16, "gelu", 1e-06),
    "vit_large_patch32_384": (16, "gelu", 1e-06),
    "vit_medium_patch16_clip_224": (8, "gelu", 1e-05),
    "vit_medium_patch32_clip_224": (8, "gelu", 1e-05),
    "vit_small_patch16_224": (6, "gelu", 1e-06),
    "vit_small_patch16_384": (6, "gelu", 1e-06),
    "vit_small_patch32_224": (6, "gelu", 1e-06),
    "vit_small_patch32_384": (6, "gelu", 1e-06),
    "vit_small_patch8_224": (6, "gelu", 1e-06),
    "vit_so150m_patch16_reg4_gap_256": (14, "gelu", 1e-06),
    "vit_so150m_patch16_reg4_gap_384": (14, "gelu", 1e-06),
    "vit_so150m_patch16_reg4_map_256": (14, "gelu", 1e-06),
    "vit_so400m_patch14_siglip_224": (16, "gelu", 1e-06),
    "vit_so400m_patch14_siglip_378": (16, "gelu", 1e-06),
    "vit_so400m_patch14_siglip_384": (16, "gelu", 1e-06),
    "vit_so400m_patch14_siglip_gap_224": (16, "gelu", 1e-06),
    "vit_so400m_patch14_siglip_gap_378": (16, "gelu", 1e-06),
    "vit_so400m_patch14_siglip_gap_384": (16, "gelu", 1e-06),
    "vit_so400m_patch14_siglip_gap_448": (16, "gelu", 1e-06),
    "vit_so400m_patch14_siglip_gap_896": (16, "gelu", 1e-06),
    "vit_so400m_patch16_siglip_256": (16, "gelu_tanh", 1e-06),
    "vit_so400m_patch16_siglip_384": (16, "gelu_tanh", 1e-06),
    "vit_so400m_patch16_siglip_512": (16, "gelu_tanh", 1e-06),
    "vit_so400m_patch16_siglip_gap_256": (16, "gelu_tanh", 1e-06),
    "vit_so400m_patch16_siglip_gap_384": (16, "gelu_tanh", 1e-06),
    "vit_so400m_patch16_siglip_gap_512": (16, "gelu_tanh", 1e-06),
    "vit_tiny_patch16_224": (3, "gelu", 1e-06),
    "vit_tiny_patch16_384": (3, "gelu", 1e-06),
    "vit_xsmall_patch16_clip_224": (4, "gelu", 1e-05),
}
TIMM_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
TIMM_UNSUPPORTED = {  # tensor-name pattern -> the timm feature it reveals
    r"\.ls[12]\.": "layer scale (init_values)",
    r"\.attn\.[qk]_norm\.": "qk_norm",
    r"\.attn\.norm\.": "scale_attn_norm",
    r"\.mlp\.norm\.": "scale_mlp_norm",
    r"\.mlp\.fc1_[gx]\.|\.mlp\.w12\.": "a SwiGLU MLP",
    r"\.in_proj\.|\.attn_out_proj\.": "parallel blocks",
    r"^patch_embed\.norm\.": "a patch-embedding norm",
}


def is_timm_checkpoint(path: str) -> bool:
    """Whether the checkpoint directory ``path`` is in timm's format (``config.json`` names an ``architecture``)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        raw = json.load(f)
    return isinstance(raw, dict) and "architecture" in raw and "model_type" not in raw


def _read_config(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UnsupportedArchitectureError(f"timm {what} = {value} is not square; vit_hf needs square images.")
        value = value[0]
    return int(value)


def timm_vision_config(path: str) -> HFVisionConfig:
    """The tower architecture of the timm checkpoint directory ``path`` (see the module docstring)."""
    raw = _read_config(path)
    arch = raw["architecture"]
    args = dict(raw.get("model_args") or {})
    shapes = tensor_shapes(path)
    where = f"timm checkpoint {path} (architecture {arch!r})"
    for pattern, feature in TIMM_UNSUPPORTED.items():
        hit = next((k for k in shapes if re.search(pattern, k)), None)
        if hit is not None:
            raise UnsupportedArchitectureError(f"{where} uses {feature} ({hit}); vit_hf does not implement it.")
    if "patch_embed.proj.weight" not in shapes:
        raise HFLoadError(f"{where} has no patch_embed.proj.weight: not a timm VisionTransformer state dict.")
    D, channels, p, p2 = shapes["patch_embed.proj.weight"]
    if channels != 3 or p != p2:
        raise UnsupportedArchitectureError(
            f"{where}: patch_embed.proj.weight {shapes['patch_embed.proj.weight']} "
            "is not a square 3-channel patch projection."
        )
    depth = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise HFLoadError(f"{where} has no blocks.N.* tensors.")
    known = TIMM_ARCHITECTURES.get(arch)
    num_heads = args.get("num_heads", known[0] if known else None)
    if num_heads is None:
        raise UnsupportedArchitectureError(
            f"{where}: the number of attention heads is not in its tensors and {arch!r} is not a known plain timm "
            f'ViT; add "model_args": {{"num_heads": N}} to its config.json (timm reads model_args too).'
        )
    act = args.get("act_layer", known[1] if known else "gelu")
    if act not in TIMM_ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"{where}: act_layer {act!r} is not supported; use {list(TIMM_ACTIVATIONS)}."
        )
    if "norm_layer" in args:
        raise UnsupportedArchitectureError(f"{where}: model_args.norm_layer is not supported (timm's LayerNorm only).")
    eps = known[2] if known else 1e-6
    cls = "cls_token" in shapes
    reg = shapes["reg_token"][1] if "reg_token" in shapes else 0
    prefix = int(cls) + reg
    n_pos = shapes["pos_embed"][1] if "pos_embed" in shapes else None
    if n_pos is None:
        raise UnsupportedArchitectureError(f"{where} has no pos_embed (pos_embed='none' is not supported).")
    input_size = (raw.get("pretrained_cfg") or {}).get("input_size")
    if "img_size" in args:
        img = _square(args["img_size"], "img_size")
    elif input_size:
        img = _square(input_size[-2:], "pretrained_cfg.input_size")
    else:
        grid = math.isqrt(n_pos - prefix) if n_pos - prefix >= 0 else 0
        grid = grid if grid * grid == n_pos - prefix else math.isqrt(n_pos)
        img = grid * p
    n_p = (img // p) ** 2
    if img % p or n_pos not in (n_p, n_p + prefix):
        raise UnsupportedArchitectureError(
            f"{where}: pos_embed holds {n_pos} positions but a {img}x{img} image with patch {p} gives {n_p} patches "
            f"(+ {prefix} prefix tokens); resampled position embeddings are not supported."
        )
    if num_heads <= 0 or D % num_heads:
        raise UnsupportedArchitectureError(f"{where}: num_heads = {num_heads} does not divide the width {D}.")
    return HFVisionConfig(
        hidden_size=D,
        intermediate_size=shapes["blocks.0.mlp.fc1.weight"][0],
        num_layers=depth,
        num_heads=int(num_heads),
        layer_norm_eps=eps,
        activation=TIMM_ACTIVATIONS[act],
        qkv_bias="blocks.0.attn.qkv.bias" in shapes,
        family="timm",
        image_size=img,
        patch_size=p,
        class_token=cls,
        reg_tokens=reg,
        pos_embed_prefix=n_pos == n_p + prefix,
        pre_norm="norm_pre.weight" in shapes,
        final_norm="norm.weight" in shapes,
        patch_bias="patch_embed.proj.bias" in shapes,
    )


def load_vision_config(hf_pretrained: str) -> HFVisionConfig:
    """The :class:`HFVisionConfig` of a checkpoint: a timm ViT (``config.json`` with ``architecture``, see
    :func:`timm_vision_config`) or an HF SigLIP / CLIP one (``model_type``)."""
    path = resolve_hf_path(hf_pretrained)
    if is_timm_checkpoint(path):
        return timm_vision_config(path)
    return HFVisionConfig.from_hf(load_hf_config(path))


def hf_vision_config(params: Any) -> HFVisionConfig:
    """The :class:`HFVisionConfig` of a ``ViTHFParams`` (config read from ``hf_pretrained``); checks ``hidden_dim``."""
    where = params.gin_name
    if not params.hf_pretrained:
        raise ValueError(f"{where}.hf_pretrained is not set; give a hub id or a local checkpoint directory.")
    c = load_vision_config(params.hf_pretrained)
    if params.hidden_dim != c.hidden_size:
        raise ValueError(
            f"{where}.hidden_dim = {params.hidden_dim} but {params.hf_pretrained!r} has hidden_size = "
            f"{c.hidden_size}; set {where}.hidden_dim = {c.hidden_size}."
        )
    return c
