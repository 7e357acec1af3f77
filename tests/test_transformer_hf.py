"""``transformer_hf``: HF decoder families loaded from safetensors, parity with the HF PyTorch models (tests only)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.fixtures.hf_checkpoints import CAUSAL_LM_ARCHS, hf_greedy, load_causal_lm, save_causal_lm  # noqa: E402
from tests.fixtures.multidevice import last_json, run_python  # noqa: E402
from vla_foundry_jax.configs.hf_decoder import UnsupportedArchitectureError  # noqa: E402
from vla_foundry_jax.configs.hf_hub import HFLoadError, resolve_hf_path  # noqa: E402
from vla_foundry_jax.models import build_model  # noqa: E402
from vla_foundry_jax.models.generation import generate  # noqa: E402
from vla_foundry_jax.params import TransformerHFParams  # noqa: E402
from vla_foundry_jax.registry import get_loss  # noqa: E402

TOL = 1e-4


def _ids(shape, seed=0, vocab=160):
    return np.random.default_rng(seed).integers(1, vocab, size=shape).astype(np.int64)


@pytest.mark.parametrize("arch", list(CAUSAL_LM_ARCHS))
def test_parity_logits_hidden_states_padding(tmp_path, arch):
    save_kw = {"max_shard_size": "20KB"} if arch == "qwen2" else {}  # qwen2: sharded index
    path, hf = save_causal_lm(tmp_path, arch, **save_kw)
    if arch == "qwen2":
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    ours = load_causal_lm(path)
    ids = _ids((2, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding on row 1
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    out = jax.jit(lambda m, i, a: m(i, attention_mask=a, output_hidden_states=True))(
        ours, jnp.asarray(ids), jnp.asarray(mask)
    )
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], atol=TOL, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
    for ours_h, ref_h in zip(out.hidden_states, ref.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(ours_h)[valid], ref_h.numpy()[valid], atol=TOL, rtol=0)
    # no mask at all: every position
    with torch.no_grad():
        ref_full = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids)).logits), ref_full, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama_untied_mqa_odd_hd", "gemma2"])
def test_greedy_generation_matches_hf(tmp_path, arch):
    path, hf = save_causal_lm(tmp_path, arch)
    ours = load_causal_lm(path)
    ids = _ids((2, 6), seed=3)
    ref = hf_greedy(hf, input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)))
    got = np.asarray(generate(ours, jnp.asarray(ids), max_new_tokens=20, temperature=0.0))
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("arch", ["llama_untied_mqa_odd_hd", "gemma2"])
def test_left_padded_greedy_generation_matches_hf(tmp_path, arch):
    """Left-padded prompts: positions from the attention mask (``cumsum - 1``), as HF ``generate``."""
    path, hf = save_causal_lm(tmp_path, arch)
    ours = load_causal_lm(path)
    ids = _ids((3, 7), seed=4)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    ref = hf_greedy(hf, input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    got = np.asarray(generate(ours, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=20, temperature=0.0))
    np.testing.assert_array_equal(got, ref)
    # each left-padded row generates what its unpadded prompt alone generates
    alone = np.asarray(generate(ours, jnp.asarray(ids[2:, 5:]), max_new_tokens=20, temperature=0.0))
    np.testing.assert_array_equal(got[2, 7:], alone[0, 2:])


def test_bf16_checkpoint_and_parameter_layout(tmp_path):
    path, hf = save_causal_lm(tmp_path, "llama_tied_gqa", dtype=torch.bfloat16)
    ours = load_causal_lm(path)
    emb = hf.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(ours.embed_tokens[...]), emb)
    q = hf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(ours.layers.self_attn.q_proj.kernel[...][1]), q.T)
    assert ours.layers.self_attn.q_proj.kernel[...].dtype == jnp.float32
    assert ours.lm_head is None and ours.hidden_dim == 32 and ours.num_hidden_layers == 2
    # logical axis names for the sharding rules
    assert ours.layers.self_attn.q_proj.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "qkv")
    assert ours.embed_tokens.get_metadata()["out_sharding"] == ("vocab", "embed")
    assert ours.layers.mlp.down_proj.kernel.get_metadata()["out_sharding"] == ("layers", "mlp", "embed")


def test_errors(tmp_path, monkeypatch):
    # unsupported architecture: names the supported ones
    gpt2 = os.path.join(str(tmp_path), "gpt2")
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(gpt2)
    with pytest.raises(UnsupportedArchitectureError, match=r"gpt2.*llama, qwen2, qwen3, mistral, gemma, gemma2"):
        build_model(TransformerHFParams(hf_pretrained=gpt2), rngs=nnx.Rngs(0))

    # hub id while offline, not cached: says how to point at a local copy
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", os.path.join(str(tmp_path), "empty_cache"))
    with pytest.raises(HFLoadError, match="local-dir"):
        resolve_hf_path("no-such-org/no-such-model")

    # a directory with only a PyTorch .bin: says how to convert
    path, _ = save_causal_lm(tmp_path, "llama_tied_gqa")
    bin_dir = os.path.join(str(tmp_path), "bin_only")
    _fake_bin(path, bin_dir)
    with pytest.raises(HFLoadError, match=r"no \*\.safetensors.*save_pretrained"):
        load_causal_lm(bin_dir)

    # config disagrees with the tensors: shape mismatches listed
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 40
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(HFLoadError, match=r"shape mismatches \(6\).*mlp.gate_proj.weight: checkpoint \(48, 32\)"):
        load_causal_lm(path)

    # untied config but no lm_head tensor: missing listed; extra tensor: unexpected listed
    cfg["intermediate_size"] = 48
    cfg["tie_word_embeddings"] = False
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(HFLoadError, match=r"missing from the checkpoint \(1\): lm_head.weight"):
        load_causal_lm(path)


def _fake_bin(src: str, dst: str) -> None:
    """``dst``: ``src``'s JSON files plus a (dummy) ``pytorch_model.bin`` and no safetensors."""
    os.makedirs(dst)
    for f in os.listdir(src):
        if f.endswith(".json"):
            with open(os.path.join(src, f)) as a, open(os.path.join(dst, f), "w") as b:
                b.write(a.read())
    with open(os.path.join(dst, "pytorch_model.bin"), "wb") as b:
        b.write(b"\0")


def test_train_loop_two_steps(tmp_path):
    from tests.fixtures.runs import tiny_experiment
    from vla_foundry_jax.training.loop import train

    path, hf = save_causal_lm(tmp_path, "llama_tied_gqa")
    assert get_loss("transformer_hf") is get_loss("transformer")
    exp = tiny_experiment(os.path.join(str(tmp_path), "run"), steps=2, batch=2, seq_len=8)
    exp = exp.replace(model=TransformerHFParams(hf_pretrained=path), num_checkpoints=1)
    result = train(exp)
    assert np.isfinite(float(result.metrics["loss"]))
    # the trained model started from the HF weights: layer-norm scales are the checkpoint's (moved by <= lr * 2)
    model = result.model()
    ref = hf.model.norm.weight.detach().numpy()
    assert np.max(np.abs(np.asarray(model.norm.scale[...]) - ref)) < 0.05


SHARDED_SCRIPT = """
import os, sys, json
import numpy as np
import torch, transformers
from tests.fixtures.hf_checkpoints import save_causal_lm
from tests.fixtures.runs import tiny_experiment
from vla_foundry_jax.params import DistributedParams, TransformerHFParams
from vla_foundry_jax.training.loop import train

tmp = sys.argv[1]
path, hf = save_causal_lm(tmp, "qwen2")
exp = tiny_experiment(os.path.join(tmp, "run"), steps=1, batch=4, seq_len=8)
exp = exp.replace(
    model=TransformerHFParams(hf_pretrained=path),
    num_checkpoints=1,
    hparams=exp.hparams.replace(per_gpu_batch_size=2),
    distributed=DistributedParams(data_parallelism=1, fsdp_parallelism=2, tensor_parallelism=2),
)
result = train(exp)
kernel = result.state["params"]["layers"]["self_attn"]["q_proj"]["kernel"][...]
print(json.dumps({"loss": float(result.metrics["loss"]), "spec": str(kernel.sharding.spec),
                  "devices": len(kernel.sharding.device_set)}))
"""


def test_sharded_load_in_train_loop(tmp_path):
    """4 CPU devices (fsdp 2 x tensor 2): the loader places each tensor in its target sharding; training runs."""
    out = last_json(run_python(SHARDED_SCRIPT, str(tmp_path), devices=4, timeout=300))
    assert np.isfinite(out["loss"]) and out["devices"] == 4, out
    assert "fsdp" in out["spec"] or "tensor" in out["spec"], out
