"""The Qwen-VL processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) for ``image_caption`` and ``robotics`` data.

``data.processor`` names a local ``save_pretrained`` directory or a hub id whose image processor is Hugging Face's
``Qwen2VLImageProcessor`` (``image_processor_type`` ``Qwen2VLImageProcessor*``); :func:`load_processor` in
:mod:`vla_foundry_jax.data.processor` then returns a :class:`QwenVLProcessor`:

* images go through transformers' own PIL/numpy image processor (``Qwen2VLImageProcessorPil``; the default
  "fast" one needs torch): smart resize (sides multiples of ``patch_size * merge_size``, area between
  ``min_pixels`` and ``max_pixels``, aspect kept; bicubic), rescale, normalise, then flat patches
  ``[t * h * w, C * temporal_patch_size * patch_size^2]`` (a still image repeated ``temporal_patch_size`` times)
  with ``image_grid_thw = (1, h, w)`` in patches;
* text is the processor's chat template (``chat_template.jinja`` / ``chat_template.json`` of the directory, or the
  tokenizer's) over one user message holding one ``{"type": "image"}`` entry per image then the text, as the
  original's ``apply_chat_template``; each ``<|image_pad|>`` then becomes ``h * w / merge_size^2`` copies of the
  image token (what ``Qwen2VLProcessor`` / ``Qwen3VLProcessor`` write).

``processor_kwargs``: ``min_pixels``, ``max_pixels`` (or ``size = {"shortest_edge": min, "longest_edge": max}``)
override the directory's. ``size = {"height": h, "width": w}`` (what the original's robotics presets pass, written
for fixed-size processors; Qwen's rejects it) is read as a budget of exactly ``h * w`` pixels: ``min_pixels =
max_pixels = h * w``, so a ``h x w`` camera image whose sides are multiples of ``patch_size * merge_size`` keeps its
size.

**Static shapes.** Patch counts vary with the image size, but a jitted step needs fixed shapes. Each sample's
flat patches are padded with zero rows to a fixed ``num_images * max_patches_per_image`` rows, where
``max_patches_per_image = max_pixels / patch_size^2`` (rounded down to a multiple of ``merge_size^2``) is the most
a smart-resized image can have. So every batch of a run has one shape and the step compiles once. The valid rows
of a sample are implied by its ``image_grid_thw`` (``sum(t * h * w)``), so no mask travels with them; the model
packs the samples' valid rows together in (sample, image) order (``models.qwen_vl.pack_sample_patches``). Because
every array keeps the sample on its leading axis, splitting a batch (hosts, micro-batches, the policy's head
repeats, which run the backbone once per sample) is a plain slice: the original instead slices its flat
``pixel_values`` by the cumulative patch counts of ``image_grid_thw``. The price is padding: choose ``max_pixels``
to fit the images (a cap above :data:`MAX_PATCHES_PER_IMAGE` patches is refused with that advice).

Per sample (``__call__``): ``input_ids`` int32 ``[length]`` right-padded with the pad id, ``loss_mask`` bool (real
tokens that are not image tokens), ``attention_mask`` int32, ``pixel_values`` float32 ``[n * max_patches_per_image,
patch_dim]`` and ``image_grid_thw`` int32 ``[n, 3]``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vla_foundry_jax.data.shards import DataError

QWEN_IMAGE_PROCESSOR = "Qwen2VLImageProcessor"  # HF class name prefix (…Pil, …Fast)
IMAGE_PAD = "<|image_pad|>"
QWEN_KWARGS = ("min_pixels", "max_pixels", "size")
MAX_PATCHES_PER_IMAGE = 16384
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def is_qwen_image_processor(image_processor: Any) -> bool:
    """True for transformers' Qwen2-VL image processors (used by Qwen2-VL, Qwen2.5-VL and Qwen3-VL)."""
    return type(image_processor).__name__.startswith(QWEN_IMAGE_PROCESSOR)


def read_chat_template(directory: str) -> str | None:
    """The chat template a processor's ``save_pretrained`` wrote in ``directory`` (None when there is none)."""
    if not directory:
        return None
    for name in CHAT_TEMPLATE_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def _pixel_bounds(image_processor: Any, kwargs: dict[str, Any], name: str) -> tuple[int, int]:
    size = dict(getattr(image_processor, "size", None) or {})
    lo, hi = size.get("shortest_edge"), size.get("longest_edge")
    given = kwargs.get("size")
    if isinstance(given, dict) and set(given) == {"height", "width"}:  # a fixed-size processor's size: its area
        lo = hi = int(given["height"]) * int(given["width"])
    elif given is not None:
        if not isinstance(given, dict) or set(given) - {"shortest_edge", "longest_edge"}:
            raise DataError(
                f"processor_kwargs size = {given!r} for the Qwen-VL processor {name!r}: give "
                "{'shortest_edge': min_pixels, 'longest_edge': max_pixels}, {'height': h, 'width': w} (a budget of "
                "h * w pixels) or min_pixels / max_pixels."
            )
        lo, hi = given.get("shortest_edge", lo), given.get("longest_edge", hi)
    lo, hi = kwargs.get("min_pixels", lo), kwargs.get("max_pixels", hi)
    if not lo or not hi or int(lo) > int(hi):
        raise DataError(f"Qwen-VL processor {name!r}: min_pixels = {lo}, max_pixels = {hi}; need 0 < min <= max.")
    return int(lo), int(hi)


class QwenVLProcessor:
    """Qwen-VL text + image processing for one sample at a time (module docstring).

    Attributes as :class:`~vla_foundry_jax.data.processor.VLMProcessor` where they apply (``tokenizer``,
    ``image_token``, ``image_token_id``, ``pad_token_id``, ``eos_token_id``, ``vocab_len``, ``name``), plus
    ``image_processor`` (HF's PIL one), ``chat_template``, ``patch_size``, ``merge_size``, ``temporal_patch_size``,
    ``patch_dim``, ``min_pixels``, ``max_pixels`` and ``max_patches_per_image``.
    """

    kind = "qwen_vl"

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None, *, name: str = "") -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.name = name
        ip = image_processor
        self.patch_size, self.merge_size = int(ip.patch_size), int(ip.merge_size)
        self.temporal_patch_size = int(ip.temporal_patch_size)
        self.patch_dim = 3 * self.temporal_patch_size * self.patch_size**2
        self.min_pixels, self.max_pixels = int(ip.size["shortest_edge"]), int(ip.size["longest_edge"])
        unit = self.merge_size**2
        self.max_patches_per_image = self.max_pixels // self.patch_size**2 // unit * unit
        factor = self.patch_size * self.merge_size
        if self.max_patches_per_image < unit:
            raise DataError(
                f"Qwen-VL processor {name!r}: max_pixels = {self.max_pixels} is smaller than one merged patch "
                f"({factor} x {factor} pixels); raise processor_kwargs max_pixels to at least {factor * factor}."
            )
        if self.max_patches_per_image > MAX_PATCHES_PER_IMAGE:
            raise DataError(
                f"Qwen-VL processor {name!r}: max_pixels = {self.max_pixels} allows {self.max_patches_per_image} "
                f"patches per image, and every sample is padded to that many (static shapes); set the data's "
                f"processor_kwargs = {{'max_pixels': N}} with N at most {MAX_PATCHES_PER_IMAGE * self.patch_size**2} "
                f"(e.g. {224 * 224} for 224 x 224 camera images)."
            )
        if IMAGE_PAD not in tokenizer.get_vocab():
            raise DataError(
                f"Qwen-VL processor {name!r}: its tokenizer has no {IMAGE_PAD!r} token; give the processor directory "
                "of the Qwen-VL checkpoint (tokenizer and image processor saved together)."
            )
        if not self.chat_template:
            raise DataError(
                f"Qwen-VL processor {name!r} has no chat template (chat_template.jinja, chat_template.json or the "
                "tokenizer's); it places the image tokens. Save the processor with its chat template."
            )
        self.image_token = IMAGE_PAD
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_PAD))
        if tokenizer.pad_token_id is None:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.eos_token_id = None if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id)
        self.vocab_len = len(tokenizer)

    def __repr__(self) -> str:
        return (
            f"QwenVLProcessor({self.name!r}, patch_size={self.patch_size}, merge_size={self.merge_size}, "
            f"pixels=[{self.min_pixels}, {self.max_pixels}], image_token_id={self.image_token_id})"
        )

    def max_patches(self, num_images: int) -> int:
        """Rows of a sample's padded ``pixel_values`` for ``num_images`` images."""
        return num_images * self.max_patches_per_image

    def prompt(self, num_images: int, text: str) -> str:
        """The chat template over one user message: ``num_images`` image entries, then ``text``."""
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=False,
        )

    def image_patches(self, image: np.ndarray, where: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[H, W, 3]`` -> (flat patches float32 ``[t * h * w, patch_dim]``, ``image_grid_thw`` ``[3]``)."""
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[-1] != 3:
            raise DataError(f"{where}: expected an RGB image [H, W, 3], got shape {img.shape}.")
        factor = self.patch_size * self.merge_size
        try:
            out = self.image_processor(images=[img.astype(np.uint8)], input_data_format="channels_last")
        except ValueError as e:  # smart_resize: aspect ratio above 200
            raise DataError(
                f"{where} of {img.shape[0]} x {img.shape[1]} pixels cannot be resized for Qwen-VL ({e}); crop or pad "
                "it in the data (or drop it)."
            ) from e
        grid = np.asarray(out["image_grid_thw"], np.int64).reshape(3)
        if grid[1] < self.merge_size or grid[2] < self.merge_size:
            raise DataError(
                f"{where} of {img.shape[0]} x {img.shape[1]} pixels resizes to {grid[1]} x {grid[2]} patches, less "
                f"than one merged patch ({factor} x {factor} pixels); raise the processor's min_pixels to at least "
                f"{factor * factor} (processor_kwargs min_pixels) or give larger images."
            )
        patches = np.asarray(out["pixel_values"], np.float32)
        if patches.shape[0] > self.max_patches_per_image:
            raise DataError(
                f"{where} of {img.shape[0]} x {img.shape[1]} pixels gives {patches.shape[0]} patches, more than the "
                f"{self.max_patches_per_image} that max_pixels = {self.max_pixels} allows (a very elongated image); "
                "crop it or raise processor_kwargs max_pixels."
            )
        return patches, grid

    def token_ids(self, text: str, tokens_per_image: Sequence[int], *, append_eos: bool = False) -> list[int]:
        """Token ids of ``text`` with the i-th ``<|image_pad|>`` expanded to ``tokens_per_image[i]`` image tokens."""
        ids = list(self.tokenizer(text)["input_ids"])
        if append_eos and self.eos_token_id is not None and (not ids or ids[-1] != self.eos_token_id):
            ids.append(self.eos_token_id)
        found = sum(i == self.image_token_id for i in ids)
        if found != len(tokens_per_image):
            raise DataError(
                f"the prompt {text[:120]!r} holds {found} {IMAGE_PAD!r} placeholder(s) for {len(tokens_per_image)} "
                "image(s); the chat template must write one per image entry."
            )
        counts = iter(tokens_per_image)
        out: list[int] = []
        for i in ids:
            out.extend([self.image_token_id] * next(counts) if i == self.image_token_id else [int(i)])
        return out

    def __call__(
        self,
        images: Sequence[np.ndarray],
        text: str,
        length: int,
        *,
        append_eos: bool = False,
        truncate: bool = False,
        where: str = "sample",
    ) -> dict[str, np.ndarray]:
        """One sample: uint8 ``images`` and the prompt ``text`` (already templated, one ``<|image_pad|>`` per
        image) -> the arrays of the module docstring, text padded to ``length``. A longer text raises unless
        ``truncate`` (then it is cut, but never through image tokens)."""
        n = len(images)
        pixels = np.zeros((self.max_patches(n), self.patch_dim), np.float32)
        grids = np.zeros((n, 3), np.int32)
        row = 0
        for i, image in enumerate(images):
            patches, grid = self.image_patches(image, f"{where}, image {i}")
            pixels[row : row + len(patches)] = patches
            row += len(patches)
            grids[i] = grid
        unit = self.merge_size**2
        tokens = np.asarray(self.token_ids(text, [int(g.prod()) // unit for g in grids], append_eos=append_eos))
        if len(tokens) > length:
            if not truncate or (tokens[length:] == self.image_token_id).any():
                raise DataError(
                    f"{where}: the prompt needs {len(tokens)} tokens (image tokens: "
                    f"{[int(g.prod()) // unit for g in grids]}) but the data's sequence length is {length}"
                    f"{' and truncation would cut image tokens' if truncate else ''}; raise seq_len (robotics: "
                    "max_text_seq_len) or lower processor_kwargs max_pixels."
                )
            tokens = tokens[:length]
        ids = np.full(length, self.pad_token_id, np.int32)
        ids[: len(tokens)] = tokens
        attention = np.zeros(length, np.int32)
        attention[: len(tokens)] = 1
        return {
            "input_ids": ids,
            "loss_mask": (attention == 1) & (ids != self.image_token_id),
            "attention_mask": attention,
            "pixel_values": pixels,
            "image_grid_thw": grids,
        }


def load_qwen_processor(name: str, image_processor: Any, tokenizer: Any, kwargs: dict[str, Any]) -> QwenVLProcessor:
    """A :class:`QwenVLProcessor` from an already loaded HF image processor and tokenizer of ``name``."""
    from transformers import Qwen2VLImageProcessorPil

    unknown = sorted(set(kwargs) - set(QWEN_KWARGS))
    if unknown:
        raise DataError(
            f"Unknown processor_kwargs {unknown} for the Qwen-VL processor {name!r}; supported: {QWEN_KWARGS}."
        )
    lo, hi = _pixel_bounds(image_processor, kwargs, name)
    config = {k: v for k, v in image_processor.to_dict().items() if not k.startswith("_")}
    config.update(size={"shortest_edge": lo, "longest_edge": hi})
    for key in ("image_processor_type", "processor_class", "min_pixels", "max_pixels", "backend"):
        config.pop(key, None)
    pil = Qwen2VLImageProcessorPil(**config)
    template = read_chat_template(name if os.path.isdir(name) else _hub_files(name))
    return QwenVLProcessor(tokenizer, pil, template, name=name)


def _hub_files(repo: str) -> str:
    """A local directory holding the chat-template files of hub repo ``repo`` that exist (maybe none)."""
    from huggingface_hub import hf_hub_download

    directory = ""
    for filename in CHAT_TEMPLATE_FILES:
        try:
            directory = os.path.dirname(hf_hub_download(repo, filename))
        except Exception as e:  # a missing file or no network: the tokenizer's template is used
            logging.info("No %s in %s (%s).", filename, repo, type(e).__name__)
    return directory
