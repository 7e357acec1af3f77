"""``build_model`` gives the model its params describe, with the weights they name (top level and sub-models)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vla_foundry_jax import checkpoint as ckpt_lib  # noqa: E402
from vla_foundry_jax.models import build_model  # noqa: E402
from vla_foundry_jax.params import (  # noqa: E402
    HyperParams,
    TrainExperimentParams,
    TransformerHFParams,
    ViTParams,
    VLMParams,
)

LLAMA = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[str, object]:
    """A tiny random HF Llama with every weight perturbed, saved locally; (dir, torch model)."""
    config = transformers.LlamaConfig(**LLAMA)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    path = str(tmp_path_factory.mktemp("hf") / "llama")
    model.save_pretrained(path)
    return path, model


def test_transformer_hf_built_with_its_hf_weights(tiny_llama):
    path, hf = tiny_llama
    ids = np.random.default_rng(0).integers(1, LLAMA["vocab_size"], size=(2, 9))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    model = build_model(TransformerHFParams(hf_pretrained=path), rngs=nnx.Rngs(0))
    got = np.asarray(model(jax.numpy.asarray(ids)).logits)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    random = build_model(TransformerHFParams(hf_pretrained=path), rngs=nnx.Rngs(0), load_weights=False)
    assert np.abs(np.asarray(random(jax.numpy.asarray(ids)).logits) - want).max() > 0.1


def test_sub_model_weights_and_weights_only_resume(tmp_path, tiny_llama):
    """A VLM whose language model names HF weights gets them; a VLM resumed weights-only from a saved run gets that
    run's weights, sub-models included."""
    path, hf = tiny_llama
    vit = ViTParams(hidden_dim=16, inter_dim=32, patch_size=4, img_size=8, n_heads=2, n_layers=1)
    vlm = VLMParams(vit=vit, transformer=TransformerHFParams(hf_pretrained=path), image_token_id=5)
    model = build_model(vlm, rngs=nnx.Rngs(3))
    hf_embed = hf.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(model.transformer.embed_tokens[...]), hf_embed)

    # Save that model as a run, then build a differently seeded VLM that resumes from it.
    exp = TrainExperimentParams(model=vlm, hparams=HyperParams(global_batch_size=1, per_gpu_batch_size=1))
    run = str(tmp_path / "run")
    saver = ckpt_lib.RunCheckpointer(run, async_save=False)
    weights = nnx.state(model, nnx.Param)
    state = {
        "step": np.int32(1),
        "params": weights,
        "frozen": nnx.State({}),
        "rest": {},
        "opt_state": {},
        "ema": None,
        "rng": jax.random.PRNGKey(0),
    }
    saver.save(1, state, exp, {})
    saver.close()
    resumed = build_model(
        VLMParams(vit=vit, transformer=TransformerHFParams(hf_pretrained=path), image_token_id=5).replace(
            resume_from_checkpoint=run
        ),
        rngs=nnx.Rngs(7),
    )
    flat_saved = ckpt_lib.flat_params(weights)
    flat_resumed = ckpt_lib.flat_params(nnx.state(resumed, nnx.Param))
    assert flat_saved.keys() == flat_resumed.keys()
    for name, value in flat_saved.items():
        np.testing.assert_array_equal(np.asarray(flat_resumed[name]), np.asarray(value), err_msg=name)
