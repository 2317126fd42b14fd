"""Device mesh and parameter shardings.

The mesh has two axes:
  * ``data``: pure data parallelism (parameters replicated along it).
  * ``fsdp``: data parallelism that also shards parameters, optimizer state and
    EMA (fully sharded data parallel); XLA all-gathers weights where used.

The batch is split over both axes. Parameters are sharded from the logical
axis names the models attach with ``nn.with_logical_partitioning``: each
logical name may map to a mesh axis through ``rules``; a dimension is sharded
only if its size divides the mesh axis, otherwise it stays replicated (so
small layers such as a 3-channel output conv never fail to shard).
"""

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # The batch dimension is split over every mesh axis.

# Logical-name -> mesh-axis rules for FSDP, in priority order: for a parameter,
# the first rule whose logical dimension divides the mesh axis wins.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("conv_out", "fsdp"),
    ("conv_in", "fsdp"),
    ("heads", "fsdp"),
    ("classes", "fsdp"),
)


def mesh_shape(num_devices: int, data: int, fsdp: int) -> tuple[int, int]:
    """Resolves the (data, fsdp) mesh shape; -1 fills in the remaining devices.

    Raises:
      ValueError: if the shape does not multiply to ``num_devices``.
    """
    if data == -1 and fsdp == -1:
        raise ValueError("config.mesh: at most one of data, fsdp may be -1.")
    if data == -1:
        if fsdp <= 0 or num_devices % fsdp:
            raise ValueError(
                f"config.mesh.fsdp={fsdp} does not divide the {num_devices} devices; "
                f"choose a divisor of {num_devices}.")
        data = num_devices // fsdp
    if fsdp == -1:
        if data <= 0 or num_devices % data:
            raise ValueError(
                f"config.mesh.data={data} does not divide the {num_devices} devices; "
                f"choose a divisor of {num_devices}.")
        fsdp = num_devices // data
    if data * fsdp != num_devices:
        raise ValueError(
            f"config.mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but JAX sees "
            f"{num_devices}. Set --config.mesh.data=-1 to use all devices for data parallelism.")
    return data, fsdp


def create_mesh(data: int = -1, fsdp: int = 1,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ("data", "fsdp") mesh over all (or the given) devices.

    The fsdp axis is the fastest-varying one, so on multi-host systems it stays
    within a host where possible and the data axis spans hosts.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(len(devices), data, fsdp)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding for arrays whose leading dimension is the (global) batch."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, str]] = DEFAULT_RULES) -> P:
    """Maps one array's logical axis names to a PartitionSpec.

    Args:
      names: logical name per dimension (None for unnamed dimensions).
      shape: the array's shape, same rank as ``names``.
      mesh: the device mesh.
      rules: ordered (logical name, mesh axis) pairs.

    Returns:
      A PartitionSpec using each mesh axis at most once, sharding only
      dimensions divisible by the mesh axis size.
    """
    if len(names) != len(shape):
        raise ValueError(f"Logical names {names} do not match shape {shape}.")
    spec = [None] * len(shape)
    used = set()
    for logical, axis in rules:
        if axis in used or mesh.shape[axis] == 1:
            continue
        for dim, name in enumerate(names):
            if name == logical and spec[dim] is None and shape[dim] % mesh.shape[axis] == 0:
                spec[dim] = axis
                used.add(axis)
                break
    return P(*spec)


def param_shardings(boxed_abstract_params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, str]] = DEFAULT_RULES) -> Any:
    """NamedShardings for an (abstract) parameter tree boxed with logical names.

    Args:
      boxed_abstract_params: output of ``jax.eval_shape(model.init, ...)["params"]``
        still holding ``nn.LogicallyPartitioned`` boxes.
      mesh: the device mesh.
      rules: logical-to-mesh rules.

    Returns:
      A tree of NamedSharding matching the *unboxed* parameter tree.
    """
    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            names, shape = leaf.names, leaf.value.shape
        else:
            names, shape = (None,) * leaf.ndim, leaf.shape
        return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))

    return jax.tree.map(one, boxed_abstract_params,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
    """Largest per-device byte count of a sharded tree (for the start-up log)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def global_batch(local: dict, batch_sharding) -> dict:
    """Global jax.Arrays, sharded by ``batch_sharding``, from this process's slice
    of every batch entry (``{name: np.ndarray [local_batch, ...]}``)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in local.items()}
