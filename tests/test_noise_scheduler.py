"""Noise schedulers (reference §3.8.2): diffusers parity, hand-derived tables, flow matching, sampling loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_foundry_jax.models.noise_scheduler import make_scheduler
from vla_foundry_jax.params import ParamsError
from vla_foundry_jax.params.model_params import DiffusionPolicyParams, NoiseSchedulerParams


def _sched(kind: str, **kw):
    return make_scheduler(
        NoiseSchedulerParams(**kw),
        use_diffusers_scheduler=kind == "diffusers",
        use_flow_matching_scheduler=kind == "flow",
    )


# ------------------------------------------------------------------ diffusers parity
@pytest.fixture(scope="module")
def torch_ddpm():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    # exactly what the original passes (beta_start/beta_end are not passed: diffusers' defaults)
    return torch, diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=True, clip_sample_range=1.5)


def test_diffusers_tables_and_ignored_betas(torch_ddpm):
    _, ref = torch_ddpm
    # the original ignores beta_start/beta_end with the diffusers scheduler (quirk kept)
    s = _sched("diffusers", beta_start=0.001, beta_end=0.05)
    np.testing.assert_allclose(s.betas, ref.betas.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(s.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=0)


def test_diffusers_add_noise_parity(torch_ddpm):
    torch, ref = torch_ddpm
    s = _sched("diffusers")
    rs = np.random.default_rng(0)
    x0 = rs.uniform(-1, 1, (6, 3, 4, 4)).astype(np.float32)
    eps = rs.standard_normal((6, 3, 4, 4)).astype(np.float32)
    t = np.array([0, 1, 10, 500, 998, 999])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).clamp(-1.5, 1.5)
    got = jax.jit(s.add_noise)(x0, eps, t)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [0, 1, 2, 37, 500, 999])
@pytest.mark.parametrize("scale", [1.0, 4.0])  # 4.0 drives x0_hat outside ±1.5: exercises clip_sample
def test_diffusers_step_parity(torch_ddpm, t, scale):
    torch, ref = torch_ddpm
    s = _sched("diffusers")
    rs = np.random.default_rng(t)
    x = rs.uniform(-1.5, 1.5, (2, 3, 5, 5)).astype(np.float32)
    eps_hat = (scale * rs.standard_normal((2, 3, 5, 5))).astype(np.float32)
    gen = torch.Generator().manual_seed(1234 + t)
    want = ref.step(torch.from_numpy(eps_hat), t, torch.from_numpy(x), generator=gen).prev_sample.clamp(-1.5, 1.5)
    # diffusers draws randn(shape, generator) on the CPU: replay the same draw
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1234 + t), dtype=torch.float32).numpy()
    got = jax.jit(lambda e, tt, xx, zz: s.step(e, tt, xx, noise=zz))(eps_hat, t, x, z)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5, rtol=0)


def test_asymmetric_clamp_with_diffusers_is_an_error():
    with pytest.raises(ParamsError, match=r"Asymmetric clamp range with the diffusers scheduler.*clamp_range"):
        _sched("diffusers", clamp_range=(-1.0, 2.0))
    # fine for the other kinds, and with no clamp
    _sched("ddpm", clamp_range=(-1.0, 2.0))
    _sched("flow", clamp_range=(-1.0, 2.0))
    _sched("diffusers", clamp_range=None)


# ------------------------------------------------------------------ own DDPM, by hand
def test_own_ddpm_tables_by_hand():
    s = _sched("ddpm", num_timesteps=4, beta_start=0.1, beta_end=0.4)
    beta = [0.1, 0.2, 0.3, 0.4]
    abar = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7, 0.9 * 0.8 * 0.7 * 0.6]
    abar_prev = [1.0, 0.9, 0.72, 0.504]
    post_var = [beta[i] * (1 - abar_prev[i]) / (1 - abar[i]) for i in range(4)]
    np.testing.assert_allclose(s.betas, beta, rtol=1e-6)
    np.testing.assert_allclose(s.alphas, [0.9, 0.8, 0.7, 0.6], rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod, [0.9, 0.72, 0.504, 0.3024], rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod_prev, abar_prev, rtol=1e-6)
    np.testing.assert_allclose(s.posterior_variance, post_var, rtol=1e-6)
    assert post_var[0] == 0.0


def test_own_ddpm_add_noise_and_step_by_hand():
    s = _sched("ddpm", num_timesteps=4, beta_start=0.1, beta_end=0.4, clamp_range=(-10.0, 10.0))
    x0 = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
    eps = np.array([[1.0, 0.5], [-0.5, 2.0]], np.float32)
    t = np.array([1, 3])
    abar = np.array([0.72, 0.3024])[:, None]
    want = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    np.testing.assert_allclose(s.add_noise(x0, eps, t), want, rtol=1e-6)
    # mask [B, 1] broadcast by appending singleton dims; masked-out rows stay clean
    mask = np.array([[1.0], [0.0]], np.float32)
    got = s.add_noise(x0[:, None], eps[:, None], t, mask=mask)[:, 0]
    np.testing.assert_allclose(got, np.stack([want[0], x0[1]]), rtol=1e-6)
    # the clamp applies to training inputs too
    tight = _sched("ddpm", num_timesteps=4, beta_start=0.1, beta_end=0.4, clamp_range=(-0.3, 0.2))
    np.testing.assert_allclose(tight.add_noise(x0, eps, t), np.clip(want, -0.3, 0.2), rtol=1e-6)
    assert s.training_target(x0, eps) is eps

    # step at t = 2, with explicit noise z
    x_t = np.array([0.3, -0.7], np.float32)
    e = np.array([0.2, 0.9], np.float32)
    z = np.array([1.5, -0.5], np.float32)
    ab, abp, b, a = 0.504, 0.72, 0.3, 0.7
    x0_hat = (x_t - np.sqrt(1 - ab) * e) / np.sqrt(ab)
    mu = np.sqrt(abp) * b / (1 - ab) * x0_hat + np.sqrt(a) * (1 - abp) / (1 - ab) * x_t
    pv = b * (1 - abp) / (1 - ab)
    np.testing.assert_allclose(s.step(e, 2, x_t, noise=z), mu + np.sqrt(pv) * z, rtol=1e-5)
    # t = 0: no noise, and the posterior mean is x0_hat itself
    x0_hat0 = (x_t - np.sqrt(0.1) * e) / np.sqrt(0.9)
    np.testing.assert_allclose(s.step(e, 0, x_t, noise=z), x0_hat0, rtol=1e-5)
    # no x0 clipping in the own DDPM, only the final clamp
    np.testing.assert_allclose(tight.step(e, 0, x_t, noise=z), np.clip(x0_hat0, -0.3, 0.2), rtol=1e-5)
    with pytest.raises(ValueError, match="rng"):
        s.step(e, 2, x_t)
    with pytest.raises(ValueError, match="step_size"):
        s.step(e, 2, x_t, noise=z, step_size=2)


# ------------------------------------------------------------------ flow matching, by hand
def test_flow_matching_by_hand():
    s = _sched("flow", num_timesteps=10, clamp_range=(-1.5, 1.5))
    assert s.betas is None and jax.tree.leaves(s) == []
    x0 = np.array([[0.5, -1.0, 1.0], [0.2, 0.4, -0.6]], np.float32)
    eps = np.array([[1.0, 0.5, 2.0], [-0.5, 1.0, 0.0]], np.float32)
    t = np.array([3, 7])
    sv = np.array([0.3, 0.7])[:, None]
    want = np.clip((1 - sv) * x0 + sv * eps, -1.5, 1.5)
    np.testing.assert_allclose(s.add_noise(x0, eps, t), want, rtol=1e-6)
    mask = np.array([[1, 0, 1], [0, 1, 1]], bool)
    np.testing.assert_allclose(s.add_noise(x0, eps, t, mask=mask), np.where(mask, want, x0), rtol=1e-6)
    np.testing.assert_allclose(s.training_target(x0, eps), eps - x0)
    v = np.array([[10.0, -2.0, 1.0]], np.float32)
    x = np.array([[0.0, 1.0, -1.4]], np.float32)
    # Euler step x - v * step_size / T, then the clamp; t is ignored
    np.testing.assert_allclose(s.step(v, 5, x), np.clip(x - v / 10, -1.5, 1.5), rtol=1e-6)
    np.testing.assert_allclose(s.step(v, 0, x, step_size=3), np.clip(x - 3 * v / 10, -1.5, 1.5), rtol=1e-6)


def test_timesteps():
    flow = _sched("flow")  # T = 1000
    np.testing.assert_array_equal(flow.timesteps(10), np.arange(999, 0, -100))  # 999 .. 99, as the original
    np.testing.assert_array_equal(flow.timesteps(8), np.arange(999, 0, -125))  # 999 .. 124, as the original
    # stable-diffusion loop: the original skips t = 0; here every step runs
    np.testing.assert_array_equal(flow.timesteps(None), np.arange(999, -1, -1))
    ddpm = _sched("ddpm")
    assert len(ddpm.timesteps()) == 1000
    with pytest.raises(ValueError, match="strided"):
        ddpm.timesteps(10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        flow.timesteps(1001)


# ------------------------------------------------------------------ full sampling loops
@pytest.mark.parametrize("kind", ["ddpm", "diffusers"])
def test_ddpm_sample_recovers_x0(kind):
    s = _sched(kind, num_timesteps=50, beta_start=0.0001, beta_end=0.02)
    x0 = jax.random.uniform(jax.random.key(1), (2, 3, 4), minval=-1.0, maxval=1.0)

    def exact_eps(x, t):  # the true epsilon of x for this x0
        abar = jnp.asarray(s.alphas_cumprod)[t]
        return (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)

    out = jax.jit(lambda key: s.sample(exact_eps, x0.shape, key))(jax.random.key(0))
    # the own DDPM's last step scales x0_hat by beta_0 / (1 - abar_0), 1 only up to float32 cancellation in
    # 1 - abar_0 (~1e-4 relative, as in the original); diffusers' formulation gives exactly 1
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-5, rtol=5e-4 if kind == "ddpm" else 1e-5)


@pytest.mark.parametrize("n", [None, 10, 7])
def test_flow_sample_recovers_x0_and_compiles_once(n):
    s = _sched("flow", num_timesteps=100, clamp_range=(-1.5, 1.5))
    x0 = jax.random.uniform(jax.random.key(1), (2, 5, 3), minval=-1.0, maxval=1.0)
    traces = []

    def exact_v(x, t):
        # after i steps of k/T from eps (time 1), x sits at time 1 - i k / T = (t + 1) / T on the path x0 -> eps
        traces.append(1)
        return (x - x0) * s.num_timesteps / (t + 1).astype(x.dtype)

    f = jax.jit(lambda key: s.sample(exact_v, x0.shape, key, n))
    out1 = f(jax.random.key(0))
    out2 = f(jax.random.key(5))
    k = s.inference_step_size(n)
    if len(s.timesteps(n)) * k == s.num_timesteps:  # the schedule spans the whole [0, 1] time
        np.testing.assert_allclose(np.asarray(out1), np.asarray(x0), atol=1e-5)
        np.testing.assert_allclose(np.asarray(out2), np.asarray(x0), atol=1e-5)
    else:  # n = 7: the original's range gives 8 steps of 14/100 (99, 85, ..., 1), overshooting past x0
        assert len(s.timesteps(n)) == 8
    assert len(traces) == 1  # one trace (fori_loop body traced once), one compilation for both keys


def test_sample_with_clamp_and_after_step():
    s = _sched("flow", num_timesteps=20, clamp_range=(-0.5, 0.5))
    x0 = jnp.full((1, 4, 2), 0.9)  # outside the clamp range: the sample ends clamped
    keep = jnp.array([1.0, 0.0, 0.0, 1.0])[None, :, None]

    def exact_v(x, t):
        return (x - x0) * 20 / (t + 1).astype(x.dtype)

    out = s.sample(exact_v, x0.shape, jax.random.key(0), after_step=lambda x: x * (1 - keep) + 0.25 * keep)
    want = jnp.where(keep > 0, 0.25, 0.5) * jnp.ones_like(x0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)


def test_selection_from_model_params():
    from vla_foundry_jax.models.noise_scheduler import make_scheduler_from

    assert make_scheduler_from(DiffusionPolicyParams()).kind == "ddpm"
    assert make_scheduler_from(DiffusionPolicyParams(use_flow_matching_scheduler=True)).kind == "flow_matching"
    both = DiffusionPolicyParams(use_flow_matching_scheduler=True, use_diffusers_scheduler=True)
    assert make_scheduler_from(both).kind == "ddpm_diffusers"
