"""Optimizer schedules, decay groups, losses, EMA and the jitted train step (accumulation, freeze)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.fixtures.training import single_device_train_step
from vla_foundry_jax.layers.losses import cross_entropy_with_z_loss, masked_mse
from vla_foundry_jax.params import EMAParams, HyperParams, TransformerParams
from vla_foundry_jax.training.ema import ema_decay, ema_init, ema_update
from vla_foundry_jax.training.optimizer import decay_mask, lr_schedule, parse_steps
from vla_foundry_jax.training.step import split_micro_batches


def test_parse_steps_fraction_or_count():
    assert parse_steps("0.1", 100) == 10
    assert parse_steps("1000", 100) == 1000
    assert parse_steps("0.3", 10) == 3


def test_cosine_schedule_matches_hand_values():
    hp = HyperParams(lr=1.0, warmup="2", lr_cooldown_end=0.0, lr_scheduler="cosine")
    s = lr_schedule(hp, 10)
    # warmup (step+1)/W, then 0.5 (1 + cos(pi (step - W) / (total - W)))
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 6: 0.5, 10: 0.0}
    for step, lr in expected.items():
        assert float(s(step)) == pytest.approx(lr, abs=1e-6), step


def test_force_min_lr_and_cooldown_floor():
    hp = HyperParams(lr=1.0, warmup="0", lr_cooldown_end=0.1, force_min_lr=0.3)
    s = lr_schedule(hp, 10)
    assert float(s(9)) == pytest.approx(0.3)  # cosine value 0.1 + 0.9*0.5*(1+cos(0.9pi)) < 0.3
    assert float(s(0)) == pytest.approx(1.0)


def test_const_and_warmup_constant_decay():
    const = lr_schedule(HyperParams(lr=2.0, warmup="4", lr_scheduler="const"), 10)
    assert [float(const(i)) for i in (0, 3, 4, 9)] == pytest.approx([0.5, 2.0, 2.0, 2.0])
    wcd = lr_schedule(HyperParams(lr=1.0, warmup="0", decay="0.3", lr_scheduler="warmup_constant_decay"), 10)
    assert float(wcd(6)) == pytest.approx(1.0)
    assert float(wcd(7)) == pytest.approx(1.0)  # cosine starts at total - D = 7
    assert float(wcd(8)) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))


def test_decay_mask_by_name():
    tree = {
        "layers": {"attention_norm": {"scale": 1.0}, "w12": {"kernel": 1.0}, "proj": {"bias": 1.0}},
        "embeddings": 1.0,
        "QK_Norm": {"w": 1.0},
    }
    mask = decay_mask(tree)
    assert mask["layers"]["w12"]["kernel"] and mask["embeddings"]
    assert not mask["layers"]["attention_norm"]["scale"]
    assert not mask["layers"]["proj"]["bias"]
    assert not mask["QK_Norm"]["w"]


def test_cross_entropy_matches_numpy_and_z_loss_counts_masked_positions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, size=(2, 3))
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    lse = np.log(np.exp(logits).sum(-1))
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    expected_ce = (nll * mask).sum() / mask.sum()
    loss, _ = cross_entropy_with_z_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), 1e-2)
    assert float(loss) == pytest.approx(expected_ce + 1e-2 * (lse**2).mean(), rel=1e-5)
    zero, _ = cross_entropy_with_z_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((2, 3), bool))
    assert float(zero) == 0.0


def test_masked_mse_divides_by_valid_elements():
    pred = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])
    target = jnp.zeros_like(pred)
    mask = jnp.array([[True, False]])  # broadcast over the feature dim
    assert float(masked_mse(pred, target, mask)) == pytest.approx((1 + 4) / 2)
    assert float(masked_mse(pred, target, jnp.zeros((1, 2), bool))) == 0.0
    assert float(masked_mse(pred, target)) == pytest.approx(30 / 4)


def test_ema_decays_follow_the_reference():
    adaptive = EMAParams(enabled=True)
    assert [float(ema_decay(adaptive, n)) for n in (0, 1)] == [0.0, 0.0]
    assert float(ema_decay(adaptive, 2)) == pytest.approx(1 - 2**-0.75)
    late = EMAParams(enabled=True, update_after_step=2)
    assert float(ema_decay(late, 3)) == 0.0 and float(ema_decay(late, 4)) == pytest.approx(1 - 2**-0.75)
    vanilla = EMAParams(enabled=True, type="vanilla", alpha=0.9)
    assert float(ema_decay(vanilla, 0)) == 0.0 and float(ema_decay(vanilla, 5)) == pytest.approx(0.9)
    e = ema_update(vanilla, ema_init({"w": jnp.ones(2)}), {"w": jnp.zeros(2)}, jnp.asarray(3))
    np.testing.assert_allclose(e["w"], 0.9)


def test_split_micro_batches_takes_strided_rows():
    x = jnp.arange(8)
    np.testing.assert_array_equal(split_micro_batches({"x": x}, 2)["x"], [[0, 2, 4, 6], [1, 3, 5, 7]])


TINY_LM = TransformerParams(hidden_dim=32, n_layers=2, n_heads=2, vocab_size=50, max_seq_len=32)


def _setup(model_params, hp, *, accum=1, ema=None):
    return single_device_train_step(model_params, hp, 100, ema=ema, accum_steps=accum)


def _batch(seed=0, b=8, s=17, vocab=50):
    ids = np.random.default_rng(seed).integers(0, vocab, size=(b, s)).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "loss_mask": jnp.ones((b, s), bool)}


def test_gradient_accumulation_matches_one_big_batch():
    hp = HyperParams(precision="fp32", lr=1e-2, warmup="0", grad_clip_norm=1.0)
    _, s1, step1 = _setup(TINY_LM, hp)
    _, s2, step2 = _setup(TINY_LM, hp, accum=4)
    for i in range(2):
        s1, m1 = step1(s1, _batch(i))
        s2, m2 = step2(s2, _batch(i))
        assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), abs=1e-5)
        assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-5)
    # Adam's first steps move every weight by ~lr * sign(g): float noise on near-zero gradients can flip a
    # sign, so weights agree to a fraction of lr rather than to float precision.
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"]), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3)


def test_train_step_lowers_loss_and_tracks_ema():
    hp = HyperParams(precision="fp32", lr=1e-2, warmup="0")
    _, state, step = _setup(TINY_LM, hp, ema=EMAParams(enabled=True))
    batch = _batch()
    losses = []
    for _ in range(8):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.5
    assert int(state["step"]) == 8
    ema_leaf, param_leaf = jax.tree.leaves(state["ema"])[0], jax.tree.leaves(state["params"])[0]
    assert not np.allclose(ema_leaf, param_leaf)  # averaged, not copied


def test_frozen_submodel_gets_no_update_and_no_optimizer_state():
    from tests.fixtures.wrapper_model import WrapperParams

    params = WrapperParams(transformer=TINY_LM.replace(freeze=True))
    hp = HyperParams(precision="fp32", lr=1e-2, warmup="0")
    _, state, step = _setup(params, hp)
    frozen_before = jax.tree.map(np.asarray, state["frozen"])
    bias_before = np.asarray(state["params"]["bias"][...])
    for i in range(3):
        state, _ = step(state, _batch(i))
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(state["frozen"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(bias_before, state["params"]["bias"][...])
    n_frozen = sum(x.size for x in jax.tree.leaves(state["frozen"]))
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    n_train = sum(x.size for x in jax.tree.leaves(state["params"]))
    assert n_frozen > 0 and n_opt <= 2 * n_train + 8  # moments for the bias only (+ counters)
    assert "transformer" not in state["params"]


def test_bfloat16_compute_keeps_float32_params():
    hp = HyperParams(precision="amp_bfloat16", lr=1e-2, warmup="0")
    _, state, step = _setup(TINY_LM, hp)
    state, m = step(state, _batch())
    assert np.isfinite(float(m["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))


def test_train_result_model_casts_the_ema_to_bf16_params():
    """``TrainResult.model(use_ema=True)`` of a ``pure_bf16`` run: bfloat16 parameters holding the float32 EMA
    rounded to bfloat16 (the one EMA selection, ``training.ema.select_ema``)."""
    from vla_foundry_jax import checkpoint as ckpt_lib
    from vla_foundry_jax.training.loop import TrainResult

    hp = HyperParams(precision="pure_bf16", lr=1e-2, warmup="0")
    spec, state, step = _setup(TINY_LM, hp, ema=EMAParams(enabled=True))
    for i in range(3):
        state, _ = step(state, _batch(i))
    result = TrainResult({}, state, spec, None)
    ema = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(state["ema"]).items()}
    raw = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(state["params"]).items()}
    assert all(v.dtype == np.float32 for v in ema.values()) and all(v.dtype == jnp.bfloat16 for v in raw.values())
    got = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(nnx.state(result.model(use_ema=True), nnx.Param)).items()}
    assert got.keys() == ema.keys()
    for k, v in got.items():
        assert v.dtype == jnp.bfloat16, k
        np.testing.assert_array_equal(v, ema[k].astype(jnp.bfloat16), err_msg=k)
    assert any(not np.array_equal(got[k], raw[k]) for k in got)  # the EMA, not the live weights
    live = ckpt_lib.flat_params(nnx.state(result.model(use_ema=False), nnx.Param))
    for k, v in live.items():
        np.testing.assert_array_equal(np.asarray(v), raw[k], err_msg=k)


def test_unknown_model_type_and_builder_errors():
    from vla_foundry_jax.models import build_model
    from vla_foundry_jax.registry import NotBuiltYetError, UnknownTypeError, params_class

    with pytest.raises(UnknownTypeError, match="Did you mean 'transformer'"):
        params_class("transfomer", family="model")
    with pytest.raises(NotBuiltYetError, match="no model builder"):
        from vla_foundry_jax.params import UNetParams

        build_model(UNetParams(channels=[8]), rngs=nnx.Rngs(0))
