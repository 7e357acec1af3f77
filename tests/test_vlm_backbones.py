"""``vlm_backbone`` (HF VLM, parity with HF torch) and ``vlm_foundry_backbone`` (a vlm run of this project)."""

from __future__ import annotations

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.fixtures.hf_checkpoints import (  # noqa: E402
    IMAGE_TOKEN,
    TINY_TEXT,
    idefics3_config,
    paligemma_config,
    save_perturbed,
)
from tests.fixtures.paths import PROCESSOR  # noqa: E402
from tests.fixtures.robotics import reach_data  # noqa: E402
from tests.fixtures.tiny_models import IMAGE_TOKEN as IMAGE_TOKEN_OURS  # noqa: E402
from tests.fixtures.tiny_models import tiny_vlm_params  # noqa: E402
from tests.fixtures.weights import loaded_with_init  # noqa: E402
from vla_foundry_jax import checkpoint as ckpt_lib  # noqa: E402
from vla_foundry_jax.models import build_model  # noqa: E402
from vla_foundry_jax.models.vlm import VLM, ImageTokenError  # noqa: E402
from vla_foundry_jax.models.vlm_backbones import Idefics3Backbone, PaliGemmaBackbone  # noqa: E402
from vla_foundry_jax.params import (  # noqa: E402
    ParamsError,
    TrainExperimentParams,
    TransformerParams,
    ViTParams,
    VLMParams,
)
from vla_foundry_jax.params.model_params import VLMBackboneParams, VLMFoundryBackboneParams  # noqa: E402
from vla_foundry_jax.registry import model_record  # noqa: E402
from vla_foundry_jax.training.loop import write_run_files  # noqa: E402
from vla_foundry_jax.training.state import frozen_prefixes, trainable_filter  # noqa: E402

ATOL = 1e-4
V = TINY_TEXT["vocab_size"]  # HF vocabulary: the action token gets id 120


# ----------------------------------------------------------------------------------------------------------
# HF checkpoints


@pytest.fixture(scope="module")
def hf_ckpts(tmp_path_factory):
    """Tiny PaliGemma (Gemma, tied head) and Idefics3 (Llama, untied head), saved with ``save_pretrained``."""
    root = tmp_path_factory.mktemp("vlm_backbone")
    return {
        "paligemma": save_perturbed(
            transformers.PaliGemmaForConditionalGeneration, paligemma_config(), root / "paligemma"
        ),
        "idefics3": save_perturbed(
            transformers.Idefics3ForConditionalGeneration, idefics3_config(tie=False), root / "idefics3"
        ),
    }


def _hf_inputs(name, b=2, seed=0):
    """Image tokens + text, sample 1 right-padded by 3 (attention 0); channels-last images ``[B, 1, 16, 16, 3]``."""
    rng = np.random.default_rng(seed)
    n_img = 16 if name == "paligemma" else 4
    S = n_img + 8
    ids = rng.integers(1, 90, size=(b, S)).astype(np.int64)
    ids[:, 1 : 1 + n_img] = IMAGE_TOKEN
    mask = np.ones((b, S), np.int64)
    mask[1, -3:] = 0
    ids[1, -3:] = 0
    images = rng.standard_normal((b, 1, 16, 16, 3)).astype(np.float32)
    return ids, mask, images


def _hf_reference(hf, name, ids, mask, images, n_layers):
    """HF torch: grow the table as the original (resize, mean row), append the action token, take hidden states."""
    hf = copy.deepcopy(hf)
    with torch.no_grad():
        hf.resize_token_embeddings(V + 1, mean_resizing=False)
        emb = hf.get_input_embeddings().weight
        emb[-1] = emb[:-1].mean(0)
        ids_a = np.concatenate([ids, np.full((ids.shape[0], 1), V)], 1)
        mask_a = np.concatenate([mask, np.ones((ids.shape[0], 1), mask.dtype)], 1)
        px = images if name == "idefics3" else images[:, 0]
        px = np.ascontiguousarray(np.moveaxis(px, -1, -3))
        out = hf(
            input_ids=torch.from_numpy(ids_a),
            pixel_values=torch.from_numpy(px),
            attention_mask=torch.from_numpy(mask_a),
            output_hidden_states=True,
        )
    hs = [h.numpy() for h in out.hidden_states]
    return np.concatenate([h[:, -1] for h in hs[-n_layers:]], -1)[:, None], hs


@pytest.mark.parametrize(("name", "n_layers"), [("paligemma", 3), ("idefics3", 1), ("idefics3", 2)])
def test_vlm_backbone_matches_hf_hidden_states(hf_ckpts, name, n_layers):
    path, hf = hf_ckpts[name]
    params = VLMBackboneParams(hf_pretrained=path, num_vlm_layers_to_use=n_layers)
    model, _ = loaded_with_init(params)
    assert isinstance(model, PaliGemmaBackbone if name == "paligemma" else Idefics3Backbone)
    assert model.action_token_id == V and model.conditioning_dim == 32 * n_layers
    ids, mask, images = _hf_inputs(name)
    ref, hs = _hf_reference(hf, name, ids, mask, images, n_layers)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(images), jnp.asarray(mask)))
    assert out.shape == (2, 1, 32 * n_layers)
    np.testing.assert_allclose(out, ref, atol=ATOL)
    # the conditioning is the action token's (last position), not the last text token's
    assert np.abs(hs[-1][:, -2] - hs[-1][:, -1]).max() > 1e-2
    # the attention mask reaches the LM: without it, sample 1's action token also sees its pads
    unmasked = np.asarray(model(jnp.asarray(ids), jnp.asarray(images)))
    np.testing.assert_allclose(unmasked[0], out[0], atol=ATOL)
    assert np.abs(unmasked[1] - out[1]).max() > 1e-3


@pytest.mark.parametrize("name", ["paligemma", "idefics3"])
def test_vlm_backbone_weights_and_action_row(hf_ckpts, name):
    path, hf = hf_ckpts[name]
    params = VLMBackboneParams(hf_pretrained=path, num_vlm_layers_to_use=1)
    model, fresh = loaded_with_init(params)
    flat = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(nnx.state(model, nnx.Param)).items()}
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    hf_emb = next(v for k, v in sd.items() if k.endswith("embed_tokens.weight"))
    emb = flat["language_model.embed_tokens"]
    assert emb.shape == (V + 1, 32)
    np.testing.assert_array_equal(emb[:V], hf_emb)
    np.testing.assert_allclose(emb[V], hf_emb.astype(np.float64).mean(0), atol=1e-6)  # mean of the loaded rows
    if name == "idefics3":  # untied: old columns from HF, the action column keeps the fresh init
        head = flat["language_model.lm_head"]
        assert head.shape == (32, V + 1)
        np.testing.assert_array_equal(head[:, :V], sd["lm_head.weight"].T)
        np.testing.assert_array_equal(head[:, V], fresh["language_model.lm_head"][:, V])
        assert 0.005 < head[:, V].std() < 0.05  # normal(0, initializer_range = 0.02), as HF's _init_weights
    else:
        assert "language_model.lm_head" not in flat  # tied: the head reads the grown table


def test_vlm_backbone_dead_head_frozen_and_batch_check(hf_ckpts):
    path, _ = hf_ckpts["idefics3"]
    params = VLMBackboneParams(hf_pretrained=path, num_vlm_layers_to_use=2)
    model, _ = loaded_with_init(params)
    ids, mask, images = _hf_inputs("idefics3")
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(ids), jnp.asarray(images), jnp.asarray(mask)) ** 2))(model)
    g = {k: float(np.abs(np.asarray(v)).max()) for k, v in ckpt_lib.flat_params(grads).items()}
    assert g["language_model.lm_head"] == 0.0  # never read ...
    assert g["language_model.norm.scale"] > 0 and g["vision_tower.embeddings.patch_embedding.kernel"] > 0
    assert frozen_prefixes(params) == [("language_model", "lm_head")]  # ... so kept out of the optimizer
    assert frozen_prefixes(params.replace(freeze=True)) == [()]
    model_record("vlm_backbone").batch_check(params, {"input_ids": ids, "pixel_values": images})
    with pytest.raises(ImageTokenError, match="sample 0 holds 3 image tokens"):
        model_record("vlm_backbone").batch_check(params, {"input_ids": ids[:, 2:], "pixel_values": images})
    with pytest.raises(ParamsError, match=r"num_vlm_layers_to_use = 4 .* choose 1 \.\. 3"):
        build_model(params.replace(num_vlm_layers_to_use=4), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------------------
# vlm_foundry_backbone

IMG = IMAGE_TOKEN_OURS  # image token id of the source VLM (vocabulary 100)


def _vlm_params(causal: bool = True, tied: bool = False) -> VLMParams:
    return tiny_vlm_params(n_layers=3, is_causal=causal, weight_tying=tied)


def save_run(out: str, model_params, seed: int = 3) -> dict[str, np.ndarray]:
    """A run directory of ``model_params`` (random weights) as the training loop writes it; returns its weights."""
    model = build_model(model_params, rngs=nnx.Rngs(seed))
    _, p, rest = nnx.split(model, nnx.Param, ...)
    exp = TrainExperimentParams(model=model_params, output_dir=out)
    state = {
        "params": p,
        "frozen": nnx.State({}),
        "step": jnp.zeros((), jnp.int32),
        "opt_state": {},
        "ema": None,
        "rng": jax.random.PRNGKey(0),
        "rest": rest,
    }
    c = ckpt_lib.RunCheckpointer(out, async_save=False)
    c.save(1, state, exp, {})
    c.wait()
    c.close()
    write_run_files(out, exp, None)
    return {k: np.asarray(v) for k, v in ckpt_lib.flat_params(p).items()}


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vlm_run"))
    return out, save_run(out, _vlm_params())


def _foundry(params, prefix=""):
    model = build_model(params, rngs=nnx.Rngs(0))
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)
    fresh = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(p).items()}
    if params.resume_from_checkpoint:
        [p] = model_record(params.type).resume_loader(params, [p], prefix)
    return nnx.merge(graphdef, p, rest), fresh


def _foundry_inputs(b=2, n_images=2, side=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.array([[1] + [IMG] * (4 * n_images) + [5, 6, 7, 0]] * b, np.int32)
    ids[1, 2 + 4 * n_images :] = [9, 0, 0]
    mask = (ids != 0).astype(np.int32)
    mask[:, 0] = 1
    px = rng.standard_normal((b, n_images, side, side, 3)).astype(np.float32)
    return ids, mask, px


@pytest.fixture(scope="module")
def foundry(vlm_run):
    out, weights = vlm_run
    params = VLMFoundryBackboneParams(resume_from_checkpoint=out, num_vlm_layers_to_use=2)
    model, fresh = _foundry(params)
    return params, model, fresh, weights


def test_foundry_weights_equal_the_source_run_and_action_row(foundry):
    _, model, fresh, weights = foundry
    flat = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(nnx.state(model, nnx.Param)).items()}
    assert set(flat) == set(weights)
    for name, w in weights.items():
        if name == "transformer.embeddings":
            assert flat[name].shape == (101, 32)
            np.testing.assert_array_equal(flat[name][:100], w)
            np.testing.assert_allclose(flat[name][100], w.astype(np.float64).mean(0), atol=1e-6)
        elif name == "transformer.output":
            assert flat[name].shape == (32, 101)
            np.testing.assert_array_equal(flat[name][:, :100], w)
            np.testing.assert_array_equal(flat[name][:, 100], fresh[name][:, 100])  # fresh init
        else:
            np.testing.assert_array_equal(flat[name], w)
    assert model.action_token_id == 100 and model.conditioning_dim == 64
    # built from random weights, the action row is the mean of those rows
    np.testing.assert_allclose(
        fresh["transformer.embeddings"][100], fresh["transformer.embeddings"][:100].mean(0), atol=1e-6
    )


def test_foundry_conditioning_is_last_hidden_states_at_the_action_token(foundry):
    _, model, _, _ = foundry
    ids, mask, px = _foundry_inputs()
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask)))
    assert out.shape == (2, 1, 64)
    ids_a = np.concatenate([ids, np.full((2, 1), 100, np.int32)], 1)  # action token id = old vocabulary size
    hs = VLM.__call__(model, jnp.asarray(ids_a), jnp.asarray(px), output_hidden_states=True).hidden_states
    assert len(hs) == 3  # raw block outputs of the 3 layers
    manual = np.concatenate([np.asarray(hs[1])[:, -1], np.asarray(hs[2])[:, -1]], -1)[:, None]
    np.testing.assert_allclose(out, manual, atol=1e-6)
    # the causal transformer drops the padding mask, as the original: the mask changes nothing
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids), jnp.asarray(px))), out, atol=1e-6)


def test_foundry_resizes_images_bilinearly_like_torch(foundry):
    _, model, _, _ = foundry
    x = np.random.default_rng(1).standard_normal((2, 2, 24, 24, 3)).astype(np.float32)
    for side in (24, 10):
        src = x[:, :, :side, :side]
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(np.ascontiguousarray(src.reshape(-1, side, side, 3).transpose(0, 3, 1, 2))),
            size=(16, 16),
            mode="bilinear",
            align_corners=False,
        ).numpy()
        got = np.asarray(model.resize_images(jnp.asarray(src)))
        np.testing.assert_allclose(got.reshape(-1, 16, 16, 3), ref.transpose(0, 2, 3, 1), atol=1e-5)
    ids, mask, px = _foundry_inputs(side=24)
    small = np.asarray(model.resize_images(jnp.asarray(px)))
    np.testing.assert_allclose(np.asarray(model(ids, px, mask)), np.asarray(model(ids, small, mask)), atol=1e-6)


def test_foundry_dead_params_and_freeze(foundry):
    params, model, _, _ = foundry
    ids, mask, px = _foundry_inputs()
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask)) ** 2))(model)
    g = {k: float(np.abs(np.asarray(v)).max()) for k, v in ckpt_lib.flat_params(grads).items()}
    dead = {k for k, v in g.items() if v == 0.0}
    assert dead == {"transformer.output", "transformer.norm.weight", "transformer.norm.bias"}
    assert frozen_prefixes(params) == [("transformer", "output"), ("transformer", "norm")]
    trainable = nnx.split(model, trainable_filter(params), ...)[1]
    assert set(ckpt_lib.flat_params(trainable)) == set(g) - dead
    assert frozen_prefixes(params.replace(freeze=True)) == [()]


def test_foundry_resume_of_a_grown_checkpoint_does_not_grow_again(foundry, tmp_path):
    """A policy checkpoint already holds V + 1 rows: the rebuilt backbone has V + 1 rows and restores strictly."""
    params = foundry[0]
    out = str(tmp_path / "vla")
    saved = save_run(out, params, seed=5)
    assert saved["transformer.embeddings"].shape == (101, 32)
    rebuilt = build_model(params, rngs=nnx.Rngs(7))
    p = nnx.state(rebuilt, nnx.Param)
    (p,) = ckpt_lib.restore_model_weights(out, [p])
    for name, w in ckpt_lib.flat_params(p).items():
        np.testing.assert_array_equal(np.asarray(w), saved[name])


def test_foundry_run_directory_errors(vlm_run, tmp_path):
    out, _ = vlm_run
    with pytest.raises(ParamsError, match=r"needs vlm_foundry_backbone\.resume_from_checkpoint"):
        build_model(VLMFoundryBackboneParams(), rngs=nnx.Rngs(0))
    llm = str(tmp_path / "llm")
    save_run(llm, TransformerParams(hidden_dim=16, n_layers=1, n_heads=2, vocab_size=50, max_seq_len=16))
    with pytest.raises(ParamsError, match="holds a 'transformer' model, not a 'vlm'"):
        build_model(VLMFoundryBackboneParams(resume_from_checkpoint=llm), rngs=nnx.Rngs(0))
    with pytest.raises(ParamsError, match=r"vlm_experiment_dir = .* does not exist"):
        build_model(VLMFoundryBackboneParams(vlm_experiment_dir=str(tmp_path / "nope")), rngs=nnx.Rngs(0))
    with pytest.raises(ckpt_lib.CheckpointError, match="does not exist"):
        build_model(VLMFoundryBackboneParams(resume_from_checkpoint=str(tmp_path / "nope")), rngs=nnx.Rngs(0))
    with pytest.raises(ParamsError, match=r"num_vlm_layers_to_use = 4 .* 3 hidden states"):
        build_model(VLMFoundryBackboneParams(vlm_experiment_dir=out, num_vlm_layers_to_use=4), rngs=nnx.Rngs(0))
    # vlm_experiment_dir alone: the architecture (from params.json) but no weights
    arch = build_model(VLMFoundryBackboneParams(vlm_experiment_dir=out, num_vlm_layers_to_use=2), rngs=nnx.Rngs(0))
    assert arch.transformer.embeddings[...].shape == (101, 32)


def test_foundry_batch_check(foundry):
    params, _, _, _ = foundry
    ids, _, px = _foundry_inputs()
    model_record("vlm_foundry_backbone").batch_check(params, {"input_ids": ids, "pixel_values": px})
    with pytest.raises(ImageTokenError, match="sample 0 holds 8 image tokens"):
        model_record("vlm_foundry_backbone").batch_check(params, {"input_ids": ids, "pixel_values": px[:, :1]})


# ----------------------------------------------------------------------------------------------------------
# inside a diffusion_policy: the loop's initial-weight load, freezing, training and a whole-policy resume


@pytest.fixture(scope="module")
def reach_vlm_run(tmp_path_factory):
    """A vlm run shaped for the reach data: the processor's vocabulary (143, image token 142), 1 token per image."""
    out = str(tmp_path_factory.mktemp("reach_vlm"))
    vit = ViTParams(
        img_size=16, patch_size=8, hidden_dim=16, inter_dim=32, n_heads=2, n_layers=1, projector_pixel_shuffle_factor=2
    )
    lm = TransformerParams(hidden_dim=32, n_layers=2, n_heads=2, vocab_size=143, max_seq_len=64)
    return out, save_run(out, VLMParams(vit=vit, transformer=lm, image_token_id=142, processor=PROCESSOR))


def policy_experiment(
    out: str, vlm_run: str, *, freeze: bool = False, steps: int = 4, denoiser_run: str | None = None
) -> TrainExperimentParams:
    from vla_foundry_jax.params import DiffusionPolicyParams, HyperParams
    from vla_foundry_jax.params.data_params import NormalizationParams
    from vla_foundry_jax.params.model_params import NoiseSchedulerParams

    backbone = VLMFoundryBackboneParams(resume_from_checkpoint=vlm_run, num_vlm_layers_to_use=2, freeze=freeze)
    model = DiffusionPolicyParams(
        vision_language_backbone=backbone,
        transformer=TransformerParams(
            hidden_dim=32,
            n_layers=2,
            n_heads=2,
            max_seq_len=64,
            is_causal=False,
            vocab_size=16,
            resume_from_checkpoint=denoiser_run,
        ),
        noise_scheduler=NoiseSchedulerParams(clamp_range=(-3.0, 3.0)),
        use_flow_matching_scheduler=True,
    )
    data = reach_data(
        normalization=NormalizationParams(method="percentile_1_99", scope="per_timestep", centered_norm=True)
    )
    return TrainExperimentParams(
        output_dir=out,
        total_train_samples=steps * 4,
        num_checkpoints=2,
        log_every_n_steps=1,
        async_checkpointing=False,
        model=model,
        data=data,
        hparams=HyperParams(precision="fp32", global_batch_size=4, per_gpu_batch_size=4, lr=1e-3, warmup="1"),
    )


def test_policy_starts_from_the_vlm_run_and_freeze_keeps_it(reach_vlm_run, tmp_path):
    """The loop's initial-weight load puts the vlm run into the policy's backbone; freeze leaves it untouched."""
    from tests.fixtures.training import single_device_train_step
    from vla_foundry_jax.training.resolve import resolve_experiment

    run, src = reach_vlm_run
    exp = resolve_experiment(policy_experiment(str(tmp_path), run, freeze=True))
    _, state, step = single_device_train_step(exp.model, exp.hparams, 4, ema=exp.ema, load_weights=True)
    frozen = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(state["frozen"]).items()}
    bb = {k[len("vision_language_backbone.") :]: v for k, v in frozen.items() if k.startswith("vision_language_")}
    assert set(bb) == set(src)  # the whole backbone is frozen ...
    assert not any(k.startswith("vision_language_") for k in ckpt_lib.flat_params(state["params"]))
    for name, w in src.items():  # ... and holds the vlm run's weights (+ the action row)
        got = bb[name]
        np.testing.assert_array_equal(got[tuple(slice(0, d) for d in w.shape)], w)
    np.testing.assert_allclose(bb["transformer.embeddings"][143], src["transformer.embeddings"].mean(0), atol=1e-6)

    from vla_foundry_jax.data.pipeline import build_train_iterator
    from vla_foundry_jax.registry import model_record

    batch = next(build_train_iterator(exp.data, global_batch_size=4, num_batches=1))
    model_record("vlm_foundry_backbone").batch_check(exp.model.vision_language_backbone, batch)
    assert batch["pixel_values"].shape[2:4] == (32, 32)  # resized to the ViT's 16 inside the backbone
    before = jax.tree.map(np.asarray, state["params"])
    state, m = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    assert np.isfinite(float(m["loss"]))
    after = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(state["frozen"]).items()}
    for k, v in frozen.items():
        np.testing.assert_array_equal(after[k], v)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, state["params"])
    assert any(jax.tree.leaves(changed))  # the policy's own parameters did train


def test_policy_run_resumes_exactly_without_growing_the_table_again(reach_vlm_run, tmp_path):
    """A policy run (4 steps, checkpoints at 2 and 4) resumed from step 2 reproduces steps 3 and 4: the rebuilt
    backbone has the same V + 1 rows as the saved one and the trained weights replace the vlm run's."""
    import shutil

    from tests.fixtures.runs import logged_losses
    from vla_foundry_jax.training.loop import train

    run, src = reach_vlm_run
    # the denoiser starts from an LLM run (a nested same-type resume next to the backbone's vlm-run resume)
    llm = str(tmp_path / "llm")
    save_run(llm, TransformerParams(hidden_dim=32, n_layers=2, n_heads=2, vocab_size=16, max_seq_len=64))
    out = str(tmp_path / "vla")
    first = train(policy_experiment(out, run, denoiser_run=llm))
    losses = logged_losses(out)
    trained = ckpt_lib.flat_params(first.state["params"])
    emb = np.asarray(trained["vision_language_backbone.transformer.embeddings"])
    assert emb.shape == (144, 32) and not np.array_equal(emb[:143], src["transformer.embeddings"])
    shutil.rmtree(os.path.join(out, "checkpoints", "4"))
    os.remove(os.path.join(out, "metrics.jsonl"))
    resumed = train(policy_experiment(out, run, denoiser_run=llm))
    again = logged_losses(out)
    assert sorted(again) == [3, 4]
    for s in (3, 4):
        assert again[s] == pytest.approx(losses[s], rel=1e-6, abs=1e-7)
    for name, w in ckpt_lib.flat_params(resumed.state["params"]).items():
        np.testing.assert_allclose(np.asarray(w), np.asarray(trained[name]), rtol=1e-6, atol=1e-7)


def test_vlm_backbone_weights_arrive_inside_a_policy(hf_ckpts):
    """The loop's initial-weight load fills the HF backbone under ``vision_language_backbone.``; dead head frozen."""
    from vla_foundry_jax import parallel
    from vla_foundry_jax.models import load_weights
    from vla_foundry_jax.params import DiffusionPolicyParams, DistributedParams, HyperParams
    from vla_foundry_jax.training.optimizer import make_optimizer
    from vla_foundry_jax.training.state import init_train_state, make_model_spec

    path, hf = hf_ckpts["idefics3"]
    params = DiffusionPolicyParams(
        vision_language_backbone=VLMBackboneParams(hf_pretrained=path, num_vlm_layers_to_use=2),
        transformer=TransformerParams(hidden_dim=32, n_layers=1, n_heads=2, max_seq_len=64, is_causal=False),
        action_dim=2,
    )
    hp = HyperParams(precision="fp32")
    spec = make_model_spec(params, hp, parallel.make_mesh(DistributedParams(), jax.devices()[:1]))
    state = init_train_state(spec, make_optimizer(hp, 2), hp, use_ema=False)
    fresh = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(state["frozen"]).items()}
    trainable, frozen = load_weights(spec.params, [state["params"], state["frozen"]])
    p = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(trainable).items()}
    f = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(frozen).items()}
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    emb = p["vision_language_backbone.language_model.embed_tokens"]
    hf_emb = next(v for k, v in sd.items() if k.endswith("embed_tokens.weight"))
    np.testing.assert_array_equal(emb[:V], hf_emb)
    np.testing.assert_allclose(emb[V], hf_emb.astype(np.float64).mean(0), atol=1e-6)
    head = f["vision_language_backbone.language_model.lm_head"]  # never read: frozen
    np.testing.assert_array_equal(head[:, :V], sd["lm_head.weight"].T)
    np.testing.assert_array_equal(head[:, V], fresh["vision_language_backbone.language_model.lm_head"][:, V])
