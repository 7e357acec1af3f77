"""Data params: one frozen dataclass per data ``type`` (text, text_untokenized; image_caption and
robotics arrive with their pipelines). Field names follow the original where they mean the same in a
grain pipeline; the webdataset-specific knobs (shuffle buffers, torch workers) have no equivalent.
"""

from __future__ import annotations

import dataclasses

from vla_foundry_jax.params.base import BaseParams, ParamsError, register_params

MODALITIES = ("text", "text_untokenized", "image_caption", "robotics")
# Which on-disk modality each data type can read (the original's compatibility table).
COMPATIBLE_MODALITIES = {
    "text": ("text", "text_untokenized"),
    "text_untokenized": ("text_untokenized",),
    "image_caption": ("image_caption",),
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
