"""Data params: one frozen dataclass per data ``type`` (text, text_untokenized, image_caption; robotics
arrives with its pipeline), and the image augmentation params. Field names follow the original where they
mean the same in a grain pipeline; the webdataset-specific knobs (shuffle buffers, torch workers) have no
equivalent.
"""

from __future__ import annotations

import dataclasses

from vla_foundry_jax.params.base import BaseParams, ParamsError, register_params

MODALITIES = ("text", "text_untokenized", "image_caption", "robotics")
# Which on-disk modality each data type can read (the original's compatibility table).
COMPATIBLE_MODALITIES = {
    "text": ("text", "text_untokenized"),
    "text_untokenized": ("text_untokenized",),
    # (JAX) a VLM run may mix text manifests in (each global batch then comes from one dataset).
    "image_caption": ("image_caption", "text", "text_untokenized"),
    "robotics": ("robotics",),
}


@dataclasses.dataclass(frozen=True)
class DataParams(BaseParams):
    """Fields every data type shares."""

    family = "data"

    type: str | None = None
    dataset_manifest: list[str] = dataclasses.field(default_factory=list)
    dataset_weighting: list[float] = dataclasses.field(default_factory=list)
    dataset_modality: list[str] = dataclasses.field(default_factory=list)
    val_dataset_manifest: list[str] = dataclasses.field(default_factory=list)
    val_dataset_weighting: list[float] = dataclasses.field(default_factory=list)
    allow_multiple_epochs: bool = False
    # (JAX) grain read threads per host; None = grain's default.
    num_workers: int | None = None
    # Batches prefetched on a background thread.
    prefetch_factor: int = 4
    seq_len: int = 2048
    # Sample-level shuffle with grain's index shuffle (the original shuffles shard order only).
    shuffle: bool = True
    # Overwritten from hparams.seed when the experiment is resolved.
    seed: int = 42

    def validate(self) -> None:
        where = self.gin_name
        n = len(self.dataset_manifest)
        if self.dataset_weighting and len(self.dataset_weighting) != n:
            raise ParamsError(
                f"{where}.dataset_weighting has {len(self.dataset_weighting)} entries for {n} manifests; "
                f"give one weight per entry of {where}.dataset_manifest."
            )
        if self.dataset_modality and len(self.dataset_modality) != n:
            raise ParamsError(
                f"{where}.dataset_modality has {len(self.dataset_modality)} entries for {n} manifests; "
                f"give one modality per manifest."
            )
        allowed = COMPATIBLE_MODALITIES.get(self.type, MODALITIES)
        for m in self.dataset_modality:
            if m not in allowed:
                raise ParamsError(
                    f"{where}.dataset_modality entry {m!r} cannot be read by data type {self.type!r}; "
                    f"allowed: {list(allowed)}."
                )
        if any(w < 0 for w in self.dataset_weighting) or (self.dataset_weighting and sum(self.dataset_weighting) <= 0):
            raise ParamsError(
                f"{where}.dataset_weighting must be non-negative with a positive sum, got {self.dataset_weighting}."
            )
        if self.seq_len <= 0:
            raise ParamsError(f"{where}.seq_len must be positive, got {self.seq_len}.")

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(self.dataset_weighting) or (1.0,) * len(self.dataset_manifest)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.dataset_modality) or (self.type,) * len(self.dataset_manifest)


@register_params("text", family="data")
class TextDataParams(DataParams):
    """Pre-tokenized text: ``<key>.json.gz`` lists of ``seq_len + 1`` token ids. No loss mask."""

    # (JAX) optional: tokenizes text_untokenized manifests mixed into a text run, and decodes samples.
    tokenizer: str | None = None


@register_params("text_untokenized", family="data")
class TextUntokenizedDataParams(DataParams):
    """Raw text tokenized in the pipeline with a Hugging Face tokenizer (hub id or local directory)."""

    tokenizer: str = "EleutherAI/gpt-neox-20b"


# ---------------------------------------------------------------- augmentation (the original's DataAugmentationParams)


@register_params("color_jitter", family="config")
class ColorJitterParams(BaseParams):
    """torchvision-v2 ``ColorJitter``: factors drawn uniformly from ``[max(0, 1 - x), 1 + x]`` for brightness,
    contrast and saturation, a hue shift from ``hue = (lo, hi)`` (fractions of a turn, within [-0.5, 0.5]);
    the four adjustments are applied in a random order."""

    enabled: bool = False
    brightness: float = 0.2
    contrast: float = 0.4
    saturation: float = 0.2
    hue: tuple[float, float] = (-0.05, 0.05)

    def validate(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ParamsError(f"color_jitter.{name} must be >= 0, got {getattr(self, name)}.")
        lo, hi = self.hue
        if not -0.5 <= lo <= hi <= 0.5:
            raise ParamsError(f"color_jitter.hue = {self.hue} must be (lo, hi) with -0.5 <= lo <= hi <= 0.5.")


CROP_MODES = ("random", "center")


@register_params("crop", family="config")
class CropParams(BaseParams):
    """Crop before any other augmentation. ``shape = (h, w)`` in pixels, or, when both entries are <= 1.0, a
    ratio of the image's height and width (``int(H * h) x int(W * w)``; random mode only). ``mode``:
    ``random`` (uniform offset) or ``center`` (fixed window)."""

    enabled: bool = False
    shape: tuple[float, float] = (224, 224)
    mode: str = "random"

    def validate(self) -> None:
        if self.mode not in CROP_MODES:
            raise ParamsError(f"crop.mode = {self.mode!r}; choose one of {list(CROP_MODES)}.")
        h, w = self.shape
        if h <= 0 or w <= 0:
            raise ParamsError(f"crop.shape = {self.shape} must be positive.")
        if self.is_ratio:
            if self.mode != "random":
                raise ParamsError(
                    f"crop.shape = {self.shape} is a ratio crop (both entries <= 1.0), which is random only; "
                    "set crop.mode = 'random' or give the shape in pixels."
                )
        elif not (float(h).is_integer() and float(w).is_integer() and h >= 1 and w >= 1):
            raise ParamsError(
                f"crop.shape = {self.shape}: give whole pixels (e.g. (224, 224)) or two ratios <= 1.0 "
                "(e.g. (0.9, 0.9))."
            )

    @property
    def is_ratio(self) -> bool:
        return self.shape[0] <= 1.0 and self.shape[1] <= 1.0


@register_params("image_augmentation", family="config")
class ImageAugmentationParams(BaseParams):
    """Image augmentations, applied crop first, then colour jitter."""

    color_jitter: ColorJitterParams = dataclasses.field(default_factory=ColorJitterParams)
    crop: CropParams = dataclasses.field(default_factory=CropParams)


@register_params("data_augmentation", family="config")
class DataAugmentationParams(BaseParams):
    """Training-time augmentation; an augmentation runs when ``enabled`` and its own ``enabled`` are both set."""

    enabled: bool = True
    image: ImageAugmentationParams = dataclasses.field(default_factory=ImageAugmentationParams)


# ---------------------------------------------------------------- image_caption


@register_params("image_caption", family="data")
class ImageCaptionDataParams(DataParams):
    """Image + caption pairs (``<key>.txt`` and ``<key>.{jpg,png,jpeg,webp}``) for VLM training.

    ``processor``: ``"simple_vlm"`` (tokenizer from ``tokenizer``, images resized to ``image_size`` and mapped
    to [-1, 1]) or a Hugging Face processor: a local directory written with ``save_pretrained`` (image
    processor config + tokenizer) or a hub id. ``tokenizer``: None = the processor's own. Each ``<image>`` of
    the text becomes ``img_num_tokens`` image tokens. ``processor_kwargs``: see ``data.processor.load_processor``.
    """

    processor: str = "google/paligemma-3b-pt-224"
    processor_kwargs: dict = dataclasses.field(default_factory=dict)
    img_num_tokens: int = 256
    image_size: int = 224
    tokenizer: str | None = None
    augmentation: DataAugmentationParams = dataclasses.field(default_factory=DataAugmentationParams)

    def validate(self) -> None:
        super().validate()
        if self.img_num_tokens <= 0:
            raise ParamsError(f"image_caption.img_num_tokens must be positive, got {self.img_num_tokens}.")
        if self.image_size <= 0:
            raise ParamsError(f"image_caption.image_size must be positive, got {self.image_size}.")

    @property
    def image_token_id(self) -> int:
        """Id of ``<image>`` in the processor's tokenizer (loads the processor)."""
        from vla_foundry_jax.data.processor import processor_for_data

        return processor_for_data(self).image_token_id

    @property
    def pad_token_id(self) -> int:
        """The processor's pad id (loads the processor)."""
        from vla_foundry_jax.data.processor import processor_for_data

        return processor_for_data(self).pad_token_id
