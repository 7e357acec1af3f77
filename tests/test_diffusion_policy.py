"""``diffusion_policy`` (reference §3.11) and its ``clip_backbone`` / ``vit_backbone`` (§3.10): token layout,
loss against hand NumPy, head repeats, freezing, flow / DDPM sampling with past inpainting, train steps, EMA."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.fixtures.training import finite_steps, single_device_train_step
from tests.fixtures.weights import loaded
from vla_foundry_jax import parallel
from vla_foundry_jax.models import build_model
from vla_foundry_jax.models import diffusion_policy as dp
from vla_foundry_jax.models.backbones import CLIPBackbone, ViTBackbone
from vla_foundry_jax.params import DistributedParams, EMAParams, HyperParams
from vla_foundry_jax.params.base import ParamsError
from vla_foundry_jax.params.model_params import (
    CLIPBackboneParams,
    DiffusionPolicyParams,
    NoiseSchedulerParams,
    TransformerParams,
    ViTBackboneParams,
)
from vla_foundry_jax.registry import get_loss, model_record
from vla_foundry_jax.training.ema import model_from_state
from vla_foundry_jax.training.state import frozen_prefixes, make_model_spec

B, N, TA, A, P, IMG = 2, 2, 4, 3, 2, 16
T = 100
VIT = ViTBackboneParams(hidden_dim=16, inter_dim=32, patch_size=8, img_size=IMG, n_heads=2, n_layers=1)
HEAD = TransformerParams(hidden_dim=32, n_layers=2, n_heads=2, is_causal=False, max_seq_len=64)


def policy_params(**kw) -> DiffusionPolicyParams:
    base = dict(
        vision_language_backbone=VIT,
        transformer=HEAD,
        noise_scheduler=NoiseSchedulerParams(num_timesteps=T),
        use_flow_matching_scheduler=True,
        action_dim=A,
        proprioception_dim=P,
    )
    return DiffusionPolicyParams(**{**base, **kw})


def make_batch(seed: int = 0, b: int = B) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    actions = r.uniform(-1, 1, (b, TA, A)).astype(np.float32)
    actions[0, 2, 0] = 2.5  # a future value beyond the clamp range (+-1.5)
    actions[0, 0, 1] = -2.0  # a past value beyond it (past steps are given clean, unclamped)
    past = np.zeros((b, TA), bool)
    past[:, 0] = True
    future = ~past
    future[-1, -1] = False  # one padded step
    return {
        "input_ids": r.integers(0, 50, (b, 5)).astype(np.int32),
        "attention_mask": np.ones((b, 5), np.int32),
        "pixel_values": r.uniform(-1, 1, (b, N, IMG, IMG, 3)).astype(np.float32),
        "attention_mask_images": np.array([[1, 1]] + [[1, 0]] * (b - 1), bool),
        "actions": actions,
        "past_mask": past,
        "future_mask": future,
        "proprioception": r.standard_normal((b, 2, P)).astype(np.float32),
    }


def jbatch(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


# One jitted function per purpose, reused across tests (eager NNX scans retrace at every call).
@nnx.jit
def j_denoise(model, cond, t, x, prop):
    return model.denoise(cond, t, x, prop)


@nnx.jit
def j_condition(model, b):
    return model.condition(b["input_ids"], b["pixel_values"], b["attention_mask"], b["attention_mask_images"])


@nnx.jit
def j_proprio(model, prop):
    return model.encode_proprioception(prop)


@nnx.jit
def j_loss(model, b, rng):
    return get_loss("diffusion_policy")(model, b, hparams=None, rng=rng)


@nnx.jit
def j_forward(model, b, rng):
    return dp.training_forward(model, b, rng)


@pytest.fixture(scope="module")
def policy():
    return build_model(policy_params(), rngs=nnx.Rngs(0))


def np_params(module) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }


def hand_sinusoids(t: np.ndarray, dim: int) -> np.ndarray:
    half = dim // 2
    freqs = np.exp(-np.arange(half) * math.log(10000.0) / (half - 1))
    args = np.asarray(t, np.float64)[..., None] * freqs
    return np.concatenate([np.sin(args), np.cos(args)], axis=-1)


# ------------------------------------------------------------------------------------------- backbones
def test_vit_backbone_camera_major_tokens_and_camera_mask(policy):
    bb = policy.vision_language_backbone
    assert isinstance(bb, ViTBackbone) and bb.conditioning_dim == 16
    batch = make_batch()
    px = jnp.asarray(batch["pixel_values"])
    out = np.asarray(bb(None, px, None, jnp.asarray(batch["attention_mask_images"])))
    n_p = (IMG // 8) ** 2
    assert out.shape == (B, N * n_p, 16)
    per_camera = [np.asarray(super(ViTBackbone, bb).__call__(px[:, c])) for c in range(N)]  # plain ViT per camera
    np.testing.assert_allclose(out[0], np.concatenate([per_camera[0][0], per_camera[1][0]]), atol=1e-5)
    np.testing.assert_allclose(out[1, :n_p], per_camera[0][1], atol=1e-5)
    assert not np.any(out[1, n_p:])  # the padded camera of sample 1
    assert bb(None, px[:, 0]).shape == (B, n_p, 16)  # a 4-D batch is one camera
    with pytest.raises(ValueError, match="needs pixel_values"):
        bb(jnp.zeros((B, 3), jnp.int32), None)


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import CLIPModel

    from tests.fixtures.hf_checkpoints import tiny_clip_config

    torch.manual_seed(0)
    hf = CLIPModel(tiny_clip_config(image_size=IMG, patch_size=8)).eval()
    path = tmp_path_factory.mktemp("clip")
    hf.save_pretrained(str(path))
    return str(path), hf


def test_clip_backbone_matches_hf_with_the_originals_text_quirk(clip_ckpt):
    torch = pytest.importorskip("torch")
    path, hf = clip_ckpt
    bb = loaded(CLIPBackboneParams(hf_pretrained=path))
    assert isinstance(bb, CLIPBackbone) and bb.conditioning_dim == 8
    ids = np.array([[61, 5, 6, 62, 63, 63], [61, 7, 8, 9, 10, 62]], np.int32)
    px = np.random.default_rng(0).uniform(-1, 1, (2, N, IMG, IMG, 3)).astype(np.float32)
    cams = np.array([[1, 1], [1, 0]], bool)
    with torch.no_grad():  # independent reference: HF CLIP towers + the original wrapper's formulas
        pooled_t = hf.text_model(input_ids=torch.from_numpy(ids).long()).pooler_output
        text = hf.text_projection(torch.nn.functional.normalize(pooled_t, dim=-1)).numpy()
        flat = torch.from_numpy(np.ascontiguousarray(px.reshape(-1, IMG, IMG, 3).transpose(0, 3, 1, 2)))
        img = torch.nn.functional.normalize(
            hf.visual_projection(hf.vision_model(pixel_values=flat).pooler_output), dim=-1
        )
        img = img.numpy().reshape(2, N, 8) * cams[..., None]
    out = np.asarray(bb(jnp.asarray(ids), jnp.asarray(px), jnp.ones_like(ids), jnp.asarray(cams)))
    assert out.shape == (2, 1 + N, 8)
    np.testing.assert_allclose(out[:, 0], text, atol=1e-5)
    np.testing.assert_allclose(out[:, 1:], img, atol=1e-5)
    assert not np.allclose(np.linalg.norm(out[:, 0], axis=-1), 1.0)  # normalised before projection (quirk)
    no_text = np.asarray(bb(None, jnp.asarray(px)))  # no camera mask given: every camera kept
    assert no_text.shape == (2, N, 8)
    np.testing.assert_allclose(no_text[0], out[0, 1:], atol=1e-6)
    disabled = build_model(CLIPBackboneParams(hf_pretrained=path, disable_text=True), rngs=nnx.Rngs(1))
    assert disabled(jnp.asarray(ids), jnp.asarray(px)).shape == (2, N, 8)
    assert bb(jnp.asarray(ids), None).shape == (2, 1, 8)
    with pytest.raises(ValueError, match="neither text nor images"):
        disabled(jnp.asarray(ids), None)


def test_clip_backbone_freezing_and_unused_parameters(clip_ckpt):
    path, _ = clip_ckpt
    base = policy_params(vision_language_backbone=CLIPBackboneParams(hf_pretrained=path))
    bb_paths = [p for p in frozen_prefixes(base) if p[0] == "vision_language_backbone"]
    assert bb_paths == [("vision_language_backbone", "logit_scale")]
    no_text = base.replace(vision_language_backbone=CLIPBackboneParams(hf_pretrained=path, disable_text=True))
    assert set(frozen_prefixes(no_text)) >= {
        ("vision_language_backbone", "text_model"),
        ("vision_language_backbone", "text_projection"),
    }
    flags = CLIPBackboneParams(hf_pretrained=path, freeze_image_encoder=True)
    assert ("vision_language_backbone", "vision_model") in frozen_prefixes(base.replace(vision_language_backbone=flags))
    frozen = base.replace(vision_language_backbone=CLIPBackboneParams(hf_pretrained=path, freeze=True))
    assert ("vision_language_backbone",) in frozen_prefixes(frozen)
    # the policy loads its CLIP backbone with the clip_hf loader at prefix "vision_language_backbone."
    model = loaded(base, sub="vision_language_backbone")
    ref = loaded(CLIPBackboneParams(hf_pretrained=path))
    batch = make_batch()
    got = model.condition(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["pixel_values"]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref(jnp.asarray(batch["input_ids"]),
                               jnp.asarray(batch["pixel_values"]))), atol=1e-6)  # fmt: skip


# ------------------------------------------------------------------------------------------- model
def test_init_components_and_one_row_vocabulary(policy):
    p = np_params(policy)
    np.testing.assert_allclose(p["time_encoding"], hand_sinusoids(np.arange(T), 16), atol=1e-5)
    assert p["output_layer.kernel"].shape == (32, A) and np.any(p["output_layer.kernel"])
    assert p["action_encode.kernel"].shape == (A, 32) and p["condition_encode.kernel"].shape == (16, 32)
    assert p["proprioception_encode.kernel"].shape == (P, 32)
    bound = 1 / math.sqrt(32)
    assert np.abs(p["output_layer.kernel"]).max() <= bound and np.abs(p["output_layer.bias"]).max() <= bound
    assert p["transformer.embeddings"].shape == (1, 32) and p["transformer.output"].shape == (32, 1)
    no_prop = build_model(policy_params(proprioception_dim=0), rngs=nnx.Rngs(0))
    assert no_prop.proprioception_encode is None


@pytest.mark.parametrize("mode", ["concat", "add"])
@pytest.mark.parametrize("with_prop", [True, False])
def test_token_layout_against_hand_numpy(mode, with_prop):
    model = build_model(
        policy_params(diffusion_step_conditioning=mode, proprioception_dim=P if with_prop else 0), rngs=nnx.Rngs(0)
    )
    p = np_params(model)
    r = np.random.default_rng(1)
    Nc = 5
    cond = r.standard_normal((B, Nc, 16)).astype(np.float32)
    acts = r.standard_normal((B, TA, 32)).astype(np.float32)
    prop = r.standard_normal((B, 2, 32)).astype(np.float32) if with_prop else None
    t = np.array([3, 97])
    seq = np.asarray(model.build_sequence(jnp.asarray(cond), jnp.asarray(t), jnp.asarray(acts),
                                          None if prop is None else jnp.asarray(prop)))  # fmt: skip
    te = hand_sinusoids(t, 16)[:, None]
    W, b = p["condition_encode.kernel"], p["condition_encode.bias"]
    head = np.concatenate([te, cond], 1) @ W + b if mode == "concat" else (cond + te) @ W + b
    want = np.concatenate([head] + ([prop] if with_prop else []) + [acts], axis=1)
    n_cond = Nc + (1 if mode == "concat" else 0)
    assert seq.shape == (B, n_cond + (2 if with_prop else 0) + TA, 32)
    np.testing.assert_allclose(seq, want, atol=1e-4)


def test_prediction_reads_the_last_block_before_the_final_norm_and_is_bidirectional(policy):
    r = np.random.default_rng(2)
    cond = jnp.asarray(r.standard_normal((B, 3, 16)), jnp.float32)
    x = jnp.asarray(r.standard_normal((B, TA, A)), jnp.float32)
    t = jnp.array([10, 20])
    pred = np.asarray(j_denoise(policy, cond, t, x, None))
    assert pred.shape == (B, TA, A)
    graphdef, state = nnx.split(policy)
    other = nnx.merge(graphdef, state)
    other.transformer.norm.weight.set_value(other.transformer.norm.weight[...] * 7.0 + 1.0)
    np.testing.assert_allclose(np.asarray(j_denoise(other, cond, t, x, None)), pred, atol=1e-6)
    x2 = x.at[:, -1].add(1.0)  # non-causal: the last action token changes the first one's prediction
    assert not np.allclose(np.asarray(j_denoise(policy, cond, t, x2, None))[:, 0], pred[:, 0])
    causal = build_model(policy_params(transformer=HEAD.replace(is_causal=True)), rngs=nnx.Rngs(0))
    c1, c2 = (np.asarray(j_denoise(causal, cond, t, xx, None)) for xx in (x, x2))
    np.testing.assert_allclose(c1[:, :-1], c2[:, :-1], atol=1e-6)


# ------------------------------------------------------------------------------------------- loss
def _hand_abar(beta_start=1e-4, beta_end=0.02):
    betas = np.linspace(beta_start, beta_end, T, dtype=np.float64).astype(np.float32)
    return np.cumprod(1.0 - betas.astype(np.float64))


@pytest.mark.parametrize("flow", [True, False])
def test_loss_equals_hand_numpy(flow):
    model = build_model(policy_params(use_flow_matching_scheduler=flow), rngs=nnx.Rngs(0))
    batch = make_batch()
    jb = jbatch(batch)
    rng = jax.random.PRNGKey(3)
    loss, metrics = j_loss(model, jb, rng)
    _, _, extras = j_forward(model, jb, rng)
    t, noise = np.asarray(extras["t"]), np.asarray(extras["noise"])
    a, fut = batch["actions"], batch["future_mask"]
    if flow:
        s = (t / T)[:, None, None]
        noisy = a + s * (noise - a)
        target = noise - a
    else:
        abar = _hand_abar()[t][:, None, None]
        noisy = np.sqrt(abar) * a + np.sqrt(1 - abar) * noise
        target = noise  # epsilon (the original would use noise - actions here)
    noisy = np.where(fut[..., None], np.clip(noisy, -1.5, 1.5), a)
    assert noisy[0, 0, 1] == -2.0  # the past step stays clean and unclamped
    cond, prop = j_condition(model, jb), j_proprio(model, jb["proprioception"])
    pred = np.asarray(j_denoise(model, cond, jnp.asarray(t), jnp.asarray(noisy, jnp.float32), prop))
    m = np.broadcast_to(fut[..., None], pred.shape)
    want = np.sum(m * (pred - target) ** 2) / np.sum(m)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(metrics["num_future_steps"]) == fut.sum()


def test_input_noise_std_changes_the_loss_and_is_off_by_default():
    batch = jbatch(make_batch())
    rng = jax.random.PRNGKey(4)
    base = build_model(policy_params(), rngs=nnx.Rngs(0))
    noisy = build_model(policy_params(input_noise_std=0.5), rngs=nnx.Rngs(0))
    l0 = float(j_loss(base, batch, rng)[0])
    l1 = float(j_loss(noisy, batch, rng)[0])
    assert np.isfinite(l1) and l0 != pytest.approx(l1, rel=1e-4)


def test_head_repeats_run_the_backbone_once(monkeypatch):
    R = 3
    model = build_model(policy_params(num_action_head_repeats=R), rngs=nnx.Rngs(0))
    calls = []
    original = ViTBackbone.__call__

    def counting(self, *args, **kwargs):
        calls.append(args[1].shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ViTBackbone, "__call__", counting)
    batch = jbatch(make_batch())
    pred, target, extras = j_forward(model, batch, jax.random.PRNGKey(0))
    assert calls == [(B, N, IMG, IMG, 3)]
    assert pred.shape == target.shape == (B * R, TA, A) and extras["future_mask"].shape == (B * R, TA)
    noise = np.asarray(extras["noise"])
    assert not np.allclose(noise[0], noise[1])  # fresh noise per repeat
    # rows i*R .. i*R+R-1 are sample i: identical inputs give identical predictions
    x = jnp.repeat(batch["actions"], R, axis=0)
    t = jnp.full((B * R,), 50)
    out = np.asarray(model(batch["input_ids"], batch["pixel_values"], x, t,
                           proprioception=jnp.repeat(batch["proprioception"], R, axis=0)))  # fmt: skip
    np.testing.assert_allclose(out[0], out[R - 1], atol=1e-6)
    assert not np.allclose(out[0], out[R])
    with pytest.raises(ValueError, match=r"action batch must be 2 \* 3 = 6"):
        model(batch["input_ids"], batch["pixel_values"], batch["actions"], jnp.zeros((B,), jnp.int32))


def test_gradients_reach_every_trainable_parameter_and_no_frozen_backbone(policy):
    params = policy_params()
    hp = HyperParams(precision="fp32", lr=1e-2, warmup="0")
    mesh = parallel.make_mesh(DistributedParams(), jax.devices()[:1])
    spec = make_model_spec(params, hp, mesh)
    trainable, frozen, rest = nnx.split(policy, *spec.filters)[1:]
    frozen_names = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(frozen)}
    assert frozen_names == {"transformer.embeddings", "transformer.output", "transformer.norm.weight",
                            "transformer.norm.bias"}  # fmt: skip
    batch = jbatch(make_batch())

    def loss(tr):
        return get_loss("diffusion_policy")(spec.merge(tr, frozen, rest), batch, rng=jax.random.PRNGKey(0))[0]

    grads = jax.jit(jax.grad(loss))(trainable)
    zero = [".".join(map(str, k)) for k, v in nnx.to_flat_state(grads) if not np.any(np.asarray(v.get_value()))]
    assert zero == []
    frozen_bb = policy_params(vision_language_backbone=VIT.replace(freeze=True))
    spec2 = make_model_spec(frozen_bb, hp, mesh)
    names = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(spec2.abstract[0])}
    assert names and not any(n.startswith("vision_language_backbone") for n in names)
    assert any(n.startswith("vision_language_backbone") for n, _ in
               ((".".join(map(str, k)), v) for k, v in nnx.to_flat_state(spec2.abstract[1])))  # fmt: skip


# ------------------------------------------------------------------------------------------- sampling
def test_flow_sampling_matches_a_hand_euler_loop_and_keeps_past_actions(policy):
    batch = make_batch()
    jb = jbatch(batch)
    rng = jax.random.PRNGKey(5)
    out = np.asarray(dp.sample_actions(policy, batch, rng, num_inference_steps=10))
    assert out.shape == (B, TA, A)
    past = batch["past_mask"]
    np.testing.assert_array_equal(out[past], batch["actions"][past])  # exactly, even the -2.0 beyond the clamp
    # hand loop: t = 99, 89, ..., 9 (step 10); x -= v * 10 / T, clamp, past re-imposed
    init_key, _ = jax.random.split(rng)
    x = np.asarray(jax.random.normal(init_key, batch["actions"].shape, jnp.float32))
    x = np.where(past[..., None], batch["actions"], x)
    cond, prop = j_condition(policy, jb), j_proprio(policy, jb["proprioception"])
    ts = list(range(T - 1, -1, -10))
    assert ts == [99, 89, 79, 69, 59, 49, 39, 29, 19, 9]
    for t in ts:
        v = np.asarray(j_denoise(policy, cond, jnp.int32(t), jnp.asarray(x, jnp.float32), prop))
        x = np.where(past[..., None], batch["actions"], np.clip(x - v * 10 / T, -1.5, 1.5))
    np.testing.assert_allclose(out, x, atol=1e-4)
    no_past = {k: v for k, v in batch.items() if k != "past_mask"}
    assert np.all(np.isfinite(np.asarray(dp.sample_actions(policy, no_past, rng, num_inference_steps=4))))


def test_the_bound_sampler_matches_sample_actions_and_checks_actions_alike(policy):
    batch = make_batch()
    rng = jax.random.PRNGKey(5)
    sample = dp.action_sampler(policy, num_inference_steps=4)
    want = np.asarray(dp.sample_actions(policy, batch, rng, num_inference_steps=4))
    np.testing.assert_array_equal(np.asarray(sample(batch, rng)), want)
    wrong_dim = {**batch, "actions": batch["actions"][..., :-1]}
    no_actions = {k: v for k, v in batch.items() if k != "actions"}
    for fn in (sample, lambda b, r: dp.sample_actions(policy, b, r, num_inference_steps=4)):
        with pytest.raises(ValueError, match=rf"\[B, Ta, {A}\] \(action_dim\), got \({B}, {TA}, {A - 1}\)"):
            fn(wrong_dim, rng)
        with pytest.raises(ValueError, match=r"needs batch\['actions'\]"):
            fn(no_actions, rng)


@pytest.mark.parametrize("diffusers_kind", [False, True])
def test_ddpm_sampling_runs_full_and_strided(diffusers_kind):
    model = build_model(
        policy_params(use_flow_matching_scheduler=False, use_diffusers_scheduler=diffusers_kind), rngs=nnx.Rngs(0)
    )
    batch = make_batch()
    past = batch["past_mask"]
    for n in (10,) if diffusers_kind else (None, 10):
        out = np.asarray(dp.sample_actions(model, batch, jax.random.PRNGKey(6), num_inference_steps=n))
        assert out.shape == (B, TA, A) and np.all(np.isfinite(out))
        np.testing.assert_array_equal(out[past], batch["actions"][past])
        assert np.abs(out).max() <= max(1.5, np.abs(batch["actions"][past]).max())
    with pytest.raises(ValueError, match="num_inference_steps"):
        dp.sample_actions(model, batch, jax.random.PRNGKey(0), num_inference_steps=0)


@pytest.mark.parametrize("n", [10, 4])
def test_strided_ddpm_step_matches_diffusers_trailing_schedule(n):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from vla_foundry_jax.models.noise_scheduler import make_scheduler

    sched = make_scheduler(
        NoiseSchedulerParams(num_timesteps=T, clamp_range=None),
        use_diffusers_scheduler=False,
        use_flow_matching_scheduler=False,
    )
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, clip_sample=False, timestep_spacing="trailing")
    ref.set_timesteps(n)
    ts, k = dp.inference_timesteps(sched, n)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    r = np.random.default_rng(0)
    x = r.standard_normal((2, 3, 4)).astype(np.float32)
    for t in ts:
        eps = r.standard_normal(x.shape).astype(np.float32)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))
        want = ref.step(torch.from_numpy(eps), int(t), torch.from_numpy(x),
                        generator=torch.Generator().manual_seed(int(t))).prev_sample.numpy()  # fmt: skip
        got = np.asarray(dp.strided_ddpm_step(sched, jnp.asarray(eps), jnp.int32(t), jnp.asarray(x), k, z.numpy()))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        x = want


# ------------------------------------------------------------------------------------------- training
def test_train_steps_lower_the_loss_and_ema_weights_are_used():
    params = policy_params()
    hp = HyperParams(precision="fp32", lr=3e-3, warmup="0")
    ema = EMAParams(enabled=True, type="vanilla", alpha=0.5)
    spec, state, step = single_device_train_step(params, hp, 100, ema=ema)
    loss_fn = get_loss("diffusion_policy")
    batch = jbatch(make_batch(b=4))
    fixed = jax.jit(lambda st: loss_fn(spec.merge(st["params"], st["frozen"], st["rest"]), batch,
                                       rng=jax.random.PRNGKey(0))[0])  # fmt: skip
    before = float(fixed(state))
    frozen_before = jax.tree.map(np.asarray, state["frozen"])
    state = finite_steps(step, state, batch, 8)
    assert float(fixed(state)) < 0.9 * before
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, state["frozen"]))
    # EMA: the inference model takes the EMA weights when present
    ema_model = model_from_state(spec, state, use_ema=True)
    live_model = model_from_state(spec, state, use_ema=False)
    e = np_params(ema_model)["output_layer.kernel"]
    np.testing.assert_array_equal(e, np.asarray(state["ema"]["output_layer"]["kernel"].get_value()))
    assert not np.array_equal(e, np_params(live_model)["output_layer.kernel"])
    small = make_batch()
    a1 = np.asarray(dp.sample_actions(ema_model, small, jax.random.PRNGKey(1), num_inference_steps=5))
    a2 = np.asarray(dp.sample_actions(live_model, small, jax.random.PRNGKey(1), num_inference_steps=5))
    assert not np.allclose(a1, a2)
    no_ema = dict(state, ema=None)
    assert np.array_equal(np_params(model_from_state(spec, no_ema))["output_layer.kernel"],
                          np_params(live_model)["output_layer.kernel"])  # fmt: skip


# ------------------------------------------------------------------------------------------- errors
def test_configuration_and_batch_errors():
    with pytest.raises(ParamsError, match=r"diffusion_policy\.action_dim.*stats\.json"):
        build_model(policy_params(action_dim=None), rngs=nnx.Rngs(0))
    with pytest.raises(ParamsError, match=r"diffusion_policy\.transformer is not set"):
        build_model(policy_params(transformer=None), rngs=nnx.Rngs(0))
    with pytest.raises(ParamsError, match="num_action_head_repeats"):
        build_model(policy_params(num_action_head_repeats=0), rngs=nnx.Rngs(0))
    check = model_record("diffusion_policy").batch_check
    check(policy_params(), make_batch())
    bad = make_batch()
    bad["actions"] = bad["actions"][..., :2]
    with pytest.raises(ValueError, match=r"action_dim = 3"):
        check(policy_params(), bad)
    no_prop = {k: v for k, v in make_batch().items() if k != "proprioception"}
    with pytest.raises(ValueError, match="proprioception_dim = 2"):
        check(policy_params(), no_prop)
    cams = make_batch()
    cams["attention_mask_images"] = cams["attention_mask_images"][:, :1]
    with pytest.raises(ValueError, match="attention_mask_images"):
        check(policy_params(), cams)
    with pytest.raises(ValueError, match=r"batch\['actions'\]"):
        dp.sample_actions(build_model(policy_params(), rngs=nnx.Rngs(0)), {"pixel_values": cams["pixel_values"]},
                          jax.random.PRNGKey(0))  # fmt: skip


def test_edge_cases_single_action_step_and_every_camera_masked(policy):
    b = make_batch()
    one = {**b, "actions": b["actions"][:, :1], "past_mask": np.zeros((B, 1), bool)}
    one["future_mask"] = np.ones((B, 1), bool)
    one["attention_mask_images"] = np.zeros((B, N), bool)
    loss, _ = j_loss(policy, jbatch(one), jax.random.PRNGKey(0))
    assert np.isfinite(float(loss))
    out = np.asarray(dp.sample_actions(policy, one, jax.random.PRNGKey(0), num_inference_steps=2))
    assert out.shape == (B, 1, A) and np.all(np.isfinite(out))


def test_vit_backbone_dropout_is_active_in_training_only():
    batch = jbatch(make_batch())
    rng = jax.random.PRNGKey(7)
    plain = build_model(policy_params(), rngs=nnx.Rngs(0))
    dropping = build_model(policy_params(vision_language_backbone=VIT.replace(dropout=0.5)), rngs=nnx.Rngs(0))
    p0, _, e0 = j_forward(plain, batch, rng)
    p1, _, e1 = j_forward(dropping, batch, rng)
    np.testing.assert_array_equal(np.asarray(e0["noise"]), np.asarray(e1["noise"]))  # same draws, same weights
    assert not np.allclose(np.asarray(p0), np.asarray(p1))
    cond = (j_condition(m, batch) for m in (plain, dropping))  # inference: deterministic
    np.testing.assert_array_equal(*(np.asarray(c) for c in cond))


def test_transformer_hf_denoiser_reads_its_post_norm_last_hidden_state(tmp_path):
    transformers = pytest.importorskip("transformers")
    from vla_foundry_jax.params.model_params import TransformerHFParams

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=40, max_position_embeddings=64)  # fmt: skip
    cfg.save_pretrained(str(tmp_path))
    params = policy_params(transformer=TransformerHFParams(hf_pretrained=str(tmp_path)))
    assert ("transformer", "embed_tokens") in frozen_prefixes(params)
    model = build_model(params, rngs=nnx.Rngs(0), load_weights=False)  # a config-only Llama dir: no weights
    r = np.random.default_rng(3)
    cond = jnp.asarray(r.standard_normal((B, 3, 16)), jnp.float32)
    x = jnp.asarray(r.standard_normal((B, TA, A)), jnp.float32)
    t = jnp.array([1, 2])
    pred = np.asarray(j_denoise(model, cond, t, x, None))
    assert pred.shape == (B, TA, A) and np.all(np.isfinite(pred))
    graphdef, state = nnx.split(model)
    other = nnx.merge(graphdef, state)
    other.transformer.norm.scale.set_value(other.transformer.norm.scale[...] * 3.0)
    assert not np.allclose(np.asarray(j_denoise(other, cond, t, x, None)), pred)  # post-norm, unlike `transformer`
    loss, _ = j_loss(model, jbatch(make_batch()), jax.random.PRNGKey(0))
    assert np.isfinite(float(loss))
