"""Pictures of runs: loss, validation loss, learning rate, gradient norm and throughput from ``metrics.jsonl``.

``plot_runs([run, ...], out)`` draws one panel per metric with one line per run (legend: the run names), against
the step or the samples seen (step x ``hparams.global_batch_size`` from the run's ``params.json``). Runs may be
local directories or fsspec URLs (``s3://``, ``gs://``). The training loop writes ``<output_dir>/curves.png`` at
each checkpoint through :func:`write_curves_quietly`, which never stops training.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging

from vla_foundry_jax import paths
from vla_foundry_jax.errors import VLAFoundryError

DEFAULT_METRICS = ("loss", "val_loss", "lr", "grad_norm", "samples_per_s")
X_AXES = ("step", "samples")
TITLES = {
    "loss": "training loss",
    "val_loss": "validation loss",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "samples_per_s": "throughput (samples/s)",
    "tokens_per_s": "throughput (tokens/s)",
    "step_time_s": "step time (s)",
    "data_wait_s": "data wait per step (s)",
    "mfu": "model FLOPs utilisation",
}


class CurvesError(VLAFoundryError):
    """A run without metrics, an unknown metric or x-axis: nothing to draw."""


def _read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    return paths.read_text(path) if paths.exists(path) else None


def read_metrics(run: str) -> dict[str, dict[int, float]]:
    """``metric -> {step: value}`` from ``<run>/metrics.jsonl`` (a resumed run's later lines win; a line cut by a
    crash is skipped). Raises :class:`CurvesError` for a run with no metrics."""
    text = _read_text(paths.join(run, "metrics.jsonl"))
    if text is None:
        raise CurvesError(
            f"{run} has no metrics.jsonl: give the output_dir of a launch.train run that has logged a step."
        )
    out: dict[str, dict[int, float]] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
            step = int(record.pop("step"))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        for k, v in record.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                out.setdefault(k, {})[step] = float(v)
    if not out:
        raise CurvesError(f"{run}/metrics.jsonl holds no metrics yet: the run has not logged a step.")
    return out


def _samples_per_step(run: str) -> int:
    text = _read_text(paths.join(run, "params.json"))
    try:
        return int(json.loads(text)["hparams"]["global_batch_size"])
    except (TypeError, ValueError, KeyError):
        raise CurvesError(
            f"x = 'samples' needs the global batch size from {run}/params.json, which is missing or unreadable; "
            "plot against x = 'step'."
        ) from None


def run_labels(runs: Sequence[str]) -> list[str]:
    """Legend names: each run's last path part, or its last two where those collide."""
    parts = [r.rstrip("/").split("/") for r in runs]
    short = [p[-1] for p in parts]
    return ["/".join(p[-2:]) if short.count(s) > 1 and len(p) > 1 else s for p, s in zip(parts, short, strict=True)]


def plot_runs(
    runs: Sequence[str],
    out: str,
    *,
    metrics: Sequence[str] | None = None,
    x: str = "step",
    labels: Sequence[str] | None = None,
) -> str:
    """Draw ``metrics`` (default :data:`DEFAULT_METRICS`, those the runs logged) of ``runs`` into the PNG ``out``.

    A metric asked for by name that no run logged is a :class:`CurvesError` naming the metrics there are.
    """
    if x not in X_AXES:
        raise CurvesError(f"x = {x!r} is not an x-axis; choose one of {list(X_AXES)}.")
    if not runs:
        raise CurvesError("no runs to plot: give one or more run directories.")
    data = [read_metrics(r) for r in runs]
    logged = sorted(set().union(*data))
    if metrics:
        unknown = [m for m in metrics if m not in logged]
        if unknown:
            raise CurvesError(f"unknown metric(s) {unknown}: the runs logged {logged}.")
        names = list(metrics)
    else:
        names = [m for m in DEFAULT_METRICS if m in logged]
    scale = [_samples_per_step(r) if x == "samples" else 1 for r in runs]
    labels = list(labels) if labels else run_labels(runs)
    png = _draw(names, data, scale, labels, x)
    paths.write_bytes(out, png)  # whole: a local temporary file renamed, or one PUT
    return out


def _draw(names: list[str], data: list[dict[str, dict[int, float]]], scale: list[int], labels: list[str], x: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    colours = [f"C{i % 10}" for i in range(len(data))]
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        for run, k, label, colour in zip(data, scale, labels, colours, strict=True):
            points = sorted(run.get(name, {}).items())
            if not points:
                continue
            xs = [s * k for s, _ in points]
            ys = [v for _, v in points]
            ax.plot(xs, ys, color=colour, label=label, marker="o" if len(points) <= 20 else None, markersize=3)
        ax.set_title(TITLES.get(name, name))
        ax.set_xlabel("samples seen" if x == "samples" else "step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_curves_quietly(output_dir: str) -> Any:
    """``<output_dir>/curves.png`` of this run (process 0); a failure is a warning, never a stopped run."""
    if jax.process_index() != 0:
        return None
    try:
        return plot_runs([output_dir], paths.join(output_dir, "curves.png"))
    except Exception as e:
        logging.warning("could not draw %s/curves.png (training goes on): %s: %s", output_dir, type(e).__name__, e)
        return None
