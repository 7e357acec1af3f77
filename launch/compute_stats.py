"""stats.json of a robotics dataset: ``python -m launch.compute_stats --manifest=DIR/manifest.jsonl``.

Writes ``stats.json`` (+ ``stats_sketch.npz``) beside the manifest (or ``--output``) in the layout the robotics
data reads: exact mean / std / min / max and percentiles within a stated bound, global and per timestep
(``vla_foundry_jax/data/stats.py``). ``--merge=a/stats.json,b/stats.json [--weights=1,2] --output=...`` merges the
statistics of several datasets instead. Bad input prints one line ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

from absl import app, flags

from vla_foundry_jax import cli, paths
from vla_foundry_jax.data.stats import compute_stats, merge_dataset_stats

flags.DEFINE_string("manifest", None, "manifest.jsonl of the dataset.")
flags.DEFINE_string("output", None, "stats.json to write (default: beside the manifest).")
flags.DEFINE_list("fields", None, "Low-dim fields (default: every numeric field of lowdim.npz but the masks).")
flags.DEFINE_integer("num_workers", 1, "Processes reading shards in parallel.")
flags.DEFINE_float("relative_error", 1e-3, "Relative error bound of the percentiles.")
flags.DEFINE_list("merge", None, "stats.json files to merge (instead of --manifest); needs --output.")
flags.DEFINE_list("weights", None, "One weight per --merge file (default 1).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = FLAGS
    if f.merge:
        if not f.output:
            cli.fail("--merge needs --output (the merged stats.json to write).")
        weights = [float(w) for w in f.weights] if f.weights else None
        stats = merge_dataset_stats(f.merge, weights, output=f.output)
        out = f.output
    elif f.manifest:
        stats = compute_stats(
            f.manifest, output=f.output, fields=f.fields, num_workers=f.num_workers,
            relative_error=f.relative_error, progress=True,
        )  # fmt: skip
        out = f.output or paths.join(paths.dirname(f.manifest), "stats.json")
    else:
        cli.fail("give --manifest=DIR/manifest.jsonl (or --merge=... --output=...).")
    print(f"wrote {out}: fields {sorted(stats)}")


if __name__ == "__main__":
    cli.run(main)
