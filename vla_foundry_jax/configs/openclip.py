"""OpenCLIP architectures for ``clip_openclip`` (plain ViT image tower + OpenAI-style text tower) as a
:class:`~vla_foundry_jax.configs.clip.CLIPConfig`.

``architecture`` is either a name in :data:`ARCHITECTURES` (our own table of the sizes of a few OpenCLIP model
configs) or the path of a JSON file in OpenCLIP's model-config format (``{"embed_dim", "quick_gelu",
"vision_cfg": {...}, "text_cfg": {...}}``). open_clip itself is never imported. Supported ``vision_cfg`` /
``text_cfg`` keys are those of the table's fields plus keys OpenCLIP's forward ignores (tokenizer settings,
``patch_dropout``, ``output_tokens`` ...); any other key set to a non-default value (timm or HF towers, ResNets,
attentional pooling, layer scale, custom blocks, other pooling, projection bias ...) raises
:class:`~vla_foundry_jax.configs.hf_decoder.UnsupportedArchitectureError`. The model side (activation, eps, pooling)
is described in :mod:`vla_foundry_jax.models.openclip_configs`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from vla_foundry_jax.configs.clip import LEGACY_EOS_ID, CLIPConfig, CLIPTextConfig
from vla_foundry_jax.configs.hf_decoder import UnsupportedArchitectureError
from vla_foundry_jax.configs.hf_vision import HFVisionConfig

LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm default, used by OpenCLIP


@dataclasses.dataclass(frozen=True)
class OpenCLIPVision:
    image_size: int = 224
    layers: int = 12
    width: int = 768
    patch_size: int = 16
    head_width: int = 64
    mlp_ratio: float = 4.0


@dataclasses.dataclass(frozen=True)
class OpenCLIPText:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclasses.dataclass(frozen=True)
class OpenCLIPArchitecture:
    embed_dim: int
    vision: OpenCLIPVision
    text: OpenCLIPText
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)

    def to_clip_config(self) -> CLIPConfig:
        act = "quick_gelu" if self.quick_gelu else "gelu"
        v, t = self.vision, self.text

        def tower(width: int, mlp_ratio: float, layers: int, heads: int) -> dict[str, Any]:
            """The encoder sizes both towers' configs take."""
            return {
                "hidden_size": width,
                "intermediate_size": int(width * mlp_ratio),
                "num_layers": layers,
                "num_heads": heads,
                "layer_norm_eps": LAYER_NORM_EPS,
                "activation": act,
            }

        return CLIPConfig(
            text=CLIPTextConfig(
                **tower(t.width, t.mlp_ratio, t.layers, t.heads),
                vocab_size=t.vocab_size,
                max_position_embeddings=t.context_length,
                eos_token_id=LEGACY_EOS_ID,  # argmax-of-ids pooling, as OpenCLIP's pool_type "argmax"
            ),
            vision=HFVisionConfig(
                **tower(v.width, v.mlp_ratio, v.layers, v.width // v.head_width),
                family="clip",
                image_size=v.image_size,
                patch_size=v.patch_size,
            ),
            projection_dim=self.embed_dim,
            logit_scale_init_value=self.init_logit_scale,
        )


def _arch(embed: int, vision: tuple[int, int, int, int], text: tuple[int, int, int], quick_gelu: bool = False):
    image_size, layers, width, patch = vision
    t_width, heads, t_layers = text
    return OpenCLIPArchitecture(
        embed_dim=embed,
        vision=OpenCLIPVision(image_size=image_size, layers=layers, width=width, patch_size=patch),
        text=OpenCLIPText(width=t_width, heads=heads, layers=t_layers),
        quick_gelu=quick_gelu,
    )


# name -> (embed_dim, (image_size, vision layers, vision width, patch), (text width, text heads, text layers)).
_TABLE = {
    "ViT-B-32": (512, (224, 12, 768, 32), (512, 8, 12)),
    "ViT-B-16": (512, (224, 12, 768, 16), (512, 8, 12)),
    "ViT-L-14": (768, (224, 24, 1024, 14), (768, 12, 12)),
    "ViT-L-14-336": (768, (336, 24, 1024, 14), (768, 12, 12)),
}
ARCHITECTURES: dict[str, OpenCLIPArchitecture] = {}
for _name, (_e, _v, _t) in _TABLE.items():
    ARCHITECTURES[_name] = _arch(_e, _v, _t)
    ARCHITECTURES[_name + "-quickgelu"] = _arch(_e, _v, _t, quick_gelu=True)

# Keys OpenCLIP's forward does not depend on (tokenizer, training-time dropout, output format, init).
_IGNORED = {
    "vision_cfg": {"patch_dropout", "output_tokens"},
    "text_cfg": {"hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "pad_id", "eos_id", "output_tokens"},
    "top": set(),
}
# Keys that may appear with exactly these (OpenCLIP default) values: the transformer-block options both towers
# share, then each tower's own.
_BLOCK_DEFAULTS = {
    "ls_init_value": None,
    "final_ln_after_pool": False,
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
_DEFAULTS = {
    "vision_cfg": {
        **_BLOCK_DEFAULTS,
        "attentional_pool": False,
        "no_ln_pre": False,
        "pos_embed_type": "learnable",
        "pool_type": "tok",
        "timm_model_name": None,
    },
    "text_cfg": {
        **_BLOCK_DEFAULTS,
        "embed_cls": False,
        "no_causal_mask": False,
        "pool_type": "argmax",
        "proj_bias": False,
        "proj_type": "linear",
        "hf_model_name": None,
    },
    "top": {"nonscalar_logit_scale": False, "custom_text": False, "init_logit_bias": None},
}


def _check_keys(where: str, section: str, cfg: dict[str, Any], fields: set[str]) -> None:
    bad = []
    for key, value in cfg.items():
        if key in fields or key in _IGNORED[section]:
            continue
        if key in _DEFAULTS[section] and value == _DEFAULTS[section][key]:
            continue
        bad.append(f"{key}={value!r}")
    if bad:
        raise UnsupportedArchitectureError(
            f"{where}: {section} settings not supported by clip_openclip: {', '.join(bad)} (only plain ViT image "
            f"towers and OpenAI-style text towers are built)."
        )


def architecture_from_dict(cfg: dict[str, Any], where: str = "clip_openclip.architecture") -> OpenCLIPArchitecture:
    """An OpenCLIP model-config dict (the content of its ``model_configs/*.json``) -> :class:`OpenCLIPArchitecture`."""
    top = {k: v for k, v in cfg.items() if k not in ("vision_cfg", "text_cfg")}
    _check_keys(where, "top", top, {"embed_dim", "quick_gelu", "init_logit_scale"})
    vision_cfg, text_cfg = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
    v_fields = {f.name for f in dataclasses.fields(OpenCLIPVision)}
    t_fields = {f.name for f in dataclasses.fields(OpenCLIPText)}
    _check_keys(where, "vision_cfg", vision_cfg, v_fields)
    _check_keys(where, "text_cfg", text_cfg, t_fields)
    if "embed_dim" not in cfg:
        raise UnsupportedArchitectureError(f"{where}: the config has no embed_dim.")
    vision = OpenCLIPVision(**{k: v for k, v in vision_cfg.items() if k in v_fields})
    text = OpenCLIPText(**{k: v for k, v in text_cfg.items() if k in t_fields})
    for name in ("image_size", "patch_size", "layers"):
        if not isinstance(getattr(vision, name), int):
            raise UnsupportedArchitectureError(
                f"{where}: vision_cfg.{name} = {getattr(vision, name)!r} is not supported (square ViT only; "
                f"ResNet towers have a tuple of layers)."
            )
    if vision.image_size % vision.patch_size:
        raise UnsupportedArchitectureError(
            f"{where}: patch_size = {vision.patch_size} does not divide image_size = {vision.image_size}."
        )
    if vision.width % vision.head_width:
        raise UnsupportedArchitectureError(
            f"{where}: vision head_width = {vision.head_width} does not divide width = {vision.width}."
        )
    if text.width % text.heads:
        raise UnsupportedArchitectureError(f"{where}: text heads = {text.heads} does not divide width = {text.width}.")
    return OpenCLIPArchitecture(
        embed_dim=int(cfg["embed_dim"]),
        vision=vision,
        text=text,
        quick_gelu=bool(cfg.get("quick_gelu", False)),
        init_logit_scale=float(cfg.get("init_logit_scale", math.log(1 / 0.07))),
    )


def resolve_architecture(architecture: str | None, where: str = "clip_openclip") -> OpenCLIPArchitecture:
    """A table name (:data:`ARCHITECTURES`) or the path of an OpenCLIP-format JSON model config."""
    if not architecture:
        raise ValueError(
            f"{where}.architecture is not set; name one of {sorted(ARCHITECTURES)} or give an OpenCLIP JSON config."
        )
    if architecture in ARCHITECTURES:
        return ARCHITECTURES[architecture]
    if architecture.endswith(".json") or os.path.isfile(architecture):
        if not os.path.isfile(architecture):
            raise FileNotFoundError(f"{where}.architecture = {architecture!r}: no such file.")
        with open(architecture) as f:
            return architecture_from_dict(json.load(f), f"{where}.architecture = {architecture!r}")
    raise UnsupportedArchitectureError(
        f"{where}.architecture = {architecture!r} is not a known OpenCLIP architecture ({sorted(ARCHITECTURES)}) "
        f"nor an existing JSON config file."
    )


def openclip_config(params: Any) -> CLIPConfig:
    return resolve_architecture(params.architecture, params.gin_name).to_clip_config()
