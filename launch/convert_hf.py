"""Convert a Hugging Face causal LM into one of our runs (Orbax checkpoint at step 0).

    python -m launch.convert_hf --hf_pretrained=DIR_OR_HUB_ID --output_dir=RUN_DIR [--type=transformer_hf]

Writes ``RUN_DIR/checkpoints/0/{model,params,train,data}`` (our run layout) and ``RUN_DIR/params.json``, and copies
the HF ``config.json`` (plus tokenizer / generation files when present) into ``RUN_DIR/hf_config/`` together with a
marker file (``converted_run.json``: where it came from). The stored experiment's ``transformer_hf.hf_pretrained``
points at that absolute ``RUN_DIR/hf_config`` directory, so the run needs neither the HF directory nor the hub:

* ``vla_foundry_jax.sampling.load_model(RUN_DIR)`` / ``python -m launch.generate --run_dir=RUN_DIR`` rebuild it;
* training starts from it with ``transformer_hf.hf_pretrained = 'RUN_DIR/hf_config'``,
  ``transformer_hf.resume_from_checkpoint = 'RUN_DIR'`` and ``transformer_hf.resume_weights_only = True`` (the
  ``transformer_hf`` weight loader sees the marker and leaves the weights to ``resume_from_checkpoint``). Pointing
  ``hf_pretrained`` at the original HF directory also works (the checkpoint's weights then replace the HF ones).

The step-0 checkpoint holds weights only (no optimizer state): resume from it with ``resume_weights_only = True``.
Moving ``RUN_DIR`` breaks the stored absolute ``hf_pretrained``; convert again (or rewrite ``hf_pretrained``).
The parameters are stored in float32 (``hparams.precision = 'fp32'`` in the stored experiment).
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

flags.DEFINE_string("hf_pretrained", None, "HF model directory (config.json + *.safetensors) or hub id.")
flags.DEFINE_string("output_dir", None, "Run directory to create (must not hold a checkpoint yet).")
flags.DEFINE_string("type", "transformer_hf", "Model type to convert into (only transformer_hf).")
FLAGS = flags.FLAGS

HF_CONFIG_DIR = "hf_config"
SUPPORTED_TYPES = ("transformer_hf",)


def convert_hf(hf_pretrained: str, output_dir: str, *, model_type: str = "transformer_hf") -> dict:
    """Convert ``hf_pretrained`` into the run directory ``output_dir``; returns a summary dict."""
    import jax
    from flax import nnx

    from vla_foundry_jax import checkpoint as ckpt_lib
    from vla_foundry_jax.configs.hf_decoder import hf_decoder_config
    from vla_foundry_jax.configs.hf_hub import resolve_hf_path
    from vla_foundry_jax.convert.hf_decoder_maps import CONFIG_ONLY_MARKER, load_hf_decoder_weights
    from vla_foundry_jax.convert.hf_export import copy_side_files
    from vla_foundry_jax.models import build_model
    from vla_foundry_jax.params import HyperParams, TrainExperimentParams, TransformerHFParams

    if model_type not in SUPPORTED_TYPES:
        raise ValueError(f"--type={model_type!r}: only {', '.join(SUPPORTED_TYPES)} can be converted.")
    t0 = time.perf_counter()
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
        raise ValueError(f"{output_dir} already holds checkpoints; give a new --output_dir.")
    src = resolve_hf_path(hf_pretrained)
    config_dir = os.path.join(output_dir, HF_CONFIG_DIR)
    copied = copy_side_files(src, config_dir)
    with open(os.path.join(config_dir, CONFIG_ONLY_MARKER), "w") as f:
        json.dump({"converted_from": hf_pretrained, "resolved": src, "weights": "../checkpoints/0/model"}, f, indent=2)

    stored_params = TransformerHFParams(hf_pretrained=config_dir)
    config = hf_decoder_config(stored_params)
    # abstract model: no random initialisation; the loader places each converted tensor as the parameter
    model = nnx.eval_shape(lambda: build_model(stored_params, rngs=nnx.Rngs(0), load_weights=False))
    abstract = nnx.state(model, nnx.Param)
    (params,) = load_hf_decoder_weights(src, config, [abstract], "", source=hf_pretrained)
    exp = TrainExperimentParams(
        name=os.path.basename(output_dir),
        output_dir=output_dir,
        model=stored_params,
        hparams=HyperParams(precision="fp32"),
        async_checkpointing=False,
    )
    state = {
        "params": params,
        "frozen": nnx.State({}),
        "step": jax.numpy.zeros((), jax.numpy.int32),
        "opt_state": {},
        "ema": {},
        "rng": jax.random.key_data(jax.random.key(0)),
        "rest": {},
    }
    # uncompressed: the save then adds ~0.25x the model's bytes of host memory instead of ~1x (see RunCheckpointer)
    checkpointer = ckpt_lib.RunCheckpointer(output_dir, async_save=False, compress_model=False)
    checkpointer.save(0, state, exp, {})
    checkpointer.wait()
    checkpointer.close()
    with open(os.path.join(output_dir, "params.json"), "w") as f:
        f.write(exp.to_json())
    n = sum(int(v.size) for v in ckpt_lib.flat_params(params).values())
    return {
        "output_dir": output_dir,
        "hf_config": config_dir,
        "files_copied": copied,
        "params": n,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.hf_pretrained or not FLAGS.output_dir:
        raise app.UsageError("--hf_pretrained and --output_dir are required.")
    summary = convert_hf(FLAGS.hf_pretrained, FLAGS.output_dir, model_type=FLAGS.type)
    logging.info("converted %s -> %s", FLAGS.hf_pretrained, summary["output_dir"])
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
