"""Device mesh, the logical-axis rules table, and the shardings derived from it.

Parameters carry logical axis names (set once, in the model files). One rules table maps them to
the mesh axes `data`, `fsdp` and `tensor`; nothing inside a layer names a mesh axis. A dimension
that a mesh axis does not divide stays replicated along that axis instead of failing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "vis_patch": None,
    "vis_embed": "fsdp",
    "vis_qkv": "tensor",
    "vis_heads": "tensor",
    "vis_mlp": "tensor",
    "vis_merge": "fsdp",
    "vis_merge_hidden": "tensor",
    "lora_rank": None,
    "seq": None,
}

RULE_SETS = {
    "default": DEFAULT_RULES,
    # Pure data parallelism: every parameter replicated.
    "replicated": {k: ("data", "fsdp") if k == "batch" else None for k in DEFAULT_RULES},
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 on `data` takes the devices left over."""
    devices = list(devices if devices is not None else jax.devices())
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"{len(devices)} devices do not split into fsdp={fsdp} x tensor={tensor}")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {data * fsdp * tensor} devices, "
                         f"{len(devices)} available")
    shape = (data, fsdp, tensor)
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # non-TPU or unusual topologies: plain order is fine
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array with logical axes; indivisible or reused mesh axes are dropped."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape):
        axis = rules.get(name) if name is not None else None
        names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        names = tuple(n for n in names if n in mesh.shape and n not in used and mesh.shape[n] > 1)
        if names and dim % _axis_size(mesh, names) == 0:
            used.update(names)
            spec.append(names[0] if len(names) == 1 else names)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES):
    """NamedShardings from each variable's `sharding_names` metadata, in a tree shaped like `state`."""

    def one(var):
        logical = var.get_metadata().get("out_sharding")
        spec = logical_to_spec(logical, var.value.shape, mesh, rules) if logical else PartitionSpec()
        return var.replace(value=NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    return NamedSharding(mesh, PartitionSpec(*spec))


# ----------------------------------------------------------------------------- activation constraints

_CONTEXT: contextvars.ContextVar[tuple[Mesh, Mapping[str, Any]] | None] = contextvars.ContextVar("btoks_mesh",
                                                                                                  default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES):
    """Within this context (at trace time) `constrain` pins activations to the mesh."""
    token = _CONTEXT.set((mesh, rules))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical axes; a no-op outside `activation_sharding`."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical, x.shape, mesh, rules)))
