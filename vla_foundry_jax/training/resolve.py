"""Shared attributes resolved once, before building: the one place where params read from each other.

The original does this in ``init_shared_attributes`` spread over the param classes; here it is one
function from an experiment to a completed experiment.
"""

from __future__ import annotations

import logging
from typing import Any

from vla_foundry_jax.configs.qwen_vl import QwenVLConfig
from vla_foundry_jax.configs.vlm_hf import vlm_hf_config
from vla_foundry_jax.data.processor import STABLE_DIFFUSION, processor_for_data
from vla_foundry_jax.data.qwen_processor import QwenVLProcessor
from vla_foundry_jax.data.robotics import resolve_robotics_data
from vla_foundry_jax.data.text import tokenizer_info
from vla_foundry_jax.models.clip import clip_config
from vla_foundry_jax.models.vlm import image_tokens_per_image, vision_geometry
from vla_foundry_jax.params import ParamsError, StableDiffusionParams, TrainExperimentParams
from vla_foundry_jax.params.train_params import check_sequence_fits, check_warmup


def resolve_experiment(exp: TrainExperimentParams) -> TrainExperimentParams:
    """Fill derived fields (data seed from hparams) and check the model against the data's vocabulary."""
    if exp.model is None:
        raise ParamsError("experiment.model is not set; bind it in gin, e.g. `experiment.model = @transformer()`.")
    if exp.data is None:
        raise ParamsError("experiment.data is not set; bind it in gin, e.g. `experiment.data = @text_untokenized()`.")
    if not exp.data.dataset_manifest:
        raise ParamsError(f"{exp.data.gin_name}.dataset_manifest is empty; list at least one manifest.jsonl path.")
    if exp.total_train_samples is None:
        raise ParamsError(
            "experiment.total_train_samples is not set; it fixes the run's length (steps = samples / batch)."
        )
    data = exp.data.replace(seed=exp.hparams.seed)
    model = exp.model
    if data.type == "robotics":
        data = resolve_robotics_data(data)
    if model.type == "vlm":
        model = resolve_vlm(model, data)
    if model.type == "vlm_hf":
        check_processor_family(model, data)
    if model.type == "diffusion_policy":
        model = resolve_diffusion_policy(model, data)
    if model.type == "stable_diffusion":
        model, data = resolve_stable_diffusion(model, data)
    if data.type == "text_untokenized" and model.type == "transformer":
        vocab_len, _ = tokenizer_info(data)
        if model.vocab_size < vocab_len:
            raise ParamsError(
                f"transformer.vocab_size = {model.vocab_size} is smaller than the tokenizer {data.tokenizer!r} "
                f"({vocab_len} tokens with its pad token); set transformer.vocab_size >= {vocab_len}."
            )
    check_sequence_fits(model, data)
    check_warmup(exp)
    return exp.replace(data=data, model=model)


TRANSFORMER_DEFAULT_VOCAB = 50432


def resolve_vlm(model, data):
    """The original's ``VLMParams.init_shared_attributes`` (reference §1.4), plus shape checks.

    ``processor`` defaults to the data's; ``image_token_id`` comes from the processor when unset; the
    language model's ``vocab_size`` becomes ``len(tokenizer)`` when it holds the transformer default
    (50432, 0) as in the original. The data's ``img_num_tokens`` and ``image_size`` must agree with the ViT.
    """
    processor_name = model.processor or getattr(data, "processor", None)
    if not processor_name or not hasattr(data, "img_num_tokens"):
        if model.image_token_id is None:
            raise ParamsError(
                "vlm.image_token_id cannot be resolved: the data has no processor; train a VLM on "
                "image_caption data or bind vlm.image_token_id."
            )
        return model
    info = processor_for_data(data.replace(processor=processor_name))
    transformer = model.transformer
    if transformer.type == "transformer" and transformer.vocab_size in (0, TRANSFORMER_DEFAULT_VOCAB):
        transformer = transformer.replace(vocab_size=info.vocab_len)
    model = model.replace(
        processor=processor_name,
        transformer=transformer,
        image_token_id=info.image_token_id if model.image_token_id is None else model.image_token_id,
    )
    per_image = image_tokens_per_image(model)
    if data.img_num_tokens != per_image:
        raise ParamsError(
            f"{data.gin_name}.img_num_tokens = {data.img_num_tokens} but the ViT gives {per_image} tokens per image "
            f"((image size / patch size)^2 (+1 for a kept class token) / projector_pixel_shuffle_factor^2); set "
            f"img_num_tokens = {per_image}."
        )
    side, _ = vision_geometry(model.vit)
    if tuple(info.image_size) != (side, side):
        what = "vit.img_size" if model.vit.type == "vit" else f"the image_size of {model.vit.gin_name}.hf_pretrained"
        raise ParamsError(
            f"the processor {processor_name!r} makes {info.image_size} images but {what} = {side}; set "
            f"{data.gin_name}.image_size (or the processor's size) equal to {side}."
        )
    if data.image_size != side:
        raise ParamsError(
            f"{data.gin_name}.image_size = {data.image_size} but the ViT and the processor {processor_name!r} take "
            f"{side} x {side} images; set {data.gin_name}.image_size = {side}."
        )
    vocab = getattr(model.transformer, "vocab_size", None)
    if model.transformer.type == "transformer" and vocab < info.vocab_len:
        raise ParamsError(
            f"transformer.vocab_size = {vocab} is smaller than the processor's tokenizer ({info.vocab_len} tokens "
            f"with the image token); set transformer.vocab_size >= {info.vocab_len}."
        )
    return model


def resolve_diffusion_policy(model, data):
    """The original's ``DiffusionPolicyParams`` / ``NoiseSchedulerParams.init_shared_attributes`` (reference §1.4).

    ``action_dim`` and ``proprioception_dim`` come from the (resolved) robotics data; a value given on the model
    must agree (``proprioception_dim = 0``, the default, counts as unset). A symmetric ``clamp_range`` needs
    centred normalisation (the clamp assumes actions around 0).
    """
    if data.type != "robotics":
        raise ParamsError(
            f"diffusion_policy trains on robotics data but experiment.data is {data.type!r}; bind "
            "`experiment.data = @robotics()`."
        )
    changes = {}
    for name, unset in (("action_dim", (None,)), ("proprioception_dim", (None, 0))):
        want, have = getattr(data, name), getattr(model, name)
        if have in unset:
            changes[name] = want
        elif have != want:
            fields = data.action_fields if name == "action_dim" else data.proprioception_fields
            raise ParamsError(
                f"diffusion_policy.{name} = {have} but the robotics data gives {name} = {want} (fields "
                f"{list(fields)} in {list(data.dataset_statistics)}); remove the diffusion_policy.{name} binding "
                "(it is filled from the data) or fix robotics.action_fields / proprioception_fields."
            )
    backbone = model.vision_language_backbone
    if backbone is not None and backbone.type == "vlm_backbone":
        check_processor_family(backbone, data)
    clamp = model.noise_scheduler.clamp_range
    if clamp is not None:
        if not data.normalization.enabled:
            logging.warning(
                "Robotics normalisation is disabled but noise_scheduler.clamp_range = %s clamps actions.", clamp
            )
        elif not data.normalization.centered_norm and clamp[0] == -clamp[1]:
            raise ParamsError(
                f"noise_scheduler.clamp_range = {clamp} is symmetric but normalization.centered_norm is False (actions "
                "normalised to [0, 1]); set normalization.centered_norm = True or a different clamp_range."
            )
    return model.replace(**changes) if changes else model


def check_processor_family(params: Any, data: Any) -> None:
    """An HF VLM (``vlm_hf`` / ``vlm_backbone``) and the data's processor must be of one family: a Qwen-VL model
    reads a Qwen-VL processor's flat patches (same patch, merge and temporal sizes, same image token), any other
    model fixed-size images. One ``ParamsError`` naming both fields otherwise."""
    name = getattr(data, "processor", None)
    if not name or name == STABLE_DIFFUSION or not params.hf_pretrained:
        return
    config = vlm_hf_config(params)
    processor = processor_for_data(data)
    qwen_model, qwen_processor = isinstance(config, QwenVLConfig), isinstance(processor, QwenVLProcessor)
    model_kind = getattr(config, "model_type", None) or type(config).__name__
    where = f"{data.gin_name}.processor = {name!r}"
    if qwen_model != qwen_processor:
        kind = "a Qwen-VL processor (flat patches)" if qwen_processor else "not a Qwen-VL processor"
        raise ParamsError(
            f"{where} is {kind} but {params.gin_name}.hf_pretrained = {params.hf_pretrained!r} is a {model_kind} "
            f"model; set {data.gin_name}.processor to the processor of the same checkpoint (e.g. "
            f"{params.hf_pretrained!r} or its local save_pretrained directory)."
        )
    if qwen_model:
        v = config.vision
        got = (processor.patch_size, processor.merge_size, processor.temporal_patch_size, processor.image_token_id)
        want = (v.patch_size, v.spatial_merge_size, v.temporal_patch_size, config.image_token_id)
        if got != want:
            raise ParamsError(
                f"{where} makes (patch_size, merge_size, temporal_patch_size, image_token_id) = {got} but "
                f"{params.gin_name}.hf_pretrained = {params.hf_pretrained!r} expects {want}; use the processor of the "
                "same checkpoint."
            )


def resolve_stable_diffusion(model: StableDiffusionParams, data: Any) -> tuple[StableDiffusionParams, Any]:
    """Shared attributes of a stable-diffusion experiment (called by :func:`resolve_experiment`).

    The data must be ``image_caption`` read with ``image_caption.processor = "stable_diffusion"``; its
    ``image_size`` becomes ``unet.image_size`` (the original's ``ImageCaptionDataParams`` rule); with a text
    encoder its ``tokenizer`` defaults to ``clip.hf_pretrained`` (the CLIP tokenizer of the same checkpoint), and
    the padded prompt length ``seq_len + 1`` must fit the text tower's ``max_position_embeddings`` (longer captions
    are truncated to ``seq_len + 1`` tokens, keeping their end-of-text token).
    """
    where = getattr(data, "gin_name", "data")
    if getattr(data, "type", None) != "image_caption" or getattr(data, "processor", None) != STABLE_DIFFUSION:
        raise ParamsError(
            f"stable_diffusion trains on image_caption data read with the stable_diffusion processor; got data type "
            f"{getattr(data, 'type', None)!r} with processor {getattr(data, 'processor', None)!r}. Set "
            "experiment.data = @image_caption() and image_caption.processor = 'stable_diffusion'."
        )
    if model.unet.in_channels != 3:
        raise ParamsError(f"stable_diffusion.unet.in_channels = {model.unet.in_channels}: image data is RGB (3).")
    if data.image_size != model.unet.image_size:
        logging.info("%s.image_size %d -> unet.image_size %d", where, data.image_size, model.unet.image_size)
        data = data.replace(image_size=model.unet.image_size)
    if model.clip.hf_pretrained is not None:
        if data.tokenizer is None:
            data = data.replace(tokenizer=model.clip.hf_pretrained)
        max_pos = clip_config(model.clip).text.max_position_embeddings
        if data.seq_len + 1 > max_pos:
            raise ParamsError(
                f"{where}.seq_len = {data.seq_len}: prompts are padded to seq_len + 1 = {data.seq_len + 1} tokens but "
                f"the CLIP text tower of clip.hf_pretrained = {model.clip.hf_pretrained!r} has {max_pos} positions; "
                f"set {where}.seq_len <= {max_pos - 1} (longer captions are truncated)."
            )
    return model, data
