"""Sample images from a trained stable-diffusion run and write a PNG grid.

    python -m launch.sample_sd --run_dir=runs/sd_quickstart --prompt="a red ball ." --prompt="a blue box ." \
        --num_images=8 --guidance_scale=3 --num_steps=50 --out=grid.png

One grid row per prompt, ``num_images`` columns. The model is rebuilt from the run's stored params (no gin file),
with its EMA weights when the run kept them; prompts are tokenised with the run's tokenizer, padded (and
truncated) to the training captions' length ``data.seq_len + 1``
(:func:`vla_foundry_jax.apps.stable_diffusion.sample_grid`).
"""

from __future__ import annotations

from absl import app, flags, logging

from vla_foundry_jax import cli
from vla_foundry_jax.apps.stable_diffusion import sample_grid

flags.DEFINE_string("run_dir", None, "Run directory (or checkpoints/<step>) of a stable_diffusion run.", required=True)
flags.DEFINE_multi_string("prompt", None, "Prompt(s); repeat the flag for several rows (default: 'a red ball .'; "
                          "none for a run without a text encoder).")  # fmt: skip
flags.DEFINE_integer("num_images", 8, "Images per prompt (grid columns).")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (default: the model's when it was trained "
                   "with guidance, else none); 1 = conditional only.")  # fmt: skip
flags.DEFINE_integer("num_steps", 50, "Sampling steps (flow matching strides over the T timesteps; DDPM needs T).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run has them.")
flags.DEFINE_integer("scale", 4, "Enlarge each pixel to scale x scale in the PNG (nearest).")
flags.DEFINE_string("out", None, "Output PNG (default <run_dir>/samples.png).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    done = sample_grid(
        FLAGS.run_dir,
        FLAGS.prompt,
        num_images=FLAGS.num_images,
        guidance_scale=FLAGS.guidance_scale,
        num_steps=FLAGS.num_steps,
        seed=FLAGS.seed,
        use_ema=FLAGS.use_ema,
        scale=FLAGS.scale,
        out=FLAGS.out,
    )
    print(f"wrote {done['path']}: {done['num_prompts']} prompt(s) x {done['num_images']} images (ema={done['ema']})")


if __name__ == "__main__":
    cli.run(main)
