"""Gin front end: nesting, scopes, overrides, search paths / includes, parse-time errors, presets."""

from __future__ import annotations

import math
from pathlib import Path

import gin
import pytest

from vla_foundry_jax.gin_utils import (
    GIN_CONFIGS_DIR,
    GinConfigError,
    build_experiment,
    operative_config_str,
    parse_gin,
    unused_bindings,
)
from vla_foundry_jax.params import (
    DiffusionPolicyParams,
    ParamsError,
    TransformerParams,
    ViTBackboneParams,
    ViTHFParams,
    ViTParams,
    VLMParams,
)

pytestmark = pytest.mark.usefixtures("fresh_gin")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bound() -> set[str]:
    """``configurable.field`` of every parsed binding (no values)."""
    return {line.split(" = ")[0] for line in gin.config_str().splitlines() if " = " in line}


# ----------------------------------------------------------------------------------------------------------
# Building


def test_nested_vlm():
    parse_gin(
        [],
        [
            "experiment.model = @vlm()",
            "vlm.vit = @vit()",
            "vlm.transformer = @transformer()",
            "vit.n_layers = 3",
            "vit.img_size = 224",
            "vit.patch_size = 14",
            "transformer.n_layers = 2",
            "vlm.image_token_id = 5",
        ],
    )
    model = build_experiment().model
    assert type(model) is VLMParams and model.image_token_id == 5
    assert type(model.vit) is ViTParams and model.vit.n_layers == 3 and model.vit.img_size == 224
    assert type(model.transformer) is TransformerParams and model.transformer.n_layers == 2


def test_nested_vlm_with_hf_vit():
    parse_gin([], ["experiment.model = @vlm()", "vlm.vit = @vit_hf()", "vit_hf.hidden_dim = 1152"])
    model = build_experiment().model
    assert type(model.vit) is ViTHFParams and model.vit.hidden_dim == 1152


def test_scopes_separate_two_instances_of_one_type():
    parse_gin(
        [],
        [
            "experiment.model = @diffusion_policy()",
            "diffusion_policy.transformer = @head/transformer()",
            "diffusion_policy.vision_language_backbone = @vit_backbone()",
            "vit_backbone.img_size = 224",
            "vit_backbone.patch_size = 14",
            "transformer.n_layers = 3",
            "transformer.hidden_dim = 64",
            "head/transformer.n_layers = 2",
            "head/transformer.is_causal = False",
        ],
    )
    policy = build_experiment().model
    assert type(policy) is DiffusionPolicyParams
    head = policy.transformer
    assert (head.n_layers, head.is_causal, head.hidden_dim) == (2, False, 64)  # unscoped bindings reach the scope
    other = TransformerParams()  # an unscoped transformer elsewhere
    assert (other.n_layers, other.is_causal, other.hidden_dim) == (3, True, 64)
    assert type(policy.vision_language_backbone) is ViTBackboneParams


def test_parent_class_bindings_do_not_reach_subclasses():
    # vit_backbone is a ViTParams, but gin bindings go by name: `vit.*` does not configure it.
    parse_gin(
        [],
        [
            "experiment.model = @diffusion_policy()",
            "diffusion_policy.transformer = @transformer()",
            "diffusion_policy.vision_language_backbone = @vit_backbone()",
            "vit.n_layers = 5",
        ],
    )
    policy = build_experiment().model
    assert policy.vision_language_backbone.n_layers == 12
    assert unused_bindings() == ["vit.n_layers = 5"]


def test_bindings_override_files_and_later_files_override_earlier(tmp_path):
    a = _write(
        tmp_path / "a.gin", "experiment.model = @transformer()\ntransformer.n_layers = 4\ntransformer.n_heads = 2\n"
    )
    b = _write(tmp_path / "b.gin", "transformer.n_heads = 8\n")
    parse_gin([str(a), str(b)], ["transformer.n_layers = 6"])
    model = build_experiment().model
    assert (model.n_layers, model.n_heads) == (6, 8)


def test_parse_clears_previous_config():
    parse_gin([], ["experiment.model = @transformer()", "transformer.n_layers = 6"])
    parse_gin([], ["experiment.model = @transformer()"])
    assert build_experiment().model.n_layers == 8


def test_macros():
    parse_gin([], ["LAYERS = 3", "experiment.model = @transformer()", "transformer.n_layers = %LAYERS"])
    assert build_experiment().model.n_layers == 3


def test_params_errors_pass_through_build():
    parse_gin([], ["experiment.model = @transformer()", "transformer.n_heads = 5"])
    with pytest.raises(ParamsError, match=r"transformer.n_heads = 5 does not divide transformer.hidden_dim = 96"):
        build_experiment()


def test_operative_config_records_used_values_and_reparses(tmp_path):
    parse_gin(
        [],
        [
            "experiment.model = @diffusion_policy()",
            "diffusion_policy.transformer = @head/transformer()",
            "head/transformer.n_layers = 2",
            "transformer.hidden_dim = 64",
            "vit.n_layers = 5",  # never used
            "experiment.name = 'dp'",
        ],
    )
    experiment = build_experiment()
    text = operative_config_str()
    for line in (
        "experiment.model = @diffusion_policy()",
        "diffusion_policy.transformer = @head/transformer()",
        "head/transformer.n_layers = 2",
        "head/transformer.hidden_dim = 64",
        "experiment.name = 'dp'",
        "clip_backbone.disable_text = False",  # defaults of what was built are recorded too
    ):
        assert line in text
    assert "#   vit.n_layers = 5" in text  # parsed but unused: a comment, not a binding
    saved = _write(tmp_path / "config.gin", text)
    parse_gin([str(saved)], [])
    assert build_experiment() == experiment


def test_operative_config_before_build_is_the_parsed_config():
    parse_gin([], ["experiment.model = @transformer()"])
    text = operative_config_str()
    assert "Nothing was built" in text and "experiment.model = @transformer()" in text


# ----------------------------------------------------------------------------------------------------------
# Search paths and includes


def test_preset_by_bare_name_and_by_repo_path_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("transformer_tiny.gin", "gin_configs/transformer_tiny.gin"):
        parse_gin([name], [])
        assert build_experiment().model.hidden_dim == 64


def test_search_paths_and_includes(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    _write(configs / "base.gin", "include 'transformer_tiny.gin'\ntransformer.n_layers = 3\n")
    _write(configs / "run.gin", "include 'base.gin'\nexperiment.name = 'run'\n")
    parse_gin(["run.gin"], [], search_paths=[str(configs)])
    experiment = build_experiment()
    assert experiment.name == "run" and experiment.model.n_layers == 3 and experiment.model.hidden_dim == 64
    # A gin file's own directory is searched for its includes.
    parse_gin([str(configs / "run.gin")], ["transformer.n_layers = 4"])
    assert build_experiment().model.n_layers == 4


def test_search_paths_do_not_leak_between_parses(tmp_path):
    _write(tmp_path / "only_here.gin", "experiment.name = 'x'\n")
    parse_gin(["only_here.gin"], [], search_paths=[str(tmp_path)])
    with pytest.raises(GinConfigError, match=r"only_here\.gin"):
        parse_gin(["only_here.gin"], [])


# ----------------------------------------------------------------------------------------------------------
# Errors, all at parse time


def _error(files: list[str], bindings: list[str], **kw) -> str:
    with pytest.raises(GinConfigError) as e:
        parse_gin(files, bindings, **kw)
    assert isinstance(e.value, ValueError)
    assert not gin.config._CONFIG  # nothing half-parsed is left behind
    return str(e.value)


def test_missing_gin_file_lists_search_paths(tmp_path):
    msg = _error(["transformer_tinyy.gin"], [], search_paths=[str(tmp_path)])
    assert "'transformer_tinyy.gin' not found" in msg
    assert str(tmp_path / "transformer_tinyy.gin") in msg
    assert str(GIN_CONFIGS_DIR / "transformer_tinyy.gin") in msg
    assert "--gin_search_paths" in msg
    assert "Did you mean 'transformer_tiny.gin'?" in msg


def test_missing_include_names_the_including_file(tmp_path):
    run = _write(tmp_path / "run.gin", "include 'nowhere.gin'\n")
    msg = _error([str(run)], [])
    assert "'nowhere.gin' not found" in msg and "run.gin" in msg


def test_unknown_configurable():
    msg = _error([], ["transfomer.n_layers = 3"])
    assert "unknown gin configurable 'transfomer'" in msg and "Did you mean 'transformer'?" in msg
    assert "transfomer.n_layers = 3" in msg  # the binding is shown


def test_unknown_configurable_in_reference():
    msg = _error([], ["experiment.model = @head/transfomr()"])
    assert "'@transfomr()'" in msg and "Did you mean 'transformer'?" in msg


def test_unknown_field_in_file_names_file_and_line(tmp_path):
    run = _write(tmp_path / "run.gin", "experiment.model = @transformer()\ntransformer.n_layer = 2\n")
    msg = _error([str(run)], [])
    assert "transformer has no field 'n_layer'" in msg and "Did you mean 'n_layers'?" in msg
    assert "Fields of transformer:" in msg and "hidden_dim" in msg
    assert "run.gin" in msg and "line 2" in msg


def test_unknown_field_in_scope_and_derived_field():
    msg = _error([], ["head/transformer.n_layer = 2"])
    assert "Did you mean 'n_layers'?" in msg
    msg = _error([], ["transformer_hf.hidden_dim = 3"])
    assert "derived" in msg and "hf_pretrained" in msg


@pytest.mark.parametrize(
    ("binding", "pieces"),
    [
        ("transformer.n_layers 3", ["malformed", "transformer.n_layers 3", "expected ':' or '='"]),
        ("transformer.n_layers = [", ["malformed", "transformer.n_layers = ["]),
        ("transformer. = 3", ["malformed", "transformer. = 3"]),
        ("transformer.n_layers = 3 4", ["malformed", "transformer.n_layers = 3 4"]),
    ],
)
def test_malformed_binding_is_shown(binding, pieces):
    msg = _error([], [binding])
    for piece in pieces:
        assert piece in msg
    assert "configurable.field = value" in msg  # how to write one


def test_malformed_line_in_file(tmp_path):
    run = _write(tmp_path / "run.gin", "transformer.n_layers = 2\ntransformer.n_heads == 2\n")
    msg = _error([str(run)], [])
    assert "run.gin line 2" in msg and "transformer.n_heads == 2" in msg


@pytest.mark.parametrize(
    ("bindings", "pieces"),
    [
        (["transformer.n_layers = 'x'"], ["transformer.n_layers", "expected an int", "'x'"]),
        (["head/transformer.qk_norm = 1"], ["head/transformer.qk_norm", "bool"]),
        (["L = 'a'", "transformer.n_layers = %L"], ["transformer.n_layers", "expected an int"]),
        (["vlm.vit = @transformer()"], ["vlm.vit takes @vit()", "@vit_hf()", "not @transformer()"]),
        (["diffusion_policy.vision_language_backbone = @vit()"], ["@clip_backbone()", "not @vit()"]),
        (["experiment.model = @transformer"], ["`@transformer()`", "parentheses"]),
        (["transformer.self = 1"], ["no field 'self'"]),
        (["transformer.n_layers = %LAYERS"], ["%LAYERS", "never defined"]),
        (["transformer_n_layers = 3"], ["macro", "sets nothing", "Did you mean 'transformer.n_layers'?"]),
        (["transformer/n_layers = 3"], ["sets nothing", "Did you mean 'transformer.n_layers'?"]),
        (["transformer.n_layers = %gin.REQUIRED"], ["transformer.n_layers", "gin.REQUIRED"]),
    ],
)
def test_errors_gin_would_only_raise_when_building(bindings, pieces):
    msg = _error([], bindings)
    for piece in pieces:
        assert piece in msg


def test_valid_values_pass_parse_time_checks():
    parse_gin(
        [],
        [
            "noise_scheduler.clamp_range = [-3, 3]",  # list -> tuple, int -> float
            "noise_scheduler.beta_end = 1",
            "unet.channels = [8, 16]",
            "transformer.resume_from_checkpoint = None",
            "experiment.model = @stable_diffusion()",
        ],
    )
    model = build_experiment().model
    assert model.noise_scheduler.clamp_range == (-3.0, 3.0) and model.unet.channels == (8, 16)


# ----------------------------------------------------------------------------------------------------------
# Presets (reference §1.11)

PRESETS = {
    # name: (hidden_dim, n_layers, n_heads, max_seq_len, post_embed_norm)
    "transformer_tiny": (64, 2, 2, 128, False),
    "transformer_11m": (96, 8, 4, 2048, False),
    "transformer_100m": (512, 12, 8, 2048, True),
    "transformer_410m": (1024, 24, 16, 2048, False),
    "transformer_1b": (2048, 24, 16, 2048, False),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_transformer_presets(name):
    parse_gin([f"{name}.gin"], [])
    assert {b.split(".")[0] for b in _bound()} == {"experiment", "transformer"}
    assert {b for b in _bound() if b.startswith("experiment.")} == {"experiment.model"}  # model fields only
    model = build_experiment().model
    assert type(model) is TransformerParams
    assert (model.hidden_dim, model.n_layers, model.n_heads, model.max_seq_len, model.post_embed_norm) == PRESETS[name]
    assert model.vocab_size == 50432 and not model.weight_tying


def test_transformer_tiny_parameter_count():
    parse_gin(["transformer_tiny.gin"], [])
    p = build_experiment().model
    h, n_layers, vocab = p.hidden_dim, p.n_layers, p.vocab_size
    ffn = 256 * math.ceil((8 * h // 3) / 256)  # swiglu hidden width, reference §2.2
    # The original's state dict (reference §4.2), inv_freq buffers excluded: they are not parameters.
    per_layer = {
        "attention.in_proj.weight": (3 * h, h),
        "attention.out_proj.weight": (h, h),
        "feed_forward.w12.weight": (2 * ffn, h),
        "feed_forward.w3.weight": (h, ffn),
        "attention_norm.weight": (h,),
        "attention_norm.bias": (h,),
        "ffn_norm.weight": (h,),
        "ffn_norm.bias": (h,),
    }
    shapes = {"embeddings.weight": (vocab, h), "norm.weight": (h,), "norm.bias": (h,), "output.weight": (vocab, h)}
    shapes |= {f"layers.{i}.{k}": s for i in range(n_layers) for k, s in per_layer.items()}
    assert shapes["layers.0.attention.in_proj.weight"] == (192, 64)
    assert shapes["layers.1.feed_forward.w12.weight"] == (512, 64)
    assert shapes["layers.1.feed_forward.w3.weight"] == (64, 256)
    assert len(shapes) + n_layers == 22  # the state dict has 22 entries: these plus one inv_freq per layer
    assert sum(math.prod(s) for s in shapes.values()) == 6_587_008


def test_params_from_dict_ignores_live_bindings():
    from vla_foundry_jax.params import params_from_dict

    parse_gin([], ["vit.n_layers = 6", "transformer.n_layers = 3"])
    vlm = params_from_dict({"type": "vlm"})  # an old JSON without the nested keys
    assert vlm.vit.n_layers == 12 and vlm.transformer.n_layers == 8
