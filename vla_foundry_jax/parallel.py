"""Device mesh, logical-axis sharding rules and the multi-host runtime.

Mesh axes are ``data``, ``fsdp`` and ``tensor``. Parameters carry logical axis names (``out_sharding``
metadata set by the layers); ``LOGICAL_RULES`` maps them to mesh axes. Batches are sharded over
``data`` and ``fsdp`` together. A logical axis whose size the mesh axis does not divide is replicated,
so tiny models run on any mesh.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.params import DistributedParams

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (or axes); names absent here are replicated.
LOGICAL_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": "tensor",
    "qkv": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "kv": None,
    "layers": None,
    "norm": None,
    "pos": None,
}


class MeshError(VLAFoundryError, ValueError):
    """The requested mesh does not fit the devices."""


def _env_says_multiprocess() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "WORLD_SIZE"):
        if int(env.get(var, "1") or 1) > 1:
            return True
    # Cloud TPU pod slices list every worker's hostname.
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(dist: DistributedParams) -> bool:
    """Join a multi-process run through ``jax.distributed.initialize``; returns whether it did.

    TPU pods, SLURM and Open MPI are auto-detected by JAX; elsewhere give ``coordinator_address``,
    ``num_processes`` and ``process_id`` (params or ``JAX_*`` env variables).
    """
    if dist.initialize == "never" or jax.distributed.is_initialized():
        return jax.distributed.is_initialized()
    explicit = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if dist.initialize == "auto" and not (explicit or _env_says_multiprocess()):
        return False
    kwargs: dict[str, Any] = {}
    if explicit:
        kwargs["coordinator_address"] = explicit
        num = dist.num_processes if dist.num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
        pid = dist.process_id if dist.process_id is not None else os.environ.get("JAX_PROCESS_ID")
        if num is None or pid is None:
            raise MeshError(
                "distributed.coordinator_address is set but the process count / id are not: set "
                "distributed.num_processes and distributed.process_id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)."
            )
        kwargs["num_processes"] = int(num)
        kwargs["process_id"] = int(pid)
    jax.distributed.initialize(**kwargs)
    logging.info("joined multi-process run: process %d of %d", jax.process_index(), jax.process_count())
    return True


def mesh_shape(dist: DistributedParams, num_devices: int) -> tuple[int, int, int]:
    """Resolve (data, fsdp, tensor) sizes, filling a -1 with the remaining devices."""
    sizes = [dist.data_parallelism, dist.fsdp_parallelism, dist.tensor_parallelism]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(
                f"{num_devices} devices cannot be split with distributed sizes (data, fsdp, tensor) = "
                f"{tuple(sizes)}: the fixed sizes multiply to {known}, which does not divide {num_devices}."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"distributed (data, fsdp, tensor) = {tuple(sizes)} needs {math.prod(sizes)} devices but "
            f"{num_devices} are available; set one of distributed.data_parallelism / fsdp_parallelism / "
            f"tensor_parallelism to -1 to fill."
        )
    return tuple(sizes)


def make_mesh(dist: DistributedParams, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over ``devices`` (default: every device of every process).

    Axes are in Auto mode: shardings come from the jit in/out annotations and XLA propagates them.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(dist, len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for an array with logical axis ``names``; indivisible or reused mesh axes replicate."""
    if not names:
        return P()
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        axes = LOGICAL_RULES.get(name) if name else None
        if axes is None:
            spec.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in axes_t)
        if size == 1 or dim % size or used & set(axes_t):
            spec.append(None)
            continue
        used |= set(axes_t)
        spec.append(axes if isinstance(axes, str) else axes_t)
    return P(*spec)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for every array leaf of an (abstract) ``nnx.State``, from its logical axis names."""

    def one(x: Any) -> Any:
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("out_sharding")
            return x.replace(NamedSharding(mesh, logical_to_spec(names, x.value.shape, mesh)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows of the global batch into global arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), np.asarray(v)) for k, v in batch.items()
    }
