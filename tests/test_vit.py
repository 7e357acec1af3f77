"""The ``vit`` model, ``pixel_shuffle``, ``vit.pretrained`` loading and the ViT gin presets.

Parity is against a NumPy (float64) re-implementation of the original's forward (reference §3.4), written here
from the original's state-dict layout (channels-first conv weights, ``[out, in]`` linears, per-layer names).
"""

from __future__ import annotations

import functools
import json
import math
import os
import types

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors.numpy import save_file

from vla_foundry_jax.checkpoint import flat_params
from vla_foundry_jax.convert import vit_weights
from vla_foundry_jax.convert.vit_weights import (
    WeightLoadError,
    export_original_state_dict,
    load_vit_weights,
    torch_interpolate,
)
from vla_foundry_jax.layers.pixel_shuffle import pixel_shuffle
from vla_foundry_jax.models import build_model
from vla_foundry_jax.models.vit import ViT
from vla_foundry_jax.params import TrainExperimentParams, TransformerParams, VLMParams
from vla_foundry_jax.params.model_params import ViTBackboneParams, ViTParams
from vla_foundry_jax.registry import model_record

IMG, PATCH, H, NH, F_, L = 16, 4, 16, 2, 32, 2
BASE = {"img_size": IMG, "patch_size": PATCH, "hidden_dim": H, "n_heads": NH, "inter_dim": F_, "n_layers": L}


def vit_params(**overrides) -> ViTParams:
    return ViTParams(**{**BASE, **overrides})


@functools.partial(nnx.jit, static_argnames=("deterministic",))
def fwd(model, x, key=None, *, deterministic=None):
    return model(x, deterministic=deterministic, rngs=key)


def randomize(model: nnx.Module, seed: int) -> None:
    """Replace every parameter by random values (so that biases and norms matter in the parity tests)."""
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(state)
    new = [jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def random_original_state_dict(p: ViTParams, seed: int, grid: int | None = None) -> dict[str, np.ndarray]:
    """A random state dict in the original's names and layouts (float32)."""
    rng = np.random.default_rng(seed)
    g = grid or p.img_size // p.patch_size
    Hd, Fd, P = p.hidden_dim, p.inter_dim, p.patch_size
    r = lambda *s: (0.3 * rng.normal(size=s)).astype(np.float32)  # noqa: E731
    sd = {
        "patch_embedding.conv.weight": r(Hd, 3, P, P),
        "patch_embedding.conv.bias": r(Hd),
        "patch_embedding.position_embedding": r(1, g * g + int(p.cls_flag), Hd),
        "layer_norm.weight": 1 + r(Hd),
        "layer_norm.bias": r(Hd),
    }
    if p.cls_flag:
        sd["patch_embedding.cls_token"] = r(1, 1, Hd)
    for i in range(p.n_layers):
        b = f"blocks.{i}."
        sd |= {
            b + "ln1.weight": 1 + r(Hd),
            b + "ln1.bias": r(Hd),
            b + "attn.qkv_proj.weight": r(3 * Hd, Hd),
            b + "attn.qkv_proj.bias": r(3 * Hd),
            b + "attn.out_proj.weight": r(Hd, Hd),
            b + "attn.out_proj.bias": r(Hd),
            b + "ln2.weight": 1 + r(Hd),
            b + "ln2.bias": r(Hd),
            b + "mlp.fc1.weight": r(Fd, Hd),
            b + "mlp.fc1.bias": r(Fd),
            b + "mlp.fc2.weight": r(Hd, Fd),
            b + "mlp.fc2.bias": r(Hd),
        }
    return sd


# ------------------------------------------------------------------------------------------- NumPy reference
def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_vit(sd: dict[str, np.ndarray], images: np.ndarray, p: ViTParams) -> np.ndarray:
    """The original's ViT forward (eval mode) on channels-last images, in float64."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    lead = images.shape[:-3]
    x = np.asarray(images, np.float64).reshape(-1, *images.shape[-3:]).transpose(0, 3, 1, 2)  # NCHW
    B, C, h, _ = x.shape
    P, g = p.patch_size, h // p.patch_size
    conv = np.einsum("ocij,bcyixj->boyx", sd["patch_embedding.conv.weight"], x.reshape(B, C, g, P, g, P))
    conv = conv + sd["patch_embedding.conv.bias"][None, :, None, None]
    t = conv.reshape(B, -1, g * g).transpose(0, 2, 1)
    if p.cls_flag:
        t = np.concatenate([np.broadcast_to(sd["patch_embedding.cls_token"], (B, 1, t.shape[-1])), t], axis=1)
    t = t + sd["patch_embedding.position_embedding"]
    hd = p.hidden_dim // p.n_heads
    for i in range(p.n_layers):
        b = f"blocks.{i}."
        y = _ln(t, sd[b + "ln1.weight"], sd[b + "ln1.bias"], p.ln_eps)
        qkv = y @ sd[b + "attn.qkv_proj.weight"].T + sd[b + "attn.qkv_proj.bias"]
        q, k, v = (a.reshape(B, -1, p.n_heads, hd).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, axis=-1))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = a.transpose(0, 2, 1, 3).reshape(B, -1, p.hidden_dim)
        t = t + a @ sd[b + "attn.out_proj.weight"].T + sd[b + "attn.out_proj.bias"]
        y = _ln(t, sd[b + "ln2.weight"], sd[b + "ln2.bias"], p.ln_eps)
        y = _gelu_tanh(y @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        t = t + y @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    out = _ln(t[:, 0] if p.cls_flag else t, sd["layer_norm.weight"], sd["layer_norm.bias"], p.ln_eps)
    return out.reshape(*lead, *out.shape[1:])


def _images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, size=shape), jnp.float32)


# ------------------------------------------------------------------------------------------- model
def test_build_init_and_layout():
    for key in ("vit", "vit_backbone"):
        cls = ViTParams if key == "vit" else ViTBackboneParams
        model = build_model(cls(**{**BASE, "cls_flag": True, "hidden_dim": 64, "n_heads": 4}), rngs=nnx.Rngs(0))
        assert isinstance(model, ViT)
    flat = flat_params(nnx.state(model, nnx.Param))
    pos = np.asarray(flat["patch_embedding.position_embedding"])
    assert pos.shape == (17, 64) and pos.min() >= 0 and pos.max() < 1 and pos.std() > 0.2  # U[0, 1)
    assert not np.any(np.asarray(flat["patch_embedding.cls_token"]))
    qkv = np.asarray(flat["blocks.attn.qkv_proj.kernel"])
    assert qkv.shape == (L, 64, 192) and abs(qkv.std() - 0.02) < 0.002
    assert abs(np.asarray(flat["patch_embedding.conv.kernel"]).std() - 0.02) < 0.003
    assert not np.any(np.asarray(flat["blocks.mlp.fc1.bias"]))
    assert np.all(np.asarray(flat["blocks.ln1.weight"]) == 1)
    names = {n: v.out_sharding for n, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    names = {".".join(map(str, k)): v for k, v in names.items()}
    assert names["patch_embedding.conv.kernel"] == ("patch", "embed")
    assert names["patch_embedding.position_embedding"] == ("pos", "embed")
    assert names["blocks.attn.qkv_proj.kernel"] == ("layers", "embed", "qkv")
    assert names["blocks.attn.out_proj.kernel"] == ("layers", "heads", "embed")
    assert names["blocks.mlp.fc2.kernel"] == ("layers", "mlp", "embed")
    assert names["blocks.ln2.bias"] == ("layers", "norm")


@pytest.mark.parametrize("cls_flag", [False, True])
def test_parity_with_original_forward(cls_flag):
    """Our params exported to the original's names == the original's forward (4-D and 5-D input)."""
    p = vit_params(cls_flag=cls_flag)
    model = ViT(p, rngs=nnx.Rngs(1))
    randomize(model, 2)
    sd = export_original_state_dict(nnx.state(model, nnx.Param), L)
    assert sd["patch_embedding.conv.weight"].shape == (H, 3, PATCH, PATCH)
    assert sd["blocks.1.attn.qkv_proj.weight"].shape == (3 * H, H)
    x5 = _images((2, 3, IMG, IMG, 3))
    out5 = np.asarray(fwd(model, x5))
    n_p = (IMG // PATCH) ** 2
    assert out5.shape == ((2, 3, H) if cls_flag else (2, 3, n_p, H))
    np.testing.assert_allclose(out5, reference_vit(sd, np.asarray(x5), p), atol=1e-5, rtol=1e-5)
    out4 = np.asarray(fwd(model, x5[:, 0]))
    assert out4.shape == ((2, H) if cls_flag else (2, n_p, H))
    np.testing.assert_allclose(out4, out5[:, 0], atol=1e-6)


def test_fused_attention_branch_matches(monkeypatch):
    """Off CPU the model calls jax.nn.dot_product_attention; the same numbers as the CPU head-major path."""
    p = vit_params()
    model = ViT(p, rngs=nnx.Rngs(1))
    randomize(model, 2)
    x = _images((2, IMG, IMG, 3))
    cpu = np.asarray(jax.jit(lambda s, x: nnx.merge(*s)(x))(nnx.split(model), x))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    fused = np.asarray(jax.jit(lambda s, x: nnx.merge(*s)(x))(nnx.split(model), x))
    np.testing.assert_allclose(fused, cpu, atol=1e-5)


def test_safetensors_load_matches_original(tmp_path):
    """A random original-format state dict, loaded through vit.pretrained, computes the original's forward."""
    p = vit_params(cls_flag=True)
    sd = random_original_state_dict(p, 3)
    path = str(tmp_path / "vit.safetensors")
    save_file({"module." + k: v for k, v in sd.items()}, path)  # a DDP-wrapped state dict
    model = ViT(p, rngs=nnx.Rngs(0))
    states = list(load_vit_weights(p.replace(pretrained=path), [nnx.state(model, nnx.Param)], ""))
    nnx.update(model, states[0])
    x = _images((2, IMG, IMG, 3), 1)
    np.testing.assert_allclose(np.asarray(fwd(model, x)), reference_vit(sd, np.asarray(x), p), atol=1e-5, rtol=1e-5)


def test_image_errors():
    model = ViT(vit_params(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"vit.img_size = 16 but the images are 32x32"):
        model(jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="channels-first"):
        model(jnp.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match="3 channels"):
        model(jnp.zeros((1, 16, 16, 4)))
    with pytest.raises(ValueError, match="channels-last"):
        model(jnp.zeros((16, 16, 3)))


def test_dropout_only_when_not_deterministic():
    model = ViT(vit_params(dropout=0.3), rngs=nnx.Rngs(0))
    x = _images((2, IMG, IMG, 3))
    key = jax.random.key(5)
    y_eval = fwd(model, x)
    np.testing.assert_array_equal(fwd(model, x, key, deterministic=True), y_eval)

    @nnx.jit
    def train_step(model, key):  # training through dropout: loss, outputs and gradients
        def loss(m):
            y = m(x, deterministic=False, rngs=key)
            return jnp.mean(y**2), y

        return nnx.value_and_grad(loss, has_aux=True)(model)

    (_, y_train), grads = train_step(model, key)
    assert not np.allclose(y_train, y_eval)
    assert float(jnp.abs(grads.blocks.attn.qkv_proj.kernel[...]).sum()) > 0
    np.testing.assert_array_equal(train_step(model, key)[0][1], y_train)  # same key, same masks
    assert not np.allclose(train_step(model, jax.random.key(6))[0][1], y_train)
    with pytest.raises(ValueError, match="no random key"):
        fwd(model, x, deterministic=False)
    model.train()  # NNX mode switch: deterministic=None now means dropout on
    assert model.deterministic is False
    with pytest.raises(ValueError, match="no random key"):
        jax.eval_shape(lambda x: model(x), x)
    model.eval()
    assert model.deterministic is True
    # dropout = 0: no key needed; same init as `model`, so the same outputs
    plain = ViT(vit_params(), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(fwd(plain, x, deterministic=False), y_eval)


def test_attention_backward_matches_autodiff():
    from vla_foundry_jax.layers.attention import head_major_attention

    rng = np.random.default_rng(0)
    q, k, v, d_out = (jnp.asarray(rng.normal(size=(2, 3, 9, 4)), jnp.float32) for _ in range(4))
    plain = lambda q, k, v: jnp.matmul(jax.nn.softmax(q @ k.swapaxes(-1, -2), axis=-1), v)  # noqa: E731
    out, vjp = jax.vjp(head_major_attention, q, k, v)
    want, want_vjp = jax.vjp(plain, q, k, v)
    np.testing.assert_allclose(out, want, atol=1e-6)
    for got, ref in zip(vjp(d_out), want_vjp(d_out), strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_scanned_hlo_does_not_grow_with_depth():
    x = jnp.zeros((1, IMG, IMG, 3))

    def hlo_size(n_layers, remat=None):
        gd, st = nnx.split(ViT(vit_params(n_layers=n_layers), rngs=nnx.Rngs(0), remat_policy=remat))
        return len(jax.jit(lambda s, x: nnx.merge(gd, s)(x)).lower(st, x).as_text())

    # above stack.CPU_UNROLL_MAX_LAYERS the blocks stay one scanned loop
    assert hlo_size(8) < 1.05 * hlo_size(5)
    gd, st = nnx.split(ViT(vit_params(), rngs=nnx.Rngs(0), remat_policy="dots_saveable"))
    loss = jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(gd, s)(x) ** 2)))
    assert float(jnp.abs(loss(st)["blocks"]["mlp"]["fc1"]["kernel"][...]).sum()) > 0


def test_cpu_unrolled_blocks_match_the_scan(monkeypatch):
    from vla_foundry_jax.layers import stack

    gd, st = nnx.split(ViT(vit_params(), rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, IMG, IMG, 3)), jnp.float32)

    def loss(s):
        return jnp.sum(nnx.merge(gd, s)(x) ** 2)

    def run():
        lowered = jax.jit(jax.value_and_grad(loss)).lower(st)
        return "while" in lowered.as_text(), lowered.compile()(st)

    looped, (val, grads) = run()  # 2 blocks <= CPU_UNROLL_MAX_LAYERS: unrolled
    monkeypatch.setattr(stack, "CPU_UNROLL_MAX_LAYERS", 0)
    scan_looped, (want_val, want_grads) = run()
    assert (looped, scan_looped) == (False, True)
    np.testing.assert_allclose(val, want_val, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- pixel shuffle
def _shuffle_loops(x: np.ndarray, s: int) -> np.ndarray:
    B, n, C = x.shape
    r = math.isqrt(n)
    g = r // s
    out = np.zeros((B, g * g, s * s * C), x.dtype)
    for b in range(B):
        for bi in range(g):
            for bj in range(g):
                for di in range(s):
                    for dj in range(s):
                        for c in range(C):
                            out[b, bi * g + bj, (di * s + dj) * C + c] = x[b, (bi * s + di) * r + (bj * s + dj), c]
    return out


def test_pixel_shuffle():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 36, 3)).astype(np.float32)
    for s in (1, 2, 3, 6):
        np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x), s)), _shuffle_loops(x, s))
    x4 = rng.normal(size=(2, 3, 16, 5)).astype(np.float32)
    out = np.asarray(pixel_shuffle(jnp.asarray(x4), 2))
    assert out.shape == (2, 12, 20)
    np.testing.assert_array_equal(out, np.concatenate([_shuffle_loops(x4[:, c], 2) for c in range(3)], axis=1))
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x4), 1)), x4.reshape(2, 48, 5))
    odd = jnp.zeros((1, 17, 4))
    assert pixel_shuffle(odd, 1) is odd  # s = 1 on 3-D input: no-op (CLS tokens allowed)
    with pytest.raises(ValueError, match="square token grid"):
        pixel_shuffle(odd, 2)
    with pytest.raises(ValueError, match="not divisible by the factor 4"):
        pixel_shuffle(jnp.zeros((1, 36, 4)), 4)


# ------------------------------------------------------------------------------------------- pretrained
def test_torch_interpolate_matches_torch():
    rng = np.random.default_rng(0)
    for mode in ("bicubic", "bilinear", "nearest"):
        for a, b in ((4, 7), (7, 4), (16, 24), (24, 16), (14, 32), (1, 3), (5, 10)):
            x = rng.normal(size=(2, 3, a, a)).astype(np.float32)
            kw = {} if mode == "nearest" else {"align_corners": False}
            ref = F.interpolate(torch.from_numpy(x), size=(b, b), mode=mode, **kw).numpy()
            np.testing.assert_allclose(torch_interpolate(x, (b, b), mode), ref, atol=1e-5, err_msg=f"{mode} {a}->{b}")
    with pytest.raises(WeightLoadError, match="interpolation_mode"):
        torch_interpolate(x, (3, 3), "area")


class _Holder(nnx.Module):
    """A parent model with the ViT at ``vit.`` and one unrelated parameter."""

    def __init__(self, p: ViTParams, seed: int):
        self.vit = ViT(p, rngs=nnx.Rngs(seed))
        self.other = nnx.Param(jnp.ones((3,)))


def _load_into_holder(p: ViTParams, seed: int = 0) -> _Holder:
    holder = _Holder(p, seed)
    spec = types.SimpleNamespace(params=VLMParams(vit=p, transformer=TransformerParams(hidden_dim=16, n_heads=2)))
    from vla_foundry_jax.models import load_weights

    (state,) = load_weights(spec.params, [nnx.state(holder, nnx.Param)])  # dispatches to the vit weight loader
    nnx.update(holder, state)
    return holder


@pytest.mark.parametrize("mode", ["bicubic", "nearest"])
def test_safetensors_resizes_position_embedding(tmp_path, mode):
    """Weights made at img 16 (grid 4) loaded into img 24 (grid 6) under a parent's ``vit.`` prefix."""
    assert (
        model_record("vit").weight_loader is load_vit_weights
        and model_record("vit_backbone").weight_loader is load_vit_weights
    )
    src = vit_params(cls_flag=True)
    sd = random_original_state_dict(src, 4)
    path = str(tmp_path / "w.safetensors")
    save_file(sd, path)
    p = src.replace(img_size=24, pretrained=path, interpolation_mode=mode)
    holder = _load_into_holder(p)
    pos = np.asarray(holder.vit.patch_embedding.position_embedding[...])
    stored = sd["patch_embedding.position_embedding"][0]
    np.testing.assert_array_equal(pos[0], stored[0])  # CLS row untouched
    grid = torch.from_numpy(np.array(stored[1:].reshape(4, 4, H).transpose(2, 0, 1)))[None]
    kw = {} if mode == "nearest" else {"align_corners": False}
    want = F.interpolate(grid, size=(6, 6), mode=mode, **kw)[0].numpy().transpose(1, 2, 0).reshape(36, H)
    np.testing.assert_allclose(pos[1:], want, atol=1e-5)
    fc1 = np.asarray(holder.vit.blocks.mlp.fc1.kernel[...])
    np.testing.assert_array_equal(fc1[1], sd["blocks.1.mlp.fc1.weight"].T)
    np.testing.assert_array_equal(np.asarray(holder.other[...]), np.ones(3))
    # the model now runs the original's forward with the resized table
    sd_resized = dict(sd, **{"patch_embedding.position_embedding": pos[None]})
    x = _images((1, 24, 24, 3), 2)
    np.testing.assert_allclose(
        np.asarray(fwd(holder.vit, x)), reference_vit(sd_resized, np.asarray(x), p), atol=1e-5, rtol=1e-5
    )


def test_safetensors_strict_errors(tmp_path):
    p = vit_params()
    sd = random_original_state_dict(p, 5)
    model = ViT(p, rngs=nnx.Rngs(0))
    states = [nnx.state(model, nnx.Param)]

    def load(tensors):
        path = str(tmp_path / "bad.safetensors")
        save_file(tensors, path)
        return load_vit_weights(p.replace(pretrained=path), states, "")

    bad = dict(sd)
    del bad["blocks.1.ln2.bias"]
    bad["blocks.2.ln2.bias"] = sd["blocks.1.ln2.bias"]
    bad["blocks.0.mlp.fc1.weight"] = np.zeros((F_ + 1, H), np.float32)
    with pytest.raises(WeightLoadError) as e:
        load(bad)
    msg = str(e.value)
    assert "missing from the file (1): blocks.1.ln2.bias" in msg
    assert "in the file but not used by the model (1): blocks.2.ln2.bias" in msg
    assert "blocks.0.mlp.fc1.weight: file (33, 16) vs model (32, 16)" in msg
    good = str(tmp_path / "good.safetensors")
    save_file(sd, good)
    cls_p = p.replace(pretrained=good, cls_flag=True)
    cls_states = [nnx.state(nnx.eval_shape(lambda: ViT(cls_p, rngs=nnx.Rngs(0))), nnx.Param)]  # abstract is fine
    with pytest.raises(WeightLoadError, match=r"missing from the file \(1\): patch_embedding.cls_token"):
        load_vit_weights(cls_p, cls_states, "")
    bad = dict(sd, **{"patch_embedding.position_embedding": np.zeros((1, 15, H), np.float32)})
    with pytest.raises(WeightLoadError, match="position_embedding: file"):  # 15 rows: not a grid
        load(bad)
    with pytest.raises(WeightLoadError, match="does not exist"):
        load_vit_weights(p.replace(pretrained=str(tmp_path / "nope")), states, "")
    assert load_vit_weights(p, states, "")[0] is states[0]  # pretrained unset: no-op


def _save_run(run_dir: str, model_params, tensors: dict[str, np.ndarray], step: int = 3) -> None:
    """A minimal run of ours: ``checkpoints/<step>/model`` (flat dotted names) + ``params/metadata``."""
    step_dir = os.path.join(run_dir, "checkpoints", str(step))
    ocp.PyTreeCheckpointer().save(os.path.join(step_dir, "model"), {k: np.asarray(v) for k, v in tensors.items()})
    os.makedirs(os.path.join(step_dir, "params"))
    with open(os.path.join(step_dir, "params", "metadata"), "w") as f:
        json.dump(TrainExperimentParams(model=model_params).to_dict(), f)


def test_pretrained_from_our_runs(tmp_path):
    p = vit_params(cls_flag=True)
    src = ViT(p, rngs=nnx.Rngs(7))
    randomize(src, 8)
    flat = {k: np.asarray(v) for k, v in flat_params(nnx.state(src, nnx.Param)).items()}
    x = _images((2, IMG, IMG, 3), 3)
    want = np.asarray(fwd(src, x))

    # a standalone vit run -> a ViT inside a parent (prefix "vit.")
    _save_run(str(tmp_path / "vit_run"), p, flat)
    holder = _load_into_holder(p.replace(pretrained=str(tmp_path / "vit_run")), seed=1)
    np.testing.assert_allclose(np.asarray(fwd(holder.vit, x)), want, atol=1e-6)

    # a VLM run (its "vit." weights) -> a standalone ViT (prefix "")
    vlm = VLMParams(vit=p, transformer=TransformerParams(hidden_dim=16, n_heads=2))
    _save_run(str(tmp_path / "vlm_run"), vlm, {**{"vit." + k: v for k, v in flat.items()}, "projection.w": np.ones(2)})
    model = ViT(p, rngs=nnx.Rngs(2))
    (state,) = load_vit_weights(p.replace(pretrained=str(tmp_path / "vlm_run")), [nnx.state(model, nnx.Param)], "")
    nnx.update(model, state)
    np.testing.assert_allclose(np.asarray(fwd(model, x)), want, atol=1e-6)

    # a different img_size: the stored position grid is resized (CLS row kept)
    big = p.replace(img_size=20, pretrained=str(tmp_path / "vit_run"), interpolation_mode="bilinear")
    model = ViT(big, rngs=nnx.Rngs(2))
    (state,) = load_vit_weights(big, [nnx.state(model, nnx.Param)], "")
    pos = np.asarray(flat_params(state)["patch_embedding.position_embedding"])
    stored = flat["patch_embedding.position_embedding"]
    np.testing.assert_array_equal(pos[0], stored[0])
    grid = torch.from_numpy(np.array(stored[1:].reshape(4, 4, H).transpose(2, 0, 1)))[None]
    resized = F.interpolate(grid, size=(5, 5), mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(pos[1:], resized.transpose(1, 2, 0).reshape(25, H), atol=1e-5)

    # strict: a run whose ViT has another depth
    model = ViT(p.replace(n_layers=3), rngs=nnx.Rngs(0))
    with pytest.raises(WeightLoadError, match="shape mismatches"):
        load_vit_weights(p.replace(n_layers=3, pretrained=str(tmp_path / "vit_run")), [nnx.state(model)], "")
    # a run without a custom ViT
    _save_run(str(tmp_path / "lm_run"), TransformerParams(hidden_dim=16, n_heads=2), {"norm.weight": np.ones(16)})
    with pytest.raises(WeightLoadError, match="no custom ViT"):
        load_vit_weights(p.replace(pretrained=str(tmp_path / "lm_run")), [nnx.state(model)], "")


def test_export_roundtrip_through_safetensors(tmp_path):
    p = vit_params()
    src = ViT(p, rngs=nnx.Rngs(3))
    randomize(src, 4)
    path = str(tmp_path / "export.safetensors")
    save_file(export_original_state_dict(nnx.state(src, nnx.Param), L), path)
    model = ViT(p, rngs=nnx.Rngs(9))
    (state,) = vit_weights.load_vit_weights(p.replace(pretrained=str(tmp_path)), [nnx.state(model, nnx.Param)], "")
    for name, value in flat_params(nnx.state(src, nnx.Param)).items():
        np.testing.assert_array_equal(np.asarray(flat_params(state)[name]), np.asarray(value), err_msg=name)


# ------------------------------------------------------------------------------------------- gin presets
@pytest.mark.parametrize(
    "name, sizes",
    [
        ("vit_tiny", (224, 14, 64, 256, 4, 4, 1)),
        ("vit_paligemma", (224, 14, 1152, 4304, 16, 27, 1)),
        ("vit_smolvlm2_256m", (512, 16, 768, 3072, 12, 12, 2)),
        ("vit_smolvlm2_256m_224", (224, 16, 768, 3072, 12, 12, 1)),
    ],
)
def test_gin_presets(name, sizes):
    from vla_foundry_jax.gin_utils import parse_gin

    try:
        parse_gin([f"gin_configs/{name}.gin"], [])
        p = ViTParams()
    finally:
        gin.clear_config()
    got = (p.img_size, p.patch_size, p.hidden_dim, p.inter_dim, p.n_heads, p.n_layers, p.projector_pixel_shuffle_factor)
    assert got == sizes
    if name == "vit_tiny":
        model = nnx.eval_shape(lambda: ViT(p, rngs=nnx.Rngs(0)))
        out = jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
        assert out.shape == (2, 256, 64)
