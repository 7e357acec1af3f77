"""Evaluate a trained VLM's captions on a held-out split: ``python -m launch.eval_caption --run_dir=DIR``.

The held-out manifest defaults to the run's ``val_dataset_manifest``. The last line printed is a JSON
object with ``exact_match``. See :func:`vla_foundry_jax.apps.captioning.evaluate_run`.
"""

from __future__ import annotations

import json

from absl import flags

from vla_foundry_jax import cli
from vla_foundry_jax.apps.captioning import evaluate_run

flags.DEFINE_string("run_dir", None, "Run directory (or checkpoints/<step>) of a trained VLM.", required=True)
flags.DEFINE_string("manifest", None, "Held-out manifest.jsonl (default: the run's val_dataset_manifest).")
flags.DEFINE_integer("limit", None, "Evaluate at most this many samples.")
flags.DEFINE_integer("batch_size", 64, "Images captioned per batch.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    result = evaluate_run(FLAGS.run_dir, manifest=FLAGS.manifest, batch_size=FLAGS.batch_size, limit=FLAGS.limit)
    for ex in result["examples"]:
        print(f"reference: {ex['reference']!r}  prediction: {ex['prediction']!r}")
    summary = {k: result[k] for k in ("exact_match", "num_samples", "manifest")}
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
