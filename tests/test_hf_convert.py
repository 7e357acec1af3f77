"""HF -> our run and our ``transformer_hf`` -> HF safetensors (``apps.hf_conversion``: ``launch.convert_hf``,
``launch.export_hf``)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.fixtures.hf_checkpoints import load_causal_lm, save_causal_lm  # noqa: E402
from tests.fixtures.runs import tiny_experiment  # noqa: E402
from vla_foundry_jax import checkpoint as ckpt_lib  # noqa: E402
from vla_foundry_jax.apps.hf_conversion import convert_hf, export_transformer_hf  # noqa: E402
from vla_foundry_jax.configs.hf_hub import HFLoadError  # noqa: E402
from vla_foundry_jax.params import TransformerHFParams  # noqa: E402

TOL = 1e-4


def _ids(shape, seed=0):
    return np.random.default_rng(seed).integers(1, 160, size=shape).astype(np.int64)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def test_convert_load_model_and_weights_only_resume(tmp_path, monkeypatch):
    from vla_foundry_jax.sampling import load_model
    from vla_foundry_jax.training.loop import train

    path, hf = save_causal_lm(tmp_path, "llama_untied_mqa_odd_hd")
    run = os.path.join(str(tmp_path), "converted")
    summary = convert_hf(path, run)
    assert summary["params"] == sum(p.numel() for p in hf.parameters())
    assert os.path.isfile(os.path.join(run, "hf_config", "config.json"))
    assert os.path.isdir(os.path.join(run, "checkpoints", "0", "model"))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        convert_hf(path, run)
    shutil.move(path, path + "_moved")  # the converted run must not need the HF directory

    # (a) rebuilt with no gin file and no HF directory; logits equal HF's
    model, exp = load_model(run)
    assert exp.model.hf_pretrained == os.path.join(run, "hf_config") and exp.data is None
    ids = _ids((2, 9))
    np.testing.assert_allclose(np.asarray(model(ids).logits), _hf_logits(hf, ids), atol=TOL, rtol=0)

    # the config-only directory without resume_from_checkpoint: a clear error
    from vla_foundry_jax.convert.hf_decoder_maps import load_transformer_hf_weights

    with pytest.raises(HFLoadError, match="resume_from_checkpoint"):
        load_transformer_hf_weights(TransformerHFParams(hf_pretrained=os.path.join(run, "hf_config")), [], "")

    # (b) weights-only resume in the trainer: the initial weights are the HF ones
    restored = []
    real_restore = ckpt_lib.restore_model_weights

    def recording_restore(*args, **kwargs):
        out = real_restore(*args, **kwargs)
        restored.append({k: np.array(v) for k, v in ckpt_lib.flat_params(out[0]).items()})  # before donation
        return out

    monkeypatch.setattr(ckpt_lib, "restore_model_weights", recording_restore)
    exp = tiny_experiment(os.path.join(str(tmp_path), "run"), steps=1, batch=2, seq_len=8)
    model_params = TransformerHFParams(
        hf_pretrained=os.path.join(run, "hf_config"), resume_from_checkpoint=run, resume_weights_only=True
    )
    result = train(exp.replace(model=model_params, num_checkpoints=1))
    assert np.isfinite(result.metrics["loss"])
    assert len(restored) == 1
    init = restored[0]
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(init["embed_tokens"]), sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(init["lm_head"]), sd["lm_head.weight"].T)
    for i in range(2):
        np.testing.assert_array_equal(
            np.asarray(init["layers.self_attn.q_proj.kernel"])[i], sd[f"model.layers.{i}.self_attn.q_proj.weight"].T
        )
        np.testing.assert_array_equal(
            np.asarray(init["layers.mlp.down_proj.bias"])[i], sd[f"model.layers.{i}.mlp.down_proj.bias"]
        )
    np.testing.assert_array_equal(np.asarray(init["norm.scale"]), sd["model.norm.weight"])


def test_train_export_reload_in_transformers(tmp_path):
    from safetensors import safe_open

    from vla_foundry_jax.training.loop import train

    path, _ = save_causal_lm(tmp_path, "llama_tied_gqa")
    run = os.path.join(str(tmp_path), "run")
    exp = tiny_experiment(run, steps=2, batch=2, seq_len=8)
    result = train(exp.replace(model=TransformerHFParams(hf_pretrained=path), num_checkpoints=1))
    out = export_transformer_hf(run, os.path.join(str(tmp_path), "exported"))
    with safe_open(os.path.join(out, "model.safetensors"), framework="np") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied: not duplicated
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "float32"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = _ids((2, 10), seed=1)
    ours = np.asarray(result.model()(ids).logits)
    np.testing.assert_allclose(_hf_logits(hf, ids), ours, atol=TOL, rtol=0)
    # the export moved: training changed the weights, the export carries the trained ones
    _, original = save_causal_lm(tmp_path / "again", "llama_tied_gqa")
    assert np.abs(_hf_logits(original, ids) - ours).max() > 1e-3


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "llama_untied_mqa_odd_hd"])
def test_export_inverts_the_maps(tmp_path, arch):
    """Gemma's norm offset, untied heads and biases: the export equals the original HF tensors, logits agree."""
    from safetensors.numpy import load_file

    path, hf = save_causal_lm(tmp_path, arch)
    ours = load_causal_lm(path)
    out = export_transformer_hf((ours, TransformerHFParams(hf_pretrained=path)), os.path.join(str(tmp_path), "out"))
    exported = load_file(os.path.join(out, "model.safetensors"))
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    assert set(exported) == set(sd)
    for k, v in sd.items():
        np.testing.assert_allclose(exported[k], v, atol=1e-6, rtol=0, err_msg=k)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = _ids((2, 7), seed=2)
    np.testing.assert_allclose(_hf_logits(reloaded, ids), np.asarray(ours(ids).logits), atol=TOL, rtol=0)
    assert nnx.state(ours, nnx.Param) is not None
