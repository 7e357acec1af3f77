"""Own UNet (reference §3.8.3) and stable_diffusion (§3.8.4): shapes, conditioning, errors, loss, train step,
sampling, classifier-free guidance, PNG grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from tests.fixtures.training import finite_steps, fixed_draw_loss, single_device_train_step
from vla_foundry_jax.apps.stable_diffusion import save_image_grid
from vla_foundry_jax.layers.positional import sinusoidal_embedding
from vla_foundry_jax.models import build_model
from vla_foundry_jax.models import stable_diffusion as sd
from vla_foundry_jax.models.unet import UNet
from vla_foundry_jax.params.base import ParamsError
from vla_foundry_jax.params.model_params import (
    CLIPHFParams,
    NoiseSchedulerParams,
    StableDiffusionParams,
    UNetParams,
)
from vla_foundry_jax.registry import get_loss, model_record

TXT = 16
TINY_UNET = UNetParams(channels=[8, 16, 16], image_size=8, time_emb_dim=8, text_emb_dim=TXT)


def _images(b=2, seed=0, size=8):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (b, size, size, 3)).astype(np.float32))


def _sd_params(clip_dir=None, **kw):
    return StableDiffusionParams(
        unet=TINY_UNET,
        noise_scheduler=NoiseSchedulerParams(num_timesteps=10),
        clip=CLIPHFParams(hf_pretrained=clip_dir),
        **kw,
    )


# ------------------------------------------------------------------------------------------------ UNet

_CALL = nnx.jit(lambda mod, *a: mod(*a))


def _jitted(module):
    return lambda *a: _CALL(module, *a)


def test_sinusoidal_embedding_layout():
    e = np.asarray(sinusoidal_embedding(jnp.array([0.0, 3.0]), 8))
    freqs = np.exp(-np.arange(4) * np.log(10000.0) / 3)
    np.testing.assert_allclose(e[1], np.concatenate([np.sin(3 * freqs), np.cos(3 * freqs)]), rtol=1e-6)
    np.testing.assert_allclose(e[0], [0, 0, 0, 0, 1, 1, 1, 1])


def test_unet_shape_and_conditioning():
    m = UNet(TINY_UNET.replace(out_channels=5), rngs=nnx.Rngs(0))
    m = _jitted(m)
    x = _images()
    text = jax.random.normal(jax.random.key(1), (2, 3, TXT))
    base = m(x, 4)
    assert base.shape == (2, 8, 8, 5)
    np.testing.assert_allclose(m(x, jnp.array([4, 4])), base, atol=1e-6)  # scalar t broadcast
    assert not np.allclose(m(x, 5), base, atol=1e-4)  # time conditioning
    cond = m(x, 4, text)
    assert not np.allclose(cond, base, atol=1e-4)  # text conditioning
    # per-sample conditioning: changing sample 1's text leaves sample 0 alone
    other = m(x, 4, text.at[1].set(-text[1]))
    np.testing.assert_allclose(other[0], cond[0], atol=1e-5)
    assert not np.allclose(other[1], cond[1], atol=1e-4)
    # remat changes nothing numerically
    r = _jitted(UNet(TINY_UNET.replace(out_channels=5), rngs=nnx.Rngs(0), remat_policy="nothing_saveable"))
    np.testing.assert_allclose(r(x, 4, text), cond, atol=1e-6)


def test_unet_time_mlp_float32_and_bf16():
    m = UNet(TINY_UNET.replace(time_mlp_float32=True), rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert m.time_fc1.kernel[...].dtype == jnp.float32 and m.init_conv.kernel[...].dtype == jnp.bfloat16
    assert _jitted(m)(_images(), 3).dtype == jnp.bfloat16
    m2 = UNet(TINY_UNET, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert m2.time_fc1.kernel[...].dtype == jnp.bfloat16


def test_unet_param_errors():
    with pytest.raises(ValueError, match="channels is empty"):
        UNet(UNetParams(channels=[]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"image_size = 12 must be divisible by 2 \*\* \(len\(unet.channels\)"):
        UNet(UNetParams(channels=[8, 8, 8, 8], image_size=12), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiple of 8"):
        UNet(UNetParams(channels=[8, 12], image_size=8), rngs=nnx.Rngs(0))
    m = UNet(TINY_UNET, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected images"):
        m(_images(size=16), 0)
    with pytest.raises(ValueError, match="text_emb_dim=16"):
        m(_images(), 0, jnp.zeros((2, 3, 7)))


# ------------------------------------------------------------------------------------------------ SD


@pytest.mark.parametrize("flow", [False, True])
def test_sd_loss_matches_hand_computation(clip_dir, flow):
    params = _sd_params(clip_dir, use_flow_matching_scheduler=flow)
    model = build_model(params, rngs=nnx.Rngs(0), load_weights=False)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 5)), jnp.int32)
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.int32)
    batch = {"pixel_values": _images(), "input_ids": ids, "attention_mask": mask}
    rng = jax.random.key(7)
    loss, metrics = nnx.jit(lambda mod, b, r: get_loss("stable_diffusion")(mod, b, rng=r))(model, batch, rng)
    k_t, k_noise, _ = jax.random.split(rng, 3)
    T = 10
    t = jax.random.randint(k_t, (2,), 0, T)
    noise = jax.random.normal(k_noise, (2, 8, 8, 3))
    x0 = batch["pixel_values"]
    if flow:
        s = (t / T)[:, None, None, None]
        x_t, target = x0 + s * (noise - x0), noise - x0
    else:
        abar = jnp.cumprod(1 - jnp.linspace(1e-4, 0.02, T))[t][:, None, None, None]
        x_t, target = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise, noise
    x_t = jnp.clip(x_t, -1.5, 1.5)
    text = model.clip.text_model(ids, mask)[0]
    want = jnp.mean(jnp.square(_jitted(model.unet)(x_t, t, text) - target))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    assert float(metrics["mse"]) == float(loss)


def test_sd_condition_dropout(clip_dir):
    model = build_model(
        _sd_params(clip_dir, do_classifier_free_guidance=True, dropout_percent=1.0),
        rngs=nnx.Rngs(0),
        load_weights=False,
    )
    (bos, eos), pad = model.empty_prompt
    ids = jnp.full((2, 4), 5, jnp.int32)
    batch = {"pixel_values": _images(), "input_ids": ids}
    pred, _, extras = sd.training_forward(model, batch, jax.random.key(3))
    assert bool(extras["dropped"].all())
    # dropping everything == training on the empty prompt
    e_ids, e_mask = model.empty_prompt_batch(2, 4)
    np.testing.assert_array_equal(e_ids[0], [bos, eos, pad, pad])
    np.testing.assert_array_equal(e_mask[0], [1, 1, 0, 0])
    pred_e, _, _ = sd.training_forward(
        model,
        {"pixel_values": batch["pixel_values"], "input_ids": e_ids, "attention_mask": e_mask},
        jax.random.key(3),
    )
    np.testing.assert_allclose(pred, pred_e, atol=1e-6)
    none = build_model(
        _sd_params(clip_dir, do_classifier_free_guidance=True, dropout_percent=0.0),
        rngs=nnx.Rngs(0),
        load_weights=False,
    )
    _, _, extras = sd.training_forward(none, batch, jax.random.key(3))
    assert "dropped" not in extras


def test_sd_param_errors(clip_dir):
    with pytest.raises(ParamsError, match="needs a text encoder"):
        build_model(_sd_params(None, do_classifier_free_guidance=True), rngs=nnx.Rngs(0))
    with pytest.raises(ParamsError, match="text_emb_dim = 32 must equal"):
        build_model(_sd_params(clip_dir).replace(unet=TINY_UNET.replace(text_emb_dim=32)), rngs=nnx.Rngs(0))
    with pytest.raises(ParamsError, match="use_diffusers_unet"):  # a diffusers checkpoint needs the flag
        build_model(_sd_params(None).replace(unet=TINY_UNET.replace(hf_pretrained="/x")), rngs=nnx.Rngs(0))
    model = build_model(_sd_params(None), rngs=nnx.Rngs(0))
    with pytest.raises(ParamsError, match="guidance needs a text encoder"):
        sd.sample_images(model, None, jax.random.key(0), guidance_scale=3.0, batch_size=2)
    check = model_record("stable_diffusion").batch_check
    check(_sd_params(None), {"pixel_values": np.zeros((2, 8, 8, 3))})
    with pytest.raises(ValueError, match="pixel_values"):
        check(_sd_params(None), {"pixel_values": np.zeros((2, 3, 8, 8))})
    with pytest.raises(ValueError, match="needs input_ids"):
        check(_sd_params(clip_dir), {"pixel_values": np.zeros((2, 8, 8, 3))})


def test_sd_train_step_lowers_loss():
    from vla_foundry_jax.params import HyperParams

    small = UNetParams(channels=[8], image_size=4, time_emb_dim=8, text_emb_dim=0)
    params = _sd_params(None, use_flow_matching_scheduler=True).replace(unet=small)
    hp = HyperParams(precision="fp32", lr=1e-2, warmup="0")
    spec, state, step = single_device_train_step(params, hp, 100)
    batch = {"pixel_values": _images(4, size=4)}
    fixed_loss = fixed_draw_loss(spec, get_loss("stable_diffusion"), batch)  # same t / noise draws before and after
    before = fixed_loss(state)
    state = finite_steps(step, state, batch, 4)
    assert fixed_loss(state) < before


def test_cfg_combine_on_tiny_denoiser():
    def unet_fn(x, t, text):  # output depends on x, t and the text
        return x * text.mean(axis=(1, 2))[:, None, None, None] + t

    x = _images()
    cond = jnp.full((2, 3, 4), 2.0)
    uncond = jnp.full((2, 3, 4), 0.5)
    out = sd.guided_denoiser(unet_fn, cond, uncond, 3.0)(x, 1)
    u, c = x * 0.5 + 1, x * 2.0 + 1
    np.testing.assert_allclose(out, u + 3.0 * (c - u), rtol=1e-6)
    np.testing.assert_allclose(sd.guided_denoiser(unet_fn, cond, uncond, None)(x, 1), c, rtol=1e-6)


@pytest.mark.parametrize("flow", [False, True])
def test_sampling_shapes_and_range(clip_dir, flow):
    model = build_model(_sd_params(None, use_flow_matching_scheduler=flow), rngs=nnx.Rngs(0))
    imgs = sd.sample_images(model, None, jax.random.key(0), batch_size=3)
    assert imgs.shape == (3, 8, 8, 3)
    assert float(jnp.max(jnp.abs(imgs))) <= 1.0 and bool(jnp.all(jnp.isfinite(imgs)))
    if flow:
        assert sd.sample_images(model, None, jax.random.key(0), num_steps=5, batch_size=1).shape == (1, 8, 8, 3)


def test_guided_sampling_with_text(clip_dir):
    model = build_model(
        _sd_params(clip_dir, use_flow_matching_scheduler=True, do_classifier_free_guidance=True),
        rngs=nnx.Rngs(0),
        load_weights=False,
    )
    ids = jnp.asarray([[61, 5, 6, 62], [61, 7, 62, 63]], jnp.int32)
    a = sd.sample_images(model, ids, jax.random.key(0))  # model's guidance_scale
    b = sd.sample_images(model, ids, jax.random.key(0), guidance_scale=1.0)
    assert a.shape == b.shape == (2, 8, 8, 3)
    assert not np.allclose(a, b)
    with pytest.raises(ParamsError, match="prompt_ids"):
        sd.sample_images(model, None, jax.random.key(0), guidance_scale=2.0, batch_size=2)


def test_save_image_grid(tmp_path):
    imgs = np.stack([np.full((4, 6, 3), v, np.float32) for v in (-1.0, 0.0, 1.0)])
    path = save_image_grid(imgs, str(tmp_path / "grid.png"))
    out = np.asarray(Image.open(path))
    assert out.shape == (8, 12, 3)  # 2 x 2 grid, one empty cell
    assert out[0, 0, 0] == 0 and out[0, 6, 0] == 128 and out[4, 0, 0] == 255 and out[4, 6, 0] == 0
