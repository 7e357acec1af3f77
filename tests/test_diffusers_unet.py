"""Diffusers-layout UNet (``stable_diffusion.use_diffusers_unet``): parity with diffusers' PyTorch UNet2DModel /
UNet2DConditionModel on tiny random checkpoints, the strict loader's errors, config checks, the seed-field layout
and a training step."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from tests.fixtures.training import finite_steps, fixed_draw_loss, single_device_train_step  # noqa: E402
from tests.fixtures.weights import perturb_all  # noqa: E402
from vla_foundry_jax.configs.hf_hub import HFLoadError  # noqa: E402
from vla_foundry_jax.convert.diffusers_unet_maps import WEIGHTS_NAME, load_diffusers_unet  # noqa: E402
from vla_foundry_jax.layers.positional import sinusoidal_embedding  # noqa: E402
from vla_foundry_jax.models import build_model  # noqa: E402
from vla_foundry_jax.models import diffusers_unet as du  # noqa: E402
from vla_foundry_jax.params.base import ParamsError  # noqa: E402
from vla_foundry_jax.params.model_params import (  # noqa: E402
    CLIPHFParams,
    NoiseSchedulerParams,
    StableDiffusionParams,
    UNetParams,
)
from vla_foundry_jax.registry import get_loss  # noqa: E402

SIZE, TXT = 16, 16
BASE = dict(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=8, attention_head_dim=8)  # fmt: skip
CASES = {
    # UNet2DModel with its common blocks and defaults otherwise
    "unet2d": ("UNet2DModel", dict(BASE, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                   up_block_types=("AttnUpBlock2D", "UpBlock2D"))),
    # UNet2DModel variants: scale-shift time conditioning (then no mid-attention GroupNorm), cos-first sinusoid with
    # a frequency shift, asymmetric downsample padding, centred input, mid scale factor, single-head attention
    "unet2d_variants": ("UNet2DModel", dict(BASE, block_out_channels=(16, 32), layers_per_block=2, act_fn="mish",
                                            down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                            up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                                            resnet_time_scale_shift="scale_shift", flip_sin_to_cos=False,
                                            freq_shift=1, downsample_padding=0, center_input_sample=True,
                                            mid_block_scale_factor=1.5, attention_head_dim=None,
                                            time_embedding_dim=48)),
    # UNet2DConditionModel with its default block types (Transformer2DModel: self + cross attention + GEGLU)
    "cond": ("UNet2DConditionModel", dict(BASE, cross_attention_dim=TXT,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))),
    # UNet2DConditionModel variants: linear projections, two transformer layers, per-level layers / heads (an Attn
    # up block takes the un-reversed attention_head_dim), plain mid block, activations, kernel sizes
    "cond_variants": ("UNet2DConditionModel", dict(BASE, cross_attention_dim=TXT, layers_per_block=(1, 2),
                                                   attention_head_dim=(2, 4), use_linear_projection=True,
                                                   transformer_layers_per_block=2, act_fn="gelu",
                                                   down_block_types=("AttnDownBlock2D", "CrossAttnDownBlock2D"),
                                                   up_block_types=("CrossAttnUpBlock2D", "AttnUpBlock2D"),
                                                   mid_block_type="UNetMidBlock2D", time_embedding_act_fn="silu",
                                                   timestep_post_act="gelu", conv_in_kernel=5, conv_out_kernel=1)),
}  # fmt: skip


def _save_torch_unet(case: str, path: str):
    """A diffusers model of ``case`` with perturbed random weights (zero-init / unit norms would hide bugs)."""
    cls_name, kw = CASES[case]
    torch.manual_seed(0)
    model = getattr(diffusers, cls_name)(**kw).eval()
    perturb_all(model, seed=1)
    model.save_pretrained(path)
    return model


def _unet_params(path: str | None = None, **kw) -> UNetParams:
    return UNetParams(**{"in_channels": 3, "out_channels": 3, "image_size": SIZE, "hf_pretrained": path, **kw})


def _load(path: str, text_width: int | None) -> du.DiffusersUNet:
    model = du.build_diffusers_unet(_unet_params(path), text_width=text_width, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    (state,) = load_diffusers_unet(path, [state])
    return nnx.merge(graphdef, state)


_CALL = nnx.jit(lambda mod, x, t, text: mod(x, t, text))


@pytest.fixture(scope="module")
def unet2d_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("unet2d"))
    _save_torch_unet("unet2d", path)
    return path


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_diffusers(case, tmp_path):
    torch_model = _save_torch_unet(case, str(tmp_path))
    conditional = CASES[case][0] == "UNet2DConditionModel"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    t = np.array([3, 750])
    text = rng.standard_normal((2, 5, TXT)).astype(np.float32) if conditional else None
    with torch.no_grad():
        extra = {"encoder_hidden_states": torch.from_numpy(text)} if conditional else {}
        want = torch_model(torch.from_numpy(x), torch.from_numpy(t), **extra).sample.numpy().transpose(0, 2, 3, 1)
    model = _load(str(tmp_path), TXT if conditional else None)
    text_j = None if text is None else jnp.asarray(text)
    got = _CALL(model, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), text_j)
    assert float(np.abs(want).max()) > 0.5  # a real signal, not a collapsed output
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 37, 999])
    for dim, flip, shift in [(32, True, 0), (33, False, 1)]:
        want = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        got = sinusoidal_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------------ strict loading


def _rewrite(src: str, dst: str, edit) -> str:
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, WEIGHTS_NAME))
    save_file(edit(dict(tensors)), os.path.join(dst, WEIGHTS_NAME))
    return dst


def _state(path: str):
    return nnx.split(du.build_diffusers_unet(_unet_params(path), text_width=None, rngs=nnx.Rngs(0)))[1]


def test_strict_load_errors(unet2d_dir, tmp_path):
    def edit(t):
        t.pop("conv_in.bias")
        t["extra.weight"] = np.zeros(3, np.float32)
        t["conv_out.weight"] = np.zeros((3, 32, 1, 1), np.float32)
        return t

    bad = _rewrite(unet2d_dir, str(tmp_path / "bad"), edit)
    with pytest.raises(HFLoadError) as err:
        load_diffusers_unet(bad, [_state(bad)], where="unet.hf_pretrained")
    msg = str(err.value)
    assert "missing from the checkpoint (1): conv_in.bias" in msg
    assert "not used by the model (1): extra.weight" in msg
    assert "conv_out.weight: checkpoint (3, 32, 1, 1) vs model (3, 32, 3, 3)" in msg
    os.remove(os.path.join(bad, WEIGHTS_NAME))
    with pytest.raises(HFLoadError, match=r"has no diffusion_pytorch_model\.safetensors"):
        load_diffusers_unet(bad, [_state(bad)])


def test_legacy_attention_names_and_layout(unet2d_dir, tmp_path):
    tensors = load_file(os.path.join(unet2d_dir, WEIGHTS_NAME))
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def rename(t):
        out = {}
        for k, v in t.items():
            for new, legacy in old.items():
                k = k.replace(new, legacy) if k.startswith("mid_block.attentions.") else k
            out[k] = v
        return out

    legacy = _rewrite(unet2d_dir, str(tmp_path / "legacy"), rename)
    assert "mid_block.attentions.0.query.weight" in load_file(os.path.join(legacy, WEIGHTS_NAME))
    (state,) = load_diffusers_unet(legacy, [_state(legacy)])
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
    # torch Linear [out, in] -> [in, out]; Conv2d [O, I, kh, kw] -> [kh, kw, I, O]; GroupNorm weight -> scale
    q = tensors["mid_block.attentions.0.to_q.weight"]
    np.testing.assert_array_equal(flat["mid_block.attentions.0.to_q.kernel"], q.T)
    conv = tensors["down_blocks.0.resnets.0.conv1.weight"]
    np.testing.assert_array_equal(flat["down_blocks.0.resnets.0.conv1.kernel"], conv.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["conv_norm_out.scale"], tensors["conv_norm_out.weight"])
    assert len(flat) == len(tensors)


def test_weight_loader_through_training_setup(unet2d_dir):
    """``launch.train``'s initial-weight step finds the ``unet`` loader at prefix ``unet.``."""
    from vla_foundry_jax import checkpoint as ckpt_lib
    from vla_foundry_jax import parallel
    from vla_foundry_jax.models import load_weights
    from vla_foundry_jax.params import DistributedParams, HyperParams
    from vla_foundry_jax.training.state import make_model_spec

    params = StableDiffusionParams(unet=_unet_params(unet2d_dir), use_diffusers_unet=True)
    hp = HyperParams(precision="fp32")
    spec = make_model_spec(params, hp, parallel.make_mesh(DistributedParams(), jax.devices()[:1]))
    _, trainable, frozen, _ = nnx.split(build_model(params, rngs=nnx.Rngs(0)), *spec.filters)
    trainable, _ = load_weights(spec.params, [trainable, frozen])
    got = np.asarray(ckpt_lib.flat_params(trainable)["unet.up_blocks.0.attentions.0.to_v.bias"])
    want = load_file(os.path.join(unet2d_dir, WEIGHTS_NAME))["up_blocks.0.attentions.0.to_v.bias"]
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------------ config checks


def _with_config(src: str, dst: str, **changes) -> str:
    shutil.copytree(src, dst)
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return dst


def test_config_errors(unet2d_dir, tmp_path):
    def build(path, text_width=None, **kw):
        return du.build_diffusers_unet(_unet_params(path, **kw), text_width=text_width, rngs=nnx.Rngs(0))

    cases = [
        ({"class_embed_type": "timestep"}, "class_embed_type = 'timestep' is not supported"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type"),
        ({"brand_new_option": 1}, r"config keys \['brand_new_option'\] are not known"),
        ({"down_block_types": ["SkipDownBlock2D", "AttnDownBlock2D"]}, "'SkipDownBlock2D' is not supported"),
        ({"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]}, "'CrossAttnDownBlock2D' is not supported"),
        ({"_class_name": "UNet3DConditionModel"}, "only \\['UNet2DModel', 'UNet2DConditionModel'\\]"),
    ]
    for i, (change, match) in enumerate(cases):
        with pytest.raises(ParamsError, match=match):
            build(_with_config(unet2d_dir, str(tmp_path / f"c{i}"), **change))
    with pytest.raises(ParamsError, match="UNet2DModel, which cannot take text"):
        build(unet2d_dir, text_width=TXT)
    with pytest.raises(ParamsError, match=r"unet.in_channels = 4 but .* has in_channels = 3"):
        build(unet2d_dir, in_channels=4)
    cond = _with_config(
        unet2d_dir,
        str(tmp_path / "cond"),
        _class_name="UNet2DConditionModel",
        cross_attention_dim=8,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
    )
    with pytest.raises(ParamsError, match="needs a text encoder"):
        build(cond)
    with pytest.raises(ParamsError, match="cross_attention_dim = 8 but the CLIP text width is 16"):
        build(cond, text_width=TXT)
    with pytest.raises(ParamsError, match="image_size = 13 must be a positive multiple of 2"):
        du.build_diffusers_unet(_unet_params(unet2d_dir).replace(image_size=13), text_width=None, rngs=nnx.Rngs(0))


def test_stable_diffusion_flags(unet2d_dir, clip_dir):
    with pytest.raises(ParamsError, match=r"set stable_diffusion\.use_diffusers_unet = True"):
        build_model(StableDiffusionParams(unet=_unet_params(unet2d_dir)), rngs=nnx.Rngs(0))
    tiny = UNetParams(channels=[8, 16], image_size=8, time_emb_dim=8, text_emb_dim=8)
    with pytest.raises(ParamsError, match=r"text_emb_dim = 8 .* must equal the CLIP text width 16"):
        build_model(
            StableDiffusionParams(unet=tiny, use_diffusers_unet=True, clip=CLIPHFParams(hf_pretrained=clip_dir)),
            rngs=nnx.Rngs(0),
        )


# ------------------------------------------------------------------------------------------------ seed-field layout


def test_layout_from_seed_fields():
    p = UNetParams(channels=[8, 16, 32], image_size=8, time_emb_dim=8, text_emb_dim=TXT, in_channels=3, out_channels=5)
    u = du.config_from_unet_params(p, conditional=False)
    assert (u.block_out_channels, u.layers_per_block, u.norm_num_groups, u.temb_dim) == ((8, 16, 32), (2, 2, 2), 8, 32)
    assert u.down_block_types == ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    assert u.up_block_types == ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    assert (u.mid_block_type, u.cross_attention_dim, u.out_channels) == ("UNetMidBlock2D", None, 5)
    c = du.config_from_unet_params(p, conditional=True)
    assert c.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert c.up_block_types == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert (c.mid_block_type, c.cross_attention_dim) == ("UNetMidBlock2DCrossAttn", TXT)
    with pytest.raises(ParamsError, match="channels is empty"):
        du.config_from_unet_params(UNetParams(), conditional=False)


def test_conditional_from_scratch_uses_text():
    p = UNetParams(channels=[8], image_size=4, time_emb_dim=8, text_emb_dim=TXT)  # cross-attention in the mid block
    model = du.build_diffusers_unet(p, text_width=TXT, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    text = jax.random.normal(jax.random.key(1), (2, 4, TXT))
    out = _CALL(model, x, jnp.array([1, 5]), text)
    assert out.shape == (2, 4, 4, 3)
    other = _CALL(model, x, jnp.array([1, 5]), text.at[1].set(-text[1]))
    np.testing.assert_allclose(other[0], out[0], atol=1e-6)  # per-sample conditioning
    assert not np.allclose(other[1], out[1], atol=1e-4)
    remat = du.build_diffusers_unet(p, text_width=TXT, rngs=nnx.Rngs(0), remat_policy="nothing_saveable")
    np.testing.assert_allclose(_CALL(remat, x, jnp.array([1, 5]), text), out, atol=1e-6)  # remat: same numbers
    with pytest.raises(ValueError, match="needs text embeddings"):
        model(x, 1)
    with pytest.raises(ValueError, match="cross_attention_dim=16"):
        model(x, 1, text[..., :8])


def test_train_step_lowers_loss():
    from vla_foundry_jax import checkpoint as ckpt_lib
    from vla_foundry_jax.params import HyperParams

    params = StableDiffusionParams(
        unet=UNetParams(channels=[8], image_size=4, time_emb_dim=8, text_emb_dim=0),
        noise_scheduler=NoiseSchedulerParams(num_timesteps=10),
        use_diffusers_unet=True,
        use_flow_matching_scheduler=True,
    )
    hp = HyperParams(precision="fp32", lr=1e-2, warmup="0")
    spec, state, step = single_device_train_step(params, hp, 100)
    assert "unet.down_blocks.0.resnets.0.time_emb_proj.kernel" in ckpt_lib.flat_params(spec.abstract[0])
    batch = {"pixel_values": jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 4, 4, 3)), jnp.float32)}
    fixed_loss = fixed_draw_loss(spec, get_loss("stable_diffusion"), batch)  # same t / noise draws before and after
    before = fixed_loss(state)
    state = finite_steps(step, state, batch, 4)
    assert fixed_loss(state) < before
