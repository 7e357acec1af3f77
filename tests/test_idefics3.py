"""``vlm_hf`` for Idefics3 / SmolVLM: logits parity with HF's ``*ForConditionalGeneration`` (untiled, full images)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.fixtures.hf_checkpoints import (  # noqa: E402
    IMAGE_TOKEN,
    hf_greedy,
    idefics3_config,
    save_perturbed,
    torch_images,
)
from tests.fixtures.weights import loaded, sharpened  # noqa: E402
from vla_foundry_jax.layers.pixel_shuffle import pixel_shuffle  # noqa: E402
from vla_foundry_jax.models.idefics3 import Idefics3  # noqa: E402
from vla_foundry_jax.models.vlm import ImageTokenError  # noqa: E402
from vla_foundry_jax.params import HyperParams  # noqa: E402
from vla_foundry_jax.params.model_params import VLMHFParams  # noqa: E402
from vla_foundry_jax.registry import get_loss, model_record  # noqa: E402

ATOL = 1e-4
T_IMG = (16 // 4) ** 2 // 4  # 16 patches, pixel shuffle by 2: 4 tokens per image


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("idefics3")
    out = {}
    for name, tie in (("idefics3", False), ("smolvlm", True)):
        cls_model = (
            transformers.Idefics3ForConditionalGeneration
            if name == "idefics3"
            else transformers.SmolVLMForConditionalGeneration
        )
        cfg = idefics3_config(smolvlm=name == "smolvlm", tie=tie)
        out[name] = save_perturbed(cls_model, cfg, root / name)
    return out


def _inputs(b=2, n_img=1, seed=0):
    """``<fake>`` + ``n_img`` runs of image tokens between text tokens; channels-last images ``[B, N, 16, 16, 3]``."""
    rng = np.random.default_rng(seed)
    S = 3 + n_img * (T_IMG + 2) + 4
    ids = rng.integers(1, 90, size=(b, S)).astype(np.int64)
    for i in range(b):
        start = 1 + i  # per-sample placement differs
        for k in range(n_img):
            s = start + k * (T_IMG + 2)
            ids[i, s : s + T_IMG] = IMAGE_TOKEN
    images = rng.standard_normal((b, n_img, 16, 16, 3)).astype(np.float32)
    return ids, images


def _hf_logits(hf, ids, images):
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(ids), pixel_values=torch_images(images)).logits.numpy()


@pytest.mark.parametrize(("name", "n_img"), [("idefics3", 1), ("smolvlm", 1), ("idefics3", 2)])
def test_idefics3_logits_match_hf(ckpts, name, n_img):
    path, hf = ckpts[name]
    model = loaded(VLMHFParams(hf_pretrained=path))
    assert isinstance(model, Idefics3) and model.config.model_type == name
    assert model.config.tokens_per_image == T_IMG
    assert model.config.text.tie_word_embeddings == (name == "smolvlm")
    ids, images = _inputs(n_img=n_img)
    ref = _hf_logits(hf, ids, images)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(images)).logits)
    np.testing.assert_allclose(out, ref, atol=ATOL)
    if n_img == 1:  # [B, img, img, 3] (one image per sample) too
        np.testing.assert_allclose(
            np.asarray(model(jnp.asarray(ids), jnp.asarray(images[:, 0])).logits), ref, atol=ATOL
        )


def test_pixel_shuffle_matches_hf_connector():
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    x = np.random.default_rng(0).standard_normal((2, 36, 5)).astype(np.float32)
    for s in (2, 3):
        ref = Idefics3Connector.pixel_shuffle(None, torch.from_numpy(x), s).numpy()
        np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x), s)), ref)


@pytest.mark.parametrize("side", [4, 26, 32])
def test_hf_position_ids_are_row_major_for_full_images(side):
    """Our tower adds position ``i`` to patch ``i``; HF's bucketed ids agree for full images of these grid sides."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    cfg = transformers.Idefics3VisionConfig(hidden_size=2, image_size=side * 2, patch_size=2, num_channels=3)
    emb = Idefics3VisionEmbeddings(cfg)
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.copy_(torch.arange(side * side, dtype=torch.float32)[:, None].repeat(1, 2))
        out = emb(torch.zeros(1, 3, side * 2, side * 2), torch.ones(1, side, side, dtype=torch.bool))
    np.testing.assert_array_equal(out[0, :, 0].numpy(), np.arange(side * side, dtype=np.float32))


def test_idefics3_loss_and_batch_check(ckpts):
    path, hf = ckpts["smolvlm"]
    params = VLMHFParams(hf_pretrained=path)
    ids, images = _inputs()
    batch = {"input_ids": ids, "pixel_values": images}
    model_record("vlm_hf").batch_check(params, batch)
    bad = ids.copy()
    bad[0, ids[0] == IMAGE_TOKEN] = 5
    with pytest.raises(ImageTokenError, match="sample 0 holds 0 image tokens"):
        model_record("vlm_hf").batch_check(params, {"input_ids": bad, "pixel_values": images})
    model = loaded(params)
    loss, _ = get_loss("vlm_hf")(
        model, {k: jnp.asarray(v) for k, v in batch.items()}, hparams=HyperParams(precision="fp32")
    )
    logits = torch.from_numpy(_hf_logits(hf, ids[:, :-1], images))
    targets = torch.from_numpy(ids[:, 1:])
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    ref = ce[targets != IMAGE_TOKEN].mean().item()
    assert float(loss) == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_idefics3_greedy_generation_matches_hf(ckpts, name, tmp_path):
    """20 greedy tokens after a prompt holding two images, as HF ``generate``."""
    from vla_foundry_jax.models.generation import generate

    hf = sharpened(ckpts[name][1], tmp_path / name)
    model = loaded(VLMHFParams(hf_pretrained=str(tmp_path / name)))
    ids, images = _inputs(n_img=2, seed=4)
    ref = hf_greedy(
        hf,
        input_ids=torch.from_numpy(ids),
        pixel_values=torch_images(images),
        attention_mask=torch.ones(ids.shape, dtype=torch.long),
    )
    got = np.asarray(generate(model, ids, max_new_tokens=20, temperature=0.0, pixel_values=images))
    np.testing.assert_array_equal(got, ref)
    assert len(np.unique(ref[:, ids.shape[1] :])) > 4  # not a degenerate repeat
