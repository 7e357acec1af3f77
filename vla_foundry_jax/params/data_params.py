"""Data params: one frozen dataclass per data ``type`` (text, text_untokenized, image_caption, robotics), the
image augmentation params and the robotics normalisation params. Field names follow the original where they
mean the same here (``shuffle_buffer_size`` / ``shuffle_initial`` are its sample shuffle buffer, used by the
streaming reader).
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
    # (JAX) Training data read by streaming (data.streaming): whole shards in a per-epoch shuffled order, split
    # between virtual streams (num_streams), each through a sample shuffle buffer; start-up reads only the
    # manifests. False: random access (every shard's tar headers indexed at start-up). Either way the batches do
    # not depend on the host count. See README.
    streaming: bool = False
    # Streaming: each stream's sample shuffle buffer holds up to shuffle_buffer_size samples and starts yielding once
    # it holds shuffle_initial (the original's webdataset fields, per loader worker there).
    shuffle_buffer_size: int = 2000
    shuffle_initial: int = 500
    # (JAX) Streaming: the global batch is filled by this many virtual streams (each its own shards, shuffle buffer
    # and generators; hosts read the streams of their rows), so the batches do not depend on the host count. A
    # divisor of the global batch; None: the largest one up to 64 and the smallest dataset's shard count.
    num_streams: int | None = None
    # Overwritten from hparams.seed when the experiment is resolved.
    seed: int = 42
    # (JAX) Bad samples (corrupt / undecodable / incomplete; see data.bad_samples) are skipped, warned and counted;
    # the run stops once they pass this fraction of the samples it trains on (0: stop at the first one).
    max_bad_sample_fraction: float = 0.01

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
        if self.val_dataset_weighting:
            raise ParamsError(
                f"{where}.val_dataset_weighting = {list(self.val_dataset_weighting)} would be ignored: validation "
                f"reads every manifest of {where}.val_dataset_manifest in order, unweighted. Leave it empty."
            )
        if self.shuffle_buffer_size < 1 or not 1 <= self.shuffle_initial <= self.shuffle_buffer_size:
            raise ParamsError(
                f"{where}.shuffle_buffer_size = {self.shuffle_buffer_size} and {where}.shuffle_initial = "
                f"{self.shuffle_initial}: need 1 <= shuffle_initial <= shuffle_buffer_size (samples held by the "
                "streaming shuffle buffer; a buffer of 1 keeps each shard's tar order)."
            )
        if self.num_streams is not None and (self.num_streams < 1 or not self.streaming):
            raise ParamsError(
                f"{where}.num_streams = {self.num_streams}: "
                + (
                    "the streaming reader's stream count must be at least 1 (or None for the default)."
                    if self.num_streams < 1
                    else f"only the streaming reader has streams; set {where}.streaming = True or leave num_streams "
                    "unset (None)."
                )
            )
        if not 0.0 <= self.max_bad_sample_fraction <= 1.0:
            raise ParamsError(
                f"{where}.max_bad_sample_fraction = {self.max_bad_sample_fraction} (data.max_bad_sample_fraction) "
                "must be in [0, 1]: the fraction of a run's samples that may be skipped as bad (0.01 = 1%)."
            )

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


# ---------------------------------------------------------------- robotics

NORMALIZATION_METHODS = ("std", "percentile_5_95", "percentile_1_99", "min_max")
NORMALIZATION_SCOPES = ("global", "per_timestep")
LANGUAGE_INSTRUCTION_TYPES = ("original", "randomized", "verbose", "alternative")


def _check_method_scope(where: str, method: str, scope: str, epsilon: float) -> None:
    if method not in NORMALIZATION_METHODS:
        raise ParamsError(f"{where}.method = {method!r}; choose one of {list(NORMALIZATION_METHODS)}.")
    if scope not in NORMALIZATION_SCOPES:
        raise ParamsError(f"{where}.scope = {scope!r}; choose one of {list(NORMALIZATION_SCOPES)}.")
    if epsilon <= 0:
        raise ParamsError(f"{where}.epsilon must be positive (it floors the scale), got {epsilon}.")


@register_params("field_normalization", family="config")
class FieldNormalizationParams(BaseParams):
    """How one lowdim field is normalised (an entry of ``normalization.field_configs``)."""

    method: str = "std"
    scope: str = "global"
    epsilon: float = 1e-8
    enabled: bool = True

    def validate(self) -> None:
        _check_method_scope("field_normalization", self.method, self.scope, self.epsilon)


@register_params("normalization", family="config")
class NormalizationParams(BaseParams):
    """Normalisation of the robotics lowdim fields from the datasets' ``stats.json`` (see ``data.normalization``).

    ``method``: ``std`` (mean, std), ``percentile_5_95`` / ``percentile_1_99`` (low percentile, range), ``min_max``
    (min, range); ``scope``: ``global`` (one value per feature) or ``per_timestep`` (the ``*_per_timestep`` rows of
    the stats, aligned on the current step). ``centered_norm`` maps percentile / min-max ranges to [-1, 1] instead
    of [0, 1]; as in the original it is forced True when the default ``method`` is ``std`` (and then applies to
    every field configured with a percentile or min-max method). ``field_configs``: per-field overrides,
    ``{field: @scope/field_normalization()}`` or plain dicts ``{field: {"method": "min_max"}}``; every
    proprioception and action field without one gets the defaults above when the experiment is resolved.
    ``include_fields`` (= proprioception + action fields) and ``lowdim_past_timesteps`` /
    ``lowdim_future_timesteps`` (the window the stats were computed on: the minimum of the datasets'
    ``past_lowdim_steps`` / ``future_lowdim_steps``) are filled then too unless given.
    """

    enabled: bool = True
    method: str = "std"
    scope: str = "global"
    epsilon: float = 1e-8
    include_fields: list[str] = dataclasses.field(default_factory=list)
    centered_norm: bool = False
    field_configs: dict[str, FieldNormalizationParams] = dataclasses.field(default_factory=dict)
    lowdim_past_timesteps: int | None = None
    lowdim_future_timesteps: int | None = None

    def validate(self) -> None:
        _check_method_scope("normalization", self.method, self.scope, self.epsilon)
        configs = {}
        for name, cfg in self.field_configs.items():
            if isinstance(cfg, dict):
                try:
                    cfg = FieldNormalizationParams(**cfg)
                except TypeError as e:
                    raise ParamsError(
                        f"normalization.field_configs[{name!r}] = {cfg!r}: {e}; known keys: method, scope, epsilon, "
                        "enabled."
                    ) from None
            if not isinstance(cfg, FieldNormalizationParams):
                raise ParamsError(
                    f"normalization.field_configs[{name!r}] must be @field_normalization() or a dict, got {cfg!r}."
                )
            configs[str(name)] = cfg
        object.__setattr__(self, "field_configs", configs)
        if self.method == "std":
            object.__setattr__(self, "centered_norm", True)
        for name in ("lowdim_past_timesteps", "lowdim_future_timesteps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ParamsError(f"normalization.{name} must be >= 0, got {getattr(self, name)}.")

    def field_config(self, field: str) -> FieldNormalizationParams:
        """The config of ``field``: its exact entry, else the first entry whose name is a substring of it, else
        the defaults (the original's lookup)."""
        if field in self.field_configs:
            return self.field_configs[field]
        for pattern, cfg in self.field_configs.items():
            if pattern in field:
                return cfg
        return FieldNormalizationParams(
            method=self.method, scope=self.scope, epsilon=self.epsilon, enabled=self.enabled
        )


@register_params("robotics", family="data")
class RoboticsDataParams(DataParams):
    """Robot episodes in the original's robotics layout (LBM / LeRobot converted; see ``data.robotics``) for
    ``diffusion_policy``.

    Files beside each ``manifest.jsonl``: ``preprocessing_config.yaml`` (window and cameras), ``stats.json``
    (listed in ``dataset_statistics``). Several fields are derived from them when the experiment is resolved
    (``data.robotics.resolve_robotics_data``): ``camera_names`` / ``image_indices`` (each dataset's preprocessing
    config; they must agree),
    ``image_names`` (``f"{camera}_t{index}"``, time-major then camera), ``lowdim_past_timesteps`` /
    ``lowdim_future_timesteps`` (default: the normalisation window; the stats' window may not be exceeded),
    ``action_dim`` / ``proprioception_dim`` (sum of the fields' feature sizes in the stats; a given value must
    agree), and the normalisation defaults.

    ``processor``: a VLM processor as for ``image_caption`` (a ``save_pretrained`` directory such as
    ``tiny_data/vlm_processor``, ``"simple_vlm"`` with ``tokenizer``, or a hub id); each image adds
    ``img_num_tokens`` image tokens to the instruction. Token ids are right-padded to ``max_text_seq_len``
    (truncating longer texts) or, when that is None, to ``seq_len`` (a longer text is an error), so batches have
    static shapes.

    Not supported (a ``ParamsError`` naming the field when set, rather than accepted and ignored):
    ``val_dataset_statistics`` (validation is normalised with the training stats, as in the original, where the
    field is unused too), ``pose_groups`` (inference-time relative poses), ``intrinsics_fields`` /
    ``extrinsics_fields`` (the original passes them to the model, which ignores them; the batch here holds only
    arrays the policy reads), ``tactile_fields``, ``use_point_cloud`` and ``point_cloud_num_points``.
    """

    dataset_statistics: list[str] = dataclasses.field(default_factory=list)
    val_dataset_statistics: list[str] = dataclasses.field(default_factory=list)
    processor: str | None = None
    processor_kwargs: dict = dataclasses.field(default_factory=dict)
    # (JAX) tokenizer of the "simple_vlm" processor (None: the processor's own / the original's default).
    tokenizer: str | None = None
    img_num_tokens: int = 256
    image_size: int = 224
    max_text_seq_len: int | None = None
    language_instruction_types: list[str] = dataclasses.field(default_factory=lambda: ["original"])
    camera_names: list[str] = dataclasses.field(default_factory=list)
    image_indices: list[int] = dataclasses.field(default_factory=list)
    image_names: list[str] = dataclasses.field(default_factory=list)
    pad_missing_images: bool = False
    mask_padded_images: bool = False
    proprioception_fields: list[str] = dataclasses.field(default_factory=list)
    tactile_fields: list[str] = dataclasses.field(default_factory=list)
    action_fields: list[str] = dataclasses.field(default_factory=list)
    pose_groups: list[dict] = dataclasses.field(default_factory=list)
    intrinsics_fields: list[str] = dataclasses.field(default_factory=list)
    extrinsics_fields: list[str] = dataclasses.field(default_factory=list)
    use_point_cloud: bool = False
    point_cloud_num_points: int = 4096
    normalization: NormalizationParams = dataclasses.field(default_factory=NormalizationParams)
    augmentation: DataAugmentationParams = dataclasses.field(default_factory=DataAugmentationParams)
    lowdim_past_timesteps: int | None = None
    lowdim_future_timesteps: int | None = None
    action_dim: int | None = None
    proprioception_dim: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.mask_padded_images and not self.pad_missing_images:
            raise ParamsError(
                "robotics.mask_padded_images = True requires robotics.pad_missing_images = True (only padded "
                "images can be masked); set both or neither."
            )
        bad = [t for t in self.language_instruction_types if t not in LANGUAGE_INSTRUCTION_TYPES]
        if bad:
            raise ParamsError(
                f"robotics.language_instruction_types has unknown types {bad}; "
                f"valid: {list(LANGUAGE_INSTRUCTION_TYPES)}."
            )
        if self.tactile_fields:
            raise ParamsError(
                f"robotics.tactile_fields = {list(self.tactile_fields)}: tactile inputs are not supported by this port "
                "(no model consumes them); leave robotics.tactile_fields empty."
            )
        if self.use_point_cloud:
            raise ParamsError(
                "robotics.use_point_cloud = True: point clouds are not supported by this port; set it to False."
            )
        for name, why in (
            (
                "val_dataset_statistics",
                "validation data is normalised with the training statistics (dataset_statistics)",
            ),
            ("pose_groups", "relative poses are not computed by this port (no model reads them)"),
            ("intrinsics_fields", "camera intrinsics are not read by any policy here"),
            ("extrinsics_fields", "camera extrinsics are not read by any policy here"),
        ):
            if getattr(self, name):
                raise ParamsError(
                    f"robotics.{name} = {list(getattr(self, name))} would be ignored: {why}. Leave robotics.{name} "
                    "empty."
                )
        if self.point_cloud_num_points != 4096:
            raise ParamsError(
                f"robotics.point_cloud_num_points = {self.point_cloud_num_points} would be ignored: point clouds are "
                "not supported by this port. Remove the binding."
            )
        if self.img_num_tokens <= 0 or self.image_size <= 0:
            raise ParamsError(
                f"robotics.img_num_tokens ({self.img_num_tokens}) and robotics.image_size ({self.image_size}) must be "
                "positive."
            )
        if self.max_text_seq_len is not None and self.max_text_seq_len <= 0:
            raise ParamsError(f"robotics.max_text_seq_len must be positive or None, got {self.max_text_seq_len}.")
        for name in ("lowdim_past_timesteps", "lowdim_future_timesteps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ParamsError(f"robotics.{name} must be >= 0, got {getattr(self, name)}.")

    @property
    def text_length(self) -> int:
        """Static length of ``input_ids``: ``max_text_seq_len``, else ``seq_len``."""
        return self.max_text_seq_len if self.max_text_seq_len is not None else self.seq_len
