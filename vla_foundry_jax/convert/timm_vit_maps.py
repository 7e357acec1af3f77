"""timm-format ViT checkpoints for ``vit_hf``: architecture from ``config.json`` + tensor shapes, strict key map.

The original builds ``vit_hf`` with ``timm.create_model(hf_pretrained, num_classes=0)`` (reference §3.4), so its
checkpoints are timm's: a directory (or hub repo such as ``timm/vit_base_patch16_siglip_224.webli``) holding
``config.json`` with ``architecture`` (a timm model name), optional ``model_args`` (keyword arguments timm passes to
the model, overriding the architecture's) and ``pretrained_cfg.input_size``, and ``model.safetensors`` with timm's
``VisionTransformer`` names. timm is never imported: the architecture is read as follows.

* From the tensors: width ``D`` and patch size (``patch_embed.proj.weight [D, 3, p, p]``), depth (``blocks.N``),
  MLP width (``fc1``), class token (``cls_token``), register tokens (``reg_token [1, R, D]``), whether the position
  embedding covers the prefix tokens (``pos_embed [1, n_p (+ prefix), D]``; timm's ``no_embed_class``), ``norm_pre``
  (``pre_norm``), the final ``norm`` (absent with ``fc_norm`` / ``final_norm=False``), patch and qkv biases.
* From ``model_args``, else :data:`TIMM_ARCHITECTURES` (facts the tensors cannot show, copied from timm 1.0.31's
  plain ``VisionTransformer`` architectures: heads, MLP activation, LayerNorm eps): ``num_heads``, ``act_layer``
  (``gelu`` exact, ``gelu_tanh``, ``quick_gelu``), LayerNorm eps (timm's default 1e-6; the CLIP models 1e-5).
* Image size: ``model_args.img_size``, else ``pretrained_cfg.input_size``, else the square position-embedding grid.

The tower is :class:`~vla_foundry_jax.models.hf_vision.HFVisionTower`; its output equals the first element of timm's
``forward_intermediates`` (the final-normed token sequence, prefix tokens first). Key map (``{i}`` stacked on the
``layers`` axis; ``qkv`` split into contiguous thirds q | k | v):

| timm tensor                          | our parameter                                              | transform |
|--------------------------------------|------------------------------------------------------------|-----------|
| ``patch_embed.proj.weight`` / bias   | ``embeddings.patch_embedding.kernel`` / bias               | conv / copy |
| ``cls_token [1, 1, D]``              | ``embeddings.class_embedding [D]``                         | reshape   |
| ``reg_token [1, R, D]``              | ``embeddings.register_tokens [R, D]``                      | reshape   |
| ``pos_embed [1, T, D]``              | ``embeddings.position_embedding [T, D]``                   | reshape   |
| ``norm_pre.*``                       | ``pre_layrnorm.*``                                         | copy      |
| ``blocks.{i}.norm1|norm2.*``         | ``encoder.layers.layer_norm1|layer_norm2.*``               | copy      |
| ``blocks.{i}.attn.qkv.weight|bias``  | ``encoder.layers.self_attn.{q,k,v}_proj.kernel|bias``      | third (+T) |
| ``blocks.{i}.attn.proj.*``           | ``encoder.layers.self_attn.out_proj.*``                    | T / copy  |
| ``blocks.{i}.mlp.fc1|fc2.*``         | ``encoder.layers.mlp.fc1|fc2.*``                           | T / copy  |
| ``norm.*``                           | ``post_layernorm.*``                                       | copy      |

Knowingly skipped: the pooling / classifier tensors (``attn_pool.*`` of the SigLIP ``map`` models, ``fc_norm.*``,
``head.*``), which ``forward_intermediates`` does not use. Refused with a clear error: layer scale (``ls1`` /
``ls2``, timm's ``init_values``), ``qk_norm``, the scale norms, SwiGLU / parallel blocks, patch-embedding norms.
Strict otherwise: every other tensor consumed, every parameter filled, every shape equal.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from vla_foundry_jax.convert.hf_decoder_maps import Rule
from vla_foundry_jax.convert.hf_loader import HFLoadError, SafetensorsReader, resolve_hf_path
from vla_foundry_jax.convert.hf_vision_maps import load_by_rules
from vla_foundry_jax.models.hf_decoder import UnsupportedArchitectureError
from vla_foundry_jax.models.hf_vision import HFVisionConfig

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
SKIPPED_PREFIXES = ("attn_pool.", "fc_norm.", "head.")
UNSUPPORTED = {  # tensor-name pattern -> the timm feature it reveals
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
    with SafetensorsReader(path) as reader:
        shapes = {k: reader.shape(k) for k in reader.keys()}
    where = f"timm checkpoint {path} (architecture {arch!r})"
    for pattern, feature in UNSUPPORTED.items():
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


def timm_rules(c: HFVisionConfig) -> list[tuple[Rule, int | None]]:
    """(rule, stacked layer count or None) pairs of the key map for the tower ``c``."""
    e = "embeddings."
    rules: list[tuple[Rule, int | None]] = [
        (Rule(e + "patch_embedding.kernel", "patch_embed.proj.weight", "conv"), None),
        (Rule(e + "position_embedding", "pos_embed", "reshape"), None),
    ]
    if c.has_patch_bias:
        rules.append((Rule(e + "patch_embedding.bias", "patch_embed.proj.bias"), None))
    if c.cls_token:
        rules.append((Rule(e + "class_embedding", "cls_token", "reshape"), None))
    if c.reg_tokens:
        rules.append((Rule(e + "register_tokens", "reg_token", "reshape"), None))
    norms = [("norm_pre", "pre_layrnorm")] if c.has_pre_norm else []
    norms += [("norm", "post_layernorm")] if c.final_norm else []
    rules += [(Rule(f"{ours}.{w}", f"{theirs}.{w}"), None) for theirs, ours in norms for w in ("weight", "bias")]
    f, t = "encoder.layers.", "blocks.{i}."
    layer = [Rule(f"{f}layer_norm{n}.{w}", f"{t}norm{n}.{w}") for n in (1, 2) for w in ("weight", "bias")]
    for j, name in enumerate("qkv"):
        layer.append(Rule(f"{f}self_attn.{name}_proj.kernel", t + "attn.qkv.weight", f"third{j}T"))
        if c.qkv_bias:
            layer.append(Rule(f"{f}self_attn.{name}_proj.bias", t + "attn.qkv.bias", f"third{j}"))
    for ours, theirs in (("self_attn.out_proj", "attn.proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
        layer += [Rule(f"{f}{ours}.kernel", f"{t}{theirs}.weight", "T"), Rule(f"{f}{ours}.bias", f"{t}{theirs}.bias")]
    return rules + [(r, c.num_layers) for r in layer]


def load_timm_vit_weights(
    path: str, config: HFVisionConfig, states: Sequence[Any], prefix: str = "", where: str = "hf_pretrained"
) -> list[Any]:
    """Fill the tower's parameters under ``prefix`` in ``states`` from the timm checkpoint at ``path`` (strict)."""
    rules = timm_rules(config)
    return load_by_rules(path, rules, states, prefix, ignore=lambda k: k.startswith(SKIPPED_PREFIXES), where=where)


def load_vit_hf_timm_weights(params: Any, states: Sequence[Any], prefix: str) -> list[Any]:
    """The ``vit_hf`` weight loader's timm branch: ``params.hf_pretrained`` is a timm checkpoint."""
    path = resolve_hf_path(params.hf_pretrained)
    where = f"{params.gin_name}.hf_pretrained = {params.hf_pretrained!r}"
    return load_timm_vit_weights(path, timm_vision_config(path), states, prefix, where=where)
