"""Evaluate a trained VLM's captions on a held-out split: ``python -m launch.eval_caption --run_dir=DIR``.

The held-out manifest defaults to the run's ``val_dataset_manifest``. The last line printed is a JSON
object with ``exact_match``.
"""

from __future__ import annotations

import json

from absl import app, flags

flags.DEFINE_string("run_dir", None, "Run directory (or checkpoints/<step>) of a trained VLM.", required=True)
flags.DEFINE_string("manifest", None, "Held-out manifest.jsonl (default: the run's val_dataset_manifest).")
flags.DEFINE_integer("limit", None, "Evaluate at most this many samples.")
flags.DEFINE_integer("batch_size", 64, "Images captioned per batch.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from vla_foundry_jax.captioning import Captioner, evaluate
    from vla_foundry_jax.sampling import load_model

    model, exp = load_model(FLAGS.run_dir)
    manifest = FLAGS.manifest or (exp.data.val_dataset_manifest[0] if exp.data.val_dataset_manifest else None)
    if manifest is None:
        raise app.UsageError("the run has no val_dataset_manifest; pass --manifest=path/to/manifest.jsonl")
    result = evaluate(Captioner(model, exp), manifest, batch_size=FLAGS.batch_size, limit=FLAGS.limit)
    for ex in result["examples"]:
        print(f"reference: {ex['reference']!r}  prediction: {ex['prediction']!r}")
    summary = {"exact_match": result["exact_match"], "num_samples": result["num_samples"], "manifest": manifest}
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
