"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``vlm_hf`` with HF ``model_type`` ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl``)
in Flax NNX; the architecture table is in :mod:`vla_foundry_jax.configs.qwen_vl`.

Inputs are HF's: ``input_ids [B, S]`` holding ``image_token_id`` placeholders, flat ``pixel_values [N, C * T * p * p]``
(every image's patches in (image, frame, merge-block row, merge-block column, row in block, column in block) order,
as the HF image processor writes them; a still image is repeated ``temporal_patch_size`` times along time by the
processor) and ``image_grid_thw [n_images, 3]`` (patch grid per image). Images of the whole batch are packed in
(sample, image) order, so samples may hold different numbers and sizes of images.

**Static shapes.** The packed patch sequence has a static length ``N`` (pad it with zero rows past the images to
bucket sizes; ``N`` must be a multiple of ``spatial_merge_size^2``); everything derived from ``image_grid_thw``
(2-D rotary positions, the per-image and per-window attention segments that stand for HF's ``cu_seqlens``, the
interpolation of Qwen3-VL's position table, the LM's multimodal positions) is computed with ``jnp`` from the grid,
so the model runs under ``jax.jit`` with a traced grid (one compile per (``N``, number of images, ``S``)). Vision
attention is :func:`~vla_foundry_jax.layers.attention.segment_attention`: patches see the patches of their own
image frame (Qwen2.5-VL's windowed layers: of their own window). Attention is banded by blocks: full layers by
the largest image frame when the grid is concrete (cost ``3 * max_patches * N`` instead of ``N^2``, and
``max_patches * N`` when all images have one size; with a traced grid ``vision_chunk``, None: dense, or blocks of
``P`` for per-sample inputs), Qwen2.5-VL's
windowed layers by one window (static; one block per window when every window is whole). For those, the merge units
are reordered so that each window is contiguous, as HF's ``window_index`` does (any such order gives the same
attention, and the merger's 2 x 2 blocks stay together), and put back in order before the merger.

Per-sample inputs (the data pipeline's layout, ``data.qwen_processor``): ``pixel_values [B, P, D]`` (each sample's
images' patches, then zero rows) with ``image_grid_thw [B, n, 3]``. :func:`pack_sample_patches` gathers them into
the packed layout above inside the model, so a batch split along its first axis (micro-batches, hosts) stays whole.

Vision tower (``visual``): 3-D patch embedding (a linear map of each flat row: HF's ``Conv3d`` with stride =
kernel), Qwen3-VL's learned position table bilinearly resized (``align_corners``) to each grid, ``depth`` pre-norm
blocks (fused ``qkv``, 2-D RoPE: the first quarter of the frequencies rotates with the row, the second with the
column, ``rotate_half`` layout), the patch merger (norm, 2 x 2 neighbours concatenated, MLP with exact GELU).
Qwen3-VL's DeepStack: after the blocks listed in ``deepstack_visual_indexes`` a merger of its own (norm after the
concatenation) makes features that are added to the outputs of the first LM layers at the image positions.

Language model: :class:`~vla_foundry_jax.models.hf_decoder.HFDecoder` (Qwen2; Qwen3 with q/k RMSNorm) with
M-RoPE: text tokens take position ``p`` on all three axes, an image's tokens take ``start + (t, row, column)`` of
its merged grid, and text after an image continues at ``start + max(rows, columns)``; positions count only
attended tokens (left padding takes 0). As in HF ``generate``, the prefill records ``rope_deltas = max position +
1 - attended length`` per row in the KV cache; later tokens are at their 1-D position plus that delta.
HF groups *consecutive* image tokens as one image (its processor always separates images by vision start / end
tokens); here images are told apart by their token counts, which agrees whenever they are separated.

Not supported: video inputs (``pixel_values_videos``, temporal positions of several frames in the LM).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vla_foundry_jax.configs.qwen_vl import QwenVisionConfig, QwenVLConfig
from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.layers.activations import ACTIVATIONS
from vla_foundry_jax.layers.attention import segment_attention
from vla_foundry_jax.layers.dense import Dense, trunc_normal
from vla_foundry_jax.layers.feed_forward import MLP, GatedMLP
from vla_foundry_jax.layers.norms import Norm
from vla_foundry_jax.layers.positional import rotate_half
from vla_foundry_jax.layers.stack import check_remat_policy, scan_layers, stack_layers
from vla_foundry_jax.models.hf_decoder import HFDecoder
from vla_foundry_jax.models.transformer import TransformerOutput

VISION_EPS = 1e-6


class QwenVLInputError(VLAFoundryError, ValueError):
    """Qwen-VL inputs that do not fit together (grid, patches, image tokens)."""


# ----------------------------------------------------------------------------------------------------------
# Geometry from image_grid_thw (jnp, jit-friendly)


def patch_layout(grid: jax.Array, n: int, merge: int) -> dict[str, jax.Array]:
    """Per flat patch row ``0 .. n-1``: ``image`` (``n_images`` for padding rows), ``frame``, ``row``, ``col`` in its
    image's patch grid, and its merge block's ``block_row`` / ``block_col`` (rows in HF's block-major order)."""
    grid = grid.astype(jnp.int32)
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    counts = t * h * w
    ends = jnp.cumsum(counts)
    idx = jnp.arange(n, dtype=jnp.int32)
    image = jnp.searchsorted(ends, idx, side="right").astype(jnp.int32)
    i = jnp.minimum(image, grid.shape[0] - 1)
    within = idx - (ends - counts)[i]
    hw = h[i] * w[i]
    frame, wf = within // hw, within % hw
    blocks_w = w[i] // merge
    block_col = (wf // merge**2) % blocks_w
    block_row = wf // (merge**2 * blocks_w)
    row = block_row * merge + (wf // merge) % merge
    col = block_col * merge + wf % merge
    return {
        "image": image,
        "frame": frame,
        "row": row,
        "col": col,
        "block_row": block_row,
        "block_col": block_col,
        "height": h[i],
        "width": w[i],
    }


def bilinear_taps(layout: dict[str, jax.Array], side: int) -> tuple[jax.Array, jax.Array]:
    """Indices ``[n, 4]`` into a ``side x side`` table and weights ``[n, 4]`` resizing it bilinearly
    (``align_corners=True``) to each patch's image grid (Qwen3-VL's learned position embedding)."""

    def axis(index: jax.Array, size: jax.Array) -> tuple[jax.Array, jax.Array]:
        src = index.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
        floor = jnp.floor(src)
        offsets = jnp.arange(2, dtype=jnp.float32)
        taps = jnp.clip(floor[:, None] + offsets, 0, side - 1).astype(jnp.int32)
        weights = jnp.maximum(1.0 - jnp.abs(src[:, None] - floor[:, None] - offsets), 0.0)
        return taps, weights

    ht, hw_ = axis(layout["row"], layout["height"])
    wt, ww = axis(layout["col"], layout["width"])
    idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    wts = (hw_[:, :, None] * ww[:, None, :]).reshape(-1, 4)
    return idx, wts


def mrope_position_ids(
    input_ids: jax.Array,
    attention_mask: jax.Array,
    grid: jax.Array | None,
    image_token_id: int,
    merge: int,
) -> tuple[jax.Array, jax.Array]:
    """HF's ``get_rope_index`` for images: positions ``[3, B, S]`` and ``rope_deltas [B]`` (module docstring)."""
    mask = attention_mask.astype(bool)
    is_img = (input_ids == image_token_id) & mask
    inc = (mask & ~is_img).astype(jnp.int32)
    t_i = h_i = w_i = jnp.zeros(input_ids.shape, jnp.int32)
    if grid is not None and grid.shape[0]:
        grid = grid.astype(jnp.int32)
        lt, lh, lw = grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge
        tokens = lt * lh * lw
        ends = jnp.cumsum(tokens)
        k = (jnp.cumsum(is_img.reshape(-1)) - 1).reshape(input_ids.shape)
        img = jnp.clip(jnp.searchsorted(ends, k, side="right"), 0, grid.shape[0] - 1)
        within = k - (ends - tokens)[img]
        t_i = within // (lh[img] * lw[img])
        h_i = (within // lw[img]) % lh[img]
        w_i = within % lw[img]
        last = is_img & (within == tokens[img] - 1)
        inc = inc + jnp.where(last, jnp.maximum(lh[img], lw[img]), 0)
    start = jnp.cumsum(inc, axis=1) - inc
    pos = jnp.stack([start + jnp.where(is_img, a, 0) for a in (t_i, h_i, w_i)])
    pos = jnp.where(mask[None], pos, 0)
    deltas = jnp.max(pos, axis=(0, 2)) + 1 - jnp.sum(mask, axis=1, dtype=jnp.int32)
    return pos, deltas


def pack_sample_patches(pixel_values: jax.Array, image_grid_thw: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample padded patches ``[B, P, D]`` (the data pipeline's layout: sample ``b``'s images first, zero rows
    after) and ``image_grid_thw [B, n, 3]`` -> the packed ``[B * P, D]`` (every sample's valid rows in (sample,
    image) order, zero rows last) and ``[B * n, 3]``. A gather computed from the grid, so it runs under ``jit``."""
    B, P, _ = pixel_values.shape
    grid = jnp.asarray(image_grid_thw, jnp.int32).reshape(B, -1, 3)
    counts = jnp.sum(jnp.prod(grid, axis=-1), axis=-1)  # valid rows per sample
    ends = jnp.cumsum(counts)
    k = jnp.arange(B * P, dtype=jnp.int32)
    sample = jnp.searchsorted(ends, k, side="right").astype(jnp.int32)
    b = jnp.minimum(sample, B - 1)
    row = jnp.clip(k - (ends - counts)[b], 0, P - 1)
    packed = jnp.where((sample < B)[:, None], pixel_values[b, row], jnp.zeros((), pixel_values.dtype))
    return packed, grid.reshape(-1, 3)


def check_sample_inputs(config: QwenVLConfig, input_ids: Any, pixel_values: Any, image_grid_thw: Any) -> None:
    """:func:`check_inputs` for the per-sample layout (``pixel_values [B, P, D]``, ``image_grid_thw [B, n, 3]``):
    each sample on its own, the error naming the sample."""
    if image_grid_thw is None:
        check_inputs(config, input_ids, pixel_values, None)
    ids, pv, grid = np.asarray(input_ids), np.asarray(pixel_values), np.asarray(image_grid_thw)
    if grid.ndim != 3 or grid.shape[0] != pv.shape[0] or ids.shape[0] != pv.shape[0]:
        raise QwenVLInputError(
            f"per-sample Qwen-VL inputs need input_ids [B, S], pixel_values [B, P, D] and image_grid_thw [B, n, 3] "
            f"with one B; got {ids.shape}, {pv.shape} and {grid.shape}."
        )
    for b in range(pv.shape[0]):
        try:
            check_inputs(config, ids[b : b + 1], pv[b], grid[b])
        except QwenVLInputError as e:
            raise QwenVLInputError(f"sample {b}: {e}") from None


def check_inputs(config: QwenVLConfig, input_ids: Any, pixel_values: Any, image_grid_thw: Any) -> None:
    """Host-side checks of concrete inputs; one :class:`QwenVLInputError` naming the field and the fix."""
    v = config.vision
    m = v.spatial_merge_size
    n_tokens = int((np.asarray(input_ids) == config.image_token_id).sum())
    if pixel_values is None:
        if n_tokens and image_grid_thw is None:
            raise QwenVLInputError(
                f"input_ids hold {n_tokens} image tokens (id {config.image_token_id}) but no pixel_values were given."
            )
        return
    if image_grid_thw is None:
        raise QwenVLInputError(
            "image_grid_thw is missing: Qwen-VL pixel_values are flat patches; pass the image processor's "
            "image_grid_thw [n_images, 3] with them."
        )
    grid = np.asarray(image_grid_thw).reshape(-1, 3)
    small = np.flatnonzero((grid[:, 1] < m) | (grid[:, 2] < m) | (grid[:, 1] % m) | (grid[:, 2] % m))
    if small.size:
        i = int(small[0])
        raise QwenVLInputError(
            f"image_grid_thw[{i}] = {grid[i].tolist()}: image {i} is smaller than one merged patch or not a whole "
            f"number of them ({m} x {m} patches of {v.patch_size} pixels); resize it to at least {m * v.patch_size} "
            "pixels per side (the processor's min_pixels)."
        )
    pv = np.shape(pixel_values)
    need = int(np.prod(grid, axis=1).sum())
    if len(pv) != 2 or pv[1] != v.patch_dim or pv[0] < need or pv[0] % v.merge_unit:
        raise QwenVLInputError(
            f"pixel_values has shape {tuple(pv)}; image_grid_thw {grid.tolist()} needs [N >= {need}, {v.patch_dim}] "
            f"flat patches with N a multiple of {v.merge_unit} (padding rows past the images are ignored)."
        )
    expected = int((grid[:, 0] * (grid[:, 1] // m) * (grid[:, 2] // m)).sum())
    if n_tokens != expected:
        raise QwenVLInputError(
            f"input_ids hold {n_tokens} image tokens (id {config.image_token_id}) but image_grid_thw "
            f"{grid.tolist()} gives {expected}; each image needs t * (h / {m}) * (w / {m}) tokens (use the "
            "processor's chat template)."
        )


def _concrete(*xs: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


# ----------------------------------------------------------------------------------------------------------
# Vision tower


def _norm(v: QwenVisionConfig, dim: int, param_dtype: jnp.dtype) -> Norm:
    kind = "rms_norm" if v.family == "qwen2_5_vl" else "default_layer_norm"
    return Norm(kind, dim, VISION_EPS, param_dtype=param_dtype)


class VisionAttention(nnx.Module):
    def __init__(self, v: QwenVisionConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.v = v
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.qkv = Dense(v.hidden_size, 3 * v.hidden_size, names=("embed", "qkv"), **kw)
        self.proj = Dense(v.hidden_size, v.hidden_size, names=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Any) -> jax.Array:
        """``attend(q, k, v)``: the segment attention of this layer (full or windowed)."""
        N, D = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(N, 3, self.v.num_heads, self.v.head_dim), 3, axis=1)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
        q = (qf * cos + rotate_half(qf) * sin).astype(x.dtype)
        k = (kf * cos + rotate_half(kf) * sin).astype(x.dtype)
        return self.proj(attend(q, k, v).reshape(N, D))


class VisionBlock(nnx.Module):
    def __init__(self, v: QwenVisionConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        D, F = v.hidden_size, v.intermediate_size
        act = ACTIVATIONS[v.activation]
        self.norm1 = _norm(v, D, param_dtype)
        self.attn = VisionAttention(v, **kw)
        self.norm2 = _norm(v, D, param_dtype)
        self.mlp = GatedMLP(D, F, act=act, **kw) if v.family == "qwen2_5_vl" else MLP(D, F, act=act, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Any) -> jax.Array:
        x = x + self.attn(self.norm1(x).astype(x.dtype), cos, sin, attend)
        return x + self.mlp(self.norm2(x).astype(x.dtype))


class PatchMerger(nnx.Module):
    """2 x 2 neighbouring patches -> one LM token: ``fc2(gelu(fc1(concat(norm(x)))))``; ``postshuffle``: the norm
    acts on the concatenation (Qwen3-VL's DeepStack mergers)."""

    def __init__(
        self, v: QwenVisionConfig, *, postshuffle: bool, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype
    ):
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.width = v.hidden_size * v.merge_unit
        self.postshuffle = postshuffle
        self.norm = _norm(v, self.width if postshuffle else v.hidden_size, param_dtype)
        self.fc1 = Dense(self.width, self.width, names=("embed", "mlp"), **kw)
        self.fc2 = Dense(self.width, v.out_hidden_size, names=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.width)).astype(x.dtype)
        else:
            x = self.norm(x).astype(x.dtype).reshape(-1, self.width)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def _vision_step(cos: jax.Array, sin: jax.Array, attend: Any, keep: bool) -> Any:
    """The scan step of a run of vision blocks (closing over its static attention, so ``nnx.remat`` sees arrays)."""

    def step(block: VisionBlock, x: jax.Array) -> Any:
        y = block(x, cos, sin, attend)
        return y, (y if keep else None)

    return step


class QwenVisionTower(nnx.Module):
    """Flat patches ``[N, patch_dim]`` + ``image_grid_thw`` -> merged tokens ``[N / 4, H_lm]`` (and Qwen3-VL's
    DeepStack features ``[K, N / 4, H_lm]``)."""

    def __init__(
        self,
        v: QwenVisionConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        remat_policy: str | None = None,
    ):
        self.v = v
        self.dtype, self.remat_policy = dtype, remat_policy
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        D = v.hidden_size
        self.patch_embed = Dense(v.patch_dim, D, bias=v.family == "qwen3_vl", names=(None, "embed"), **kw)
        self.pos_embed = (
            nnx.Param(
                trunc_normal(rngs.params(), (v.num_position_embeddings, D), 0.02, param_dtype),
                out_sharding=(None, "embed"),
            )
            if v.num_position_embeddings
            else None
        )
        self.blocks = stack_layers(
            lambda r: VisionBlock(v, rngs=r, dtype=dtype, param_dtype=param_dtype), v.depth, rngs
        )
        self.merger = PatchMerger(v, postshuffle=False, **kw)
        K = len(v.deepstack_visual_indexes)
        self.deepstack_mergers = (
            stack_layers(
                lambda r: PatchMerger(v, postshuffle=True, rngs=r, dtype=dtype, param_dtype=param_dtype), K, rngs
            )
            if K
            else None
        )

    def rotary(self, layout: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """2-D rotary cos / sin ``[N, 1, head_dim]`` (float32)."""
        quarter = self.v.head_dim // 2
        inv_freq = 1.0 / (self.v.rope_theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
        rows, cols = (layout[k][:, None].astype(jnp.float32) for k in ("row", "col"))
        freqs = jnp.concatenate([rows * inv_freq, cols * inv_freq], axis=-1)
        emb = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]
        return jnp.cos(emb), jnp.sin(emb)

    def __call__(
        self,
        pixel_values: jax.Array,
        grid: jax.Array,
        chunk: int | None = None,
        aligned: bool = False,
        whole_windows: bool = False,
    ) -> tuple[jax.Array, jax.Array | None]:
        """``chunk``: block size of the full-attention layers (None: dense); ``aligned``: every image frame fills one
        block; ``whole_windows``: every window is complete (both let a block attend only to itself)."""
        v = self.v
        N = pixel_values.shape[0]
        layout = patch_layout(grid, N, v.spatial_merge_size)
        x = self.patch_embed(pixel_values.astype(self.dtype))
        if self.pos_embed is not None:
            side = math.isqrt(v.num_position_embeddings)
            idx, wts = bilinear_taps(layout, side)
            table = self.pos_embed[...].astype(jnp.float32)
            x = x + jnp.sum(table[idx] * wts[..., None], axis=1).astype(x.dtype)
        cos, sin = self.rotary(layout)
        zeros = jnp.zeros_like(layout["image"])
        full = jnp.stack([layout["image"], layout["frame"], zeros, zeros])
        keep = bool(v.deepstack_visual_indexes)
        if v.windowed:
            # reorder the merge units so that every window is contiguous (HF's window_index; any order that keeps
            # windows together gives the same attention), then attend in blocks of one window
            ws = v.window_merged
            wr, wc = layout["block_row"] // ws, layout["block_col"] // ws
            keys = [layout[k][:: v.merge_unit] for k in ("block_col", "block_row")]
            keys += [wc[:: v.merge_unit], wr[:: v.merge_unit], layout["frame"][:: v.merge_unit]]
            units = jnp.lexsort([*keys, layout["image"][:: v.merge_unit]])
            perm = (units[:, None] * v.merge_unit + jnp.arange(v.merge_unit)).reshape(-1)
            x, cos, sin, full = x[perm], cos[perm], sin[perm], full[:, perm]
            window = jnp.stack([layout["image"], layout["frame"], wr, wc])[:, perm]
            window_chunk = ws * ws * v.merge_unit
        # runs of consecutive blocks of one kind (full / windowed), each scanned with its own static block size
        kinds = [not v.windowed or i in v.fullatt_block_indexes for i in range(v.depth)]
        runs = [i for i in range(1, v.depth) if kinds[i] != kinds[i - 1]]
        graphdef, state = nnx.split(self.blocks)
        hidden = []
        for lo, hi in zip([0, *runs], [*runs, v.depth], strict=True):
            if kinds[lo]:
                attend = functools.partial(segment_attention, segments=full, chunk=chunk, aligned=aligned)
            else:
                attend = functools.partial(
                    segment_attention, segments=window, chunk=window_chunk, aligned=whole_windows
                )

            blocks = self.blocks
            if (lo, hi) != (0, v.depth):
                blocks = nnx.merge(graphdef, jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], state))
            step = _vision_step(cos, sin, attend, keep)
            x, h = scan_layers(step, blocks, x, out_axes=(nnx.Carry, 0), remat_policy=self.remat_policy)
            hidden.append(h)
        hidden = jnp.concatenate(hidden) if keep else None
        if v.windowed:
            x = x[jnp.argsort(perm)]
        merged = self.merger(x)
        if not keep:
            return merged, None
        picked = hidden[jnp.asarray(v.deepstack_visual_indexes)]  # [K, N, D]

        @nnx.vmap(in_axes=(0, 0), out_axes=0)
        def deep(merger: PatchMerger, h: jax.Array) -> jax.Array:
            return merger(h)

        return merged, deep(self.deepstack_mergers, picked)


# ----------------------------------------------------------------------------------------------------------
# The VLM


class QwenVL(nnx.Module):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL (``type = "vlm_hf"``); ``__call__`` returns the LM's
    :class:`TransformerOutput` (its cache also carries ``rope_deltas [B]``)."""

    def __init__(
        self,
        config: QwenVLConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat_policy: str | None = None,
        vision_chunk: int | None = None,
    ):
        check_remat_policy(remat_policy)
        self.config = config
        self.dtype = dtype
        self.vision_chunk = vision_chunk
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype, "remat_policy": remat_policy}
        self.visual = QwenVisionTower(config.vision, **kw)
        self.language_model = HFDecoder(config.text, **kw)

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def hidden_dim(self) -> int:
        return self.config.text.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.config.text.num_layers

    def _blocks(self, grid: Any) -> tuple[int | None, bool, bool]:
        """(block size of the full-attention layers, whether every image frame fills exactly one such block, whether
        every window is whole) from a concrete grid; with a traced one ``vision_chunk`` and no alignment."""
        if grid is not None and _concrete(grid):
            g = np.asarray(grid).reshape(-1, 3)
            if not len(g):
                return None, False, False
            frames = g[:, 1] * g[:, 2]
            side = self.config.vision.window_merged * self.config.vision.spatial_merge_size
            whole = bool(side and np.all(g[:, 1] % side == 0) and np.all(g[:, 2] % side == 0))
            return int(frames.max()), bool(np.all(frames == frames[0])), whole
        return self.vision_chunk, False, False

    def encode_images(
        self, pixel_values: jax.Array, image_grid_thw: jax.Array, chunk: int | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """Merged image tokens ``[N / 4, H]`` (packed, padding rows last) and DeepStack features or None
        (``chunk``: a bound on any image's rows, used when the grid is traced)."""
        grid = jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
        blocks = self._blocks(image_grid_thw)
        if chunk is not None and not _concrete(image_grid_thw):
            blocks = (chunk, False, False)
        return self.visual(jnp.asarray(pixel_values), grid, *blocks)

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        image_grid_thw: jax.Array | None,
        chunk: int | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """LM input embeddings ``[B, S, H]`` with the image positions replaced by the packed image tokens (in
        (sample, position) order), and the DeepStack additions ``[K, B, S, H]`` (or None)."""
        is_img = input_ids == self.config.image_token_id
        tokens = self.language_model.embed(input_ids)
        if pixel_values is None:
            return tokens, None
        merged, deep = self.encode_images(pixel_values, image_grid_thw, chunk)
        slot = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, merged.shape[0] - 1).reshape(is_img.shape)
        x = jnp.where(is_img[..., None], merged.astype(tokens.dtype)[slot], tokens)
        if deep is not None:
            deep = jnp.where(is_img[None, ..., None], deep.astype(tokens.dtype)[:, slot], jnp.zeros((), tokens.dtype))
        return x, deep

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        *,
        image_grid_thw: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: Any = None,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        position_ids: jax.Array | None = None,
    ) -> TransformerOutput:
        """``input_ids [B, S]`` with image tokens, flat ``pixel_values`` + ``image_grid_thw`` -> LM output.

        Positions: M-RoPE from the ids and the grid (a prompt, with or without a cache) unless 1-D
        ``position_ids [B, S]`` come without images (generated tokens): those get the cache's ``rope_deltas``.
        ``token_type_ids`` (not an HF input here): prefix-LM attention where it is 0, as PaliGemma's.
        """
        del deterministic  # no dropout
        chunk = None
        if pixel_values is not None and jnp.ndim(pixel_values) == 3:  # per-sample padded (the data pipeline's)
            if _concrete(input_ids, pixel_values, image_grid_thw):
                check_sample_inputs(self.config, input_ids, pixel_values, image_grid_thw)
            chunk = pixel_values.shape[1]  # no image is longer than one sample's rows
            pixel_values, image_grid_thw = pack_sample_patches(jnp.asarray(pixel_values), image_grid_thw)
        elif _concrete(input_ids, pixel_values, image_grid_thw):
            check_inputs(self.config, input_ids, pixel_values, image_grid_thw)
        c = self.config
        B, S = input_ids.shape
        mask = jnp.ones((B, S), bool) if attention_mask is None else attention_mask.astype(bool)
        x, deep = self.embed(input_ids, pixel_values, image_grid_thw, chunk=chunk)
        deltas = jnp.zeros((B,), jnp.int32) if cache is None else cache["rope_deltas"]
        if position_ids is None or pixel_values is not None:
            grid = None if image_grid_thw is None else jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
            positions, deltas = mrope_position_ids(input_ids, mask, grid, c.image_token_id, c.vision.spatial_merge_size)
        else:
            positions = position_ids if position_ids.ndim == 3 else position_ids + deltas[:, None]
        lm_cache = None if cache is None else {k: v for k, v in cache.items() if k != "rope_deltas"}
        out = self.language_model(
            inputs_embeds=x,
            attention_mask=attention_mask,
            cache=lm_cache,
            output_hidden_states=output_hidden_states,
            prefix_mask=None if token_type_ids is None else token_type_ids == 0,
            position_ids=positions,
            deepstack=deep,
        )
        if out.cache is None:
            return out
        return TransformerOutput(out.logits, {**out.cache, "rope_deltas": deltas}, out.hidden_states)

    def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype | None = None) -> Any:
        cache = self.language_model.init_cache(batch_size, max_len, dtype)
        return {**cache, "rope_deltas": jnp.zeros((batch_size,), jnp.int32)}


def patchify_images(images: jax.Array, v: QwenVisionConfig) -> tuple[jax.Array, np.ndarray]:
    """Channels-last images ``[B, N, h, w, C]`` (already normalised, sides multiples of ``patch * merge``) -> HF's flat
    ``pixel_values [B * N * gh * gw, C * T * p * p]`` and ``image_grid_thw [B * N, 3]`` (static), as HF's image
    processor writes a still image: repeated ``T = temporal_patch_size`` times along time, rows in (merge-block row,
    merge-block column, row in block, column in block) order, each row (channel, time, pixel row, pixel column)."""
    B, N, h, w, C = images.shape
    p, m, T = v.patch_size, v.spatial_merge_size, v.temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise QwenVLInputError(
            f"camera images of {h} x {w} pixels: Qwen-VL needs sides that are multiples of {p * m} (patch_size x "
            "spatial_merge_size); resize them in the data pipeline."
        )
    gh, gw = h // p, w // p
    x = jnp.moveaxis(images.reshape(B * N, h, w, C), -1, 1)  # [BN, C, h, w]
    x = jnp.broadcast_to(x[:, :, None], (B * N, C, T, h, w))
    x = x.reshape(B * N, C, T, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 1, 2, 5, 8)  # [BN, gh/m, gw/m, m, m, C, T, p, p]
    grid = np.tile(np.asarray([[1, gh, gw]], np.int32), (B * N, 1))
    return x.reshape(B * N * gh * gw, C * T * p * p), grid
