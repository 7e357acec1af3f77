"""Serve a trained diffusion policy over websockets: ``python -m launch.serve_policy --run_dir=RUN --port=PORT``.

Robots connect with the thin client (``vla_foundry_jax_client.PolicyClient``); the schema is in
``vla_foundry_jax_client/protocol.py``. Prints ``serving RUN on ws://HOST:PORT ...`` once listening (``--port=0``
picks a free port) and serves until stopped: SIGTERM exits 0, Ctrl-C exits 130 as every CLI
(:func:`vla_foundry_jax.serving.server.serve_policy`).
"""

from __future__ import annotations

from absl import app, flags

from vla_foundry_jax import cli
from vla_foundry_jax.serving.server import serve_policy

flags.DEFINE_string("run_dir", None, "Run directory (or checkpoints/<step>) of a diffusion_policy.", required=True)
flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8765, "TCP port (0: a free one, printed).")
flags.DEFINE_integer("num_flow_steps", 10, "Denoising steps per chunk (0: the scheduler's own number).")
flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.")
flags.DEFINE_integer("execute_steps", 1, "Default receding horizon: actions of a chunk executed before replanning.")
flags.DEFINE_integer("max_batch", 16, "Most sessions in one device call (batch sizes 1, 2, 4, .. are compiled).")
flags.DEFINE_float("batch_window_ms", 2.0, "How long a batch waits for other connected clients' requests.")
flags.DEFINE_integer("seed", 0, "Sampling noise seed (combined with each session's seed).")
flags.DEFINE_bool(
    "pin_cpu_threads",
    True,
    "On the CPU backend, pin XLA's worker threads one per core: a request after an idle gap is then as fast as "
    "back-to-back ones (--nopin_cpu_threads leaves them to the OS scheduler).",
)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.max_batch < 1 or FLAGS.port < 0 or FLAGS.batch_window_ms < 0:
        cli.fail("--max_batch must be >= 1, --port >= 0 and --batch_window_ms >= 0.")
    serve_policy(
        FLAGS.run_dir,
        host=FLAGS.host,
        port=FLAGS.port,
        num_flow_steps=FLAGS.num_flow_steps or None,
        use_ema=FLAGS.use_ema,
        execute_steps=FLAGS.execute_steps,
        max_batch=FLAGS.max_batch,
        batch_window_ms=FLAGS.batch_window_ms,
        seed=FLAGS.seed,
        pin_cpu_threads=FLAGS.pin_cpu_threads,
    )


if __name__ == "__main__":
    cli.run(main)
