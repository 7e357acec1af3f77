"""Strict weight loader for ``clip_openclip``: an OpenCLIP ``CLIP`` state dict (safetensors) into our CLIP model.

``pretrained_weights`` is a ``.safetensors`` file (e.g. OpenCLIP's ``open_clip_model.safetensors``) or a directory
holding safetensors files. Tensor names are OpenCLIP's OpenAI-style ones (a leading ``module.`` from DDP
checkpoints is stripped); ``{i}`` is a block index, stacked on our leading ``layers`` axis:

| OpenCLIP tensor                                        | our parameter                                        |
|--------------------------------------------------------|------------------------------------------------------|
| ``visual.conv1.weight [D, 3, p, p]``                   | ``vision_model.embeddings.patch_embedding.kernel``   |
| ``visual.class_embedding`` / ``visual.positional_embedding`` | ``vision_model.embeddings.class_/position_embedding`` |
| ``visual.ln_pre.*`` / ``visual.ln_post.*``             | ``vision_model.pre_layrnorm.*`` / ``post_layernorm.*`` |
| ``visual.proj [D_v, P]``                               | ``visual_projection.kernel`` (as is)                 |
| ``token_embedding.weight`` / ``positional_embedding``  | ``text_model.embeddings.token_/position_embedding``  |
| ``ln_final.*``                                         | ``text_model.final_layer_norm.*``                    |
| ``text_projection [D_t, P]`` / ``logit_scale``         | ``text_projection.kernel`` (as is) / ``logit_scale`` |

and per block, ``visual.transformer.resblocks.{i}.`` -> ``vision_model.encoder.layers.`` and
``transformer.resblocks.{i}.`` -> ``text_model.encoder.layers.``: ``ln_1`` / ``ln_2`` -> ``layer_norm1`` /
``layer_norm2``; the fused ``attn.in_proj_weight [3D, D]`` / ``attn.in_proj_bias [3D]`` split in (q, k, v) order
into ``self_attn.{q,k,v}_proj`` (weights transposed to ``[in, out]`` kernels); ``attn.out_proj`` ->
``self_attn.out_proj``; ``mlp.c_fc`` / ``mlp.c_proj`` -> ``mlp.fc1`` / ``mlp.fc2``.

Strict (:func:`~vla_foundry_jax.convert.engine.load_rules`): every checkpoint tensor consumed, every parameter under
the prefix filled, every shape equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vla_foundry_jax.configs.clip import CLIPConfig
from vla_foundry_jax.configs.openclip import openclip_config
from vla_foundry_jax.convert.engine import PATCH_CONV, TRANSPOSE, Rule, fused_third, load_rules
from vla_foundry_jax.convert.sources import PrefixedSource, open_safetensors

HINT = "Is `architecture` the one these weights were trained with?"
TO_SAFETENSORS = (
    "convert the OpenCLIP checkpoint once with PyTorch, e.g. "
    "`safetensors.torch.save_file(model.state_dict(), 'open_clip_model.safetensors')`."
)


def _norm(flax: str, src: str, layers: int | None = None) -> list[Rule]:
    return [Rule(f"{flax}.{w}", f"{src}.{w}", layers=layers) for w in ("weight", "bias")]


def _block_rules(flax: str, src: str, n: int) -> list[Rule]:
    f, s = flax + "encoder.layers.", src + "transformer.resblocks.{i}."
    rules = _norm(f + "layer_norm1", s + "ln_1", n) + _norm(f + "layer_norm2", s + "ln_2", n)
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rules += [
            Rule(f"{f}self_attn.{name}.kernel", s + "attn.in_proj_weight", fused_third(j, True), n),
            Rule(f"{f}self_attn.{name}.bias", s + "attn.in_proj_bias", fused_third(j, False), n),
        ]
    for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        rules += [
            Rule(f"{f}{ours}.kernel", f"{s}{theirs}.weight", TRANSPOSE, n),
            Rule(f"{f}{ours}.bias", f"{s}{theirs}.bias", layers=n),
        ]
    return rules


def openclip_rules(c: CLIPConfig) -> list[Rule]:
    """Every tensor of an OpenCLIP ``CLIP`` (plain ViT + OpenAI-style text tower) -> our :class:`CLIPModel`."""
    v, t = "vision_model.", "text_model."
    return [
        Rule(v + "embeddings.patch_embedding.kernel", "visual.conv1.weight", PATCH_CONV),
        Rule(v + "embeddings.class_embedding", "visual.class_embedding"),
        Rule(v + "embeddings.position_embedding", "visual.positional_embedding"),
        *_norm(v + "pre_layrnorm", "visual.ln_pre"),
        *_block_rules(v, "visual.", c.vision.num_layers),
        *_norm(v + "post_layernorm", "visual.ln_post"),
        Rule("visual_projection.kernel", "visual.proj"),
        Rule(t + "embeddings.token_embedding", "token_embedding.weight"),
        Rule(t + "embeddings.position_embedding", "positional_embedding"),
        *_block_rules(t, "", c.text.num_layers),
        *_norm(t + "final_layer_norm", "ln_final"),
        Rule("text_projection.kernel", "text_projection"),
        Rule("logit_scale", "logit_scale"),
    ]


def load_openclip(
    path: str, rules: Sequence[Rule], states: Sequence[Any], prefix: str = "", *, where: str = "checkpoint"
) -> list[Any]:
    """Fill the parameters under ``prefix`` in ``states`` from the OpenCLIP safetensors at ``path`` (strict)."""
    with open_safetensors(path, TO_SAFETENSORS) as reader:
        keys = reader.keys()
        strip = "module." if keys and all(k.startswith("module.") for k in keys) else ""  # DDP checkpoints
        return load_rules(PrefixedSource(reader, strip), rules, states, prefix, where=where, hint=HINT)


def load_clip_openclip_weights(params: Any, states: Sequence[Any], prefix: str) -> list[Any]:
    """Weight loader for ``clip_openclip``: every tensor of ``pretrained_weights`` into the built model."""
    if not params.pretrained_weights:
        return list(states)
    where = f"{params.gin_name}.pretrained_weights = {params.pretrained_weights!r}"
    rules = openclip_rules(openclip_config(params))
    return load_openclip(params.pretrained_weights, rules, states, prefix, where=where)
