"""The ``robotics`` modality: samples in the original's robotics layout -> fixed-shape arrays for ``diffusion_policy``.

On disk (one webdataset sample per anchor timestep of an episode; the original's LBM / LeRobot preprocessing)::

    <key>.<camera>_t<idx>.jpg (or .png)    one image per camera and image index (t-1, t0, ...), already resized
    <key>.lowdim.npz                       arrays [T_window, ...]: every lowdim field (float64 in the original),
                                           past_mask / future_mask bool [T_window], intrinsics, extrinsics, ...
                                           (T_window = past_lowdim_steps + 1 + future_lowdim_steps)
    <key>.metadata.json                    episode_id, anchor_timestep, anchor_relative_idx (row of the current step
                                           in the window), padding, camera names, ...
    <key>.language_instructions.json      {"original": [...], "randomized": [...], "verbose": ..., "alternative": ...}

and beside ``manifest.jsonl``: ``preprocessing_config.yaml`` (``past_lowdim_steps``, ``future_lowdim_steps``,
``camera_names``, ``image_indices``, ...), ``stats.json`` (see ``data.normalization``) and
``processing_metadata.json``.

Per sample (:class:`RoboticsTransform`, in grain's reader threads, with grain's per-(seed, index) generator):

* instruction: a uniform choice over the union of the instructions of ``language_instruction_types`` (empty when
  there are none, as in the original), drawn from the per-sample generator, so it is fixed by (data seed, index);
* lowdim: each action / proprioception field is cropped around the anchor to ``[anchor - past, anchor + future]``
  (``lowdim_past/future_timesteps``), cast to float32 and normalised (current step at row ``past``);
  ``actions = concat(action_fields) [Ta, A]``, ``proprioception = concat(f[:past + 1]) [past + 1, P]`` (absent
  without proprioception fields); the masks are cropped alike (a sample without them gets ``past_mask = t < past``,
  ``future_mask = t >= past``);
* images: ordered by ``image_names`` (time-major, camera-minor); augmented jointly (same crop window and colour
  jitter for all, ``data.augment``) in training; a missing image raises (naming the image and those present) unless
  ``pad_missing_images`` (a zero image, masked out of ``attention_mask_images`` when ``mask_padded_images``);
  each then goes through the processor's image preprocessing (channels last);
* text: the processor tokenizer's chat template with one image entry per image when it has one, else the
  original's fallback ``"<image> " * N + instruction``; every ``<image>`` becomes ``img_num_tokens`` image tokens;
  right-padded with the pad id to ``max_text_seq_len`` (longer texts truncated; cutting image tokens raises) or,
  when that is None, to ``seq_len`` (a longer text raises). The original pads each batch to its longest text;
  static shapes need a fixed length.

With a Qwen-VL processor (``data.qwen_processor``) images and text go through it instead: its chat template with
one image entry per image, each image smart-resized and cut into flat patches, so ``pixel_values`` is float32
``[N * max_patches_per_image, patch_dim]`` (zero rows past the images) with ``image_grid_thw`` int32 [N, 3].

Output: ``input_ids`` int32 [S], ``attention_mask`` int32 [S], ``pixel_values`` float32 [N, H, W, 3],
``attention_mask_images`` bool [N], ``actions`` float32 [Ta, A], ``past_mask`` / ``future_mask`` bool [Ta],
``proprioception`` float32 [past + 1, P]. Batched by the pipeline to the shared robotics batch contract.

Bad samples (``BadSampleError``; skipped, warned and counted like every modality, see ``data.bad_samples``): a
sample without lowdim.npz / metadata.json / images, an unreadable lowdim.npz, a member that is not valid JSON,
metadata without ``anchor_relative_idx``, a lowdim field missing from the npz, a missing image (unless
``pad_missing_images``) and an undecodable image. The original drops such samples; here the next sample replaces
it. A window too short for the configured steps and a prompt too long stay hard errors (the config is wrong).

Differences from the original: normalisation runs per sample (same numbers); metadata / strings stay out of the
batch (the jitted step takes arrays only and the policy reads none of them).
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from typing import Any

import numpy as np

from vla_foundry_jax import paths
from vla_foundry_jax.data.augment import augment_images
from vla_foundry_jax.data.image_caption import decode_image
from vla_foundry_jax.data.normalization import Normalizer, load_stats, merge_stats
from vla_foundry_jax.data.processor import VLMProcessor
from vla_foundry_jax.data.qwen_processor import QwenVLProcessor
from vla_foundry_jax.data.shards import BadSampleError, DataError
from vla_foundry_jax.params.base import ParamsError
from vla_foundry_jax.params.data_params import FieldNormalizationParams

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LOWDIM_FIELD = "lowdim.npz"
METADATA_FIELD = "metadata.json"
INSTRUCTIONS_FIELD = "language_instructions.json"
PREPROCESSING_CONFIG = "preprocessing_config.yaml"


def _where(sample: dict[str, Any]) -> str:
    return f"robotics sample {sample.get('__key__')!r} of shard {sample.get('__shard__')!r}"


# ---------------------------------------------------------------- params resolution (reads the dataset files)


def read_preprocessing_config(directory: str) -> dict[str, Any] | None:
    """``<directory>/preprocessing_config.yaml`` as a dict (the first entry of an indexed collection), or None.

    ``directory`` may be local or on object storage (read through ``paths``)."""
    import yaml

    path = paths.join(directory, PREPROCESSING_CONFIG)
    if not paths.exists(path):
        return None
    cfg = yaml.safe_load(paths.read_text(path)) or {}
    if cfg and all(isinstance(k, int) for k in cfg):  # {0: {...}, 1: {...}} from merged configs
        cfg = cfg[min(cfg)]
    return cfg


def _agreed(configs: list[tuple[str, dict]], key: str, field: str) -> list:
    first_path, first = configs[0]
    if key not in first:
        raise ParamsError(f"{first_path} has no {key!r}; set robotics.{field} explicitly.")
    for path, cfg in configs[1:]:
        if cfg.get(key) != first[key]:
            raise ParamsError(
                f"robotics.{field} is unset and the datasets disagree: {key} = {first[key]} in {first_path} but "
                f"{cfg.get(key)} in {path}; set robotics.{field} explicitly or use coherent datasets."
            )
    return list(first[key])


def resolve_robotics_data(data: Any) -> Any:
    """Fill the derived fields of a ``robotics`` data params object (idempotent; see ``RoboticsDataParams``).

    Raises ``ParamsError`` naming the field and the fix: empty ``dataset_statistics`` / ``action_fields``, a
    missing stats.json or preprocessing_config.yaml, cameras or image indices that differ between datasets, a
    window longer than the data holds, a field absent from the stats, or a given dim that disagrees with the stats.
    """
    if not data.dataset_statistics:
        raise ParamsError(
            "robotics.dataset_statistics is empty: list the stats.json of each dataset (written beside its "
            "manifest.jsonl, e.g. ['tiny_data/reach/train/stats.json'])."
        )
    if not data.action_fields:
        raise ParamsError(
            "robotics.action_fields is empty: list the lowdim fields forming the action, e.g. ['action_xy']."
        )
    try:
        stats = merge_stats([load_stats(p) for p in data.dataset_statistics])
    except DataError as e:
        raise ParamsError(str(e)) from None
    changes: dict[str, Any] = {}

    camera_names, image_indices = list(data.camera_names), list(data.image_indices)
    if not camera_names or not image_indices:
        configs = []
        for manifest in data.dataset_manifest:
            directory = paths.dirname(manifest)
            cfg = read_preprocessing_config(directory)
            if cfg is None:
                if data.image_names:
                    configs = []
                    break
                raise ParamsError(
                    "robotics.camera_names / robotics.image_indices are unset and "
                    f"{paths.join(directory, PREPROCESSING_CONFIG)!r} (which gives their defaults) does not exist; "
                    "set robotics.camera_names and robotics.image_indices."
                )
            configs.append((paths.join(directory, PREPROCESSING_CONFIG), cfg))
        if configs:
            camera_names = camera_names or _agreed(configs, "camera_names", "camera_names")
            image_indices = image_indices or [int(i) for i in _agreed(configs, "image_indices", "image_indices")]
    changes["camera_names"], changes["image_indices"] = camera_names, image_indices
    image_names = list(data.image_names) or [f"{c}_t{i}" for i in image_indices for c in camera_names]
    if not image_names:
        raise ParamsError("robotics.image_names is empty (no camera_names / image_indices); the policy needs images.")
    changes["image_names"] = image_names

    norm = data.normalization
    include = [*data.proprioception_fields, *data.action_fields]
    include = list(dict.fromkeys(include))
    field_configs = dict(norm.field_configs)
    for name in include:
        if name not in field_configs:
            field_configs[name] = FieldNormalizationParams(
                method=norm.method, scope=norm.scope, epsilon=norm.epsilon, enabled=norm.enabled
            )
    past_avail, future_avail = [], []
    for path in data.dataset_statistics:
        directory = paths.dirname(path)
        cfg = read_preprocessing_config(directory)
        if cfg is None:
            if norm.lowdim_past_timesteps is not None and norm.lowdim_future_timesteps is not None:
                continue
            raise ParamsError(
                f"{paths.join(directory, PREPROCESSING_CONFIG)!r} (beside robotics.dataset_statistics entry "
                f"{path!r}) does not exist; it gives the stats' window (past_lowdim_steps, future_lowdim_steps). "
                "Add it or set normalization.lowdim_past_timesteps and normalization.lowdim_future_timesteps."
            )
        try:
            past_avail.append(int(cfg["past_lowdim_steps"]))
            future_avail.append(int(cfg["future_lowdim_steps"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ParamsError(
                f"{paths.join(directory, PREPROCESSING_CONFIG)} lacks an integer past_lowdim_steps / "
                f"future_lowdim_steps ({e})."
            ) from None
    norm_past = norm.lowdim_past_timesteps if norm.lowdim_past_timesteps is not None else min(past_avail)
    norm_future = norm.lowdim_future_timesteps if norm.lowdim_future_timesteps is not None else min(future_avail)
    past = data.lowdim_past_timesteps if data.lowdim_past_timesteps is not None else norm_past
    future = data.lowdim_future_timesteps if data.lowdim_future_timesteps is not None else norm_future
    for name, want, avail, key in (
        ("lowdim_past_timesteps", past, past_avail, "past_lowdim_steps"),
        ("lowdim_future_timesteps", future, future_avail, "future_lowdim_steps"),
    ):
        if avail and want > min(avail):
            raise ParamsError(
                f"robotics.{name} = {want} exceeds the {min(avail)} steps the data holds ({key} of the "
                f"datasets' {PREPROCESSING_CONFIG}); lower robotics.{name} to at most {min(avail)}."
            )
    changes["normalization"] = norm.replace(
        include_fields=include,
        field_configs=field_configs,
        lowdim_past_timesteps=norm_past,
        lowdim_future_timesteps=norm_future,
    )
    changes["lowdim_past_timesteps"], changes["lowdim_future_timesteps"] = past, future

    for kind, fields, given in (
        ("action", data.action_fields, data.action_dim),
        ("proprioception", data.proprioception_fields, data.proprioception_dim),
    ):
        dims = []
        for name in fields:
            if name not in stats or "mean" not in stats[name]:
                raise ParamsError(
                    f"robotics.{kind}_fields entry {name!r} is not in the statistics {list(data.dataset_statistics)}; "
                    f"fields there: {sorted(stats)}."
                )
            dims.append(len(stats[name]["mean"]))
        if given is not None and given != sum(dims):
            raise ParamsError(
                f"robotics.{kind}_dim = {given} but the {kind} fields {list(fields)} have {sum(dims)} features in "
                f"stats.json ({dims}); set robotics.{kind}_dim = {sum(dims)} or leave it None."
            )
        changes[f"{kind}_dim"] = sum(dims)
    return data.replace(**changes)


# ---------------------------------------------------------------- per-sample pieces


def select_instruction(instructions: dict[str, Any] | None, types: Any, rng: np.random.Generator | None) -> str:
    """Uniform choice over the instructions of ``types`` (in that order; a str counts as a one-item list)."""
    if not instructions or not types:
        return ""
    pool: list[str] = []
    for t in types:
        value = instructions.get(t)
        if value is None:
            continue
        pool.extend([value] if isinstance(value, str) else [str(v) for v in value])
    if not pool:
        return ""
    return pool[int(rng.integers(len(pool)))] if rng is not None and len(pool) > 1 else pool[0]


def crop_window(x: np.ndarray, anchor: int, past: int, future: int, *, where: str = "window") -> np.ndarray:
    """Rows ``[anchor - past, anchor + future]`` of ``x [T, ...]`` (the original's ``crop_sequence``)."""
    if anchor < past or x.shape[0] < anchor + future + 1:
        raise DataError(
            f"{where}: cannot take {past} past and {future} future steps around row {anchor} of a {x.shape[0]}-step "
            "window; lower robotics.lowdim_past_timesteps / lowdim_future_timesteps (at most the dataset's "
            "past_lowdim_steps / future_lowdim_steps)."
        )
    return x[anchor - past : anchor + future + 1]


def image_key(field: str) -> tuple[str, str] | None:
    """``"scene_t-1.jpg"`` -> ``("scene_t-1", "scene_t-1")``; a dotted prefix (``"observation.images.cam_t0.jpg"``)
    gives the short name ``"cam_t0"`` second. None when ``field`` is not an image."""
    stem, _, ext = field.rpartition(".")
    if not stem or ext.lower() not in IMAGE_EXTENSIONS:
        return None
    parts = stem.rsplit("_t", 1)
    short = parts[0].rsplit(".", 1)[-1] + "_t" + parts[1] if len(parts) == 2 and "." in parts[0] else stem
    return stem, short


def robotics_text(processor: VLMProcessor, num_images: int, instruction: str) -> str:
    """The original's ``apply_chat_template``: the tokenizer's chat template with ``num_images`` image entries and
    the instruction (no generation prompt) when it has one, else ``"<image> " * num_images + instruction``."""
    tok = processor.tokenizer
    if getattr(tok, "chat_template", None):
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": instruction}]
        return tok.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=False
        )
    return f"{processor.image_token} " * num_images + instruction if processor.image_token else instruction


def _load_json(sample: dict[str, Any], name: str, where: str) -> Any:
    try:
        return json.loads(sample[name])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadSampleError.of(sample, f"{where}: member {name!r} is not valid JSON: {e}") from e


class RoboticsTransform:
    """Raw shard sample -> the per-sample arrays of the module docstring; used with ``MapDataset.random_map``.

    ``data`` must be resolved (:func:`resolve_robotics_data`); ``train=False`` centres crops and skips the
    colour jitter (instructions are still drawn from the per-sample generator).
    """

    def __init__(self, data: Any, processor: VLMProcessor, normalizer: Normalizer, *, train: bool = True) -> None:
        if data.lowdim_past_timesteps is None or data.lowdim_future_timesteps is None or not data.image_names:
            raise ValueError("RoboticsTransform needs resolved data params (data.robotics.resolve_robotics_data)).")
        self.data = data
        self.processor = processor
        self.normalizer = normalizer
        self.train = train
        self.past = int(data.lowdim_past_timesteps)
        self.future = int(data.lowdim_future_timesteps)
        self.text_length = int(data.text_length)

    def _images(self, sample: dict[str, Any], rng: np.random.Generator | None, where: str):
        fields: dict[str, str] = {}
        for field in sample:
            if field.startswith("__"):
                continue
            names = image_key(field)
            if names is not None:
                fields.setdefault(names[0], field)
                fields.setdefault(names[1], field)
        if not fields:
            raise BadSampleError.of(
                sample, f"{where} has no image members (<key>.<camera>_t<idx>.jpg); fields: {sorted(sample)}."
            )
        present, missing = [], []
        for name in self.data.image_names:
            (present if name in fields else missing).append(name)
        if missing and not self.data.pad_missing_images:
            raise BadSampleError.of(
                sample,
                f"{where} has no image {missing[0]!r} (robotics.image_names, from camera_names x image_indices); "
                f"images present: {sorted({image_key(f)[1] for f in fields.values()})}. Fix robotics.camera_names / "
                "image_indices, or set robotics.pad_missing_images = True to zero-fill missing images.",
            )
        if not present:
            raise BadSampleError.of(
                sample, f"{where} has none of the images {list(self.data.image_names)}; cannot pad them all."
            )
        decoded = [decode_image(sample[fields[n]], where=f"{where}, image {n!r}", sample=sample) for n in present]
        decoded = augment_images(decoded, self.data.augmentation, rng, train=self.train, where=where)
        by_name = dict(zip(present, decoded, strict=True))
        zero = np.zeros_like(decoded[0])
        images = [by_name.get(n, zero) for n in self.data.image_names]
        mask = np.array([n in by_name or not self.data.mask_padded_images for n in self.data.image_names], dtype=bool)
        return images, mask

    def text_tokens(self, instruction: str, num_images: int, where: str) -> tuple[np.ndarray, np.ndarray]:
        text = robotics_text(self.processor, num_images, instruction)
        n_placeholders = text.count(self.processor.image_token)
        if n_placeholders != num_images:
            raise DataError(
                f"{where}: the prompt holds {n_placeholders} {self.processor.image_token!r} placeholder(s) for "
                f"{num_images} image(s): {text[:120]!r}."
            )
        tokens = np.asarray(self.processor.token_ids(text), dtype=np.int64)
        length = self.text_length
        if len(tokens) > length:
            if self.data.max_text_seq_len is None:
                raise DataError(
                    f"{where}: the prompt needs {len(tokens)} tokens ({self.processor.img_num_tokens} per image, "
                    f"{num_images} images) but robotics.seq_len = {length}; raise robotics.seq_len or set "
                    "robotics.max_text_seq_len (longer prompts are then truncated)."
                )
            if (tokens[length:] == self.processor.image_token_id).any():
                raise DataError(
                    f"{where}: the prompt needs {len(tokens)} tokens and robotics.max_text_seq_len = {length} would "
                    "cut image tokens; raise max_text_seq_len (or lower img_num_tokens)."
                )
            tokens = tokens[:length]
        ids = np.full(length, self.processor.pad_token_id, dtype=np.int32)
        ids[: len(tokens)] = tokens
        mask = np.zeros(length, dtype=np.int32)
        mask[: len(tokens)] = 1
        return ids, mask

    def _lowdim(self, sample: dict[str, Any], where: str) -> dict[str, np.ndarray]:
        lowdim_field = next((f for f in sample if f.endswith(LOWDIM_FIELD)), None)
        meta_field = next((f for f in sample if f.endswith(METADATA_FIELD)), None)
        if lowdim_field is None or meta_field is None:
            raise BadSampleError.of(
                sample,
                f"{where} lacks {'lowdim.npz' if lowdim_field is None else 'metadata.json'}; fields: "
                f"{sorted(k for k in sample if not k.startswith('__'))}. Is this robotics data "
                "(data.dataset_modality)?",
            )
        meta = _load_json(sample, meta_field, where)
        anchor = meta.get("anchor_relative_idx") if isinstance(meta, dict) else None
        if anchor is None:
            raise BadSampleError.of(
                sample, f"{where}: metadata.json has no anchor_relative_idx (row of the current step in the window)."
            )
        unreadable = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)
        try:
            npz = np.load(io.BytesIO(sample[lowdim_field]), allow_pickle=False)
        except unreadable as e:
            raise BadSampleError.of(sample, f"{where}: cannot read lowdim.npz ({type(e).__name__}: {e}).") from e
        out: dict[str, np.ndarray] = {}
        with npz:
            available = set(npz.files)

            def get(name: str) -> np.ndarray:
                if name not in available:
                    raise BadSampleError.of(
                        sample,
                        f"{where}: lowdim field {name!r} (robotics.action_fields / proprioception_fields) is not in "
                        f"lowdim.npz; fields there: {sorted(available)}.",
                    )
                try:
                    return np.asarray(npz[name])
                except unreadable as e:
                    raise BadSampleError.of(
                        sample, f"{where}: cannot read field {name!r} of lowdim.npz ({type(e).__name__}: {e})."
                    ) from e

            for name in dict.fromkeys([*self.data.action_fields, *self.data.proprioception_fields]):
                x = crop_window(get(name), int(anchor), self.past, self.future, where=f"{where}, field {name!r}")
                x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
                out[name] = self.normalizer.normalize(name, x.astype(np.float32), anchor=self.past)
            steps = self.past + 1 + self.future
            for name, default in (
                ("past_mask", np.arange(steps) < self.past),
                ("future_mask", np.arange(steps) >= self.past),
            ):
                if name in available:
                    m = crop_window(get(name).reshape(-1), int(anchor), self.past, self.future, where=where)
                    out[name] = m.astype(bool)
                else:
                    out[name] = default
        return out

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        where = _where(sample)
        lowdim = self._lowdim(sample, where)
        images, image_mask = self._images(sample, rng, where)
        instructions = None
        instr_field = next((f for f in sample if f.endswith(INSTRUCTIONS_FIELD)), None)
        if instr_field is not None:
            instructions = _load_json(sample, instr_field, where)
        instruction = select_instruction(instructions, self.data.language_instruction_types, rng)
        extra = {}
        if isinstance(self.processor, QwenVLProcessor):
            text = self.processor.prompt(len(images), instruction)
            qwen = self.processor(
                images, text, self.text_length, truncate=self.data.max_text_seq_len is not None, where=where
            )
            input_ids, attention_mask, pixels = qwen["input_ids"], qwen["attention_mask"], qwen["pixel_values"]
            extra["image_grid_thw"] = qwen["image_grid_thw"]
        else:
            input_ids, attention_mask = self.text_tokens(instruction, len(images), where)
            pixels = np.stack([self.processor.preprocess_image(im) for im in images]).astype(np.float32)
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixels,
            **extra,
            "attention_mask_images": image_mask,
            "actions": np.concatenate([lowdim[f] for f in self.data.action_fields], axis=-1),
            "past_mask": lowdim["past_mask"],
            "future_mask": lowdim["future_mask"],
        }
        if self.data.proprioception_fields:
            out["proprioception"] = np.concatenate(
                [lowdim[f][: self.past + 1] for f in self.data.proprioception_fields], axis=-1
            )
        return out


def robotics_processor(data: Any) -> VLMProcessor | QwenVLProcessor:
    """The VLM processor ``robotics.processor`` names (loaded once; errors name the field)."""
    from vla_foundry_jax.data.processor import processor_for_data

    if not data.processor:
        raise DataError(
            "robotics.processor is not set: robotics instructions and images go through a VLM processor, e.g. "
            "robotics.processor = 'tiny_data/vlm_processor' (a save_pretrained directory), 'simple_vlm' or a hub id."
        )
    processor = processor_for_data(data)
    if not isinstance(processor, (VLMProcessor, QwenVLProcessor)):
        raise DataError(f"robotics.processor = {data.processor!r} is not a VLM processor (it has no image tokens).")
    return processor


def robotics_transform(data: Any, *, train: bool = True) -> RoboticsTransform:
    """Resolve ``data`` (idempotent) and build the transform (processor + normalizer from ``dataset_statistics``)."""
    data = resolve_robotics_data(data)
    normalizer = Normalizer.from_stats(list(data.dataset_statistics), data)
    return RoboticsTransform(data, robotics_processor(data), normalizer, train=train)
