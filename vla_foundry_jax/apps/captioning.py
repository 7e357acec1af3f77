"""Caption images with a trained VLM and score captions against references (``launch.caption``,
``launch.eval_caption``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax.data.image_caption import decode_image, decode_sample
from vla_foundry_jax.data.processor import IMAGE_TOKEN, processor_for_data
from vla_foundry_jax.data.shards import ShardDataSource
from vla_foundry_jax.errors import UsageError
from vla_foundry_jax.models.generation import generate
from vla_foundry_jax.params import TrainExperimentParams
from vla_foundry_jax.sampling import load_model


class Captioner:
    """Greedy captioning: the prompt is the processor's ``"<image> "`` prefix; generation stops at EOS."""

    def __init__(self, model: Any, exp: TrainExperimentParams, *, max_new_tokens: int = 16):
        self.model = model
        self.exp = exp
        self.processor = processor_for_data(exp.data.replace(processor=exp.model.processor or exp.data.processor))
        self.max_new_tokens = max_new_tokens
        self.prompt_ids = np.asarray(self.processor.token_ids(f"{IMAGE_TOKEN} "), np.int32)

    def __call__(self, images: list[np.ndarray]) -> list[str]:
        """uint8 ``[H, W, 3]`` images (any size; resized by the processor) -> captions."""
        pixels = np.stack([self.processor.preprocess_image(im) for im in images])[:, None]  # [B, 1, H, W, 3]
        ids = np.broadcast_to(self.prompt_ids, (len(images), len(self.prompt_ids)))
        out = generate(
            self.model,
            jnp.asarray(ids),
            max_new_tokens=self.max_new_tokens,
            temperature=0.0,
            eos_token_id=self.processor.eos_token_id,
            pixel_values=jnp.asarray(pixels),
            rng=jax.random.PRNGKey(0),
        )
        new = np.asarray(out)[:, ids.shape[1] :]
        return [self.processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

    def caption_files(self, paths: Iterable[str]) -> list[str]:
        images = []
        for p in paths:
            with open(p, "rb") as f:
                images.append(decode_image(f.read(), where=p))
        return self(images)


def normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " . ").split())


def evaluate(captioner: Captioner, manifest: str, *, batch_size: int = 64, limit: int | None = None) -> dict:
    """Exact match of generated vs reference captions (case and spacing normalised) over a manifest."""
    source = ShardDataSource(manifest)
    n = len(source) if limit is None else min(limit, len(source))
    matches, examples = 0, []
    for start in range(0, n, batch_size):
        samples = [decode_sample(source[i]) for i in range(start, min(n, start + batch_size))]
        preds = captioner([s["image"] for s in samples])
        for s, pred in zip(samples, preds, strict=True):
            ok = normalise(pred) == normalise(s["caption"])
            matches += ok
            if len(examples) < 8:
                examples.append({"reference": s["caption"], "prediction": pred})
    return {"exact_match": matches / max(n, 1), "num_samples": n, "examples": examples}


CAPTIONING_TYPES = ("vlm", "vlm_hf")


def load_captioning_model(run_dir: str) -> tuple[Any, Any]:
    """``(model, experiment)`` of the VLM run in ``run_dir``; a run of another model type is a clear error."""
    kind = ckpt_lib.load_experiment_params(run_dir).model.type
    if kind not in CAPTIONING_TYPES:
        raise UsageError(
            f"{run_dir} holds a {kind!r} model; captioning needs a run of {' or '.join(CAPTIONING_TYPES)}."
        )
    return load_model(run_dir)


def caption_run(run_dir: str, paths: list[str], *, max_new_tokens: int = 16) -> list[tuple[str, str]]:
    """``(path, caption)`` of each image file, captioned by the VLM run in ``run_dir`` (its trained weights)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"no such image file: {', '.join(repr(p) for p in missing)}.")
    model, exp = load_captioning_model(run_dir)
    captions = Captioner(model, exp, max_new_tokens=max_new_tokens).caption_files(paths)
    return list(zip(paths, captions, strict=True))


def evaluate_run(
    run_dir: str, *, manifest: str | None = None, batch_size: int = 64, limit: int | None = None
) -> dict[str, Any]:
    """:func:`evaluate` of the VLM run in ``run_dir`` on ``manifest`` (default: the run's first
    ``val_dataset_manifest``); the result also names the ``manifest``."""
    model, exp = load_captioning_model(run_dir)
    if manifest is None:
        if not exp.data.val_dataset_manifest:
            raise UsageError(f"{run_dir}: the run has no val_dataset_manifest; give a manifest.jsonl to evaluate on.")
        manifest = exp.data.val_dataset_manifest[0]
    return {**evaluate(Captioner(model, exp), manifest, batch_size=batch_size, limit=limit), "manifest": manifest}
