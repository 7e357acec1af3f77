"""The original VLA Foundry's YAML configs and presets -> our params and gin (issue 13, item 3).

The tests write their own YAML files shaped like every file of the original's ``vla_foundry/config_presets/`` (same
names, sections, types, ``!include`` / ``<<:`` structure; values are the model sizes the presets name), plus an
experiment ``config.yaml`` as the original's ``draccus.dump`` writes it (every field). Each training config
converts, its gin parses back (``gin_utils.parse_gin``) to the same params, and the mapping back to YAML loads to
the same params again. Expected values are read off the YAML written here.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap

import gin
import pytest
import yaml

from tests.fixtures.multidevice import subprocess_env
from tests.fixtures.paths import ROOT
from vla_foundry_jax import gin_utils
from vla_foundry_jax.configs import foundry_yaml as fy
from vla_foundry_jax.params import ImageAugmentationParams, TrainExperimentParams

pytestmark = pytest.mark.usefixtures("fresh_gin")


def _transformer(hidden, layers, heads, seq=2048, post_embed_norm="false", comment=""):
    return (
        f"{comment}type: transformer\nhidden_dim: {hidden}\nn_layers: {layers}\nn_heads: {heads}\n"
        f"max_seq_len: {seq}\nvocab_size: 50432\npost_embed_norm: {post_embed_norm}\nweight_tying: false\n"
        "is_causal: true\n"
    )


def _vit(img, hidden, inter, heads, layers, patch, shuffle):
    return (
        f"type: vit\nimg_size: {img}\nhidden_dim: {hidden}\ninter_dim: {inter}\nn_heads: {heads}\n"
        f"n_layers: {layers}\npatch_size: {patch}\nprojector_pixel_shuffle_factor: {shuffle}\n"
    )


def _policy(backbone: str, transformer: str, clamp: str, head: str = "", vocab: str = "  is_causal: false\n"):
    return (
        f"type: diffusion_policy\n{head}vision_language_backbone:\n{backbone}transformer:\n"
        f"  <<: !include {transformer}\n{vocab}noise_scheduler:\n  num_timesteps: 1000\n  beta_start: 0.0001\n"
        f"  beta_end: 0.02\n  clamp_range: {clamp}\nuse_flow_matching_scheduler: true\n"
    )


def _robotics_data(processor: str, tokens: int) -> str:
    return (
        f"type: robotics\nimage_size: 224\nprocessor: {processor}\nprocessor_kwargs: {{size: {{height: 224, "
        f"width: 224}}}}\nimg_num_tokens: {tokens}\nallow_multiple_epochs: true\nseq_len: 2048\n"
        "lowdim_past_timesteps: 1\nlowdim_future_timesteps: 14\nprefetch_factor: 8\nnum_workers: 8\n"
    )


ARM_FIELDS = ["xyz", "rot_6d"]
LBM_DATA = (
    "type: robotics\nlanguage_instruction_types: [original, randomized, verbose, alternative]\n"
    "proprioception_fields:\n"
    + "".join(f"  - robot__actual__poses__{s}::panda__{f}\n" for s in ("left", "right") for f in ARM_FIELDS)
    + "action_fields:\n"
    + "".join(f"  - robot__action__poses__{s}::panda__{f}_relative\n" for s in ("left", "right") for f in ARM_FIELDS)
    + "pose_groups:\n  - {name: left_panda_action, position_key: a, rotation_key: b}\n"
    "intrinsics_fields: [intrinsics.scene_right_0, intrinsics.scene_left_0]\n"
    "extrinsics_fields: [extrinsics.scene_right_0, extrinsics.scene_left_0]\n"
    "normalization:\n  enabled: true\n  method: percentile_1_99\n  scope: per_timestep\n  epsilon: 1e-2\n"
    "  centered_norm: true\n"
)
CLIP_BACKBONE = "  type: clip_backbone\n  hf_pretrained: openai/clip-vit-base-patch32\n  disable_text: false\n"
LBM_JOB = (
    "model:\n  <<: !include ../models/diffusion_policy.yaml\n  input_noise_std: 0.05\n"
    "  vision_language_backbone:\n    hf_pretrained: openai/clip-vit-base-patch32\n    freeze_text_encoder: false\n"
    "    freeze_image_encoder: false\n  transformer:\n    <<: !include ../models/transformer_410m.yaml\n"
    "    is_causal: true\n  noise_scheduler:\n    clamp_range: [-1.5, 1.5]\n"
    "data:\n  <<: !include ../data/lbm/lbm_data_params.yaml\n  <<: !include ../data/diffusion_policy.yaml\n"
    "  augmentation:\n    image:\n      color_jitter: {enabled: true}\n      crop: {enabled: true}\n"
    "  camera_names: [scene_right_0, scene_left_0, wrist_left_plus, wrist_right_minus]\n"
    "  image_indices: [-1, 0]\n  lowdim_past_timesteps: 2\n  lowdim_future_timesteps: 8\n  prefetch_factor: 16\n"
    "distributed:\n  fsdp: false\n"
    "hparams:\n  <<: !include ../hparams/diffusion_policy.yaml\n  precision: float32\n  lr: 0.00005\n"
    "  lr_cooldown_end: 0.000001\n  wd: 0.00000001\n  per_gpu_batch_size: 128\n  global_batch_size: {batch}\n"
    "ema:\n  enabled: true\n"
)
MANIFEST = "  dataset_manifest: [s3://bucket/task/shards/manifest.jsonl]\n"
STATS = "  dataset_statistics: [s3://bucket/task/shards/stats.json]\n  dataset_modality: [robotics]\n"
STATS += "  dataset_weighting: [1.0]\n"

# Every file of the original's config_presets/, by path: its shape written here.
PRESETS = {
    "data/diffusion_policy.yaml": _robotics_data("openai/clip-vit-base-patch32", 64),
    "data/vla_diffusion.yaml": _robotics_data("google/paligemma2-3b-pt-224", 256),
    "data/lbm/lbm_data_params.yaml": LBM_DATA,
    "data/lbm/lbm_action_fields.yaml": (
        "action_key_fields: [robot__action__poses__right::panda__xyz]\naction_index_fields: [3]\n"
        "pose_groups:\n  - {name: right_panda_action, position_key: a, rotation_key: b}\n"
    ),
    "data/lbm/lbm_data_camera_names_4cameras.yaml": (
        "- scene_right_0\n- scene_left_0\n- wrist_left_plus\n- wrist_right_minus\n"
    ),
    "data/lbm/lbm_data_camera_names_6cameras.yaml": "- scene_right_0\n- scene_left_0\n- wrist_left_minus\n"
    "- wrist_left_plus\n- wrist_right_minus\n- wrist_right_plus\n",
    "data/lbm/lbm_data_discard_key.yaml": (
        "- robot__desired__wrench__right::panda\n- robot__desired__wrench__left::panda\n"
    ),
    "data/lbm/lbm_image_augmentation_params.yaml": (
        "color_jitter:\n  enabled: true\n  brightness: 0.2\n  contrast: 0.4\n  saturation: 0.2\n  hue: [-0.05, 0.05]\n"
        "crop:\n  enabled: true\n  shape: [224, 224]\n  mode: random\n"
    ),
    "data/lbm/lbm_language_annotations.yaml": (
        "language_dict:\n  PutCupInBin:\n    original: [put the cup in the bin]\n"
    ),
    "data/preprocessing/ray_cluster_configs.yaml": (
        "cluster_name: shards\nmin_workers: 1\nmax_workers: 4\nprovider: {type: aws, region: us-east-1}\n"
    ),
    "data/robotics_preprocessing_params_1past_14future.yaml": (
        "past_lowdim_steps: 1\nfuture_lowdim_steps: 14\nimage_indices: [-1, 0]\nstride: 1\njpeg_quality: 95\n"
    ),
    "data/robotics_preprocessing_params_5past_20future_lbmsize.yaml": (
        "past_lowdim_steps: 5\nfuture_lowdim_steps: 20\nimage_indices: [-1, 0]\nresize_images_size: [342, 256]\n"
    ),
    "hparams/diffusion_policy.yaml": (
        "precision: amp_bf16\nloss_function: mse\ngrad_clip_norm: 1.0\nlr: 5e-4\nlr_cooldown_end: 1e-5\n"
    ),
    "models/transformer_tiny.yaml": _transformer(64, 2, 2, seq=128, comment="# about 3M parameters\n"),
    "models/transformer_11m.yaml": _transformer(96, 8, 4),
    "models/transformer_100m.yaml": _transformer(512, 12, 8, post_embed_norm="true"),
    "models/transformer_410m.yaml": _transformer(1024, 24, 16),
    "models/transformer_1b.yaml": _transformer(2048, 24, 16),
    "models/qwen_05b.yaml": (
        "type: transformer_hf\nhidden_dim: 1024\nn_layers: 24\nn_heads: 16\nmax_seq_len: 2048\n"
        "vocab_size: 151936\npost_embed_norm: false\nweight_tying: false\n"
    ),
    "models/unet.yaml": "type: unet\nin_channels: 3\nout_channels: 3\ntime_emb_dim: 256\ntext_emb_dim: 512\n"
    "channels: [128, 256, 512, 1024]\n",
    "models/vit_tiny.yaml": _vit(224, 64, 256, 4, 4, 14, 1),
    "models/vit_paligemma.yaml": _vit(224, 1152, 4304, 16, 27, 14, 1),
    "models/vit_smolvlm2_256m.yaml": _vit(512, 768, 3072, 12, 12, 16, 2),
    "models/vit_smolvlm2_256m_224.yaml": _vit(224, 768, 3072, 12, 12, 16, 1),
    "models/vlm_11m.yaml": "type: vlm\ntransformer:\n  <<: !include transformer_11m.yaml\n"
    "vit: !include vit_tiny.yaml\n",
    "models/vlm_100m.yaml": "type: vlm\ntransformer:\n  <<: !include transformer_100m.yaml\n"
    "vit: !include vit_tiny.yaml\n",
    "models/vlm_1b.yaml": "type: vlm\ntransformer:\n  <<: !include transformer_1b.yaml\n  vocab_size: 49280\n"
    "vit: !include vit_paligemma.yaml\n",
    "models/vlm_3b.yaml": "type: vlm\ntransformer:\n  type: transformer\n  hidden_dim: 2048\n  n_layers: 18\n"
    "  n_heads: 8\n  max_seq_len: 2048\n  vocab_size: 257216\n  post_embed_norm: false\n  weight_tying: false\n"
    "vit: !include vit_paligemma.yaml\n",
    "models/vlm_3b_gemma2_2b.yaml": "type: vlm\ntransformer:\n  type: transformer_hf\n"
    "  hf_pretrained: google/gemma-2-2b\nvit: !include vit_paligemma.yaml\n",
    "models/paligemma_load_llm.yaml": "type: vlm\ntransformer: !include transformer_1b.yaml\n"
    "vit: !include vit_paligemma.yaml\n",
    "models/smolvlm_load_llm.yaml": "type: vlm\ntransformer: !include transformer_1b.yaml\n"
    "vit: !include vit_smolvlm2_256m_224.yaml\n",
    "models/diffusion_policy.yaml": _policy(CLIP_BACKBONE, "transformer_100m.yaml", "[-3, 3]"),
    "models/vla_diffusion_11m.yaml": _policy(
        "  type: vlm_backbone\n  hf_pretrained: HuggingFaceTB/SmolVLM2-256M-Video-Instruct\n"
        "  num_vlm_layers_to_use: 1\n",
        "transformer_tiny.yaml",
        "[-3, 3]",
    ),
    "models/vla_diffusion_100m.yaml": _policy(
        "  type: vlm_foundry_backbone\n  num_vlm_layers_to_use: 4\n", "transformer_11m.yaml", "[-3, 3]"
    ),
    "models/vla_diffusion_1b.yaml": _policy(
        "  type: vlm_foundry_backbone\n  num_vlm_layers_to_use: 4\n", "transformer_100m.yaml", "[-3, 3]"
    ),
    "models/vla_diffusion_paligemma2.yaml": _policy(
        "  type: vlm_backbone\n  hf_pretrained: google/paligemma-3b-pt-224\n  num_vlm_layers_to_use: 4\n",
        "transformer_100m.yaml",
        "[-3, 3]",
    ),
    "models/vla_smolvlm_256m.yaml": _policy(
        "  freeze: false\n  num_vlm_layers_to_use: 1\n  hf_pretrained: HuggingFaceTB/SmolVLM2-256M-Video-Instruct\n"
        "  resume_from_checkpoint: null\n  resume_weights_only: false\n  type: vlm_backbone\n",
        "transformer_410m.yaml",
        "[-1.5, 1.5]",
        head="num_action_head_repeats: 8\ninput_noise_std: 0.05\ndiffusion_step_conditioning: add\n",
    ),
    "models/vla_smolvlm_foundry_backbone.yaml": _policy(
        "  freeze: false\n  num_vlm_layers_to_use: 4\n  resume_from_checkpoint: null\n  resume_weights_only: false\n"
        "  type: vlm_foundry_backbone\n",
        "transformer_410m.yaml",
        "[-1.5, 1.5]",
        head="num_action_head_repeats: 8\ninput_noise_std: 0.05\ndiffusion_step_conditioning: add\n",
        vocab="  vocab_size: 0\n",
    ),
    "training_jobs/diffusion_policy_bellpepper.yaml": (
        "model:\n  <<: !include ../models/diffusion_policy.yaml\n  vision_language_backbone:\n"
        "    type: clip_backbone\n    hf_pretrained: openai/clip-vit-base-patch32\n    freeze_text_encoder: True\n"
        "  transformer:\n    <<: !include ../models/transformer_100m.yaml\n    is_causal: True\n"
        "data:\n  <<: !include ../data/lbm/lbm_data_params.yaml\n  <<: !include ../data/diffusion_policy.yaml\n"
        + MANIFEST
        + STATS
        + "  camera_names: [scene_right_0, scene_left_0, wrist_left_plus, wrist_right_minus]\n"
        "  image_indices: [-1, 0]\n  augmentation:\n    image:\n      crop: {enabled: true, shape: [224, 224], "
        "mode: center}\ndistributed:\n  fsdp: True\n"
        "hparams:\n  <<: !include ../hparams/diffusion_policy.yaml\n  per_gpu_batch_size: 16\n"
        "  global_batch_size: 128\n"
    ),
    "training_jobs/diffusion_policy_lbm1.yaml": (
        "model:\n  type: diffusion_policy\n  vision_language_backbone:\n    type: clip_backbone\n"
        "    hf_pretrained: openai/clip-vit-base-patch32\n    freeze_text_encoder: True\n"
        "  transformer:\n"
        + textwrap.indent(_transformer(512, 12, 8, post_embed_norm="true"), "    ")
        + "  noise_scheduler: {num_timesteps: 100, beta_start: 0.0001, beta_end: 0.02, clamp_range: [-1.0, 1.0]}\n"
        "  use_flow_matching_scheduler: true\n  use_diffusers_scheduler: false\n  input_noise_std: 0.0\n"
        "data:\n"
        + textwrap.indent(LBM_DATA.replace("per_timestep", "global"), "  ")
        + textwrap.indent(_robotics_data('"openai/clip-vit-base-patch32"', 64).split("\n", 1)[1], "  ")
        + MANIFEST
        + STATS
        + "  camera_names: [scene_right_0, scene_left_0, wrist_left_minus, wrist_left_plus, wrist_right_minus, "
        "wrist_right_plus]\n  image_indices: [-1, 0]\n  pad_missing_images: True\n"
        "distributed:\n  fsdp: True\n"
        "hparams:\n  precision: amp_bf16\n  loss_function: mse\n  grad_clip_norm: null\n  lr: 1e-4\n"
        "  lr_cooldown_end: 1e-4\n  lr_scheduler: const\n  per_gpu_batch_size: 16\n  global_batch_size: 32\n"
        "  seed: 42\n  warmup: '0.0'\n  force_min_lr: 0.0\n  optimizer: adamw\n  wd: 1e-6\n  beta1: 0.95\n"
        "  beta2: 0.999\n  eps: 1.0e-8\n  z_loss_coefficient: 0.0\n  grad_checkpointing: false\n"
        "  torchcompile: false\n"
    ),
    "training_jobs/lbm_hparams_4cams.yaml": LBM_JOB.replace("{batch}", "1024"),
    "training_jobs/lbm_hparams_6cams.yaml": LBM_JOB.replace("{batch}", "1024").replace(
        "wrist_left_plus, wrist_right_minus]", "wrist_left_minus, wrist_left_plus, wrist_right_minus, wrist_right_plus]"
    ),
    "training_jobs/lbm_multitask_4cams.yaml": "total_train_samples: 614_400_000\nnum_checkpoints: 15\n"
    + LBM_JOB.replace("{batch}", "4096")
    .replace("  prefetch_factor: 16\n", "  prefetch_factor: 16\n" + MANIFEST + STATS)
    .replace("  augmentation:\n", "  pad_missing_images: true\n  augmentation:\n    enabled: true\n"),
    "training_jobs/vla_diffusion_bellpepper.yaml": (
        "model:\n  <<: !include ../models/vla_diffusion_paligemma2.yaml\n"
        "data:\n  <<: !include ../data/lbm/lbm_data_params.yaml\n  <<: !include ../data/vla_diffusion.yaml\n"
        + MANIFEST
        + STATS
        + "  camera_names: [scene_right_0, scene_left_0]\n  image_indices: [-1, 0]\ndistributed:\n  fsdp: True\n"
        "hparams:\n  <<: !include ../hparams/diffusion_policy.yaml\n  per_gpu_batch_size: 1\n  global_batch_size: 2\n"
    ),
    "training_jobs/vla_diffusion_tiny_test.yaml": (
        "model:\n  <<: !include ../models/vla_diffusion_11m.yaml\n"
        "data:\n  <<: !include ../data/lbm/lbm_data_params.yaml\n  <<: !include ../data/vla_diffusion.yaml\n"
        "  processor: HuggingFaceTB/SmolVLM2-256M-Video-Instruct\n  image_size: 512\n  img_num_tokens: 64\n"
        "  seq_len: 512\n  dataset_manifest: [small_lbm_dataset/manifest.jsonl]\n"
        "  dataset_statistics: [small_lbm_dataset/stats.json]\n  dataset_modality: [robotics]\n"
        "  dataset_weighting: [1.0]\n  camera_names: [scene_right_0, scene_left_0]\n  image_indices: [-1, 0]\n"
        "  num_workers: 0\n  prefetch_factor: null\ndistributed:\n  fsdp: false\n"
        "hparams:\n  <<: !include ../hparams/diffusion_policy.yaml\n  per_gpu_batch_size: 1\n  global_batch_size: 1\n"
    ),
}

LBM_IGNORED = {"data.pose_groups", "data.intrinsics_fields", "data.extrinsics_fields", "distributed.fsdp"}
# What each preset is: its section, the fields dropped as meaningless here, or the error a non-training file gives.
EXPECTED = {
    **{p: ("model", set()) for p in PRESETS if p.startswith("models/")},
    "models/qwen_05b.yaml": (
        "model",
        {f"model.{f}" for f in ("hidden_dim", "n_layers", "n_heads", "max_seq_len", "vocab_size")}
        | {"model.post_embed_norm", "model.weight_tying"},
    ),
    "data/diffusion_policy.yaml": ("data", set()),
    "data/vla_diffusion.yaml": ("data", set()),
    "data/lbm/lbm_data_params.yaml": ("data", {"data.pose_groups", "data.intrinsics_fields", "data.extrinsics_fields"}),
    "data/lbm/lbm_image_augmentation_params.yaml": ("image_augmentation", set()),
    "hparams/diffusion_policy.yaml": ("hparams", set()),
    **{p: ("experiment", LBM_IGNORED) for p in PRESETS if p.startswith("training_jobs/")},
    "training_jobs/diffusion_policy_lbm1.yaml": ("experiment", LBM_IGNORED | {"hparams.torchcompile"}),
    "training_jobs/vla_diffusion_tiny_test.yaml": ("experiment", LBM_IGNORED | {"data.prefetch_factor"}),
    "data/lbm/lbm_action_fields.yaml": "is not a training config",
    "data/lbm/lbm_data_camera_names_4cameras.yaml": "fragment for `!include`",
    "data/lbm/lbm_data_camera_names_6cameras.yaml": "fragment for `!include`",
    "data/lbm/lbm_data_discard_key.yaml": "fragment for `!include`",
    "data/lbm/lbm_language_annotations.yaml": "is not a training config",
    "data/preprocessing/ray_cluster_configs.yaml": "is not a training config",
    "data/robotics_preprocessing_params_1past_14future.yaml": "is not a training config",
    "data/robotics_preprocessing_params_5past_20future_lbmsize.yaml": "is not a training config",
}

# An experiment's config.yaml as the original writes it: every field, the VLM's sub-models inline.
SAVED_CONFIG = """\
data:
  allow_multiple_epochs: false
  dataloader_in_order: false
  dataset_cache: {cache_dir: null, cache_size_gb: null, cache_verbose: null, enabled: false}
  dataset_manifest: [s3://bucket/captions/manifest.jsonl]
  dataset_modality: [image_caption]
  dataset_weighting: [1.0]
  hf_fast_tokenizer_rayon_threads: null
  hf_fast_tokenizers_parallelism: true
  image_size: 224
  img_num_tokens: 64
  num_workers: 12
  prefetch_factor: 4
  processor: HuggingFaceTB/SmolVLM2-256M-Video-Instruct
  processor_kwargs: {}
  seed: 7
  seq_len: 512
  shuffle: true
  shuffle_buffer_size: 2000
  shuffle_initial: 500
  tokenizer: HuggingFaceTB/SmolVLM2-256M-Video-Instruct
  type: image_caption
  use_hf_fast_tokenizer: true
  val_dataset_manifest: []
  val_dataset_weighting: []
  augmentation:
    enabled: true
    image:
      color_jitter: {brightness: 0.2, contrast: 0.4, enabled: false, hue: [-0.05, 0.05], saturation: 0.2}
      random_crop: {enabled: true, mode: center, shape: [200, 200]}
db_logging: true
distributed:
  ddp_static_graph: false
  device: cuda:0
  dist_backend: nccl
  dist_url: env://
  fsdp: true
  fsdp_cpu_offload: false
  fsdp_reshard_after_forward: false
  local_rank: 0
  rank: 0
  use_distributed: true
  world_size: 8
ema: {alpha: 0.999, enabled: true, inv_gamma: 1.0, max_value: 0.9999, min_value: 0.0, power: 0.75, type: ema,
  update_after_step: 10}
hparams:
  beta1: 0.9
  beta2: 0.95
  decay: '0.3'
  eps: 1.0e-08
  force_min_lr: 0.0
  global_batch_size: 128
  grad_checkpointing: true
  grad_clip_norm: 1.0
  loss_function: cross_entropy
  lr: 0.0003
  lr_cooldown_end: 3.0e-05
  lr_scheduler: cosine
  optimizer: adamw
  per_gpu_batch_size: 4
  precision: amp_bfloat16
  seed: 7
  torchcompile: true
  warmup: 0.05
  wd: 0.1
  world_size: 8
  z_loss_coefficient: 0.0001
log_every_n_steps: 10
log_level: INFO
max_checkpoint_limit: 3
model:
  freeze: false
  image_token_id: 142
  processor: HuggingFaceTB/SmolVLM2-256M-Video-Instruct
  resume_from_checkpoint: null
  resume_weights_only: false
  type: vlm
  transformer:
    <<: !include ../config_presets/models/transformer_tiny.yaml
    attn_name: torch_attn
    cast_output_to_float32: false
    ffn_type: swiglu
    freeze: false
    norm_eps: 1.0e-05
    norm_type: rms_norm
    positional_embedding_type: rotary
    qk_norm: true
    resume_from_checkpoint: null
    resume_weights_only: false
    vocab_size: 143
  vit:
    cls_flag: false
    dropout: 0.0
    freeze: true
    hidden_dim: 64
    img_size: 224
    inter_dim: 128
    interpolation_mode: bicubic
    ln_eps: 1.0e-06
    n_heads: 4
    n_layers: 2
    patch_size: 16
    pretrained: null
    projector_pixel_shuffle_factor: 2
    resume_from_checkpoint: null
    resume_weights_only: false
    type: vit
name: 2026_01_02-vlm_tiny
num_checkpoints: 4
num_epochs: null
remote_sync: s3://bucket/runs
remote_sync_fixed_path: s3://bucket/fixed/
resolve_configs: false
resolve_configs_path: null
save_path: /data/experiments
total_train_samples: 640000
total_val_samples: 512
val_every_n_checkpoints: 2
wandb: true
wandb_entity: null
wandb_project_name: vla_foundry
wandb_tags: [vlm]
"""
SAVED_IGNORED = {
    *(f"data.{f}" for f in ("dataloader_in_order", "dataset_cache", "hf_fast_tokenizer_rayon_threads")),
    "data.hf_fast_tokenizers_parallelism",
    *(f"data.{f}" for f in ("use_hf_fast_tokenizer", "val_dataset_weighting")),
    *(f"distributed.{f}" for f in ("ddp_static_graph", "device", "dist_backend", "dist_url", "fsdp")),
    *(f"distributed.{f}" for f in ("fsdp_cpu_offload", "fsdp_reshard_after_forward", "local_rank", "rank")),
    *(f"distributed.{f}" for f in ("use_distributed", "world_size")),
    "hparams.torchcompile",
    "hparams.world_size",
    *("db_logging", "remote_sync", "remote_sync_fixed_path", "resolve_configs", "resolve_configs_path"),
}


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("foundry") / "config_presets"
    for rel, text in PRESETS.items():
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        (root / rel).write_text(text)
    run = root.parent / "run"
    run.mkdir()
    (run / "config.yaml").write_text(SAVED_CONFIG)
    return str(root)


def _gin_round_trip(cfg: fy.FoundryConfig, tmp_path) -> None:
    """The gin of ``cfg`` parses and builds exactly ``cfg``'s params."""
    path = tmp_path / "converted.gin"
    path.write_text(fy.foundry_config_to_gin(cfg))
    try:
        gin_utils.parse_gin([str(path)], [])
        if cfg.section == "image_augmentation":
            assert ImageAugmentationParams() == cfg.params
        else:
            assert gin_utils.build_experiment() == cfg.experiment
    finally:
        gin.clear_config()


def _yaml_round_trip(cfg: fy.FoundryConfig, tmp_path) -> dict:
    """Ours -> the original's YAML -> ours gives the same experiment; returns the YAML dict."""
    exported = fy.params_to_foundry_yaml(cfg.experiment)
    path = tmp_path / "exported.yaml"
    path.write_text(yaml.safe_dump(exported))
    again = fy.load_foundry_config(str(path))
    assert again.experiment == cfg.experiment
    return exported


def test_the_table_covers_every_preset():
    assert set(EXPECTED) == set(PRESETS)
    assert len(PRESETS) == 45  # the files of the original's config_presets/


@pytest.mark.parametrize("rel", sorted(PRESETS))
def test_every_preset_converts_and_its_gin_parses(presets, rel, tmp_path):
    expected = EXPECTED[rel]
    path = os.path.join(presets, rel)
    if isinstance(expected, str):  # a fragment or a preprocessing / cluster config, not a training config
        with pytest.raises(fy.FoundryConfigError, match=expected) as err:
            fy.load_foundry_config(path)
        assert path in str(err.value) and "\n" not in str(err.value)
        return
    section, ignored = expected
    cfg = fy.load_foundry_config(path)
    assert cfg.section == section
    assert set(cfg.ignored) == ignored
    _gin_round_trip(cfg, tmp_path)
    if section != "image_augmentation":
        _yaml_round_trip(cfg, tmp_path)


def test_includes_and_merges_resolve_like_the_original(presets):
    exp = fy.load_foundry_config(os.path.join(presets, "training_jobs/lbm_hparams_4cams.yaml")).experiment
    m = exp.model
    assert m.type == "diffusion_policy" and m.input_noise_std == 0.05
    # transformer: merged from transformer_410m, its own is_causal on top
    assert (m.transformer.hidden_dim, m.transformer.n_layers, m.transformer.n_heads) == (1024, 24, 16)
    assert m.transformer.is_causal is True and m.transformer.post_embed_norm is False
    # The merge is shallow: the job's backbone block replaces the preset's; without a type it is a clip_backbone.
    assert m.vision_language_backbone.type == "clip_backbone"
    assert m.vision_language_backbone.freeze_image_encoder is False and m.vision_language_backbone.disable_text is False
    assert m.noise_scheduler.clamp_range == (-1.5, 1.5) and m.noise_scheduler.num_timesteps == 1000
    d = exp.data
    assert d.normalization.method == "percentile_1_99" and d.normalization.epsilon == 0.01  # first include
    assert d.processor == "openai/clip-vit-base-patch32" and d.img_num_tokens == 64  # second include
    assert (d.lowdim_past_timesteps, d.lowdim_future_timesteps, d.prefetch_factor) == (2, 8, 16)  # own keys win
    assert d.augmentation.image.color_jitter.enabled and d.augmentation.image.crop.enabled
    assert d.camera_names == ("scene_right_0", "scene_left_0", "wrist_left_plus", "wrist_right_minus")
    h = exp.hparams
    assert (h.loss_function, h.grad_clip_norm, h.precision, h.lr) == ("mse", 1.0, "float32", 5e-5)
    assert exp.ema.enabled
    lbm = fy.load_foundry_config(os.path.join(presets, "training_jobs/lbm_multitask_4cams.yaml")).experiment
    assert (lbm.total_train_samples, lbm.num_checkpoints) == (614_400_000, 15)
    vlm = fy.load_foundry_config(os.path.join(presets, "models/vlm_1b.yaml")).experiment.model
    assert (vlm.transformer.hidden_dim, vlm.transformer.vocab_size, vlm.vit.hidden_dim) == (2048, 49280, 1152)


def test_later_merge_wins_and_own_keys_win_over_merges(tmp_path):
    (tmp_path / "a.yaml").write_text("lr: 1e-3\nwd: 0.1\n")
    (tmp_path / "b.yaml").write_text("wd: 0.2\nbeta1: 0.8\n")
    (tmp_path / "job.yaml").write_text("hparams:\n  <<: !include a.yaml\n  <<: !include b.yaml\n  beta1: 0.7\n")
    h = fy.load_foundry_config(str(tmp_path / "job.yaml")).experiment.hparams
    assert (h.lr, h.wd, h.beta1) == (1e-3, 0.2, 0.7)


def test_saved_experiment_config_maps_field_by_field(presets, tmp_path, caplog):
    path = os.path.join(os.path.dirname(presets), "run", "config.yaml")
    with caplog.at_level(logging.WARNING, logger=fy.__name__):
        cfg = fy.load_foundry_config(path)
    exp = cfg.experiment
    assert set(cfg.ignored) == SAVED_IGNORED and len(cfg.ignored) == len(SAVED_IGNORED)
    records = [r for r in caplog.records if "ignored" in r.getMessage()]
    assert len(records) == 1 and all(k in records[0].getMessage() for k in SAVED_IGNORED)
    assert exp.name == "2026_01_02-vlm_tiny" and exp.output_dir == "/data/experiments/2026_01_02-vlm_tiny"
    assert (exp.total_train_samples, exp.num_checkpoints, exp.max_checkpoint_limit) == (640000, 4, 3)
    assert (exp.total_val_samples, exp.val_every_n_checkpoints, exp.log_every_n_steps) == (512, 2, 10)
    m = exp.model
    assert (m.type, m.image_token_id, m.processor) == ("vlm", 142, "HuggingFaceTB/SmolVLM2-256M-Video-Instruct")
    t = m.transformer
    assert (t.hidden_dim, t.n_layers, t.n_heads, t.max_seq_len) == (64, 2, 2, 128)  # from the included preset
    assert (t.vocab_size, t.norm_type, t.qk_norm) == (143, "rms_norm", True)  # the file's own keys
    assert (m.vit.hidden_dim, m.vit.inter_dim, m.vit.projector_pixel_shuffle_factor, m.vit.freeze) == (64, 128, 2, True)
    d = exp.data
    assert (d.type, d.seq_len, d.num_workers, d.seed, d.img_num_tokens) == ("image_caption", 512, 12, 7, 64)
    assert d.augmentation.image.crop.mode == "center" and d.augmentation.image.crop.shape == (200, 200)  # renamed
    h = exp.hparams
    assert (h.lr, h.lr_cooldown_end, h.warmup, h.grad_checkpointing) == (3e-4, 3e-5, "0.05", True)
    assert (h.global_batch_size, h.per_gpu_batch_size, h.z_loss_coefficient, h.seed) == (128, 4, 1e-4, 7)
    assert exp.ema.enabled and exp.ema.update_after_step == 10
    _gin_round_trip(cfg, tmp_path)
    exported = _yaml_round_trip(cfg, tmp_path)
    assert exported["save_path"] == "/data/experiments" and exported["name"] == "2026_01_02-vlm_tiny"
    # Every mapped field the file gave comes back with the same value.
    raw = fy.load_yaml(path)
    raw["data"]["augmentation"]["image"]["crop"] = raw["data"]["augmentation"]["image"].pop("random_crop")
    for leaf, value in _leaves(raw):
        if leaf not in SAVED_IGNORED and not any(leaf.startswith(i + ".") for i in SAVED_IGNORED):
            assert _same(_get(exported, leaf), value), leaf


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("processor_kwargs",):
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float, str)) and isinstance(b, (int, float, str)) and not isinstance(a, bool):
        try:
            return float(a) == float(b)
        except ValueError:
            return a == b
    return a == b


def test_overrides_follow_draccus_dotted_keys(presets, tmp_path):
    path = os.path.join(presets, "training_jobs/vla_diffusion_tiny_test.yaml")
    (tmp_path / "vit_backbone.yaml").write_text("type: vit_backbone\nhidden_dim: 32\nn_heads: 2\nimg_size: 32\n")
    cfg = fy.load_foundry_config(
        path,
        [
            "model.transformer.n_layers=3",
            "hparams.lr=3e-4",  # a string to YAML 1.1, a float to draccus
            "--data.camera_names=[a, b, c]",
            f"model.vision_language_backbone=include {tmp_path / 'vit_backbone.yaml'}",
            "ema.enabled=true",
        ],
    )
    exp = cfg.experiment
    assert exp.model.transformer.n_layers == 3 and exp.model.transformer.hidden_dim == 64
    assert exp.hparams.lr == 3e-4 and exp.data.camera_names == ("a", "b", "c") and exp.ema.enabled
    assert exp.model.vision_language_backbone.type == "vit_backbone"
    assert exp.model.vision_language_backbone.hidden_dim == 32
    _gin_round_trip(cfg, tmp_path)
    # A model preset takes the same experiment-level keys.
    model = fy.load_foundry_config(os.path.join(presets, "models/transformer_11m.yaml"), ["model.hidden_dim=128"])
    assert model.experiment.model.hidden_dim == 128 and model.section == "model"


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  type: transformer\n  totally_unused_flag: 1\n", "unknown field 'model.totally_unused_flag'"),
        ("model:\n  type: transformer\n  hiden_dim: 8\n", "Did you mean 'hidden_dim'"),
        ("hparams:\n  lr: 1e-4\n  learning_rate: 3\n", "unknown field 'hparams.learning_rate'"),
        ("model:\n  type: mamba\n", "model.type = 'mamba' is not a model type"),
        ("type: mamba\nd_state: 16\n", "type 'mamba' is no model or data type"),
        ("model:\n  hidden_dim: 8\n", "model has no `type`"),
        ("model:\n  type: vlm\n  vit:\n    type: transformer\n", "model.vit.type = 'transformer' does not fit"),
        ("model:\n  type: transformer\n  n_heads: 5\n", "does not divide"),
        ("num_epochs: 2\nmodel: {type: transformer}\n", "num_epochs"),
        ("model: !include nowhere.yaml\n", "names no file"),
        ("model: [1, 2\n", "not valid YAML"),
        ("", "is empty"),
    ],
)
def test_bad_configs_name_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(fy.FoundryConfigError, match=message) as err:
        fy.load_foundry_config(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_include_cycle_and_bad_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("hparams: !include b.yaml\n")
    (tmp_path / "b.yaml").write_text("<<: !include a.yaml\n")
    with pytest.raises(fy.FoundryConfigError, match="!include cycle"):
        fy.load_foundry_config(str(tmp_path / "a.yaml"))
    (tmp_path / "ok.yaml").write_text("model: {type: transformer}\n")
    for override, message in [
        ("model.hidden_dim", "must read key.path=value"),
        ("=3", "must read key.path=value"),
        ("model..x=3", "must read key.path=value"),
        ("model.type.x=3", "not a section with fields"),
        ("model.hidden_dim=[1, 2", "not valid YAML"),
        ("model.hidden_dim=wide", "hidden_dim: expected an int"),
    ]:
        with pytest.raises(fy.FoundryConfigError, match=message):
            fy.load_foundry_config(str(tmp_path / "ok.yaml"), [override])


def _cli(*args: str, cwd: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launch.foundry_config", *args],
        cwd=cwd,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_prints_gin_and_reports_bad_input_in_one_line(presets, tmp_path):
    job = os.path.join(presets, "training_jobs/diffusion_policy_bellpepper.yaml")
    (tmp_path / "bad.yaml").write_text("model: {type: transformer\n")
    (tmp_path / "mamba.yaml").write_text("model: {type: mamba}\n")
    bad = [
        ([f"--config_path={tmp_path / 'missing.yaml'}"], "does not exist"),
        ([f"--config_path={tmp_path / 'bad.yaml'}"], "not valid YAML"),
        ([f"--config_path={tmp_path / 'mamba.yaml'}"], "'mamba' is not a model type"),
        ([f"--config_path={job}", "--override", "hparams.lr"], "must read key.path=value"),
    ]
    good = _cli(f"--config_path={job}", "--override", "hparams.lr=1e-3", cwd=ROOT)
    procs = [(_cli(*args, cwd=str(tmp_path)), args, message) for args, message in bad]  # all at once
    stdout, stderr = good.communicate(timeout=120)
    assert good.returncode == 0, stderr
    assert "hparams.lr = 0.001" in stdout and "experiment.model = @diffusion_policy()" in stdout
    assert "distributed.fsdp" in stderr  # the ignored fields, listed once
    gin_file = tmp_path / "job.gin"
    gin_file.write_text(stdout)
    try:
        gin_utils.parse_gin([str(gin_file)], [])
        built = gin_utils.build_experiment()
    finally:
        gin.clear_config()
    expected = fy.load_foundry_config(job, ["hparams.lr=1e-3"]).experiment
    assert built == expected and isinstance(built, TrainExperimentParams)
    for proc, args, message in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (args, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
        assert stdout == ""


@pytest.fixture(scope="module")
def s3_bucket():
    """A real S3 API (moto's server on 127.0.0.1) with an empty bucket; yields its s3:// root."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    import s3fs

    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()  # an instance cached by another test talks to another endpoint
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("presets")
        yield "s3://presets"
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_configs_and_their_includes_read_from_s3(s3_bucket, presets):
    from vla_foundry_jax import paths

    for rel in ("training_jobs/lbm_hparams_4cams.yaml", "models/diffusion_policy.yaml", "models/transformer_410m.yaml"):
        paths.write_text(f"{s3_bucket}/{rel}", PRESETS[rel])
    for rel in ("models/transformer_100m.yaml", "data/lbm/lbm_data_params.yaml", "data/diffusion_policy.yaml"):
        paths.write_text(f"{s3_bucket}/{rel}", PRESETS[rel])
    paths.write_text(f"{s3_bucket}/hparams/diffusion_policy.yaml", PRESETS["hparams/diffusion_policy.yaml"])
    remote = fy.load_foundry_config(f"{s3_bucket}/training_jobs/lbm_hparams_4cams.yaml")
    local = fy.load_foundry_config(os.path.join(presets, "training_jobs/lbm_hparams_4cams.yaml"))
    assert remote.experiment == local.experiment and remote.ignored == local.ignored
    paths.write_text(f"{s3_bucket}/broken.yaml", "model: !include models/missing.yaml\n")
    with pytest.raises(fy.FoundryConfigError, match=re.escape("s3://presets/models/missing.yaml")):
        fy.load_foundry_config(f"{s3_bucket}/broken.yaml")


def test_wandb_switch_maps_onto_experiment_wandb_fields_and_back(tmp_path):
    """``wandb: true`` with the original's project / entity / tags becomes experiment.wandb_*; off, they are ignored."""
    on = tmp_path / "on.yaml"
    on.write_text("wandb: true\nwandb_project_name: robots\nwandb_entity: lab\nwandb_tags: [a, b]\n")
    exp = fy.load_foundry_config(str(on)).experiment
    assert (exp.wandb_project, exp.wandb_entity, exp.wandb_tags) == ("robots", "lab", ("a", "b"))
    back = fy.params_to_foundry_yaml(exp)
    assert back["wandb"] is True and back["wandb_project_name"] == "robots" and back["wandb_tags"] == ["a", "b"]
    assert not {"wandb_project", "wandb_run_name", "wandb_group"} & set(back)
    off = tmp_path / "off.yaml"
    off.write_text("wandb: false\nwandb_project_name: robots\n")
    cfg = fy.load_foundry_config(str(off))
    assert cfg.experiment.wandb_project is None and "wandb_project_name" in cfg.ignored
