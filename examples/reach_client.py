"""A robot loop over the policy server: the bundled ReachEnv driven through ``vla_foundry_jax_client``.

    python -m launch.serve_policy --run_dir=runs/vla_quickstart --port=8765 &
    python examples/reach_client.py --url=ws://127.0.0.1:8765 --num_episodes=50 --execute_steps=4

Each episode resets the session with the env seed (so the sampling noise matches ``launch.eval_policy`` with the
same ``--seed`` and ``--execute_steps``) and sends one observation per control step; the server replans every
``execute_steps`` steps. Prints a JSON line with ``success_rate``, ``successes`` and ``steps``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from vla_foundry_jax.testbeds.tiny_robotics import ReachEnv
from vla_foundry_jax_client import PolicyClient


def run_episodes(
    client: PolicyClient, *, num_episodes: int, seed: int = 0, execute_steps: int = 4, max_steps: int = 24
) -> dict[str, Any]:
    """Episodes ``seed .. seed + n - 1`` one after another through ``client``."""
    successes, steps = [], []
    for i in range(num_episodes):
        env = ReachEnv(max_steps=max_steps)
        obs = env.reset(seed + i)
        client.reset(seed=seed + i, execute_steps=execute_steps)
        done, ok, n = False, False, 0
        while not done:
            action = client.infer(
                {"images": {"scene": obs["image"]}, "proprio": {"agent_xy": obs["agent_xy"]},
                 "instruction": obs["instruction"]}
            )  # fmt: skip
            obs, done, ok = env.step(action["action_xy"])
            n += 1
        successes.append(bool(ok))
        steps.append(n)
    return {"success_rate": sum(successes) / max(num_episodes, 1), "successes": successes, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765")
    parser.add_argument("--num_episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--execute_steps", type=int, default=4)
    parser.add_argument("--max_steps", type=int, default=24)
    args = parser.parse_args()
    with PolicyClient(args.url) as client:
        result = run_episodes(
            client,
            num_episodes=args.num_episodes,
            seed=args.seed,
            execute_steps=args.execute_steps,
            max_steps=args.max_steps,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
