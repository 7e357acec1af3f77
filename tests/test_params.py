"""Params: every field and default of VLA Foundry's ModelParams page, inheritance, JSON, hashing, errors."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

import pytest

from vla_foundry_jax import registry
from vla_foundry_jax.params import (
    BackboneParams,
    CLIPBackboneParams,
    CLIPHFParams,
    DiffusionPolicyParams,
    HyperParams,
    ModelParams,
    NoiseSchedulerParams,
    ParamsError,
    StableDiffusionParams,
    TextDataParams,
    TrainExperimentParams,
    TransformerHFParams,
    TransformerParams,
    UNetParams,
    ViTBackboneParams,
    ViTHFParams,
    ViTParams,
    VLMBackboneParams,
    VLMFoundryBackboneParams,
    VLMHFParams,
    VLMParams,
    params_from_dict,
)

pytestmark = pytest.mark.usefixtures("fresh_gin")  # params built here see class defaults, not another test's bindings


# ----------------------------------------------------------------------------------------------------------
# The seed page ("ModelParams"), transcribed: type key -> [(field, type, default)].
# A type is a Python type / typing form; `Params(*class names)` is a params-typed field (a union when
# several names are given); `Default("Name")` is a default that is a fresh instance of that params class.


@dataclasses.dataclass(frozen=True)
class Params:
    names: tuple[str, ...]

    def __init__(self, *names: str) -> None:
        object.__setattr__(self, "names", names)


@dataclasses.dataclass(frozen=True)
class Default:
    name: str


BASE_FIELDS = [
    ("type", str, None),  # auto-populated from the registered key (checked separately)
    ("resume_from_checkpoint", str, None),
    ("resume_weights_only", bool, False),
    ("freeze", bool, False),
]
TRANSFORMER_HF_FIELDS = [("hf_pretrained", str, None)]
VIT_FIELDS = [
    ("pretrained", str, None),
    ("interpolation_mode", str, "bicubic"),
    ("hidden_dim", int, 768),
    ("inter_dim", int, 3072),
    ("patch_size", int, 16),
    ("img_size", int, 384),
    ("n_heads", int, 12),
    ("dropout", float, 0.0),
    ("n_layers", int, 12),
    ("ln_eps", float, 1e-6),
    ("cls_flag", bool, False),
    ("projector_pixel_shuffle_factor", int, 1),
]
CLIP_HF_FIELDS = [
    ("hf_pretrained", str, None),
    ("freeze_text_encoder", bool, False),
    ("freeze_image_encoder", bool, False),
]

SEED: dict[str, tuple[str, list[tuple[str, Any, Any]]]] = {
    "transformer": (
        "TransformerParams",
        [
            ("norm_type", str, "default_layer_norm"),
            ("ffn_type", str, "swiglu"),
            ("qk_norm", bool, False),
            ("positional_embedding_type", str, "rotary"),
            ("attn_name", str, "torch_attn"),
            ("hidden_dim", int, 96),
            ("n_layers", int, 8),
            ("n_heads", int, 4),
            ("vocab_size", int, 50432),
            ("post_embed_norm", bool, False),
            ("norm_eps", float, 1e-5),
            ("weight_tying", bool, False),
            ("cast_output_to_float32", bool, False),
            ("max_seq_len", int, 2048),
            ("is_causal", bool, True),
        ],
    ),
    "transformer_hf": ("TransformerHFParams", TRANSFORMER_HF_FIELDS),
    "vit": ("ViTParams", VIT_FIELDS),
    "vit_hf": (
        "ViTHFParams",
        [("hf_pretrained", str, None), ("hidden_dim", int, 768), ("projector_pixel_shuffle_factor", int, 1)],
    ),
    "vlm": (
        "VLMParams",
        [
            ("vit", Params("ViTParams", "ViTHFParams"), Default("ViTParams")),
            ("transformer", Params("TransformerParams", "TransformerHFParams"), Default("TransformerParams")),
            ("image_token_id", int, None),
            ("processor", str, None),
        ],
    ),
    "vlm_hf": ("VLMHFParams", [("hf_pretrained", str, None)]),
    "diffusion_policy": (
        "DiffusionPolicyParams",
        [
            (
                "vision_language_backbone",
                Params("VLMBackboneParams", "CLIPBackboneParams", "VLMFoundryBackboneParams", "ViTBackboneParams"),
                Default("CLIPBackboneParams"),
            ),
            # The seed's default is the abstract ModelParams() (it must always be configured); the port says
            # the same with None. Checked in test_diffusion_policy_transformer_must_be_configured.
            ("transformer", Params("TransformerParams", "TransformerHFParams"), None),
            ("noise_scheduler", Params("NoiseSchedulerParams"), Default("NoiseSchedulerParams")),
            ("use_diffusers_scheduler", bool, False),
            ("use_flow_matching_scheduler", bool, False),
            ("input_noise_std", float, 0.0),
            ("diffusion_step_conditioning", Literal["add", "concat"], "concat"),
            ("action_dim", int, None),
            ("proprioception_dim", int, 0),
        ],
    ),
    "stable_diffusion": (
        "StableDiffusionParams",
        [
            ("unet", Params("UNetParams"), Default("UNetParams")),
            ("noise_scheduler", Params("NoiseSchedulerParams"), Default("NoiseSchedulerParams")),
            ("use_diffusers_unet", bool, False),
            ("use_diffusers_scheduler", bool, False),
            ("use_flow_matching_scheduler", bool, False),
            ("clip", Params("CLIPHFParams"), Default("CLIPHFParams")),
            ("do_classifier_free_guidance", bool, False),
            ("guidance_scale", float, 4.0),
            ("dropout_percent", float, 0.2),
        ],
    ),
    "unet": (
        "UNetParams",
        [
            ("in_channels", int, 3),
            ("out_channels", int, 3),
            ("time_emb_dim", int, 256),
            ("text_emb_dim", int, 512),
            ("channels", list[int], []),
            ("image_size", int, 128),
            ("time_mlp_float32", bool, False),
        ],
    ),
    "noise_scheduler": (
        "NoiseSchedulerParams",
        [
            ("num_timesteps", int, 1000),
            ("beta_start", float, 0.0001),
            ("beta_end", float, 0.02),
            ("clamp_range", tuple[float, float], (-1.5, 1.5)),
        ],
    ),
    "clip_hf": ("CLIPHFParams", CLIP_HF_FIELDS),
    "clip_openclip": (
        "CLIP_OpenCLIPParams",
        [
            ("architecture", str, None),
            ("pretrained_weights", str, None),
            ("freeze_text_encoder", bool, False),
            ("freeze_image_encoder", bool, False),
        ],
    ),
    # Backbones: the seed lists the own fields and names the parents whose fields they inherit.
    "clip_backbone": ("CLIPBackboneParams", [*CLIP_HF_FIELDS, ("disable_text", bool, False)]),
    "vlm_backbone": ("VLMBackboneParams", [("hf_pretrained", str, None), ("num_vlm_layers_to_use", int, 4)]),
    "vlm_foundry_backbone": ("VLMFoundryBackboneParams", [("num_vlm_layers_to_use", int, 4)]),
    "vit_backbone": ("ViTBackboneParams", VIT_FIELDS),
}

# Fields the original's code has but the seed page does not list (reference §1.3).
REFERENCE_EXTRAS = {
    "diffusion_policy": [("num_action_head_repeats", int, None)],
    "vlm_foundry_backbone": [("vlm_experiment_dir", str, None)],
}

ALL_ROWS = [
    (key, name, field, typ, default)
    for key, (name, rows) in SEED.items()
    for field, typ, default in [*BASE_FIELDS, *rows, *REFERENCE_EXTRAS.get(key, [])]
]


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def test_seed_covers_every_model_type_key():
    # test-only types (tests/fixtures/wrapper_model.py registers "test_wrapper") are not product types
    model_keys = {k for k, c in registry.PARAMS.items() if c.family == "model" and not k.startswith("test_")}
    assert set(SEED) == model_keys


@pytest.mark.parametrize("key", sorted(SEED))
def test_registered_under_key_with_seed_class_name(key):
    cls = registry.params_class(key)
    assert cls.__name__ == SEED[key][0]
    assert cls.type_key == key
    assert issubclass(cls, ModelParams)
    assert cls().type == key


@pytest.mark.parametrize(("key", "name", "field", "typ", "default"), ALL_ROWS)
def test_seed_field_type_and_default(key, name, field, typ, default):
    cls = registry.params_class(key)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert field in fields, f"{name} lacks the seed field {field!r}"
    assert fields[field].init, f"{name}.{field} must be settable"
    members = _union_members(typing.get_type_hints(cls)[field])

    # Type: the annotation accepts the seed type (and None where the seed default is None).
    if isinstance(typ, Params):
        params_members = {m.__name__ for m in members if isinstance(m, type) and issubclass(m, ModelParams)}
        assert params_members == set(typ.names), f"{name}.{field}: {params_members} != {set(typ.names)}"
    else:
        assert typ in members, f"{name}.{field}: annotation {members} does not accept {typ}"
    if default is None:
        assert type(None) in members, f"{name}.{field} must accept None"

    # Default.
    value = getattr(cls(), field)
    if field == "type":
        assert value == key
    elif isinstance(default, Default):
        default_cls = type(value)
        assert default_cls.__name__ == default.name
        assert value == default_cls() and value.type == default_cls.type_key
    elif isinstance(default, list):
        assert list(value) == default
    else:
        assert value == default and type(value) is type(default), f"{name}.{field} = {value!r}, seed {default!r}"


def test_diffusion_policy_transformer_must_be_configured():
    # Seed: default is the abstract ModelParams(), i.e. it must always be set; the port's default is None.
    assert DiffusionPolicyParams().transformer is None
    policy = DiffusionPolicyParams(transformer=TransformerParams(is_causal=False))
    assert policy.transformer.is_causal is False


def test_inheritance():
    for cls in (TransformerHFParams, ViTHFParams, CLIPHFParams, VLMHFParams):
        assert issubclass(cls, ModelParams)
    for cls in (ViTHFParams, CLIPHFParams, VLMHFParams):
        assert issubclass(cls, TransformerHFParams)
    assert issubclass(CLIPBackboneParams, BackboneParams) and issubclass(CLIPBackboneParams, CLIPHFParams)
    assert issubclass(VLMBackboneParams, BackboneParams) and issubclass(VLMBackboneParams, VLMHFParams)
    assert issubclass(ViTBackboneParams, BackboneParams) and issubclass(ViTBackboneParams, ViTParams)
    assert issubclass(VLMFoundryBackboneParams, BackboneParams)
    assert "hf_pretrained" in {f.name for f in dataclasses.fields(ViTHFParams)}
    assert ViTHFParams(hf_pretrained="timm/vit").hidden_dim == 768  # a real field, no HF lookup
    assert ViTHFParams(hidden_dim=1152).hidden_dim == 1152
    assert CLIPBackboneParams(hf_pretrained="openai/clip", disable_text=True).freeze_text_encoder is False
    # BackboneParams is an unregistered marker: no type key of its own.
    assert "BackboneParams" not in {c.__name__ for c in registry.PARAMS.values()}
    # Different classes with the same fields are different params.
    assert ViTBackboneParams() != ViTParams()


def test_type_filled_from_key_and_checked():
    assert TransformerParams().type == "transformer"
    assert TransformerParams(type="transformer").type == "transformer"
    assert ViTBackboneParams().type == "vit_backbone"
    with pytest.raises(ParamsError, match=r"transformer\.type is 'vit'"):
        TransformerParams(type="vit")


def test_stable_diffusion_image_size_is_unet_image_size():
    assert StableDiffusionParams(unet=UNetParams(image_size=64)).image_size == 64


def test_transformer_hf_dims_from_local_hf_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(
        hidden_size=48, vocab_size=321, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path)
    params = TransformerHFParams(hf_pretrained=str(tmp_path))
    assert params.hidden_dim == 48
    assert params.vocab_size == 321
    # Subclasses that do not shadow the property read it the same way.
    assert CLIPBackboneParams(hf_pretrained=str(tmp_path)).hidden_dim == 48
    with pytest.raises(ParamsError, match="hf_pretrained is not set"):
        _ = TransformerHFParams().hidden_dim


# ----------------------------------------------------------------------------------------------------------
# JSON round-trip and hashing

VIT_TINY = ViTParams(img_size=224, patch_size=14, hidden_dim=64, inter_dim=256, n_heads=4, n_layers=4)


def _round_trip(params: Any, cls: type | None = None, family: str = "model") -> Any:
    text = json.dumps(params.to_dict())
    return params_from_dict(json.loads(text), cls, family=family)


def test_json_round_trip_vlm_experiment():
    vlm = VLMParams(
        vit=VIT_TINY,
        transformer=TransformerParams(hidden_dim=64, n_layers=2, n_heads=2, max_seq_len=128, freeze=True),
        image_token_id=7,
        processor="simple_vlm",
    )
    experiment = TrainExperimentParams(
        name="vlm",
        data=TextDataParams(dataset_manifest=["a/manifest.jsonl"], dataset_weighting=[1]),
        hparams=HyperParams(lr=3e-4, grad_clip_norm=1.0),
        model=vlm,
    )
    back = _round_trip(experiment, TrainExperimentParams, family="config")
    assert back == experiment
    assert type(back.model.vit) is ViTParams and type(back.data) is TextDataParams
    assert back.to_dict()["model"]["vit"]["type"] == "vit"
    assert _round_trip(vlm) == vlm  # from `type` alone


def test_json_round_trip_vlm_with_hf_parts_keeps_types():
    vlm = VLMParams(vit=ViTHFParams(hf_pretrained="timm/x"), transformer=TransformerHFParams(hf_pretrained="org/lm"))
    back = _round_trip(vlm)
    assert back == vlm
    assert type(back.vit) is ViTHFParams and type(back.transformer) is TransformerHFParams


@pytest.mark.parametrize(
    "backbone",
    [
        CLIPBackboneParams(hf_pretrained="openai/clip-vit-base-patch32", disable_text=True),
        VLMBackboneParams(hf_pretrained="/models/SmolVLM2-256M", num_vlm_layers_to_use=1),
        VLMFoundryBackboneParams(vlm_experiment_dir="runs/vlm"),
        ViTBackboneParams(img_size=224, patch_size=14, hidden_dim=64, inter_dim=256, n_heads=4, n_layers=2),
    ],
    ids=lambda b: b.type,
)
def test_json_round_trip_diffusion_policy(backbone):
    policy = DiffusionPolicyParams(
        vision_language_backbone=backbone,
        transformer=TransformerParams(hidden_dim=64, n_layers=2, n_heads=2, is_causal=False),
        noise_scheduler=NoiseSchedulerParams(clamp_range=(-3, 3)),
        use_flow_matching_scheduler=True,
        action_dim=7,
    )
    back = _round_trip(policy)
    assert back == policy
    assert type(back.vision_language_backbone) is type(backbone)  # rebuilt from `type`, not guessed
    assert back.noise_scheduler.clamp_range == (-3.0, 3.0)
    experiment = TrainExperimentParams(model=policy)
    assert _round_trip(experiment, TrainExperimentParams, family="config") == experiment


def test_round_trip_stable_diffusion_lists_become_tuples():
    sd = StableDiffusionParams(unet=UNetParams(channels=[8, 16]), clip=CLIPHFParams(hf_pretrained="openai/clip"))
    assert sd.unet.channels == (8, 16)
    assert _round_trip(sd) == sd


def test_hashable():
    a, b = TransformerParams(n_layers=2), TransformerParams(n_layers=2)
    assert a == b and hash(a) == hash(b)
    assert hash(a) != hash(TransformerParams(n_layers=3))
    assert {a: 1}[b] == 1
    experiment = TrainExperimentParams(model=VLMParams(vit=VIT_TINY), data=TextDataParams(dataset_manifest=["m"]))
    assert hash(experiment) == hash(_round_trip(experiment, TrainExperimentParams, family="config"))
    hash(StableDiffusionParams(unet=UNetParams(channels=[1, 2])))
    hash(DiffusionPolicyParams(transformer=TransformerParams()))


def test_replace_validates_again():
    p = TransformerParams().replace(n_layers=3)
    assert p.n_layers == 3 and p.type == "transformer"
    with pytest.raises(ParamsError, match="n_heads"):
        TransformerParams().replace(n_heads=5)


# ----------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_type_key_lists_keys_and_closest():
    with pytest.raises(registry.UnknownTypeError) as e:
        registry.params_class("transfomer")
    msg = str(e.value)
    assert "'transfomer'" in msg and "Did you mean 'transformer'?" in msg
    for key in ("transformer", "vit", "vlm", "diffusion_policy"):
        assert key in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(registry.UnknownTypeError, match="model type"):
        registry.params_class("text", family="model")


@pytest.mark.parametrize(
    ("cls", "kwargs", "pieces"),
    [
        (TransformerParams, {"n_layers": "2"}, ["transformer.n_layers", "int", "'2'"]),
        (TransformerParams, {"n_layers": True}, ["transformer.n_layers", "int"]),
        (TransformerParams, {"qk_norm": 1}, ["transformer.qk_norm", "bool"]),
        (ViTParams, {"dropout": "0.1"}, ["vit.dropout", "float"]),
        (
            NoiseSchedulerParams,
            {"clamp_range": (1.0, 2.0, 3.0)},
            ["noise_scheduler.clamp_range", "tuple[float, float]"],
        ),
        (DiffusionPolicyParams, {"diffusion_step_conditioning": "sum"}, ["diffusion_step_conditioning", "concat"]),
        (VLMParams, {"vit": TransformerParams()}, ["vlm.vit", "@vit()"]),
        (DiffusionPolicyParams, {"vision_language_backbone": ViTParams()}, ["vision_language_backbone"]),
    ],
)
def test_wrong_field_type_names_the_field(cls, kwargs, pieces):
    with pytest.raises(ParamsError) as e:
        cls(**kwargs)
    for piece in pieces:
        assert piece in str(e.value)


def test_int_is_accepted_for_float_fields():
    assert TransformerParams(norm_eps=1).norm_eps == 1.0
    assert isinstance(NoiseSchedulerParams(clamp_range=[-3, 3]).clamp_range[0], float)


def test_n_heads_must_divide_hidden_dim():
    with pytest.raises(ParamsError, match=r"transformer.n_heads = 5 does not divide transformer.hidden_dim = 96"):
        TransformerParams(n_heads=5)
    with pytest.raises(ParamsError, match=r"vit.n_heads = 7 does not divide vit.hidden_dim = 768"):
        ViTParams(n_heads=7)
    with pytest.raises(ParamsError, match=r"vit_backbone.n_heads"):
        ViTBackboneParams(n_heads=7)


def test_params_from_dict_errors():
    with pytest.raises(ParamsError) as e:
        params_from_dict({"type": "transformer", "n_layer": 2})
    assert "n_layer" in str(e.value) and "n_layers" in str(e.value)
    with pytest.raises(ParamsError, match="without a 'type'"):
        params_from_dict({"n_layers": 2})
    with pytest.raises(registry.UnknownTypeError, match="Did you mean 'transformer'"):
        params_from_dict({"type": "transfomer"})
    with pytest.raises(ParamsError, match="unknown fields"):
        params_from_dict({"type": "vlm", "vit": {"type": "vit", "depth": 3}})
