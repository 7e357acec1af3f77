"""The original's (PyTorch VLA Foundry) state-dict names <-> our parameters, one declarative table per model type.

The original saves ``model.state_dict()`` of its torch modules; our modules keep its attribute names, so a table
maps each of its tensors to one parameter through a :class:`~vla_foundry_jax.convert.engine.Transform`:
``X.weight`` of a ``Linear`` -> ``X.kernel`` transposed, ``nn.Embedding`` / ``nn.Parameter`` tensors as they are,
``layers.{i}.`` / ``blocks.{i}.`` tensors stacked on our leading layer axis. Per type:

* ``transformer``: :data:`TRANSFORMER` (norm parts per ``norm_type``, the SwiGLU ``w12`` / ``w3`` or GELU
  ``feed_forward.0`` / ``.2`` linears, optional ``q_norm`` / ``k_norm`` / ``post_embed_norm``; ``output.weight``
  stored beside a tied ``embeddings.weight`` is the same tensor and is ignored). The rotary ``inv_freq`` buffers
  are constants here: ignored on import, recomputed on export;
* ``transformer_hf``: the HF ``*ForCausalLM`` under ``model.`` through the HF decoder tables of
  :mod:`~vla_foundry_jax.convert.hf_decoder_maps` (its config read from ``hf_pretrained``; a tied
  ``model.lm_head.weight`` is the embedding);
* ``vlm_hf``: the HF PaliGemma / Idefics3 under ``model.`` through :mod:`~vla_foundry_jax.convert.vlm_hf_maps`;
* ``vit`` / ``vit_backbone``: the ViT table of :mod:`~vla_foundry_jax.convert.vit_weights`;
* ``vit_hf``: the original's ``ViTHF`` holds ``timm.create_model(hf_pretrained)`` as ``model``: the timm table of
  :mod:`~vla_foundry_jax.convert.timm_vit_maps` under ``model.`` (timm's pooling / classifier tensors, unused by
  ``forward_intermediates``, are kept for the export);
* ``clip_hf`` / ``clip_backbone``: the HF ``CLIPModel`` under ``model.`` (:func:`~vla_foundry_jax.convert.
  hf_vision_maps.clip_rules`; stale ``position_ids`` buffers kept for the export);
* ``vlm``: its ``vit.`` (``vit`` or ``vit_hf``) and ``transformer.`` sub-tables plus ``projection.proj.weight``;
* ``diffusion_policy``: the backbone under ``vision_language_backbone._model.`` (a ``vit_backbone``'s ViT, a
  ``vlm_foundry_backbone``'s VLM, a ``clip_backbone``'s / ``vlm_backbone``'s HF model under a further ``model.``;
  a ``vlm_backbone``'s token table and head carry the action-token row), its ``transformer.``,
  ``time_encoding.weight`` and the four encoders; the DDPM scheduler's buffers (``scheduler.betas`` ...) and
  ``sinusoidal_position_embeddings.emb`` are constants;
* ``stable_diffusion``: its own UNet under ``unet.`` (:mod:`~vla_foundry_jax.convert.foundry_unet_maps`; the
  sinusoid buffer ``unet.time_mlp.0.emb`` a constant), the CLIP under ``clip.model.`` when ``clip.hf_pretrained``
  is set, the DDPM scheduler's buffers under ``scheduler.``. The original's ``use_diffusers_unet`` UNet (a fixed
  six-level diffusers ``UNet2DModel`` whatever ``unet`` says) has no counterpart here and is refused by name.

:func:`foundry_rules` resolves the tables of a params tree into a :class:`Plan`: concrete rules, the names to
ignore on import, and the constants and tied copies :func:`export_state_dict` writes back (the original's strict
``load_state_dict`` expects them). Other types raise :class:`FoundryMapError` naming the type.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from vla_foundry_jax.configs.clip import clip_config
from vla_foundry_jax.configs.hf_decoder import hf_decoder_config
from vla_foundry_jax.configs.hf_hub import resolve_hf_path
from vla_foundry_jax.configs.hf_vision import hf_vision_config, is_timm_checkpoint
from vla_foundry_jax.configs.vlm_hf import Idefics3Config, vlm_hf_config
from vla_foundry_jax.convert.engine import TRANSPOSE, Rule, resolve
from vla_foundry_jax.convert.foundry_unet_maps import UNET_BUFFER, unet_rules
from vla_foundry_jax.convert.hf_decoder_maps import decoder_rules
from vla_foundry_jax.convert.hf_vision_maps import IGNORED_SUFFIXES, clip_rules
from vla_foundry_jax.convert.timm_vit_maps import SKIPPED_PREFIXES, timm_rules
from vla_foundry_jax.convert.vit_weights import vit_rules
from vla_foundry_jax.convert.vlm_hf_maps import IDEFICS3, PALIGEMMA, PATCH, vlm_rules
from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.params.model_params import ModelParams, TransformerParams


class FoundryMapError(VLAFoundryError, ValueError):
    """A model the original saves that this project cannot map (type or configuration named)."""


_L = "layers.{i}."
# the parameters each of the original's norm types holds (``norm_type`` of the transformer)
NORM_PARTS = {
    "default_layer_norm": ("weight", "bias"),
    "lp_layer_norm": ("weight", "bias"),
    "gain_only_lp_layer_norm": ("weight",),
    "gain_only_layer_norm": ("weight",),
    "no_wb_layer_norm": (),
    "rms_norm": ("weight",),
}


def _norm(target: str, source: str, when: Callable[[Any], bool] | None = None) -> tuple[Rule, ...]:
    """One rule per parameter of a norm (which ones depends on ``norm_type``)."""
    return tuple(
        Rule(
            f"{target}.{part}",
            f"{source}.{part}",
            when=lambda p, part=part, when=when: part in NORM_PARTS[p.norm_type] and (when is None or when(p)),
        )
        for part in ("weight", "bias")
    )


def _swiglu(p: TransformerParams) -> bool:
    return p.ffn_type == "swiglu"


TRANSFORMER: tuple[Rule, ...] = (
    Rule("embeddings", "embeddings.weight"),
    Rule("output", "output.weight", TRANSPOSE, when=lambda p: not p.weight_tying),
    *_norm("post_embed_norm", "post_embed_norm", when=lambda p: p.post_embed_norm),
    *_norm("norm", "norm"),
    *_norm("layers.attention_norm", _L + "attention_norm"),
    *_norm("layers.ffn_norm", _L + "ffn_norm"),
    *_norm("layers.attention.q_norm", _L + "attention.q_norm", when=lambda p: p.qk_norm),
    *_norm("layers.attention.k_norm", _L + "attention.k_norm", when=lambda p: p.qk_norm),
    Rule("layers.attention.in_proj.kernel", _L + "attention.in_proj.weight", TRANSPOSE),
    Rule("layers.attention.out_proj.kernel", _L + "attention.out_proj.weight", TRANSPOSE),
    Rule("layers.feed_forward.w12.kernel", _L + "feed_forward.w12.weight", TRANSPOSE, when=_swiglu),
    Rule("layers.feed_forward.w3.kernel", _L + "feed_forward.w3.weight", TRANSPOSE, when=_swiglu),
    Rule("layers.feed_forward.w1.kernel", _L + "feed_forward.0.weight", TRANSPOSE, when=lambda p: not _swiglu(p)),
    Rule("layers.feed_forward.w2.kernel", _L + "feed_forward.2.weight", TRANSPOSE, when=lambda p: not _swiglu(p)),
)
VLM_PROJECTION = (Rule("projection", "projection.proj.weight", TRANSPOSE),)


def _linear(name: str, when: Callable[[Any], bool] | None = None) -> tuple[Rule, ...]:
    return (
        Rule(f"{name}.kernel", f"{name}.weight", TRANSPOSE, when=when),
        Rule(f"{name}.bias", f"{name}.bias", when=when),
    )


DIFFUSION_POLICY: tuple[Rule, ...] = (
    Rule("time_encoding", "time_encoding.weight"),
    *_linear("output_layer"),
    *_linear("action_encode"),
    *_linear("condition_encode"),
    *_linear("proprioception_encode", when=lambda p: p.proprioception_dim > 0),
)
BACKBONE = "vision_language_backbone."
BACKBONE_SOURCE = "vision_language_backbone._model."
UNSUPPORTED = {
    "clip_openclip": "an OpenCLIP model",
}


class Plan:
    """The concrete rules of one model plus what its state dict also holds (constants) and how to recreate them."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.ignored: list[Callable[[str], bool]] = []
        self.buffers: dict[str, np.ndarray] = {}
        self.aliases: dict[str, str] = {}  # tied copies written on export: name -> name of the tensor it repeats
        self.constants: dict[str, np.ndarray] = {}  # source names of our own: values of never-read parameters
        self.dead: set[str] = set()  # the original's never-read tensors (zeros on export)

    def kept(self, names: Iterable[str]) -> list[str]:
        """The ignored tensors among ``names`` (a checkpoint's) that an import keeps for an exact export: constant
        buffers, unused heads (e.g. SigLIP's pooling head); not the dead token tables nor tied copies."""
        return sorted(n for n in names if self.ignore(n) and n not in self.dead and n not in self.aliases)

    def ignore(self, name: str) -> bool:
        return any(f(name) for f in self.ignored)


def rotary_inv_freq(head_dim: int) -> np.ndarray:
    """The original's ``RotaryEmbedding.inv_freq``: ``1 / 10000 ** (arange(0, d, 2) / d)`` in float32."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(10000.0) ** exponent)).astype(np.float32)


def ddpm_buffers(num_timesteps: int, beta_start: float, beta_end: float) -> dict[str, np.ndarray]:
    """The original's ``NoiseSchedulerDDPM`` buffers (float32 linspace betas, cumulative products)."""
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64).astype(np.float32)
    alphas = np.float32(1) - betas
    cum = np.cumprod(alphas, dtype=np.float32)
    prev = np.concatenate([np.ones(1, np.float32), cum[:-1]])
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": cum,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(cum),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(np.float32(1) - cum),
        "posterior_variance": betas * (np.float32(1) - prev) / (np.float32(1) - cum),
    }


def sinusoid_frequencies(dim: int) -> np.ndarray:
    """The original's ``SinusoidalPositionEmbeddings.emb``: ``exp(-arange(d/2) * ln(10000) / (d/2 - 1))``."""
    half = dim // 2
    return np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1))).astype(np.float32)


def _add_transformer(plan: Plan, p: TransformerParams, sp: str, tp: str) -> None:
    plan.rules += resolve(TRANSFORMER, p, layers=p.n_layers, source_prefix=sp, target_prefix=tp)
    if p.weight_tying:
        plan.ignored.append(lambda n, name=sp + "output.weight": n == name)
        plan.aliases[sp + "output.weight"] = sp + "embeddings.weight"
    if p.positional_embedding_type in ("rotary", "rotary_float32"):
        names = {f"{sp}layers.{i}.attention.pos_embed.inv_freq" for i in range(p.n_layers)}
        plan.ignored.append(lambda n, names=names: n in names)
        inv = rotary_inv_freq(p.hidden_dim // p.n_heads)
        plan.buffers.update(dict.fromkeys(names, inv))
    elif p.positional_embedding_type != "none":
        raise FoundryMapError(
            f"transformer.positional_embedding_type = {p.positional_embedding_type!r} exists only in this project; "
            f"the original has no such tensors."
        )


def _add_transformer_hf(plan: Plan, p: ModelParams, sp: str, tp: str) -> None:
    """The original's ``TransformerHF`` holds the HF ``*ForCausalLM`` as ``model``: the HF decoder table under
    ``model.model.``, the head ``model.lm_head.weight`` (a tied one is the embedding: ignored, written back)."""
    c = hf_decoder_config(p)
    plan.rules += decoder_rules(c, sp + "model.model.", tp, lm_head=sp + "model.lm_head.weight")
    rotary = sp + "model.model.rotary_emb.inv_freq"  # persistent in older transformers versions
    plan.ignored.append(lambda n, rotary=rotary: n == rotary)
    if c.tie_word_embeddings:
        head = sp + "model.lm_head.weight"
        plan.ignored.append(lambda n, head=head: n == head)
        plan.aliases[head] = sp + "model.model.embed_tokens.weight"


# the in-memory names of transformers 5 (what the original's ``VLMHF.model.state_dict()`` holds), for exports
MEMORY_ANCHORS = {
    "paligemma": (
        "model.vision_tower." + PATCH,
        "model.multi_modal_projector.linear.weight",
        "model.language_model.embed_tokens.weight",
        "lm_head.weight",
    ),
    "idefics3": (
        "model.vision_model." + PATCH,
        "model.connector.modality_projection.proj.weight",
        "model.text_model.embed_tokens.weight",
        "lm_head.weight",
    ),
}


def _add_vlm_hf(plan: Plan, p: ModelParams, sp: str, tp: str, keys: Iterable[str] | None) -> None:
    """The original's ``VLMHF`` holds the HF ``AutoModelForImageTextToText`` as ``model``: the PaliGemma /
    Idefics3 tables of :mod:`~vla_foundry_jax.convert.vlm_hf_maps` under ``model.`` (prefixes as found in the
    checkpoint; transformers 5 names on export)."""
    c = vlm_hf_config(p)
    kind = "idefics3" if isinstance(c, Idefics3Config) else "paligemma"
    inner = sp + "model."
    names = MEMORY_ANCHORS[kind] if keys is None else [k[len(inner) :] for k in keys if k.startswith(inner)]
    rules, skip = vlm_rules(IDEFICS3 if kind == "idefics3" else PALIGEMMA, c, names)
    rules = resolve(rules, source_prefix=inner, target_prefix=tp)
    plan.rules += rules
    skipped = {inner + n for n in skip}
    plan.ignored.append(lambda n, skipped=skipped: n in skipped)
    if c.text.tie_word_embeddings:
        embed = next(r.source for r in rules if r.target == tp + "language_model.embed_tokens")
        plan.aliases[inner + "lm_head.weight"] = embed


def _add_lm(plan: Plan, p: ModelParams, sp: str, tp: str) -> None:
    if p.type == "transformer_hf":
        _add_transformer_hf(plan, p, sp, tp)
    else:
        _add_transformer(plan, p, sp, tp)


def _add_vit(plan: Plan, p: ModelParams, targets: Iterable[str], sp: str, tp: str) -> None:
    names = [t[len(tp) :] for t in targets if t.startswith(tp)]
    plan.rules += resolve(vit_rules(names, p.n_layers), source_prefix=sp, target_prefix=tp)


def _add_vit_hf(plan: Plan, p: ModelParams, sp: str, tp: str) -> None:
    """The original's ``ViTHF`` holds the timm model as ``model``: the timm table under ``model.``."""
    if p.hf_pretrained and not is_timm_checkpoint(resolve_hf_path(p.hf_pretrained)):
        raise FoundryMapError(
            f"{p.gin_name}.hf_pretrained = {p.hf_pretrained!r} is not a timm checkpoint (config.json with an "
            f"'architecture'); the original builds vit_hf with timm.create_model, so its weights use timm's names. "
            f"Point hf_pretrained at the timm model the run was trained from."
        )
    plan.rules += resolve(timm_rules(hf_vision_config(p)), source_prefix=sp + "model.", target_prefix=tp)
    skipped = tuple(sp + "model." + s for s in SKIPPED_PREFIXES)  # pooling / classifier: kept for the export
    plan.ignored.append(lambda n, skipped=skipped: n.startswith(skipped))


def _add_clip(plan: Plan, p: ModelParams, sp: str, tp: str) -> None:
    """The original's ``CLIPHF`` holds the HF ``CLIPModel`` as ``model``: the CLIP table under ``model.``."""
    inner = sp + "model."
    plan.rules += resolve(clip_rules(clip_config(p)), source_prefix=inner, target_prefix=tp)
    plan.ignored.append(lambda n, inner=inner: n.startswith(inner) and n.endswith(IGNORED_SUFFIXES))


def _add_unet(plan: Plan, p: ModelParams, targets: Iterable[str], sp: str, tp: str) -> None:
    """The original's own UNet (:mod:`~vla_foundry_jax.convert.foundry_unet_maps`) and its sinusoid buffer."""
    names = [t[len(tp) :] for t in targets if t.startswith(tp)]
    plan.rules += resolve(unet_rules(names), source_prefix=sp, target_prefix=tp)
    emb = sp + UNET_BUFFER
    plan.ignored.append(lambda n, emb=emb: n == emb)
    plan.buffers[emb] = sinusoid_frequencies(p.time_emb_dim)


def _add_ddpm_buffers(plan: Plan, params: ModelParams) -> None:
    """The original's ``NoiseSchedulerDDPM`` is a module (its buffers under ``scheduler.``); the other two are not."""
    plan.ignored.append(lambda n: n.startswith("scheduler."))
    if not (params.use_flow_matching_scheduler or params.use_diffusers_scheduler):
        s = params.noise_scheduler
        for k, v in ddpm_buffers(s.num_timesteps, s.beta_start, s.beta_end).items():
            plan.buffers[f"scheduler.{k}"] = v


def _check_unet(params: ModelParams) -> None:
    if params.type == "stable_diffusion" and params.use_diffusers_unet:
        raise FoundryMapError(
            "stable_diffusion.use_diffusers_unet = True: the original's diffusers UNet is a fixed six-level "
            "UNet2DModel (128..512 channels) that ignores the unet settings; this project builds its diffusers UNet "
            "from unet.channels or a diffusers checkpoint, so that state dict cannot be imported. Supported: the "
            "original's own UNet (use_diffusers_unet = False)."
        )


def _add_stable_diffusion(plan: Plan, params: ModelParams, targets: Iterable[str]) -> None:
    _check_unet(params)
    targets = list(targets)
    _add_unet(plan, params.unet, targets, "unet.", "unet.")
    if params.clip.hf_pretrained:
        _add_clip(plan, params.clip, "clip.", "clip.")
    _add_ddpm_buffers(plan, params)


def _add_vlm(plan: Plan, p: ModelParams, targets: Iterable[str], sp: str, tp: str) -> None:
    targets = list(targets)
    for child in (p.vit, p.transformer):
        if child.type in UNSUPPORTED:
            _unsupported(child.type, f"{p.type}.{'vit' if child is p.vit else 'transformer'}")
    if p.vit.type == "vit_hf":
        _add_vit_hf(plan, p.vit, sp + "vit.", tp + "vit.")
    else:
        _add_vit(plan, p.vit, targets, sp + "vit.", tp + "vit.")
    _add_lm(plan, p.transformer, sp + "transformer.", tp + "transformer.")
    plan.rules += resolve(VLM_PROJECTION, source_prefix=sp, target_prefix=tp)


def _unsupported(kind: str, where: str) -> None:
    raise FoundryMapError(
        f"{where} is a {kind!r} ({UNSUPPORTED[kind]}): importing the original's {kind} weights is not supported "
        f"yet; supported: transformer, transformer_hf, vit, vit_hf, clip_hf, vlm (vit or vit_hf, transformer or "
        f"transformer_hf), vlm_hf, diffusion_policy with a clip_backbone, vit_backbone, vlm_backbone or "
        f"vlm_foundry_backbone, stable_diffusion with its own UNet."
    )


def check_supported(params: ModelParams) -> None:
    """Raise :class:`FoundryMapError` when ``params`` (or a sub-model) has no table here."""
    if params.type in UNSUPPORTED:
        _unsupported(params.type, "the model")
    _check_unet(params)
    for field in ("vit", "transformer", "vision_language_backbone"):
        child = getattr(params, field, None)
        if isinstance(child, ModelParams) and child.type in UNSUPPORTED:
            _unsupported(child.type, f"{params.type}.{field}")


def foundry_rules(
    params: ModelParams,
    targets: Iterable[str],
    *,
    source_vlm: ModelParams | None = None,
    keys: Iterable[str] | None = None,
) -> Plan:
    """The :class:`Plan` of a model ``params`` whose parameter names (ours) are ``targets``; ``source_vlm``: the
    ``vlm`` params of a ``vlm_foundry_backbone`` (its architecture lives in the source VLM's config); ``keys``: the
    checkpoint's tensor names when importing (a ``vlm_hf``'s prefixes are found in them)."""
    targets = list(targets)
    plan = Plan()
    kind = params.type
    if kind in UNSUPPORTED:
        _unsupported(kind, "the model")
    if kind in ("transformer", "transformer_hf"):
        _add_lm(plan, params, "", "")
    elif kind == "vlm_hf":
        _add_vlm_hf(plan, params, "", "", keys)
    elif kind in ("vit", "vit_backbone"):
        _add_vit(plan, params, targets, "", "")
    elif kind in ("clip_hf", "clip_backbone"):
        _add_clip(plan, params, "", "")
    elif kind == "vlm":
        _add_vlm(plan, params, targets, "", "")
    elif kind == "stable_diffusion":
        _add_stable_diffusion(plan, params, targets)
    elif kind == "diffusion_policy":
        bb = params.vision_language_backbone
        if bb.type == "vit_backbone":
            _add_vit(plan, bb, targets, BACKBONE_SOURCE, BACKBONE)
        elif bb.type == "vlm_foundry_backbone":
            if source_vlm is None:
                raise FoundryMapError("a vlm_foundry_backbone needs its source VLM's params (vlm_config_model.yaml).")
            _add_vlm(plan, source_vlm, targets, BACKBONE_SOURCE, BACKBONE)
        elif bb.type == "clip_backbone":
            _add_clip(plan, bb, BACKBONE_SOURCE, BACKBONE)
        elif bb.type == "vlm_backbone":
            _add_vlm_hf(plan, bb, BACKBONE_SOURCE, BACKBONE, keys)
        else:
            _unsupported(bb.type, "diffusion_policy.vision_language_backbone")
        if params.transformer is None:
            raise FoundryMapError("diffusion_policy.transformer is not set in the original's config.")
        _add_lm(plan, params.transformer, "transformer.", "transformer.")
        if params.transformer.type == "transformer":
            _dead_token_tables(plan, params.transformer, targets)
        plan.rules += resolve(DIFFUSION_POLICY, params)
        emb = "sinusoidal_position_embeddings.emb"
        plan.ignored.append(lambda n: n == emb)
        plan.buffers[emb] = None  # filled by export_buffers (needs the table's width)
        _add_ddpm_buffers(plan, params)
    else:
        raise FoundryMapError(f"model type {kind!r}: no table of the original's state-dict names.")
    return plan


DEAD = "(never read) "


def _dead_token_tables(plan: Plan, p: TransformerParams, targets: list[str]) -> None:
    """The denoiser's token table and head are never read: ours are one zero row (see ``models.diffusion_policy``),
    the original's ``[V, H]`` tensors are dropped on import and written as zeros on export."""
    if "transformer.embeddings" in targets and p.vocab_size != 1:
        H, V = p.hidden_dim, p.vocab_size
        dead = {"transformer.embeddings": ((1, H), (V, H)), "transformer.output": ((H, 1), (V, H))}
        kept = []
        for rule in plan.rules:
            if rule.target in dead:
                if rule.target in targets:
                    ours, theirs = dead[rule.target]
                    plan.constants[DEAD + rule.target] = np.zeros(ours, np.float32)
                    kept.append(Rule(rule.target, DEAD + rule.target))
                    plan.buffers[rule.source] = np.zeros(theirs, np.float32)
                    plan.dead.add(rule.source)
                names = {rule.source}
                plan.ignored.append(lambda n, names=names: n in names)
            else:
                kept.append(rule)
        plan.rules = kept


class PlanSource:
    """A source plus the plan's constants (names no file holds)."""

    def __init__(self, source: Any, plan: Plan):
        self.source, self.constants = source, plan.constants

    def __enter__(self) -> PlanSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def keys(self) -> list[str]:
        return sorted([*self.source.keys(), *self.constants])

    def full_name(self, name: str) -> str:
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        return self.constants[name].shape if name in self.constants else self.source.shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.constants[name].copy() if name in self.constants else self.source.get(name)


def export_state_dict(
    params: ModelParams, flat: dict[str, Any], plan: Plan, kept: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """``{original name: array}`` of our flat parameters (``{"dotted.path": array}``): every rule inverted
    (layers split), the tied copies and the original's constant buffers added. ``kept``: the ignored tensors an
    import stored; they give the buffers' exact values (recomputed otherwise, possibly one bit off torch's) and the
    unused tensors (written as found)."""
    missing = sorted(r.target for r in plan.rules if r.target not in flat)
    unused = sorted(set(flat) - {r.target for r in plan.rules})
    if missing or unused:
        raise FoundryMapError(
            f"the {params.type} parameters do not match the original's table: missing {missing[:20]}, "
            f"not in the table {unused[:20]}."
        )
    out: dict[str, np.ndarray] = {}
    parts: dict[str, dict[int, np.ndarray]] = {}  # fused tensors: name -> {slice index: inverted slice}
    for rule in plan.rules:
        if rule.source.startswith(DEAD):
            continue
        if rule.transform.invert is None:
            raise FoundryMapError(f"{rule.target}: the {rule.transform.name} transform cannot be inverted.")
        value = np.asarray(flat[rule.target])
        items = list(zip(rule.source_names(), value, strict=True)) if rule.stacked else [(rule.source, value)]
        for name, v in items:
            if rule.transform.part is None:
                out[name] = np.asarray(rule.transform.invert(v), order="C")  # (ascontiguousarray makes 0-d 1-d)
            else:
                parts.setdefault(name, {})[rule.transform.part[0]] = rule.transform.invert(v)
    for name, slices in parts.items():
        n = next(r.transform.part[1] for r in plan.rules if r.transform.part is not None and name in r.source_names())
        if sorted(slices) != list(range(n)):
            raise FoundryMapError(f"{name}: only slices {sorted(slices)} of {n} of the fused tensor are parameters.")
        out[name] = np.asarray(np.concatenate([slices[j] for j in range(n)], axis=0), order="C")
    for name, value in plan.buffers.items():
        if value is None:  # the sinusoid frequencies of the diffusion time table
            value = sinusoid_frequencies(out["time_encoding.weight"].shape[1])
        stored = (kept or {}).get(name)
        out[name] = stored if stored is not None and stored.shape == value.shape else value
    for name, repeated in plan.aliases.items():
        out[name] = out[repeated]
    for name, value in (kept or {}).items():  # tensors the model does not use, as the import found them
        out.setdefault(name, value)
    return out
