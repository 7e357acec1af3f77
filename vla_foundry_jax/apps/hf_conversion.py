"""Hugging Face causal LM <-> our ``transformer_hf`` runs (``launch.convert_hf``, ``launch.export_hf``).

HF -> run: :func:`convert_hf` writes ``RUN_DIR/checkpoints/0/{model,params,train,data}`` (our run layout) and
``RUN_DIR/params.json``, and copies the HF ``config.json`` (plus tokenizer / generation files when present) into
``RUN_DIR/hf_config/`` together with a marker file (``converted_run.json``: where it came from). The stored
experiment's ``transformer_hf.hf_pretrained`` points at that absolute ``RUN_DIR/hf_config`` directory, so the run
needs neither the HF directory nor the hub:

* ``vla_foundry_jax.sampling.load_model(RUN_DIR)`` / ``python -m launch.generate --run_dir=RUN_DIR`` rebuild it;
* training starts from it with ``transformer_hf.hf_pretrained = 'RUN_DIR/hf_config'``,
  ``transformer_hf.resume_from_checkpoint = 'RUN_DIR'`` and ``transformer_hf.resume_weights_only = True`` (the
  ``transformer_hf`` weight loader sees the marker and leaves the weights to ``resume_from_checkpoint``). Pointing
  ``hf_pretrained`` at the original HF directory also works (the checkpoint's weights then replace the HF ones).

The step-0 checkpoint holds weights only (no optimizer state): resume from it with ``resume_weights_only = True``.
Moving ``RUN_DIR`` breaks the stored absolute ``hf_pretrained``; convert again (or rewrite ``hf_pretrained``).
The parameters are stored in float32 (``hparams.precision = 'fp32'`` in the stored experiment).

Run -> HF, the inverse of :mod:`vla_foundry_jax.convert.hf_decoder_maps`: :func:`export_transformer_hf` writes
``out_dir/model.safetensors`` + ``config.json`` (+ the tokenizer files and ``generation_config.json`` found next
to the model's config) so that ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads the trained
weights. Every active rule of the decoder table (:func:`~vla_foundry_jax.convert.hf_decoder_maps.decoder_rules`)
is inverted (``Transform.invert``):

* ``TRANSPOSE``: kernels ``[in, out]`` transposed back to torch's ``[out, in]``;
* ``{i}``: the stacked ``[L, ...]`` parameter split into one tensor per layer;
* ``ADD_ONE``: Gemma's folded ``1 + w`` becomes ``w`` again;
* tied embeddings: only ``model.embed_tokens.weight`` is written (HF ties ``lm_head`` to it).

Tensor names carry the ``model.`` prefix of ``*ForCausalLM`` checkpoints. Written with safetensors' NumPy API (no
torch), in the parameters' dtype unless ``dtype`` says otherwise (``float32``, ``float16`` or ``bfloat16``);
``config.json``'s ``dtype`` is set to match.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import numpy as np
from flax import nnx

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax import paths
from vla_foundry_jax.configs.hf_decoder import HFDecoderConfig, hf_decoder_config
from vla_foundry_jax.configs.hf_hub import load_hf_config, resolve_hf_path
from vla_foundry_jax.convert.hf_decoder_maps import CONFIG_ONLY_MARKER, decoder_rules, load_hf_decoder_weights
from vla_foundry_jax.errors import UsageError
from vla_foundry_jax.models import build_model
from vla_foundry_jax.params import HyperParams, TrainExperimentParams, TransformerHFParams
from vla_foundry_jax.sampling import load_model

HF_CONFIG_DIR = "hf_config"
SUPPORTED_TYPES = ("transformer_hf",)

# Files of an HF model directory besides weights and config that describe the tokenizer or generation defaults.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.json",
    "chat_template.jinja",
)
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None}


def copy_side_files(src: str, dst: str, *, with_config: bool = True) -> list[str]:
    """Copy ``config.json`` (optional) and the tokenizer / generation files present in ``src`` to ``dst``."""
    os.makedirs(dst, exist_ok=True)
    names = (("config.json",) if with_config else ()) + SIDE_FILES
    copied = []
    for name in names:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def convert_hf(hf_pretrained: str, output_dir: str, *, model_type: str = "transformer_hf") -> dict:
    """Convert ``hf_pretrained`` (HF directory or hub id) into the run directory ``output_dir`` (see the module
    docstring); returns a summary: ``output_dir``, ``hf_config``, ``files_copied``, ``params``, ``seconds``.

    The source is checked before anything is written, and the run is assembled in a sibling temporary directory that
    is renamed to ``output_dir`` only when complete: a failure or a kill never leaves a half-written run behind.
    """
    if model_type not in SUPPORTED_TYPES:
        raise UsageError(f"model type {model_type!r}: only {', '.join(SUPPORTED_TYPES)} can be converted.")
    t0 = time.perf_counter()
    output_dir = paths.local_output_dir(output_dir, "--output_dir")
    if os.path.isdir(os.path.join(output_dir, "checkpoints")):
        raise UsageError(f"{output_dir} already holds checkpoints; give a new output directory.")
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise UsageError(f"--output_dir = {output_dir} already exists and is not empty; give a new output directory.")
    src = resolve_hf_path(hf_pretrained)
    load_hf_config(hf_pretrained)  # a source without config.json fails here, naming the source
    staging = f"{output_dir}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        copied = copy_side_files(src, os.path.join(staging, HF_CONFIG_DIR))
        with open(os.path.join(staging, HF_CONFIG_DIR, CONFIG_ONLY_MARKER), "w") as f:
            json.dump(
                {"converted_from": hf_pretrained, "resolved": src, "weights": "../checkpoints/0/model"}, f, indent=2
            )
        config_dir = os.path.join(output_dir, HF_CONFIG_DIR)  # where the run will live; stored in its params
        stored_params = TransformerHFParams(hf_pretrained=config_dir)
        staged_params = TransformerHFParams(hf_pretrained=os.path.join(staging, HF_CONFIG_DIR))
        config = hf_decoder_config(staged_params)
        # abstract model: no random initialisation; the loader places each converted tensor as the parameter
        model = nnx.eval_shape(lambda: build_model(staged_params, rngs=nnx.Rngs(0), load_weights=False))
        abstract = nnx.state(model, nnx.Param)
        (params,) = load_hf_decoder_weights(src, config, [abstract], "", source=hf_pretrained)
        exp = TrainExperimentParams(
            name=os.path.basename(output_dir),
            output_dir=output_dir,
            model=stored_params,
            hparams=HyperParams(precision="fp32"),
            async_checkpointing=False,
        )
        ckpt_lib.write_weights_run(staging, params, exp)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty (checked above)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    n = sum(int(v.size) for v in ckpt_lib.flat_params(params).values())
    return {
        "output_dir": output_dir,
        "hf_config": config_dir,
        "files_copied": copied,
        "params": n,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def hf_tensors(flat: dict[str, Any], config: HFDecoderConfig, dtype: str | None = None) -> dict[str, np.ndarray]:
    """``{HF name: array}`` of a ``transformer_hf``'s flat parameters (``{"dotted.path": array}``): every rule of
    :func:`~vla_foundry_jax.convert.hf_decoder_maps.decoder_rules` inverted (``Transform.invert``, layers split)."""
    target = None
    if dtype is not None:
        if dtype not in _DTYPES:
            raise UsageError(f"dtype {dtype!r}: choose one of {sorted(_DTYPES)}.")
        import ml_dtypes

        target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(_DTYPES[dtype])
    rules = decoder_rules(config, "model.")
    missing = sorted(r.target for r in rules if r.target not in flat)
    unused = sorted(set(flat) - {r.target for r in rules})
    if missing or unused:
        raise UsageError(
            f"the parameters do not match the {config.model_type} map: missing {missing[:20]}, unused {unused[:20]}."
        )
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        value = np.asarray(flat[rule.target])
        if rule.stacked:
            if value.shape[0] != config.num_layers:
                raise ValueError(f"{rule.target}: leading axis {value.shape[0]} != num_layers {config.num_layers}.")
            items = list(zip(rule.source_names(), value, strict=True))
        else:
            items = [(rule.source, value)]
        for name, v in items:
            v = np.ascontiguousarray(rule.transform.invert(v))
            out[name] = v if target is None else v.astype(target)
    return out


def _model_and_config(run_dir_or_model: Any) -> tuple[dict[str, Any], Any, str | None]:
    """(flat params, TransformerHFParams, HF directory of its config) of a run directory or a built model."""
    if isinstance(run_dir_or_model, (str, os.PathLike)):
        model, exp = load_model(os.fspath(run_dir_or_model))
        params = exp.model
    elif isinstance(run_dir_or_model, tuple):  # (model, TransformerHFParams)
        model, params = run_dir_or_model
    else:
        raise TypeError("export_transformer_hf takes a run directory or a (model, TransformerHFParams) pair.")
    if not isinstance(params, TransformerHFParams):
        raise UsageError(f"export_transformer_hf exports transformer_hf models, not {params.type!r}.")
    flat = ckpt_lib.flat_params(nnx.state(model, nnx.Param))
    return flat, params, resolve_hf_path(params.hf_pretrained)


def export_transformer_hf(run_dir_or_model: Any, out_dir: str, *, dtype: str | None = None) -> str:
    """Write ``run_dir_or_model`` as an HF checkpoint directory ``out_dir``; returns ``out_dir``.

    Args:
      run_dir_or_model: a run directory (or checkpoints/<step>) of a ``transformer_hf`` run, or a
        ``(model, TransformerHFParams)`` pair (e.g. ``(result.model(), result.experiment.model)``).
      out_dir: created if absent; ``model.safetensors``, ``config.json`` and the tokenizer files go there.
      dtype: ``float32`` / ``float16`` / ``bfloat16`` for the written tensors (None: the parameters' dtype).
    """
    from safetensors.numpy import save_file

    out_dir = paths.local_output_dir(out_dir, "--out_dir")
    flat, params, hf_dir = _model_and_config(run_dir_or_model)
    if os.path.realpath(out_dir) == os.path.realpath(hf_dir):
        raise UsageError(
            f"--out_dir = {out_dir} is the directory the run reads its HF config from; export into another directory."
        )
    config = hf_decoder_config(params)
    tensors = hf_tensors(flat, config, dtype)
    # Every file is written in full to a staging directory beside out_dir, then moved in (each move atomic), the
    # weights last: a failure leaves out_dir as it was or with whole files only.
    staging = f"{out_dir.rstrip(os.sep)}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        copy_side_files(hf_dir, staging)
        written = str(next(iter(tensors.values())).dtype)
        with open(os.path.join(staging, "config.json")) as f:
            cfg = json.load(f)
        cfg["dtype"] = written
        cfg.pop("torch_dtype", None)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        os.makedirs(out_dir, exist_ok=True)
        for stale in (CONFIG_ONLY_MARKER, "model.safetensors.index.json"):
            if os.path.exists(os.path.join(out_dir, stale)):
                os.remove(os.path.join(out_dir, stale))
        names = sorted(os.listdir(staging), key=lambda n: n == "model.safetensors")
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
