"""VLM processors: text with ``<image>`` placeholders + images -> fixed-length ids, loss mask, pixel values.

``load_processor(name_or_path, image_size=..., img_num_tokens=..., tokenizer=None)`` returns a
:class:`VLMProcessor`. Two kinds of ``name_or_path``:

* ``"simple_vlm"`` (the original's ``SimpleVLMProcessor``): tokenizer = ``tokenizer`` (a local directory or hub
  id; default the original's ``HuggingFaceTB/SmolVLM2-256M-Video-Instruct``), ``"<image>"`` added as a special
  token if the tokenizer lacks it; images scaled by 1/255, resized to ``image_size x image_size`` with
  **bilinear, align_corners=False, no antialiasing** (``torch.nn.functional.interpolate`` semantics,
  implemented in numpy) and normalised with mean = std = 0.5 (to [-1, 1]).
* a Hugging Face processor: a **local directory** written by ``save_pretrained`` (an image processor config,
  ``preprocessor_config.json``, plus tokenizer files), or a hub id (needs the network or the HF cache; offline
  the error asks for a local directory). The image processor config gives the size (``{height, width}``, or
  ``shortest_edge`` + center ``crop_size``), ``resample``, ``rescale_factor``, mean and std; images are resized
  **with PIL and the config's resample filter** (as Hugging Face's PIL image processors do, i.e. antialiased when
  downscaling), then rescaled and normalised. The tokenizer is ``AutoTokenizer.from_pretrained(path)`` unless
  ``tokenizer`` names another; it must hold ``"<image>"`` (added if missing, like ``simple_vlm``).

A third name, ``"stable_diffusion"`` (the original's ``StableDiffusionProcessor``), is not a VLM processor:
:class:`StableDiffusionProcessor` tokenises the bare caption with a CLIP tokenizer (``data.tokenizer``, which the
stable-diffusion resolver defaults to ``clip.hf_pretrained``) padded / truncated to ``seq_len + 1``
(:func:`tokenize_prompts`) and makes ``[s, s, 3]`` images in [-1, 1], randomly mirrored in training.

In both VLM kinds, a tokenizer without a pad token gets ``"[PAD]"`` (the original's rule for text). Tiling processors
(SmolVLM/Idefics3 ``longest_edge``) and chat templates are not supported: captions use the original's
fallback template, ``"<image> " + caption`` (:func:`caption_text`).

A processor whose image processor is Qwen2-VL's (Qwen2-VL, Qwen2.5-VL, Qwen3-VL checkpoints) is a third kind,
:class:`~vla_foundry_jax.data.qwen_processor.QwenVLProcessor` (variable image sizes as flat patches, its chat
template; see that module).

Output per text (``__call__``): ``input_ids`` int32 ``[max_length]`` right-padded with the pad id / truncated,
where each ``<image>`` became ``img_num_tokens`` copies of ``image_token_id``; ``loss_mask`` bool, True exactly
on real tokens that are not image tokens; ``pixel_values`` float32 **channels-last** ``[H, W, 3]`` per image.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from vla_foundry_jax import paths
from vla_foundry_jax.data.qwen_processor import QwenVLProcessor, is_qwen_image_processor, load_qwen_processor
from vla_foundry_jax.data.shards import DataError

IMAGE_TOKEN = "<image>"
SIMPLE_VLM = "simple_vlm"
SIMPLE_VLM_DEFAULT_TOKENIZER = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"
_PROCESSOR_KWARGS = ("image_token", "add_special_tokens")
_LOCK = threading.RLock()

# PIL resample filters by Hugging Face's PILImageResampling number.
_PIL_FILTERS = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def caption_text(caption: str, num_images: int = 1) -> str:
    """The original's ``apply_chat_template`` fallback (no chat template): ``"<image> " * n + caption``."""
    return f"{IMAGE_TOKEN} " * num_images + caption


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``[H, W, C]`` to ``size = (h, w)`` with align_corners=False and no antialiasing
    (``torch.nn.functional.interpolate(mode="bilinear")``): source coordinate ``(i + 0.5) * H / h - 0.5``,
    clamped at 0; neighbours clamped at the border. Returns float32."""
    x = np.asarray(image, dtype=np.float32)
    in_h, in_w = x.shape[:2]
    out_h, out_w = size
    if (in_h, in_w) == (out_h, out_w):
        return x

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(np.float32)

    y0, y1, wy = axis(in_h, out_h)
    x0, x1, wx = axis(in_w, out_w)
    rows = x[y0] * (1.0 - wy)[:, None, None] + x[y1] * wy[:, None, None]
    return rows[:, x0] * (1.0 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """How a processor turns a uint8 ``[H, W, 3]`` image into pixel values ``[*size, 3]``.

    ``resample``: ``"bilinear"`` = :func:`resize_bilinear` on the rescaled floats (simple_vlm); a PIL filter
    name (``"BILINEAR"``, ``"BICUBIC"``, ...) = PIL resize of the uint8 image (Hugging Face PIL processors).
    ``shortest_edge``: resize the short side to it (aspect kept, long side ``int(s * long / short)``) and
    center-crop to ``size`` (CLIP-style); None: resize straight to ``size``.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1.0 / 255.0
    do_rescale: bool = True
    do_normalize: bool = True
    resample: str = "bilinear"
    shortest_edge: int | None = None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[-1] != 3:
            raise DataError(f"expected an RGB image [H, W, 3], got shape {img.shape}.")
        if self.resample == "bilinear":
            x = img.astype(np.float32) * (np.float32(self.rescale_factor) if self.do_rescale else np.float32(1))
            x = resize_bilinear(x, self.size)
        else:
            x = self._pil_resize(img.astype(np.uint8)).astype(np.float32)
            if self.do_rescale:
                x = x * np.float32(self.rescale_factor)
        if self.do_normalize:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _pil_resize(self, img: np.ndarray) -> np.ndarray:
        from PIL import Image

        resample = getattr(Image.Resampling, self.resample)
        pil = Image.fromarray(img)
        h, w = self.size
        if self.shortest_edge is None:
            return np.asarray(pil.resize((w, h), resample=resample)) if pil.size != (w, h) else img
        in_h, in_w = img.shape[:2]
        short, long = min(in_h, in_w), max(in_h, in_w)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        new_h, new_w = (new_short, new_long) if in_h <= in_w else (new_long, new_short)
        out = np.asarray(pil.resize((new_w, new_h), resample=resample)) if (new_h, new_w) != (in_h, in_w) else img
        if new_h < h or new_w < w:
            raise DataError(f"image resized to {new_h}x{new_w} is smaller than the processor's crop {h}x{w}.")
        top, left = (new_h - h) // 2, (new_w - w) // 2
        return out[top : top + h, left : left + w]


class VLMProcessor:
    """Tokenizer + image preprocessing for VLM data; see the module docstring for the semantics.

    Attributes: ``tokenizer`` (a ``transformers`` tokenizer), ``image_token_id``, ``pad_token_id``,
    ``eos_token_id`` (None if the tokenizer has none), ``vocab_len`` (``len(tokenizer)``, counts added tokens),
    ``img_num_tokens``, ``image_size`` (``(H, W)`` of pixel_values), ``image_config``.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_config: ImageConfig,
        *,
        img_num_tokens: int,
        image_token: str = IMAGE_TOKEN,
        add_special_tokens: bool = True,
        name: str = "",
    ) -> None:
        if img_num_tokens <= 0:
            raise ValueError(f"img_num_tokens must be positive, got {img_num_tokens}.")
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.img_num_tokens = img_num_tokens
        self.image_token = image_token
        self.add_special_tokens = add_special_tokens
        self.name = name
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(image_token))
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.eos_token_id = None if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id)
        self.vocab_len = len(tokenizer)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.image_config.size

    def __repr__(self) -> str:
        return (
            f"VLMProcessor({self.name!r}, image_size={self.image_size}, img_num_tokens={self.img_num_tokens}, "
            f"image_token_id={self.image_token_id}, pad_token_id={self.pad_token_id}, vocab_len={self.vocab_len})"
        )

    def preprocess_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 ``[H, W, 3]`` -> float32 ``[*image_size, 3]`` (resized, rescaled, normalised)."""
        return self.image_config(image)

    def token_ids(self, text: str, *, append_eos: bool = False) -> list[int]:
        """Token ids of ``text`` with every ``<image>`` expanded to ``img_num_tokens`` image tokens (and the eos
        id appended when asked and the tokenizer did not already end with it). No padding or truncation."""
        # Plain call without padding/truncation arguments: those mutate the shared Rust tokenizer, which is not
        # safe from several reader threads at once.
        ids = list(self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"])
        if append_eos and self.eos_token_id is not None and (not ids or ids[-1] != self.eos_token_id):
            ids.append(self.eos_token_id)
        out: list[int] = []
        for i in ids:
            if i == self.image_token_id:
                out.extend([self.image_token_id] * self.img_num_tokens)
            else:
                out.append(int(i))
        return out

    def __call__(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[str],
        max_length: int,
        *,
        append_eos: bool = False,
    ) -> dict[str, np.ndarray]:
        """Process a batch: ``images`` (uint8 ``[H, W, 3]``, one per ``<image>`` in ``texts``, in order) and
        ``texts`` -> ``{"input_ids": int32 [n, max_length], "loss_mask": bool [n, max_length],
        "pixel_values": float32 [len(images), H, W, 3]}``. Truncation that would cut image tokens raises."""
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(images):
            raise DataError(
                f"{len(images)} image(s) given for {n_placeholders} {self.image_token!r} placeholder(s) in the texts; "
                "give one image per placeholder."
            )
        ids = np.full((len(texts), max_length), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(texts), max_length), dtype=bool)
        for row, text in enumerate(texts):
            tokens = np.asarray(self.token_ids(text, append_eos=append_eos), dtype=np.int64)
            n = min(len(tokens), max_length)
            if (tokens[n:] == self.image_token_id).any():
                raise DataError(
                    f"text {text[:80]!r} needs {len(tokens)} tokens ({self.img_num_tokens} per image) but "
                    f"max_length is {max_length}: truncation would cut image tokens. Raise data.seq_len (or lower "
                    "img_num_tokens)."
                )
            ids[row, :n] = tokens[:n]
            mask[row, :n] = tokens[:n] != self.image_token_id
        h, w = self.image_size
        pixels = np.zeros((len(images), h, w, 3), dtype=np.float32)
        for i, image in enumerate(images):
            pixels[i] = self.preprocess_image(image)
        return {"input_ids": ids, "loss_mask": mask, "pixel_values": pixels}


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _looks_like_path(name: str) -> bool:
    """True for existing paths and for names that cannot be hub ids (absolute, ./x, a/b/c, ~/x)."""
    return os.path.exists(name) or not _HUB_ID.match(name)


def _not_local(name: str) -> str:
    return f"no local directory {name!r} exists (cwd {os.getcwd()!r})"


def _load_tokenizer(name: str, what: str) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover
        raise ImportError("image_caption data needs `transformers` (pip install transformers).") from e
    if paths.is_remote(name):  # s3://, gs://, hf://: a cached local copy
        name = paths.local_dir(name)
    if _looks_like_path(name) and not os.path.isdir(name):
        raise DataError(f"Cannot find {what} {name!r}: {_not_local(name)}; give a directory from save_pretrained.")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise DataError(
            f"Cannot load {what} {name!r} ({_not_local(name)}; as a hub id: {e}). Pass a local directory (a "
            "tokenizer / processor saved with save_pretrained); hub ids only work where the Hugging Face hub or its "
            "cache is reachable (offline, HF_HUB_OFFLINE=1 makes this fail without retrying)."
        ) from e


def _prepare_tokenizer(tok: Any, image_token: str, name: str) -> Any:
    if image_token not in tok.get_vocab():
        logging.info("Tokenizer %s has no %r token: adding it as a special token.", name, image_token)
        tok.add_special_tokens({"additional_special_tokens": [image_token]})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


def _size_hw(size: Any, what: str) -> tuple[tuple[int, int] | None, int | None]:
    """HF image processor ``size`` -> ((h, w) or None, shortest_edge or None)."""
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if isinstance(size, int):
        return (size, size), None
    if get("height") and get("width"):
        return (int(get("height")), int(get("width"))), None
    if get("shortest_edge"):
        return None, int(get("shortest_edge"))
    raise DataError(
        f"Image processor of {what} has size {size!r}: only fixed sizes ({{height, width}}) or shortest_edge + "
        "center crop are supported (tiling processors such as SmolVLM's longest_edge are not)."
    )


def _auto_image_processor(name: str) -> Any:
    """Hugging Face's image processor of ``name`` (its PIL / numpy backend: no torch needed)."""
    try:
        from transformers import AutoImageProcessor
    except ImportError as e:  # pragma: no cover
        raise ImportError("image_caption data needs `transformers` (pip install transformers).") from e
    try:
        return AutoImageProcessor.from_pretrained(name, backend="pil")
    except (OSError, ValueError) as e:
        where = "" if os.path.isdir(name) else f" ({_not_local(name)}; as a hub id)"
        raise DataError(
            f"Cannot load the image processor of processor {name!r}{where}: {e}. Pass a local directory holding a "
            "processor saved with save_pretrained (preprocessor_config.json + tokenizer files); hub ids only work "
            "where the Hugging Face hub or its cache is reachable (offline, HF_HUB_OFFLINE=1 skips the retries)."
        ) from e


def _hf_image_config(name: str, ip: Any) -> ImageConfig:
    hw, shortest = _size_hw(getattr(ip, "size", None), f"processor {name!r}")
    if shortest is not None:
        if not getattr(ip, "do_center_crop", False):
            raise DataError(f"processor {name!r} resizes the shortest edge without a center crop (variable sizes).")
        hw, _ = _size_hw(ip.crop_size, f"processor {name!r} (crop_size)")
    resample = getattr(ip, "resample", None)
    resample = 2 if resample is None else int(resample)
    if resample not in _PIL_FILTERS:
        raise DataError(f"processor {name!r}: unknown resample filter {resample}.")
    mean = getattr(ip, "image_mean", None) or (0.0, 0.0, 0.0)
    std = getattr(ip, "image_std", None) or (1.0, 1.0, 1.0)
    return ImageConfig(
        size=hw,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
        do_rescale=bool(getattr(ip, "do_rescale", True)),
        do_normalize=bool(getattr(ip, "do_normalize", True)),
        resample=_PIL_FILTERS[resample],
        shortest_edge=shortest,
    )


@functools.cache
def _load_cached(
    name: str, image_size: int, img_num_tokens: int, tokenizer: str | None, kwargs_json: str
) -> VLMProcessor | QwenVLProcessor:
    kwargs = json.loads(kwargs_json)
    if paths.is_remote(name):  # s3://, gs://, hf://: a cached local copy
        name = paths.local_dir(name)
    image_processor = None
    if name != SIMPLE_VLM:
        if _looks_like_path(name) and not os.path.isdir(name):
            raise DataError(
                f"Processor directory {name!r} not found (cwd {os.getcwd()!r}). data.processor must be 'simple_vlm', "
                "a local directory written by save_pretrained (image processor + tokenizer) or a hub id."
            )
        image_processor = _auto_image_processor(name)
        if is_qwen_image_processor(image_processor):
            what = "the tokenizer of processor" if tokenizer is None else "tokenizer"
            return load_qwen_processor(name, image_processor, _load_tokenizer(tokenizer or name, what), kwargs)
    unknown = sorted(set(kwargs) - set(_PROCESSOR_KWARGS))
    if unknown:
        raise DataError(f"Unknown processor_kwargs {unknown}; supported: {list(_PROCESSOR_KWARGS)}.")
    image_token = kwargs.get("image_token", IMAGE_TOKEN)
    if name == SIMPLE_VLM:
        tok_name = tokenizer or SIMPLE_VLM_DEFAULT_TOKENIZER
        tok = _load_tokenizer(tok_name, "the simple_vlm tokenizer (data.tokenizer)")
        image = ImageConfig(size=(image_size, image_size))
    else:
        image = _hf_image_config(name, image_processor)
        tok = _load_tokenizer(tokenizer or name, "the tokenizer of processor" if tokenizer is None else "tokenizer")
        if image.size != (image_size, image_size):
            logging.info("Processor %s makes %s images; data.image_size=%d is not used.", name, image.size, image_size)
    tok = _prepare_tokenizer(tok, image_token, tokenizer or name)
    return VLMProcessor(
        tok,
        image,
        img_num_tokens=img_num_tokens,
        image_token=image_token,
        add_special_tokens=bool(kwargs.get("add_special_tokens", True)),
        name=name,
    )


def load_processor(
    name_or_path: str,
    *,
    image_size: int,
    img_num_tokens: int,
    tokenizer: str | None = None,
    **kwargs: Any,
) -> VLMProcessor | QwenVLProcessor:
    """Load (once per argument set; shared by threads) the processor ``name_or_path`` (a Qwen-VL image processor
    gives a :class:`~vla_foundry_jax.data.qwen_processor.QwenVLProcessor`).

    ``kwargs`` (the data params' ``processor_kwargs``): ``image_token`` (default ``"<image>"``),
    ``add_special_tokens`` (tokenizer's BOS/EOS post-processing, default True). Raises ``DataError`` with
    the fix for a missing directory, an unreachable hub id or an unsupported image processor.
    """
    with _LOCK:
        return _load_cached(
            str(name_or_path), int(image_size), int(img_num_tokens), tokenizer, json.dumps(kwargs, sort_keys=True)
        )


def processor_for_data(data: Any) -> VLMProcessor | QwenVLProcessor | StableDiffusionProcessor:
    """The processor an ``image_caption`` data params object names (``"stable_diffusion"``: the
    :class:`StableDiffusionProcessor` with ``data.tokenizer``, ``data.image_size`` and ``seq_len + 1`` tokens)."""
    if data.processor == STABLE_DIFFUSION:
        return load_sd_processor(data.tokenizer, image_size=data.image_size, max_length=data.seq_len + 1)
    return load_processor(
        data.processor,
        image_size=data.image_size,
        img_num_tokens=data.img_num_tokens,
        tokenizer=data.tokenizer,
        **dict(data.processor_kwargs),
    )


def processor_info(data: Any) -> dict[str, Any]:
    """What a VLM needs from its data before building: ``vocab_len``, ``pad_token_id``, ``image_token_id``,
    ``eos_token_id``, ``img_num_tokens`` and ``image_size`` ``(H, W)``."""
    p = processor_for_data(data)
    return {
        "vocab_len": p.vocab_len,
        "pad_token_id": p.pad_token_id,
        "image_token_id": p.image_token_id,
        "eos_token_id": p.eos_token_id,
        "img_num_tokens": p.img_num_tokens,
        "image_size": p.image_size,
    }


# ---------------------------------------------------------------- stable diffusion (the original's "stable_diffusion")

STABLE_DIFFUSION = "stable_diffusion"


def tokenize_prompts(tokenizer: Any, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-style prompts -> ``(input_ids int32 [n, length], attention_mask int32 [n, length])``.

    Each text is tokenised with the tokenizer's special tokens (``bos ... eos``), right-padded with the pad id
    (eos when the tokenizer has none). A text longer than ``length`` tokens is **truncated** to ``length``
    tokens keeping its final eos (what HF's ``CLIPTokenizer(..., truncation=True, max_length=length)`` returns).
    """
    if length < 2:
        raise ValueError(f"prompt length must be >= 2 (bos + eos), got {length}.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    ids = np.full((len(texts), length), pad, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
        # no padding/truncation arguments: they mutate the shared Rust tokenizer (not thread-safe)
        toks = list(tokenizer(text)["input_ids"])
        if len(toks) > length:
            toks = toks[: length - 1] + ([eos] if eos is not None and toks[-1] == eos else toks[length - 1 : length])
        ids[row, : len(toks)] = toks
        mask[row, : len(toks)] = 1
    return ids, mask


class StableDiffusionProcessor:
    """The original's ``StableDiffusionProcessor``: caption -> CLIP token ids padded to ``max_length`` (truncated
    beyond it, :func:`tokenize_prompts`); image -> PIL bilinear (antialiased) resize to ``image_size``, a random
    horizontal flip with probability ``flip_prob`` in training, ``[0, 255] -> [-1, 1]``.

    ``__call__(image uint8 [H, W, 3], caption, rng, train)`` returns ``{"pixel_values": float32 [s, s, 3]}`` plus
    ``input_ids`` / ``attention_mask`` int32 ``[max_length]`` when a tokenizer is given (None: unconditional
    training, images only). The flip mirrors the width axis only (axis 1 of channels-last ``[H, W, 3]``), so
    colours are untouched; captions describe no left/right, so a mirrored image still matches its caption.

    Difference from the original: the caption is tokenised as is. The original wraps it with its no-chat-template
    fallback (``"<image> " + caption``), so its text encoder is trained on prompts that its ``generate`` never sees.
    """

    def __init__(self, tokenizer: Any | None, image_size: int, max_length: int, *, flip_prob: float = 0.5) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.max_length = int(max_length)
        self.flip_prob = float(flip_prob)
        self.pad_token_id = 0
        if tokenizer is not None:
            self.pad_token_id = int(
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )

    def __repr__(self) -> str:
        return (
            f"StableDiffusionProcessor(image_size={self.image_size}, max_length={self.max_length}, "
            f"text={self.tokenizer is not None})"
        )

    def preprocess_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 ``[H, W, 3]`` -> float32 ``[image_size, image_size, 3]`` in [-1, 1] (no flip)."""
        config = ImageConfig(size=(self.image_size, self.image_size), resample="BILINEAR")
        return config(np.asarray(image, np.uint8))

    def __call__(
        self, image: np.ndarray, caption: str, rng: np.random.Generator | None = None, *, train: bool = True
    ) -> dict[str, np.ndarray]:
        pixels = self.preprocess_image(image)
        if train and rng is not None and self.flip_prob > 0 and rng.random() < self.flip_prob:
            pixels = np.ascontiguousarray(pixels[:, ::-1, :])
        out = {"pixel_values": pixels}
        if self.tokenizer is not None:
            ids, mask = tokenize_prompts(self.tokenizer, [caption], self.max_length)
            out |= {"input_ids": ids[0], "attention_mask": mask[0]}
        return out


@functools.cache
def _load_sd_cached(tokenizer: str | None, image_size: int, max_length: int) -> StableDiffusionProcessor:
    tok = None if tokenizer is None else _load_tokenizer(tokenizer, "the stable_diffusion tokenizer (data.tokenizer)")
    return StableDiffusionProcessor(tok, image_size, max_length)


def load_sd_processor(tokenizer: str | None, *, image_size: int, max_length: int) -> StableDiffusionProcessor:
    """The ``stable_diffusion`` processor (once per argument set; shared by threads). ``tokenizer``: a CLIP
    checkpoint / tokenizer directory or hub id (None: images only)."""
    with _LOCK:
        return _load_sd_cached(tokenizer, int(image_size), int(max_length))
