"""The original's own stable-diffusion UNet (``stable_diffusion.unet``) <-> :mod:`~vla_foundry_jax.models.unet`.

The original's module names and ours differ only in naming: a declarative table of module-path substitutions turns
each of our parameter paths into the original's state-dict name, and the leaf's kind gives the transform.

| ours                                   | the original's                         |
|----------------------------------------|----------------------------------------|
| ``time_fc1`` / ``time_fc2``            | ``time_mlp.1`` / ``time_mlp.3``        |
| ``init_conv``                          | ``init_conv``                          |
| ``down.{i}.res1|res2|self_attn|cross_attn`` | ``down_blocks.{i}.0|1|2|3``       |
| ``down.{i}.resample``                  | ``down_samples.{i}``                   |
| ``mid_res1`` / ``mid_res2``            | ``mid_block1`` / ``mid_block2``        |
| ``mid_self_attn`` / ``mid_cross_attn`` | ``mid_attn`` / ``mid_cross_attn``      |
| ``up.{i}.res1|...`` / ``up.{i}.resample`` | ``up_blocks.{i}.0|...`` / ``up_samples.{i}`` |
| ``out_norm`` / ``out_conv``            | ``final_conv.0`` / ``final_conv.2``    |
| ResnetBlock ``norm1`` / ``conv1``      | ``block1.0`` / ``block1.2``            |
| ResnetBlock ``norm2`` / ``conv2``      | ``block2.0`` / ``block2.2``            |
| ResnetBlock ``time_proj`` / ``text_proj`` | ``time_mlp`` / ``text_mlp``         |

Leaves: ``kernel`` <- ``weight`` in torch's layout by rank (conv ``OIHW`` -> ``HWIO``, Linear ``[out, in]`` ->
``[in, out]``), the upsamplers' ``ConvTranspose2d`` weight ``[in, out, kh, kw]`` flipped spatially and moved to
``[kh, kw, in, out]`` (:data:`CONV_TRANSPOSE`); GroupNorm ``scale`` <- ``weight``; ``bias`` <- ``bias``.
The sinusoid buffer ``time_mlp.0.emb`` is a constant here (:data:`UNET_BUFFER`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from vla_foundry_jax.convert.engine import COPY, TORCH_LAYOUT, Rule, Transform

LEVEL_PARTS = {"res1": "0", "res2": "1", "self_attn": "2", "cross_attn": "3"}
# (pattern on our path, replacement) applied in order; module paths only, the leaf is mapped after
MODULE_NAMES: tuple[tuple[str, str], ...] = (
    (r"^time_fc1\.", "time_mlp.1."),
    (r"^time_fc2\.", "time_mlp.3."),
    (r"^out_norm\.", "final_conv.0."),
    (r"^out_conv\.", "final_conv.2."),
    (r"^mid_res1\.", "mid_block1."),
    (r"^mid_res2\.", "mid_block2."),
    (r"^mid_self_attn\.", "mid_attn."),
    (r"^(down|up)\.(\d+)\.resample\.", r"\1_samples.\2."),
    (r"^(down|up)\.(\d+)\.(res1|res2|self_attn|cross_attn)\.", "LEVEL"),
    (r"\.norm1\.", ".block1.0."),
    (r"\.conv1\.", ".block1.2."),
    (r"\.norm2\.", ".block2.0."),
    (r"\.conv2\.", ".block2.2."),
    (r"\.time_proj\.", ".time_mlp."),
    (r"\.text_proj\.", ".text_mlp."),
)
LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
UNET_BUFFER = "time_mlp.0.emb"


def _conv_transpose_to_flax(value: np.ndarray, shape: tuple[int, ...] = ()) -> np.ndarray:
    return value[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)


def _conv_transpose_to_torch(value: np.ndarray) -> np.ndarray:
    return value.transpose(2, 3, 0, 1)[:, :, ::-1, ::-1]


# torch ConvTranspose2d weight [in, out, kh, kw] -> our transposed Conv2d kernel [kh, kw, in, out]
CONV_TRANSPOSE = Transform(
    "conv_transpose",
    _conv_transpose_to_flax,
    lambda s: (s[2], s[3], s[0], s[1]),
    invert=_conv_transpose_to_torch,
)


def _level(match: re.Match) -> str:
    kind, i, part = match.groups()
    return f"{kind}_blocks.{i}.{LEVEL_PARTS[part]}."


def original_name(path: str) -> str:
    """The original's state-dict name (relative to the UNet) of our UNet parameter ``path``."""
    for pattern, replacement in MODULE_NAMES:
        path = re.sub(pattern, _level if replacement == "LEVEL" else replacement, path)
    head, _, leaf = path.rpartition(".")
    return f"{head}.{LEAVES[leaf]}"


def unet_rules(paths: Iterable[str]) -> list[Rule]:
    """One rule per parameter of our UNet (``paths`` relative to it)."""
    rules = []
    for path in sorted(paths):
        if path.endswith(".kernel"):
            upsampler = re.match(r"^up\.\d+\.resample\.", path) is not None
            transform = CONV_TRANSPOSE if upsampler else TORCH_LAYOUT
        else:
            transform = COPY
        rules.append(Rule(path, original_name(path), transform))
    return rules
