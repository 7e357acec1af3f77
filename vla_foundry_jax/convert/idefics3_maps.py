"""Weight map of ``vlm_hf`` for Idefics3 / SmolVLM checkpoints (used by the ``vlm_hf`` loader in ``vlm_hf_maps``).

Three tables for one strict :func:`~vla_foundry_jax.convert.hf_vision_maps.load_by_rules` pass:

* ``vision_tower.*`` <- :func:`~vla_foundry_jax.convert.hf_vision_maps.vision_rules` (SigLIP layout: patch ``Conv2d``
  with bias, position embedding, encoder layers, ``post_layernorm``) from ``[model.]vision_model.``;
* ``connector.kernel`` <- ``[model.]connector.modality_projection.proj.weight`` (transposed; no bias);
* ``language_model.*`` <- :data:`~vla_foundry_jax.convert.hf_decoder_maps.ARCH_MAPS` of the text model's type from
  ``[model.]text_model.``; ``lm_head.weight`` only when the top-level config is untied (a stored copy of tied
  embeddings is skipped).

``save_pretrained`` of transformers 5.x and the hub's SmolVLM / Idefics3 checkpoints both use the ``model.``-prefixed
names; the bare ones (an ``Idefics3Model`` saved on its own) load too.
"""

from __future__ import annotations

from collections.abc import Sequence

from vla_foundry_jax.convert.hf_decoder_maps import ARCH_MAPS, Rule, _active
from vla_foundry_jax.convert.hf_loader import HFLoadError
from vla_foundry_jax.convert.hf_vision_maps import LayeredRule, vision_rules
from vla_foundry_jax.models.idefics3 import Idefics3Config

VISION_PREFIXES = ("model.vision_model.", "vision_model.")
CONNECTOR_PREFIXES = ("model.connector.", "connector.")
TEXT_PREFIXES = ("model.text_model.", "text_model.")
LM_HEAD = "lm_head.weight"


def _find(keys: set[str], prefixes: Sequence[str], anchor: str, what: str) -> str:
    for p in prefixes:
        if p + anchor in keys:
            return p
    raise HFLoadError(f"no {what} in the checkpoint (looked for {', '.join(p + anchor for p in prefixes)}).")


def idefics3_rules(c: Idefics3Config, keys: Sequence[str]) -> tuple[list[LayeredRule], list[LayeredRule], set[str]]:
    """(all rules, norm rules needing a rewrite (none: no Gemma text), checkpoint names to skip) for ``keys``."""
    ks = set(keys)
    vsrc = _find(ks, VISION_PREFIXES, "embeddings.patch_embedding.weight", "Idefics3 vision model")
    csrc = _find(ks, CONNECTOR_PREFIXES, "modality_projection.proj.weight", "Idefics3 connector")
    tsrc = _find(ks, TEXT_PREFIXES, "embed_tokens.weight", "text model")
    rules = vision_rules(c.vision, "vision_tower.", vsrc)
    rules.append((Rule("connector.kernel", csrc + "modality_projection.proj.weight", "T"), None))
    for r in ARCH_MAPS[c.text.model_type]:
        if not _active(r, c.text):
            continue
        if not r.body:  # the untied lm_head
            if LM_HEAD not in ks:
                raise HFLoadError(f"the config is untied but the checkpoint has no {LM_HEAD}.")
            hf = LM_HEAD
        else:
            hf = tsrc + r.hf
        transform = "copy" if r.transform == "norm" else r.transform  # no norm offset (Gemma is refused)
        rules.append((Rule("language_model." + r.flax, hf, transform), c.text.num_layers if "{i}" in r.hf else None))
    skip = {k for k in ks if k.endswith("rotary_emb.inv_freq")}
    if c.text.tie_word_embeddings:
        skip.add(LM_HEAD)
    return rules, [], skip
