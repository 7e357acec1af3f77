"""``vlm_hf`` with Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints: parity with HF PyTorch on tiny random models
(logits, hidden states, greedy generation), images of several sizes packed in one batch, bad inputs, 8 devices."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.fixtures.multidevice import last_json, run_python  # noqa: E402
from tests.fixtures.weights import loaded, perturb_and_save, sharpened  # noqa: E402
from vla_foundry_jax.models.qwen_vl import QwenVLInputError  # noqa: E402
from vla_foundry_jax.params.model_params import VLMHFParams  # noqa: E402

ATOL = 1e-4
IMG, VIDEO, START, END = 150, 151, 152, 153
PATCH, MERGE, TPATCH = 4, 2, 2
PATCH_DIM = 3 * TPATCH * PATCH * PATCH


def _text(interleaved: bool = False, **kw):
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    if interleaved:
        rope["mrope_interleaved"] = True
    return dict(
        vocab_size=160,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        rope_parameters=rope,
        **kw,
    )


VISION = dict(patch_size=PATCH, temporal_patch_size=TPATCH, spatial_merge_size=MERGE, num_heads=2)
TOKENS = dict(image_token_id=IMG, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def _configs():
    T = transformers
    return {
        "qwen2_vl": (
            T.Qwen2VLForConditionalGeneration,
            T.Qwen2VLConfig(
                text_config=_text(),
                vision_config=dict(VISION, depth=2, embed_dim=16, hidden_size=32, mlp_ratio=2),
                **TOKENS,
            ),
        ),
        "qwen2_5_vl": (
            T.Qwen2_5_VLForConditionalGeneration,
            T.Qwen2_5_VLConfig(
                text_config=_text(),
                vision_config=dict(
                    VISION,
                    depth=3,
                    hidden_size=16,
                    intermediate_size=24,
                    out_hidden_size=32,
                    window_size=16,
                    fullatt_block_indexes=[1],
                ),
                **TOKENS,
            ),
        ),
        "qwen3_vl": (
            T.Qwen3VLForConditionalGeneration,
            T.Qwen3VLConfig(
                text_config=_text(interleaved=True),
                vision_config=dict(
                    VISION,
                    depth=3,
                    hidden_size=16,
                    intermediate_size=24,
                    out_hidden_size=32,
                    num_position_embeddings=16,
                    deepstack_visual_indexes=[0, 2],
                ),
                tie_word_embeddings=True,
                **TOKENS,
            ),
        ),
    }


FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_vl")
    out = {}
    for i, (name, (cls, cfg)) in enumerate(_configs().items()):
        for c in (cfg, cfg.text_config, cfg.vision_config):
            c._attn_implementation = "eager"
        torch.manual_seed(i)
        model = cls(cfg)
        out[name] = (perturb_and_save(model, root / name), model)
    return out


@pytest.fixture(scope="module")
def ours(ckpts):
    return {name: loaded(VLMHFParams(hf_pretrained=ckpts[name][0])) for name in FAMILIES}


def _image_tokens(grid):
    t, h, w = grid
    return [START] + [IMG] * (t * (h // MERGE) * (w // MERGE)) + [END]


def _batch(seed=0, pad_rows=8):
    """Sample 0: two images (16x24 and 32x16 pixels) between text; sample 1: text only, left-padded; sample 2: one
    24x24 image. Returns ids, attention mask, flat pixel rows (HF's), the same plus zero padding rows, grids."""
    rng = np.random.default_rng(seed)
    grids = [(1, 4, 6), (1, 8, 4), (1, 6, 6)]
    words = lambda n: list(rng.integers(1, 140, size=n))  # noqa: E731
    rows = [
        words(3) + _image_tokens(grids[0]) + words(2) + _image_tokens(grids[1]) + words(4),
        words(9),
        words(2) + _image_tokens(grids[2]) + words(5),
    ]
    S = max(map(len, rows))
    ids = np.zeros((3, S), np.int64)
    mask = np.zeros((3, S), np.int64)
    for b, r in enumerate(rows):
        ids[b, S - len(r) :] = r
        mask[b, S - len(r) :] = 1
    n = sum(t * h * w for t, h, w in grids)
    pixels = rng.standard_normal((n, PATCH_DIM)).astype(np.float32)
    padded = np.concatenate([pixels, np.zeros((pad_rows, PATCH_DIM), np.float32)])
    return ids, mask, pixels, padded, np.asarray(grids, np.int64)


def _hf_forward(hf, ids, mask, pixels, grids, **kw):
    with torch.no_grad():
        return hf(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            pixel_values=torch.from_numpy(pixels),
            image_grid_thw=torch.from_numpy(grids),
            mm_token_type_ids=torch.from_numpy((ids == IMG).astype(np.int64)),
            **kw,
        )


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_hidden_states_match_hf(ckpts, ours, name):
    _, hf = ckpts[name]
    model = ours[name]
    ids, mask, pixels, padded, grids = _batch()
    ref = _hf_forward(hf, ids, mask, pixels, grids, output_hidden_states=True)
    out = model(
        jnp.asarray(ids),
        jnp.asarray(padded),
        image_grid_thw=jnp.asarray(grids),
        attention_mask=jnp.asarray(mask),
        output_hidden_states=True,
    )
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], atol=ATOL)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for got, want in list(zip(out.hidden_states, ref.hidden_states, strict=True))[-3:]:
        np.testing.assert_allclose(np.asarray(got)[valid], want.numpy()[valid], atol=ATOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_matches_hf(ckpts, name, tmp_path):
    """20 greedy tokens after an image prompt: positions of the generated tokens follow HF's rope deltas."""
    from vla_foundry_jax.models.generation import generate

    hf = sharpened(ckpts[name][1], tmp_path / name)
    model = loaded(VLMHFParams(hf_pretrained=str(tmp_path / name)))
    ids, mask, pixels, _, grids = _batch(seed=3, pad_rows=0)
    ids, mask = ids[[0, 2]], mask[[0, 2]]
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            pixel_values=torch.from_numpy(pixels),
            image_grid_thw=torch.from_numpy(grids),
            mm_token_type_ids=torch.from_numpy((ids == IMG).astype(np.int64)),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    got = generate(
        model,
        ids,
        mask,
        max_new_tokens=20,
        temperature=0.0,
        pixel_values=pixels,
        image_grid_thw=grids,
    )
    np.testing.assert_array_equal(np.asarray(got), ref)
    assert len(np.unique(ref[:, ids.shape[1] :])) > 4  # not a degenerate repeat


def test_bad_inputs_name_the_field(ours):
    model = ours["qwen2_5_vl"]
    ids, _, _, padded, grids = _batch()
    with pytest.raises(QwenVLInputError, match="image_grid_thw is missing"):
        model(jnp.asarray(ids), jnp.asarray(padded))
    n = int((ids == IMG).sum())
    bad = ids.copy()
    bad[tuple(np.argwhere(ids == IMG)[0])] = 5
    with pytest.raises(QwenVLInputError, match=rf"input_ids hold {n - 1} image tokens .* gives {n}"):
        model(jnp.asarray(bad), jnp.asarray(padded), image_grid_thw=jnp.asarray(grids))
    small = grids.copy()
    small[2] = (1, 1, 36)
    with pytest.raises(QwenVLInputError, match=r"image_grid_thw\[2\] .* smaller than one merged patch"):
        model(jnp.asarray(ids), jnp.asarray(padded), image_grid_thw=jnp.asarray(small))


SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax import nnx
from tests.fixtures.weights import loaded
from vla_foundry_jax.params.model_params import VLMHFParams

model = loaded(VLMHFParams(hf_pretrained=sys.argv[1]))
data = np.load(sys.argv[2])
args = (jnp.asarray(data["ids"]), jnp.asarray(data["pixels"]), jnp.asarray(data["grids"]), jnp.asarray(data["mask"]))
graphdef, state = nnx.split(model)

@jax.jit
def run(state, ids, pixels, grids, mask):
    return nnx.merge(graphdef, state)(ids, pixels, image_grid_thw=grids, attention_mask=mask).logits

one = np.asarray(run(state, *args))
mesh = Mesh(np.array(jax.devices()), ("d",))
rows = NamedSharding(mesh, P("d"))
put = lambda x: jax.device_put(x, rows if x.ndim and x.shape[0] % 8 == 0 else NamedSharding(mesh, P()))
state = jax.tree.map(put, state)  # every array with a leading axis divisible by 8 is split across the devices
sharded = np.asarray(run(state, *(put(a) for a in args)))
print(json.dumps({"devices": len(jax.devices()), "diff": float(np.abs(one - sharded).max())}))
"""


def test_sharded_matches_single_device(ckpts, tmp_path):
    ids, mask, _, padded, grids = _batch(pad_rows=36)  # 128 patch rows: split 8 ways
    np.savez(tmp_path / "batch.npz", ids=ids, mask=mask, pixels=padded, grids=grids)
    done = run_python(SHARDED, ckpts["qwen3_vl"][0], str(tmp_path / "batch.npz"), devices=8, timeout=300)
    result = last_json(done)
    assert result["devices"] == 8 and result["diff"] < 1e-5


def test_vlm_backbone_matches_hf(ckpts, name="qwen3_vl", n_layers=2):
    """``vlm_backbone``: camera images patchified in the model as HF's image processor does; the conditioning is
    HF's last hidden states at an appended action token (embedding table grown by one mean row)."""
    import copy

    from vla_foundry_jax.models.vlm_backbones import QwenVLBackbone
    from vla_foundry_jax.params.model_params import VLMBackboneParams

    path, hf = ckpts[name]
    model = loaded(VLMBackboneParams(hf_pretrained=path, num_vlm_layers_to_use=n_layers))
    assert isinstance(model, QwenVLBackbone) and model.action_token_id == 160
    rng = np.random.default_rng(7)
    cams = rng.standard_normal((2, 2, 16, 24, 3)).astype(np.float32)  # 2 samples x 2 cameras of 16 x 24 pixels
    text = lambda n: list(rng.integers(1, 140, size=n))  # noqa: E731
    ids = np.asarray([text(2) + _image_tokens((1, 4, 6)) * 2 + text(3) for _ in range(2)], np.int64)
    processor = transformers.Qwen2VLImageProcessorPil(
        do_resize=False, do_rescale=False, do_normalize=False, patch_size=PATCH, merge_size=MERGE
    )
    flat = processor(
        images=list(np.moveaxis(cams.reshape(4, 16, 24, 3), -1, 1)), input_data_format="channels_first"
    ).convert_to_tensors("np")
    hf = copy.deepcopy(hf)
    with torch.no_grad():
        hf.resize_token_embeddings(161, mean_resizing=False)
        emb = hf.get_input_embeddings().weight
        emb[-1] = emb[:-1].mean(0)
    ids_a = np.concatenate([ids, np.full((2, 1), 160)], 1)
    ref = _hf_forward(
        hf, ids_a, np.ones_like(ids_a), flat["pixel_values"], flat["image_grid_thw"], output_hidden_states=True
    )
    want = np.concatenate([h.numpy()[:, -1] for h in ref.hidden_states[-n_layers:]], -1)[:, None]
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(cams)))
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_qwen3vl_vla_preset(ckpts):
    """The original's Qwen3-VL-2B-Thinking VLA recipe: its fields, and the policy builds over a Qwen3-VL backbone."""
    from flax import nnx

    from vla_foundry_jax.gin_utils import build_experiment, parse_gin
    from vla_foundry_jax.models import build_model

    dims = ["diffusion_policy.action_dim = 7", "diffusion_policy.proprioception_dim = 3"]
    parse_gin(["vla_diffusion_qwen3vl_2b.gin"], dims)
    model = build_experiment().model
    bb, tp = model.vision_language_backbone, model.transformer
    assert (bb.type, bb.hf_pretrained, bb.num_vlm_layers_to_use) == ("vlm_backbone", "Qwen/Qwen3-VL-2B-Thinking", 4)
    assert (tp.hidden_dim, tp.n_layers, tp.n_heads, tp.is_causal) == (512, 12, 8, False)  # transformer_100m
    assert model.use_flow_matching_scheduler and model.noise_scheduler.clamp_range == (-3.0, 3.0)
    parse_gin(["vla_diffusion_qwen3vl_2b.gin"], [*dims, f"vlm_backbone.hf_pretrained = '{ckpts['qwen3_vl'][0]}'"])
    params = build_experiment().model
    abstract = nnx.eval_shape(lambda: build_model(params, rngs=nnx.Rngs(0), load_weights=False))
    assert abstract.vision_language_backbone.conditioning_dim == 4 * 32
    table = abstract.vision_language_backbone.language_model.embed_tokens
    assert table.shape == (161, 32)  # the checkpoint's 160 rows + the action token


def test_sharded_safetensors_load_the_same(ckpts, ours, tmp_path):
    from flax import nnx

    from vla_foundry_jax import checkpoint as ckpt_lib

    ckpts["qwen2_5_vl"][1].save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    again = loaded(VLMHFParams(hf_pretrained=str(tmp_path)))
    a = ckpt_lib.flat_params(nnx.state(again, nnx.Param))
    b = ckpt_lib.flat_params(nnx.state(ours["qwen2_5_vl"], nnx.Param))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_segment_attention_blocks_equal_dense():
    """Banded (segments within ``chunk`` positions) and aligned (segments starting at multiples of ``chunk``) block
    attention equal one dense segment-masked softmax written here in NumPy."""
    from vla_foundry_jax.layers.attention import segment_attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((40, 2, 8)).astype(np.float32) for _ in range(3))

    def reference(seg):
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(8)
        s = np.where((seg[:, None] == seg[None, :])[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        return np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v)

    ragged = np.repeat(np.arange(5), [7, 12, 3, 12, 6])  # segments of at most 12
    even = np.repeat(np.arange(5), 8)  # segments of 8 starting at multiples of 8
    for seg, chunk, aligned in [(ragged, 12, False), (ragged, None, False), (even, 8, True)]:
        got = segment_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg)[None],
                                chunk=chunk, aligned=aligned)  # fmt: skip
        np.testing.assert_allclose(np.asarray(got), reference(seg), atol=1e-5)
