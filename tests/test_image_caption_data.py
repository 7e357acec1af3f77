"""image_caption data: processor, augmentation, corrupted images, batches, mixing with text, eval, tiny data."""

from __future__ import annotations

import gzip
import io
import json
import os

import gin
import numpy as np
import pytest

from tests.fixtures.paths import PROCESSOR, TINY
from vla_foundry_jax.data import (
    DataError,
    ImageCaptionSource,
    ShardDataSource,
    build_eval_iterator,
    build_train_iterator,
    load_processor,
    processor_info,
    write_shards,
)
from vla_foundry_jax.data.augment import (
    JitterDraw,
    adjust_hue,
    apply_jitter,
    augment_images,
    crop_window,
    draw_jitter,
)
from vla_foundry_jax.data.image_caption import ImageCaptionTransform, decode_sample
from vla_foundry_jax.data.pipeline import batch_choices
from vla_foundry_jax.data.processor import processor_for_data, resize_bilinear
from vla_foundry_jax.params.base import ParamsError, params_from_dict
from vla_foundry_jax.params.data_params import (
    ColorJitterParams,
    CropParams,
    DataAugmentationParams,
    ImageAugmentationParams,
    ImageCaptionDataParams,
)
from vla_foundry_jax.testbeds.tiny_datasets import SHAPE_COLORS, SHAPE_NAMES, make_tiny_vlm_datasets

TOKENIZER = os.path.join(TINY, "tokenizer")
SHAPES_TRAIN = os.path.join(TINY, "shapes", "train", "manifest.jsonl")
SHAPES_VAL = os.path.join(TINY, "shapes", "val", "manifest.jsonl")
IMG_TOKENS = 4
SEQ = 12  # "<image>"x4 + "a red ball ." + eos = 9 tokens
IMAGE_ID = 142  # "<image>" appended to the 142-token tiny tokenizer


def _data(**kw) -> ImageCaptionDataParams:
    base = dict(
        dataset_manifest=[SHAPES_TRAIN],
        processor=PROCESSOR,
        img_num_tokens=IMG_TOKENS,
        image_size=32,
        seq_len=SEQ,
        num_workers=0,
    )
    return ImageCaptionDataParams(**{**base, **kw})


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _caption_samples(n: int, *, size: int = 16, corrupt: tuple[int, ...] = ()) -> list[dict[str, bytes]]:
    """Sample i: a constant image of value 10 * i and caption "a red ball ."; ``corrupt`` indices get bad bytes."""
    out = []
    for i in range(n):
        img = np.full((size, size, 3), 10 * i, np.uint8)
        data = b"\x89PNG not really an image" if i in corrupt else _png(img)
        out.append({"__key__": f"{i:04d}", "txt": b"a red ball .", "png": data, "json": b'{"uid": 1}'})
    return out


# ---------------------------------------------------------------- processor


def test_resize_bilinear_by_hand_and_against_torch():
    x = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    # 4 -> 2: source coordinates (i + 0.5) * 2 - 0.5 = 0.5, 2.5: means of rows/cols (0, 1) and (2, 3)
    down = resize_bilinear(x, (2, 2))[..., 0]
    np.testing.assert_allclose(down, [[2.5, 4.5], [10.5, 12.5]])
    # 2 -> 4 on [[0, 1], [2, 3]]: source coordinates -0.25 (clamped to 0), 0.25, 0.75, 1.25 (right neighbour clamped)
    up = resize_bilinear(np.array([[0, 1], [2, 3]], np.float32)[..., None], (4, 4))[..., 0]
    w = np.array([0.0, 0.25, 0.75, 1.0], np.float32)
    np.testing.assert_allclose(up, w[:, None] * 2 + w[None, :], atol=1e-6)
    import torch

    rng = np.random.default_rng(0)
    img = rng.random((7, 9, 3), dtype=np.float32)
    for size in ((3, 5), (11, 4), (7, 9)):
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(img).permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False
        )[0].permute(1, 2, 0)
        np.testing.assert_allclose(resize_bilinear(img, size), ref.numpy(), atol=1e-6)


def test_simple_vlm_processor_tokens_mask_and_pixels():
    proc = load_processor("simple_vlm", image_size=2, img_num_tokens=3, tokenizer=TOKENIZER)
    tok = proc.tokenizer
    assert proc.image_token_id == tok.convert_tokens_to_ids("<image>") == IMAGE_ID
    assert proc.vocab_len == len(tok) == 143 and proc.pad_token_id == 0 and proc.eos_token_id == 2
    img = np.array([[[0, 0, 0], [255, 255, 255]], [[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [51, 102, 204]]], np.uint8)
    img = np.repeat(img, 2, axis=1)  # [3, 4, 3] -> resized to 2x2
    out = proc([img], ["<image> a red ball ."], 10, append_eos=True)
    words = tok("a red ball .", add_special_tokens=False)["input_ids"]
    assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (1, 10)
    assert out["input_ids"][0].tolist() == [IMAGE_ID] * 3 + words + [2] + [0] * 2
    assert out["loss_mask"].dtype == np.bool_
    assert out["loss_mask"][0].tolist() == [False] * 3 + [True] * 5 + [False] * 2
    # pixels: x / 255, bilinear (align_corners=False) to 2x2, then (x - 0.5) / 0.5; channels last
    pv = out["pixel_values"]
    assert pv.shape == (1, 2, 2, 3) and pv.dtype == np.float32
    expect = resize_bilinear(img.astype(np.float32) / 255.0, (2, 2)) * 2.0 - 1.0
    np.testing.assert_allclose(pv[0], expect, atol=1e-6)
    # H: 3 -> 2, source rows 0.25 and 1.75; W: 4 -> 2, source cols 0.5 and 2.5 (cols 0/1 and 2/3 are equal)
    row0 = 0.75 * img[0, 0] + 0.25 * img[1, 0]
    np.testing.assert_allclose(pv[0, 0, 0], row0 / 255.0 * 2 - 1, atol=1e-6)
    # several texts; one image per placeholder; without eos
    two = proc([img, img, img], ["<image> a", "<image> <image> b"], 8)
    assert (two["input_ids"] == IMAGE_ID).sum(1).tolist() == [3, 6] and two["pixel_values"].shape[0] == 3
    with pytest.raises(DataError, match="one image per placeholder"):
        proc([img], ["<image> a", "<image> b"], 8)
    with pytest.raises(DataError, match="truncation would cut image tokens"):
        proc([img], ["a b <image>"], 4)


def test_hf_processor_directory_matches_transformers():
    proc = load_processor(PROCESSOR, image_size=224, img_num_tokens=IMG_TOKENS)
    assert (proc.vocab_len, proc.image_token_id, proc.pad_token_id, proc.image_size) == (143, IMAGE_ID, 0, (32, 32))
    assert proc.image_config.resample == "BILINEAR" and proc.image_config.mean == (0.5, 0.5, 0.5)
    info = processor_info(_data())
    from_data = processor_for_data(_data())  # the processor a data params names (params do no I/O)
    assert (from_data.image_token_id, from_data.pad_token_id) == (IMAGE_ID, 0)
    assert info["vocab_len"] == 143 and info["image_token_id"] == IMAGE_ID and info["eos_token_id"] == 2
    img = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    from transformers import AutoImageProcessor

    ref = AutoImageProcessor.from_pretrained(PROCESSOR)(images=[img], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(proc.preprocess_image(img), np.transpose(ref, (1, 2, 0)), atol=1e-5)


def test_unknown_processor_errors(tmp_path, monkeypatch):
    missing = str(tmp_path / "no_such_processor")
    with pytest.raises(DataError, match=r"(?s)no_such_processor.*not found.*save_pretrained"):
        load_processor(missing, image_size=32, img_num_tokens=4)
    with pytest.raises(DataError, match=r"Unknown processor_kwargs \['bogus'\]"):
        load_processor(PROCESSOR, image_size=32, img_num_tokens=4, bogus=1)
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", offline)
    with pytest.raises(DataError, match=r"(?s)some-org/some-vlm.*Pass a local directory"):
        load_processor("some-org/some-vlm", image_size=32, img_num_tokens=4)


# ---------------------------------------------------------------- augmentation


def test_crop_windows():
    center = CropParams(enabled=True, shape=(4, 6), mode="center")
    assert crop_window(10, 10, center, None) == (3, 2, 4, 6)
    assert crop_window(9, 13, center, None) == (2, 4, 4, 6)  # round(2.5) = 2, round(3.5) = 4 (Python rounding)
    rand = CropParams(enabled=True, shape=(4, 6))
    windows = {crop_window(10, 12, rand, np.random.default_rng(s)) for s in range(50)}
    assert all(0 <= t <= 6 and 0 <= left <= 6 and (h, w) == (4, 6) for t, left, h, w in windows)
    assert len(windows) > 10
    assert crop_window(10, 12, rand, np.random.default_rng(3)) == crop_window(10, 12, rand, np.random.default_rng(3))
    ratio = CropParams(enabled=True, shape=(0.5, 0.75))
    t, left, h, w = crop_window(11, 20, ratio, np.random.default_rng(0))
    assert (h, w) == (5, 15) and 0 <= t <= 6 and 0 <= left <= 5
    assert crop_window(11, 20, ratio, None, center=True) == (3, 2, 5, 15)
    with pytest.raises(DataError, match=r"10x12 pixels is smaller than the crop 16x6"):
        crop_window(10, 12, CropParams(enabled=True, shape=(16, 6)), np.random.default_rng(0))
    with pytest.raises(ParamsError, match="random only"):
        CropParams(shape=(0.5, 0.5), mode="center")
    with pytest.raises(ParamsError, match="whole pixels"):
        CropParams(shape=(0.5, 100))
    with pytest.raises(ParamsError, match=r"crop\.mode"):
        CropParams(mode="left")


def test_color_jitter_by_hand():
    img = np.full((4, 4, 3), 100, np.uint8)
    off = dict(brightness=None, contrast=None, saturation=None, hue=None)
    for factor, value in ((1.5, 150), (3.0, 255), (0.333, 33)):  # x * f, clamped, truncated
        out = apply_jitter(img, JitterDraw((0, 1, 2, 3), **{**off, "brightness": factor}))
        assert out.dtype == np.uint8 and (out == value).all()
    # contrast blends with the mean of the floored grayscale: gray(100) = floor(99.99) = 99
    out = apply_jitter(img, JitterDraw((0, 1, 2, 3), **{**off, "contrast": 0.5}))
    assert (out == 99).all()  # 0.5 * 100 + 0.5 * 99 = 99.5 -> 99
    two = np.zeros((2, 1, 3), np.uint8)
    two[1] = 200  # gray values 0 and floor(199.98) = 199 -> mean 99.5
    out = apply_jitter(two, JitterDraw((1,), **{**off, "contrast": 2.0}))
    assert out[:, 0, 0].tolist() == [0, 255]  # 2 * 0 - 99.5 -> 0; 2 * 200 - 99.5 = 300.5 -> 255
    out = apply_jitter(two, JitterDraw((1,), **{**off, "contrast": 0.5}))
    assert out[:, 0, 0].tolist() == [49, 149]  # 49.75, 149.75 truncated
    # saturation 0 = grayscale; hue: red + 1/3 turn = green; hue 0 = identity
    colour = np.array([[[200, 100, 50]]], np.uint8)
    gray = int(np.floor(np.float32(200 * 0.2989) + np.float32(100 * 0.587) + np.float32(50 * 0.114)))
    assert apply_jitter(colour, JitterDraw((2,), **{**off, "saturation": 0.0}))[0, 0].tolist() == [gray] * 3
    assert adjust_hue(np.array([[[255, 0, 0]]], np.uint8), 1 / 3)[0, 0].tolist() == [0, 255, 0]
    rnd = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(adjust_hue(rnd, 0.0), rnd)
    # draws: factors within their ranges, order a permutation
    params = ColorJitterParams(enabled=True, brightness=0.2, contrast=0.0, saturation=0.5, hue=(-0.1, 0.0))
    for s in range(20):
        d = draw_jitter(params, np.random.default_rng(s))
        assert sorted(d.order) == [0, 1, 2, 3] and d.contrast is None
        assert 0.8 <= d.brightness <= 1.2 and 0.5 <= d.saturation <= 1.5 and -0.1 <= d.hue <= 0.0


def test_augment_images_deterministic_joint_and_eval():
    aug = DataAugmentationParams(
        image=ImageAugmentationParams(
            color_jitter=ColorJitterParams(enabled=True), crop=CropParams(enabled=True, shape=(0.75, 0.75))
        )
    )
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    one = augment_images([a, b], aug, np.random.default_rng(5))
    again = augment_images([a, b], aug, np.random.default_rng(5))
    other = augment_images([a, b], aug, np.random.default_rng(6))
    assert one[0].shape == (12, 12, 3)
    np.testing.assert_array_equal(one[0], again[0])
    assert not np.array_equal(one[0], other[0])
    same = augment_images([a, a], aug, np.random.default_rng(5))  # same shape: same window and jitter
    np.testing.assert_array_equal(same[0], same[1])
    ev = augment_images([a], aug, None, train=False)[0]  # centred crop, no jitter
    np.testing.assert_array_equal(ev, a[2:14, 2:14])
    assert augment_images([a], aug.replace(enabled=False), None)[0] is not None
    np.testing.assert_array_equal(augment_images([a], aug.replace(enabled=False), None)[0], a)


# ---------------------------------------------------------------- params and gin


def test_params_gin_and_json_round_trip():
    gin.clear_config()
    try:
        gin.parse_config(
            [
                "image_caption.processor = 'simple_vlm'",
                "image_caption.tokenizer = 'tiny_data/tokenizer'",
                "image_caption.img_num_tokens = 16",
                "image_caption.augmentation = @data_augmentation()",
                "data_augmentation.image = @image_augmentation()",
                "image_augmentation.crop = @crop()",
                "crop.enabled = True",
                "crop.shape = (0.9, 0.9)",
                "image_augmentation.color_jitter = @color_jitter()",
                "color_jitter.enabled = True",
                "color_jitter.hue = (-0.1, 0.1)",
            ]
        )
        data = ImageCaptionDataParams(dataset_manifest=["m"])
    finally:
        gin.clear_config()
    assert data.type == "image_caption" and data.img_num_tokens == 16 and data.processor == "simple_vlm"
    assert data.augmentation.image.crop.enabled and data.augmentation.image.crop.shape == (0.9, 0.9)
    assert data.augmentation.image.color_jitter.hue == (-0.1, 0.1)
    again = params_from_dict(json.loads(data.to_json()), family="data")
    assert again == data and hash(again) == hash(data)
    defaults = ImageCaptionDataParams()
    assert defaults.processor == "google/paligemma-3b-pt-224" and defaults.tokenizer is None
    assert defaults.augmentation.enabled and not defaults.augmentation.image.crop.enabled
    assert (
        defaults.augmentation.image.crop.shape == (224, 224)
        and defaults.augmentation.image.color_jitter.contrast == 0.4
    )
    ImageCaptionDataParams(dataset_manifest=["a", "b"], dataset_modality=["image_caption", "text"])
    with pytest.raises(ParamsError, match="hue"):
        ColorJitterParams(hue=(0.2, -0.2))


# ---------------------------------------------------------------- decoding, corrupted images, errors


def test_decode_and_missing_members():
    sample = {"__key__": "k1", "__shard__": "s0", "txt": b" a red ball .\n", "PNG": _png(np.zeros((5, 7, 3), np.uint8))}
    out = decode_sample(sample)
    assert out["caption"] == "a red ball ." and out["image"].shape == (5, 7, 3) and out["image"].dtype == np.uint8
    with pytest.raises(DataError, match=r"(?s)'k2' of shard 's3' has no image member.*\['json', 'txt'\]"):
        decode_sample({"__key__": "k2", "__shard__": "s3", "txt": b"x", "json": b"{}"})
    with pytest.raises(DataError, match=r"'k3'.*no caption"):
        decode_sample({"__key__": "k3", "__shard__": "s3", "jpg": b"x"})


def test_corrupted_images_are_skipped_and_counted(tmp_path):
    manifest = write_shards(str(tmp_path / "ic"), _caption_samples(8, corrupt=(2, 3)), samples_per_shard=3)
    src = ImageCaptionSource(ShardDataSource(manifest))
    assert src[1]["image"][0, 0, 0] == 10
    assert src[2]["__key__"] == "0004" and src[3]["__key__"] == "0004"  # replaced by the next decodable sample
    assert src.skipped == 3 and src.corrupt_keys == {"shard-0000/0002", "shard-0001/0003"}
    data = _data(dataset_manifest=[manifest], shuffle=False, max_bad_sample_fraction=0.5)  # 3 of 8 may be bad
    it = build_train_iterator(data, global_batch_size=4, num_batches=2)
    values = np.concatenate([b["pixel_values"][:, 0, 0, 0, 0] for b in it])
    expect = np.array([0, 10, 40, 40, 40, 50, 60, 70], np.float32) / 255.0 * 2 - 1
    np.testing.assert_allclose(values, expect, atol=1e-6)
    assert it.corrupt_images_skipped == 3
    broken = write_shards(str(tmp_path / "bad"), _caption_samples(4, corrupt=(0, 1, 2, 3)), samples_per_shard=4)
    with pytest.raises(DataError, match=r"consecutive samples.*undecodable"):
        ImageCaptionSource(ShardDataSource(broken))[0]


def test_pipeline_errors(tmp_path):
    no_image = [{"__key__": "0001", "txt": b"a red ball ."}]
    manifest = write_shards(str(tmp_path / "noimg"), no_image, samples_per_shard=1)
    with pytest.raises(DataError, match=r"'0001' of shard 'shard-0000' has no image member"):
        next(build_train_iterator(_data(dataset_manifest=[manifest]), global_batch_size=1, num_batches=1))
    big_crop = _data(
        augmentation=DataAugmentationParams(
            image=ImageAugmentationParams(crop=CropParams(enabled=True, shape=(64, 64)))
        )
    )
    with pytest.raises(DataError, match=r"48x48 pixels is smaller than the crop 64x64"):
        next(build_train_iterator(big_crop, global_batch_size=1, num_batches=1))
    with pytest.raises(DataError, match="not found"):
        build_train_iterator(_data(processor=str(tmp_path / "nope")), global_batch_size=1, num_batches=1)


# ---------------------------------------------------------------- batches from the tiny shapes data


def test_tiny_shapes_batches():
    data = _data(
        augmentation=DataAugmentationParams(
            image=ImageAugmentationParams(
                crop=CropParams(enabled=True, shape=(40, 40)), color_jitter=ColorJitterParams(enabled=True)
            )
        )
    )
    it = build_train_iterator(data, global_batch_size=6, num_batches=2)
    batch = next(it)
    assert set(batch) == {"input_ids", "loss_mask", "pixel_values"}
    assert batch["input_ids"].shape == (6, SEQ + 1) and batch["input_ids"].dtype == np.int32
    assert batch["loss_mask"].shape == (6, SEQ + 1) and batch["loss_mask"].dtype == np.bool_
    assert batch["pixel_values"].shape == (6, 1, 32, 32, 3) and batch["pixel_values"].dtype == np.float32
    assert np.abs(batch["pixel_values"]).max() <= 1.0
    ids = batch["input_ids"]
    assert (ids[:, :IMG_TOKENS] == IMAGE_ID).all() and ((ids == IMAGE_ID).sum(1) == IMG_TOKENS).all()
    tok = load_processor(PROCESSOR, image_size=32, img_num_tokens=IMG_TOKENS).tokenizer
    for row, mask in zip(ids, batch["loss_mask"], strict=True):
        words = tok.convert_ids_to_tokens(row[mask].tolist())
        assert (
            words[0] == "a"
            and words[1] in SHAPE_COLORS
            and words[2] in SHAPE_NAMES
            and words[3:]
            == [
                ".",
                "<|endoftext|>",
            ]
        )
        assert (row[~mask][IMG_TOKENS:] == 0).all()
    again = next(build_train_iterator(data, global_batch_size=6, num_batches=2))
    np.testing.assert_array_equal(again["pixel_values"], batch["pixel_values"])  # augmentation fixed by (seed, index)


# ---------------------------------------------------------------- mixing image_caption with text


def _text_manifest(root, n: int) -> str:
    samples = [
        {"__key__": f"{i:06d}", "json.gz": gzip.compress(json.dumps([1000 + i] * (SEQ + 1)).encode(), mtime=0)}
        for i in range(n)
    ]
    return write_shards(str(root / "text"), samples, samples_per_shard=100)


def test_mixed_text_and_image_caption(tmp_path):
    text = _text_manifest(tmp_path, 400)
    data = _data(
        dataset_manifest=[SHAPES_TRAIN, text],
        dataset_modality=["image_caption", "text"],
        dataset_weighting=[1, 3],
        prefetch_factor=2,
        num_workers=2,
    )
    n = 120
    it = build_train_iterator(data, global_batch_size=2, num_batches=n)
    batches = list(it)
    kinds = np.array([int("pixel_values" not in b) for b in batches])
    np.testing.assert_array_equal(kinds, it.batch_datasets)  # each batch from one dataset, as announced
    for b, k in zip(batches, kinds, strict=True):
        assert set(b) == ({"input_ids", "loss_mask"} if k else {"input_ids", "loss_mask", "pixel_values"})
        if k:
            assert (b["input_ids"] >= 1000).all()
    assert abs(kinds.mean() - 0.75) < 0.12
    text_rows = np.concatenate([b["input_ids"][:, 0] for b in batches if "pixel_values" not in b])
    assert len(set(text_rows.tolist())) == len(text_rows)  # each text sample once
    # prefix-stable choice of the datasets: a longer run starts with the same batches
    np.testing.assert_array_equal(batch_choices([1, 3], 50, data.seed), batch_choices([1, 3], 100, data.seed)[:50])
    # exact resume
    it2 = build_train_iterator(data, global_batch_size=2, num_batches=n)
    for _ in range(7):
        next(it2)
    state = json.loads(json.dumps(it2.get_state()))
    resumed = build_train_iterator(data, global_batch_size=2, num_batches=n)
    resumed.set_state(state)
    for t in range(7, 17):
        got = next(resumed)
        assert set(got) == set(batches[t])
        for key in got:
            np.testing.assert_array_equal(got[key], batches[t][key])
    # per-host rows: the two hosts' batches concatenate to the global batch
    hosts = [
        build_train_iterator(data, global_batch_size=2, num_batches=20, process_index=p, process_count=2)
        for p in range(2)
    ]
    for t in range(20):
        parts = [next(h) for h in hosts]
        for key in batches[t]:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batches[t][key])
    # not enough text for a long run without repetition
    with pytest.raises(DataError, match=r"(?s)text/manifest\.jsonl.*picked for .* global batches"):
        build_train_iterator(data, global_batch_size=8, num_batches=100)


def test_two_image_caption_datasets_mix_per_sample():
    data = _data(dataset_manifest=[SHAPES_TRAIN, SHAPES_VAL], dataset_weighting=[1, 1])
    it = build_train_iterator(data, global_batch_size=4, num_batches=2)
    assert it.batch_datasets is None
    assert next(it)["pixel_values"].shape == (4, 1, 32, 32, 3)


# ---------------------------------------------------------------- evaluation


def test_eval_iterator_in_order_padded_and_sliced_by_host(tmp_path):
    manifest = write_shards(str(tmp_path / "ev"), _caption_samples(7, size=40), samples_per_shard=3)
    data = _data(
        val_dataset_manifest=[manifest],
        augmentation=DataAugmentationParams(
            image=ImageAugmentationParams(
                crop=CropParams(enabled=True, shape=(0.5, 0.5)), color_jitter=ColorJitterParams(enabled=True)
            )
        ),
    )
    ev = build_eval_iterator(data, global_batch_size=4)
    assert len(ev) == 2 and ev.num_samples == 7
    batches = list(ev)
    assert [b["valid"].tolist() for b in batches] == [[True] * 4, [True] * 3 + [False]]
    values = np.concatenate([b["pixel_values"][:, 0, 0, 0, 0] for b in batches])
    expect = np.array([0, 10, 20, 30, 40, 50, 60], np.float32) / 255 * 2 - 1  # in order, no jitter
    np.testing.assert_allclose(values[:7], expect, atol=1e-6)
    pad = batches[1]
    assert not pad["loss_mask"][3].any() and (pad["input_ids"][3] == 0).all() and (pad["pixel_values"][3] == 0).all()
    assert [len(b["valid"]) for b in ev] == [4, 4]  # re-iterable
    hosts = [build_eval_iterator(data, manifest, global_batch_size=4, process_index=p, process_count=2) for p in (0, 1)]
    for t, parts in enumerate(zip(*hosts, strict=True)):
        for key in batches[t]:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batches[t][key])
    # a transform with train=False centres the ratio crop (20x20 of 40x40 -> rows 10:30)
    proc = load_processor(PROCESSOR, image_size=32, img_num_tokens=IMG_TOKENS)
    t = ImageCaptionTransform(proc, SEQ, data.augmentation, train=False)
    img = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    out = t({"__key__": "k", "__shard__": "s", "caption": "a red ball .", "image": img})
    np.testing.assert_allclose(out["pixel_values"][0], proc.preprocess_image(img[10:30, 10:30]))


# ---------------------------------------------------------------- bundled tiny data


@pytest.mark.skipif(not os.path.isdir(os.path.join(TINY, "shapes")), reason="tiny_data/shapes not generated")
def test_bundled_shapes_and_processor_match_generator(tmp_path):
    make_tiny_vlm_datasets(str(tmp_path))
    for sub in ("shapes/train", "shapes/val", "vlm_processor"):
        names = sorted(os.listdir(os.path.join(TINY, sub)))
        assert names == sorted(os.listdir(os.path.join(tmp_path, sub)))
        for name in names:
            with open(os.path.join(TINY, sub, name), "rb") as f, open(os.path.join(tmp_path, sub, name), "rb") as g:
                assert f.read() == g.read(), f"tiny_data/{sub}/{name} differs from the generator's output"
    total = sum(
        os.path.getsize(os.path.join(r, f))
        for sub in ("shapes", "vlm_processor")
        for r, _, fs in os.walk(os.path.join(TINY, sub))
        for f in fs
    )
    assert total < 3_000_000
    train, val = ShardDataSource(SHAPES_TRAIN), ShardDataSource(SHAPES_VAL)
    assert (len(train), len(val)) == (1024, 192)
    captions = {decode_sample(train[i])["caption"] for i in range(0, 1024, 4)}
    assert len(captions) == len(SHAPE_COLORS) * len(SHAPE_NAMES)  # every colour x shape appears
    sample = decode_sample(val[0])
    assert sample["image"].shape == (48, 48, 3)
    assert sample["caption"].split()[1] in SHAPE_COLORS and sample["caption"].split()[2] in SHAPE_NAMES
