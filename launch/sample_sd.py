"""Sample images from a trained stable-diffusion run and write a PNG grid.

    python -m launch.sample_sd --run_dir=runs/sd_quickstart --prompt="a red ball ." --prompt="a blue box ." \
        --num_images=8 --guidance_scale=3 --num_steps=50 --out=grid.png

One grid row per prompt, ``num_images`` columns. The model is rebuilt from the run's stored params (no gin file),
with its EMA weights when the run kept them; prompts are tokenised with the run's tokenizer, padded (and
truncated) to the training captions' length ``data.seq_len + 1``.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

flags.DEFINE_string("run_dir", None, "Run directory (or checkpoints/<step>) of a stable_diffusion run.", required=True)
flags.DEFINE_multi_string("prompt", ["a red ball ."], "Prompt(s); repeat the flag for several rows.")
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
    import jax
    import numpy as np

    from vla_foundry_jax.models import stable_diffusion as sd

    if FLAGS.num_images <= 0:
        raise app.UsageError("--num_images must be positive.")
    model, exp, used_ema = sd.load_sd_model(FLAGS.run_dir, use_ema=FLAGS.use_ema)
    prompts = [p for p in FLAGS.prompt for _ in range(FLAGS.num_images)]
    ids = mask = None
    if model.has_text:
        ids, mask = sd.encode_prompts(exp, prompts)
    elif FLAGS.prompt != ["a red ball ."]:
        raise app.UsageError("this run has no text encoder (clip.hf_pretrained is None): sample without --prompt.")
    images = sd.sample_images(
        model,
        ids,
        jax.random.PRNGKey(FLAGS.seed),
        num_steps=FLAGS.num_steps,
        guidance_scale=FLAGS.guidance_scale,
        batch_size=len(prompts),
        prompt_mask=mask,
    )
    out = FLAGS.out or os.path.join(FLAGS.run_dir, "samples.png")
    sd.save_image_grid(np.asarray(images), out, ncols=FLAGS.num_images, scale=FLAGS.scale)
    print(f"wrote {out}: {len(FLAGS.prompt)} prompt(s) x {FLAGS.num_images} images (ema={used_ema})")


if __name__ == "__main__":
    app.run(main)
