"""timm-format ViT checkpoints for ``vit_hf``: architecture from ``config.json`` + tensor shapes, strict key map.

The original builds ``vit_hf`` with ``timm.create_model(hf_pretrained, num_classes=0)`` (reference §3.4), so its
checkpoints are timm's; their architecture (and what is refused) is read by
:func:`~vla_foundry_jax.configs.hf_vision.timm_vision_config`. This module holds the key map.

The tower is :class:`~vla_foundry_jax.models.hf_vision.HFVisionTower`; its output equals the first element of timm's
``forward_intermediates`` (the final-normed token sequence, prefix tokens first). Key map (``{i}`` stacked on the
``layers`` axis; ``qkv`` split into contiguous thirds q | k | v):

| timm tensor                          | our parameter                                         | transform         |
|--------------------------------------|-------------------------------------------------------|-------------------|
| ``patch_embed.proj.weight`` / bias   | ``embeddings.patch_embedding.kernel`` / bias          | patch_conv / copy |
| ``cls_token [1, 1, D]``              | ``embeddings.class_embedding [D]``                    | squeeze_leading   |
| ``reg_token [1, R, D]``              | ``embeddings.register_tokens [R, D]``                 | squeeze_leading   |
| ``pos_embed [1, T, D]``              | ``embeddings.position_embedding [T, D]``              | squeeze_leading   |
| ``norm_pre.*``                       | ``pre_layrnorm.*``                                    | copy              |
| ``blocks.{i}.norm1|norm2.*``         | ``encoder.layers.layer_norm1|layer_norm2.*``          | copy              |
| ``blocks.{i}.attn.qkv.weight|bias``  | ``encoder.layers.self_attn.{q,k,v}_proj.kernel|bias`` | fused_third (+T)  |
| ``blocks.{i}.attn.proj.*``           | ``encoder.layers.self_attn.out_proj.*``               | T / copy          |
| ``blocks.{i}.mlp.fc1|fc2.*``         | ``encoder.layers.mlp.fc1|fc2.*``                      | T / copy          |
| ``norm.*``                           | ``post_layernorm.*``                                  | copy              |

Knowingly skipped: the pooling / classifier tensors (``attn_pool.*`` of the SigLIP ``map`` models, ``fc_norm.*``,
``head.*``), which ``forward_intermediates`` does not use. Strict otherwise
(:func:`~vla_foundry_jax.convert.engine.load_rules`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vla_foundry_jax.configs.hf_vision import HFVisionConfig
from vla_foundry_jax.convert.engine import PATCH_CONV, SQUEEZE_LEADING, TRANSPOSE, Rule, fused_third, load_rules
from vla_foundry_jax.convert.sources import SafetensorsReader

SKIPPED_PREFIXES = ("attn_pool.", "fc_norm.", "head.")


def timm_rules(c: HFVisionConfig) -> list[Rule]:
    """The key map for the tower ``c``."""
    e = "embeddings."
    rules = [
        Rule(e + "patch_embedding.kernel", "patch_embed.proj.weight", PATCH_CONV),
        Rule(e + "position_embedding", "pos_embed", SQUEEZE_LEADING),
    ]
    if c.has_patch_bias:
        rules.append(Rule(e + "patch_embedding.bias", "patch_embed.proj.bias"))
    if c.cls_token:
        rules.append(Rule(e + "class_embedding", "cls_token", SQUEEZE_LEADING))
    if c.reg_tokens:
        rules.append(Rule(e + "register_tokens", "reg_token", SQUEEZE_LEADING))
    norms = [("norm_pre", "pre_layrnorm")] if c.has_pre_norm else []
    norms += [("norm", "post_layernorm")] if c.final_norm else []
    rules += [Rule(f"{ours}.{w}", f"{theirs}.{w}") for theirs, ours in norms for w in ("weight", "bias")]
    f, t, n = "encoder.layers.", "blocks.{i}.", c.num_layers
    rules += [Rule(f"{f}layer_norm{k}.{w}", f"{t}norm{k}.{w}", layers=n) for k in (1, 2) for w in ("weight", "bias")]
    for j, name in enumerate("qkv"):
        rules.append(Rule(f"{f}self_attn.{name}_proj.kernel", t + "attn.qkv.weight", fused_third(j, True), n))
        if c.qkv_bias:
            rules.append(Rule(f"{f}self_attn.{name}_proj.bias", t + "attn.qkv.bias", fused_third(j, False), n))
    for ours, theirs in (("self_attn.out_proj", "attn.proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
        rules += [
            Rule(f"{f}{ours}.kernel", f"{t}{theirs}.weight", TRANSPOSE, n),
            Rule(f"{f}{ours}.bias", f"{t}{theirs}.bias", layers=n),
        ]
    return rules


def load_timm_vit_weights(
    path: str, config: HFVisionConfig, states: Sequence[Any], prefix: str = "", where: str = "hf_pretrained"
) -> list[Any]:
    """Fill the tower's parameters under ``prefix`` in ``states`` from the timm checkpoint at ``path`` (strict)."""
    with SafetensorsReader(path) as reader:
        ignore = lambda k: k.startswith(SKIPPED_PREFIXES)  # noqa: E731
        return load_rules(reader, timm_rules(config), states, prefix, where=where, ignore=ignore)
