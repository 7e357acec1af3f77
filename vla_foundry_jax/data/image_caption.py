"""The ``image_caption`` modality: ``<key>.txt`` caption + ``<key>.{jpg,png,jpeg,webp}`` image (+ optional
``<key>.json`` metadata) -> processor outputs for a VLM.

Per sample (in grain's reader threads)::

    decode_sample              caption (UTF-8, stripped), image (PIL -> RGB uint8 [H, W, 3]), metadata
                               (called by the transform on the raw shard sample)
    ImageCaptionTransform      augment (crop, colour jitter; see data.augment) with grain's per-sample rng,
                               text = "<image> " + caption (the original's no-chat-template fallback), eos
                               appended, processor -> input_ids int32 [seq_len + 1], loss_mask bool
                               [seq_len + 1], pixel_values float32 [1, H, W, 3] (one image; the leading axis
                               is the image axis, so several cameras fit later)

With a Qwen-VL processor (``data.qwen_processor``) the text is its chat template over the image and the caption
(the original's ``apply_chat_template``; longer texts are truncated to ``seq_len + 1`` tokens, never through image
tokens) and the image flat patches: ``pixel_values float32 [max_patches_per_image, patch_dim]`` (zero rows past
the image) and ``image_grid_thw int32 [1, 3]``.

With the ``stable_diffusion`` processor (``image_caption.processor = "stable_diffusion"``) the transform gives
``pixel_values float32 [s, s, 3]`` in [-1, 1] (randomly mirrored in training), ``input_ids`` and
``attention_mask`` int32 ``[seq_len + 1]`` (CLIP tokens of the bare caption; see
``data.processor.StableDiffusionProcessor``), so batches are ``pixel_values [B, s, s, 3]``.

Bad samples (``BadSampleError``; skipped, warned and counted by the pipeline as for every modality, see
``data.bad_samples``): a sample without a caption or an image (the original drops such samples), a caption that
is not UTF-8, and image bytes PIL cannot decode (``CorruptImageError``). The replacement is the next element of
the same dataset, so it is deterministic and a resumed run reads the same samples; the neighbour is then seen
twice in that epoch. ``ImageCaptionSource`` applies the same policy to decoded samples for direct reading.
"""

from __future__ import annotations

import io
import json
from typing import Any

import grain
import numpy as np

from vla_foundry_jax.data.augment import augment_images
from vla_foundry_jax.data.bad_samples import MAX_CONSECUTIVE_BAD, BadSampleLog, SkipBadSamples
from vla_foundry_jax.data.processor import StableDiffusionProcessor, VLMProcessor, caption_text
from vla_foundry_jax.data.qwen_processor import QwenVLProcessor
from vla_foundry_jax.data.shards import BadSampleError, ShardDataSource
from vla_foundry_jax.data.text import pad_or_truncate, sample_where, untokenized_text
from vla_foundry_jax.params.data_params import DataAugmentationParams

IMAGE_FIELDS = ("jpg", "png", "jpeg", "webp")
CAPTION_FIELD = "txt"
METADATA_FIELD = "json"


class CorruptImageError(BadSampleError):
    """Image bytes that PIL cannot decode."""


def image_field(sample: dict[str, Any]) -> str | None:
    """The sample's image member (first of jpg, png, jpeg, webp; case-insensitive), or None."""
    lower = {k.lower(): k for k in sample if not k.startswith("__")}
    for ext in IMAGE_FIELDS:
        if ext in lower:
            return lower[ext]
    return None


def decode_image(data: bytes, *, where: str = "image", sample: dict[str, Any] | None = None) -> np.ndarray:
    """Image bytes -> RGB uint8 ``[H, W, 3]`` (PIL; palette, grey and alpha images converted to RGB).

    Undecodable bytes raise ``CorruptImageError`` (naming the shard and key of the raw ``sample`` when given)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise CorruptImageError.of(sample or {}, f"{where}: cannot decode the image ({type(e).__name__}: {e}).") from e


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw shard sample -> ``{"__key__", "__shard__", "caption": str, "image": uint8 [H, W, 3], "metadata"}``.

    Raises ``BadSampleError`` for a missing caption / image or a caption that is not UTF-8, and its subclass
    ``CorruptImageError`` for undecodable image bytes.
    """
    where = sample_where(sample)
    fields = sorted(k for k in sample if not k.startswith("__"))
    field = image_field(sample)
    if field is None:
        raise BadSampleError.of(
            sample,
            f"image_caption data: {where} has no image member (<key>.jpg/.png/.jpeg/.webp); fields: {fields}. "
            "Is this manifest really image_caption data (data.dataset_modality)?",
        )
    if CAPTION_FIELD not in sample:
        raise BadSampleError.of(
            sample, f"image_caption data: {where} has no caption member (<key>.txt); fields: {fields}."
        )
    try:
        caption = sample[CAPTION_FIELD].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadSampleError.of(sample, f"image_caption data: the caption of {where} is not UTF-8: {e}") from e
    metadata = None
    if METADATA_FIELD in sample:
        try:
            metadata = json.loads(sample[METADATA_FIELD])
        except (json.JSONDecodeError, UnicodeDecodeError):
            metadata = None  # metadata is informative only
    image = decode_image(sample[field], where=f"image_caption data: {where}", sample=sample)
    return {
        "__key__": sample["__key__"],
        "__shard__": sample["__shard__"],
        "caption": caption,
        "image": image,
        "metadata": metadata,
    }


class ImageCaptionSource:
    """Random-access decoded image-caption samples (``decode_sample``) over a :class:`ShardDataSource`, with the
    bad-sample policy of ``data.bad_samples``: a bad sample is replaced by the next good one (index + 1, + 2,
    ... modulo the length). ``skipped``: replacements made so far; ``corrupt_keys``: distinct ``shard/key`` met."""

    def __init__(self, source: ShardDataSource, *, max_consecutive_corrupt: int = MAX_CONSECUTIVE_BAD) -> None:
        self.source = source
        self.log = BadSampleLog()
        self._decoded = SkipBadSamples(
            grain.MapDataset.source(source).map(decode_sample),
            self.log,
            [source],
            max_consecutive=max_consecutive_corrupt,
            count_key=None,
            what=f"image_caption data {source.manifest_path!r}",
        )

    @property
    def skipped(self) -> int:
        return self.log.count

    @property
    def corrupt_keys(self) -> set[str]:
        return set(self.log.keys)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._decoded[int(index)]

    def __repr__(self) -> str:
        return f"ImageCaptionSource({self.source!r}, skipped={self.skipped})"


class ImageCaptionTransform:
    """Decoded sample -> ``{"input_ids": int32 [seq_len+1], "loss_mask": bool [seq_len+1],
    "pixel_values": float32 [1, H, W, 3]}``. Used with ``MapDataset.random_map`` (``rng`` drives the
    augmentation); ``train=False`` centres crops and skips the colour jitter."""

    def __init__(
        self,
        processor: VLMProcessor,
        seq_len: int,
        augmentation: DataAugmentationParams | None = None,
        *,
        train: bool = True,
        append_eos: bool = True,
    ) -> None:
        self.processor = processor
        self.seq_len = seq_len
        self.augmentation = augmentation
        self.train = train
        self.append_eos = append_eos

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        if "image" not in sample:  # a raw shard sample (not yet decoded by ImageCaptionSource)
            sample = decode_sample(sample)
        where = f"image_caption data: {sample_where(sample)}"
        (image,) = augment_images([sample["image"]], self.augmentation, rng, train=self.train, where=where)
        if isinstance(self.processor, StableDiffusionProcessor):  # [s, s, 3] in [-1, 1] (+ ids, attention_mask)
            return self.processor(image, sample["caption"], rng, train=self.train)
        if isinstance(self.processor, QwenVLProcessor):  # chat template, flat patches padded + image_grid_thw
            text = self.processor.prompt(1, sample["caption"])
            length = self.seq_len + 1
            out = self.processor([image], text, length, append_eos=self.append_eos, truncate=True, where=where)
            return {k: out[k] for k in ("input_ids", "loss_mask", "pixel_values", "image_grid_thw")}
        out = self.processor([image], [caption_text(sample["caption"])], self.seq_len + 1, append_eos=self.append_eos)
        return {
            "input_ids": out["input_ids"][0],
            "loss_mask": out["loss_mask"][0],
            "pixel_values": out["pixel_values"],  # [1, H, W, 3]
        }


class ProcessorTextTransform:
    """``text_untokenized`` manifests inside an ``image_caption`` run: raw text tokenized with the processor's
    tokenizer, right-padded with its pad id / truncated to ``seq_len + 1`` (same output as the text modality)."""

    def __init__(self, processor: VLMProcessor, seq_len: int, field: str = "json") -> None:
        self.processor = processor
        self.seq_len = seq_len
        self.field = field

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        del rng
        text = untokenized_text(sample, self.field)
        ids = np.asarray(self.processor.token_ids(text), dtype=np.int64)
        return pad_or_truncate(ids, self.seq_len + 1, self.processor.pad_token_id)
