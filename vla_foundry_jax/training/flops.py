"""Model FLOPs of a jitted step and the accelerators' peaks: model FLOPs utilisation (MFU).

The FLOPs are counted on the step's jaxpr: every matrix product (``dot_general``) and convolution, inside scans
times their length (XLA's ``cost_analysis`` counts a loop body once, so it misses scanned layers and gradient
accumulation). A ``while`` loop of unknown trip count counts once; a ``cond`` counts its largest branch. Under
``grad_checkpointing`` the recomputed forward is counted too (the figure is then hardware FLOPs).
Peaks are the dense bfloat16 matrix peaks of one chip (MFU of a float32 run is against the same peak).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core

# Dense bf16 peak FLOP/s of one device, by a substring of ``jax.Device.device_kind`` (first match wins: specific
# names before the generic ones). Vendor datasheet figures, without sparsity.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3 / NVL per-GPU dense
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("V100", 125e12),  # fp16 tensor cores (no bf16)
    ("TPU v6 lite", 918e12),  # v6e
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("TPU v2", 45e12),
)


def peak_flops(device_kind: str) -> float | None:
    """The dense bf16 peak FLOP/s of one device of this kind, or None when unknown (e.g. a CPU)."""
    for name, peak in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def _dot_flops(eqn: Any) -> float:
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval
    return 2.0 * math.prod(out.shape) * math.prod(lhs[d] for d in contract)


def _conv_flops(eqn: Any) -> float:
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * math.prod(out.shape) * math.prod(rhs) / out_features


def _sub_jaxprs(value: Any) -> list[Any]:
    if isinstance(value, jex_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jex_core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def jaxpr_flops(jaxpr: Any) -> float:
    """Matmul and convolution FLOPs of a (closed) jaxpr, nested calls, scans (times length) and conds included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max((jaxpr_flops(b) for b in eqn.params["branches"]), default=0.0)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
        else:
            total += sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
    return total


def step_flops(fn: Callable[..., Any], *args: Any) -> float:
    """FLOPs of one call of ``fn(*args)`` over the global arrays (traced, not run; ``args`` may be abstract)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    return jaxpr_flops(jax.make_jaxpr(fn)(*abstract))
