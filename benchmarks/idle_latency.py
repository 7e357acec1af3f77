"""Policy sampling latency after idle gaps, with XLA:CPU's worker threads pinned one per core or left unpinned.

    python benchmarks/idle_latency.py                       # gaps 0, 20, 50, 100 ms; 5 rounds x 10 calls
    python benchmarks/idle_latency.py --gaps_ms=0,100 --rounds=3 --quick

A robot asks for an action chunk every control period, so the policy call usually follows an idle gap. The sampler
is ``compare.py``'s policy_sampling (the server's ``action_sampler``: a vit_tiny backbone over two 224 x 224
cameras, batch 1, 10 flow steps). For each gap the rounds alternate pinned (``cpu_threads.pin_xla_cpu_workers``)
and unpinned (the workers' affinity reset to every allowed core) in one process, so machine drift cancels. Prints
one JSON line per gap: median and p90 latency (ms) of each setting and the unpinned / pinned ratio of the medians.
CPU backend, Linux.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaps_ms", default="0,20,50,100", help="comma-separated idle gaps before each call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10, help="timed calls per round and setting")
    ap.add_argument("--quick", action="store_true", help="scaled-down policy (CI time)")
    args = ap.parse_args()
    try:
        gaps = [float(g) / 1e3 for g in args.gaps_ms.split(",")]
    except ValueError:
        gaps = []
    if not gaps or min(gaps) < 0 or args.rounds < 1 or args.calls < 1:
        _fail(
            f"--gaps_ms={args.gaps_ms!r} --rounds={args.rounds} --calls={args.calls}: give comma-separated gaps >= 0 "
            "in milliseconds (e.g. --gaps_ms=0,50,100) and --rounds / --calls >= 1"
        )

    import compare

    from vla_foundry_jax.cpu_threads import pin_xla_cpu_workers, xla_cpu_worker_threads

    run, _ = compare.ours("policy_sampling", args.quick, "")
    run()
    cores = os.sched_getaffinity(0)

    def unpin() -> None:
        for tid in xla_cpu_worker_threads():
            os.sched_setaffinity(tid, cores)

    settings = {"pinned": pin_xla_cpu_workers, "unpinned": unpin}
    if not pin_xla_cpu_workers():
        _fail("nothing to pin here: this needs the CPU backend on Linux with no more XLA workers than allowed cores")
    for gap in gaps:
        times: dict[str, list[float]] = {name: [] for name in settings}
        for r in range(args.rounds):
            for name in sorted(settings, reverse=r % 2 == 1):
                settings[name]()
                run()  # first call after switching: untimed
                for _ in range(args.calls):
                    time.sleep(gap)
                    t0 = time.perf_counter()
                    run()
                    times[name].append(1e3 * (time.perf_counter() - t0))
        row = {"gap_ms": round(gap * 1e3, 1)}
        for name, ts in times.items():
            row[f"{name}_ms_median"] = round(float(np.median(ts)), 2)
            row[f"{name}_ms_p90"] = round(float(np.percentile(ts, 90)), 2)
        row["unpinned_over_pinned"] = round(row["unpinned_ms_median"] / row["pinned_ms_median"], 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
