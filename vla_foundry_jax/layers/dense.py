"""The one dense (linear) layer of every model, and its initialisers.

``Dense(in, out)``: ``x [..., in] -> [..., out]``; ``kernel [in, out]`` (Flax layout; a torch ``Linear.weight`` is
``[out, in]``) with logical axes ``names``, optional ``bias [out]`` with axis ``names[1]``. Parameters live in
``param_dtype`` and are cast to the compute ``dtype`` at use. ``init`` picks the family's initialisation:

* ``"trunc_normal"``: kernel N(0, ``std``) truncated at +-3 std (``std`` defaults to ``in**-0.5``), bias 0;
* ``"normal"``: kernel N(0, ``std``) (default 0.02), bias 0;
* ``"torch"``: PyTorch's ``nn.Linear`` default, kernel and bias U(+-1/sqrt(in)) (kernel drawn first).

``flatten=True`` computes one 2-D matmul on ``x.reshape(-1, in)`` (XLA:CPU's backward of a dot with several
contracting axes pays a large transpose); the result is the same.

:func:`matmul` is the product of every dense layer and language-model head: on CPU its gradients run in the
plain (non-transposed) operand form (below).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

DENSE_INITS = ("trunc_normal", "normal", "torch")


def trunc_normal(key: jax.Array, shape: tuple[int, ...], std: float | jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Normal(0, std) truncated at +-3 std (torch ``trunc_normal_(std=s, a=-3s, b=3s)``)."""
    return (jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32) * std).astype(dtype)


def torch_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: jnp.dtype) -> jax.Array:
    """U(+-1/sqrt(fan_in)): PyTorch's default init of ``Linear`` / ``Conv`` weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., K] @ w [K, N]``. On CPU the gradients are ``g @ w^T`` and ``x^T @ g`` with the small transposes
    (``w^T``, ``x^T``) materialised first: inside a train step XLA:CPU may run autodiff's forms, which contract an
    operand on its transposed side, on its slow generic dot (transformer_11m's 50k-vocabulary head weight gradient,
    ``[2048, 96]^T @ [2048, 50432]``: 160 ms in the step, ~55 ms on materialised operands; 2 threads)."""
    if jax.default_backend() == "cpu":
        return _matmul_plain_grads(x, w)
    return jnp.dot(x, w)


@jax.custom_vjp
def _matmul_plain_grads(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w)


def _matmul_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return jnp.dot(x, w), (x, w)


def _matmul_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    g2 = g.reshape(-1, g.shape[-1])
    # the barriers keep XLA from folding each transpose back into its dot
    d_x = jnp.dot(g2, jax.lax.optimization_barrier(w.T)).reshape(x.shape).astype(x.dtype)
    d_w = jnp.dot(jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T), g2).astype(w.dtype)
    return d_x, d_w


_matmul_plain_grads.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nnx.Module):
    """``x [..., in] -> [..., out]`` (see the module docstring for ``init`` / ``std`` / ``flatten``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rngs: nnx.Rngs,
        bias: bool = True,
        names: tuple[str | None, str | None] = (None, None),
        init: str = "trunc_normal",
        std: float | jax.Array | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        flatten: bool = False,
    ):
        if init not in DENSE_INITS:
            raise ValueError(f"Dense init = {init!r} is not supported; choose one of {DENSE_INITS}.")
        self.dtype = dtype
        self.flatten = flatten
        shape = (in_features, out_features)
        if init == "trunc_normal":
            kernel = trunc_normal(rngs.params(), shape, in_features**-0.5 if std is None else std, param_dtype)
        elif init == "normal":
            scale = 0.02 if std is None else std
            kernel = (jax.random.normal(rngs.params(), shape, jnp.float32) * scale).astype(param_dtype)
        else:
            kernel = torch_uniform(rngs.params(), shape, in_features, param_dtype)
        self.kernel = nnx.Param(kernel, out_sharding=names)
        if not bias:
            self.bias = None
        elif init == "torch":
            self.bias = nnx.Param(
                torch_uniform(rngs.params(), (out_features,), in_features, param_dtype), out_sharding=(names[1],)
            )
        else:
            self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(names[1],))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        kernel = self.kernel[...].astype(dt)
        h = x.reshape(-1, x.shape[-1]) if self.flatten else x
        y = matmul(h.astype(dt), kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        return y.reshape(*x.shape[:-1], kernel.shape[-1]) if self.flatten else y
