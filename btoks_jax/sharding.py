"""Device mesh, the logical-axis rules table, and the shardings derived from it.

Parameters carry logical axis names (set once, in the model files). One rules table maps them to
the mesh axes `data`, `fsdp` and `tensor`; nothing inside a layer names a mesh axis or builds a
PartitionSpec. A logical name the rules do not know, a parameter without logical names, and a
dimension that the mesh axes it maps to do not divide, are errors: nothing is replicated by accident.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from btoks_jax.inputs import batch_axis

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


def _mesh_axes(name: str, mesh, rules: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """The mesh axes `rules` map logical axis `name` to, of those `mesh` has."""
    if name not in rules:
        raise ValueError(f"{where}: unknown logical axis name {name!r}; the sharding rules know "
                         f"{', '.join(sorted(rules))}")
    axis = rules[name]
    names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    return tuple(n for n in names if n in mesh.shape)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh, rules: Mapping[str, Any] = DEFAULT_RULES,
                    *, where: str = "array") -> PartitionSpec:
    """PartitionSpec for an array of `shape` with one logical axis name (or None) per dimension.

    Each name maps through `rules` to mesh axes; an axis an earlier dimension already uses, or one the mesh
    lacks, is left out (one of size 1 stays named: it splits nothing). A name the rules do not know, or a
    dimension the mesh axes do not divide, raises ValueError naming `where` (e.g. the parameter's path).
    """
    if len(logical) != len(shape):
        raise ValueError(f"{where}: {len(logical)} logical axes {tuple(logical)} for shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape):
        names = () if name is None else tuple(n for n in _mesh_axes(name, mesh, rules, where) if n not in used)
        if dim % _axis_size(mesh, names):
            raise ValueError(f"{where} of shape {tuple(shape)}: dimension {dim} (logical axis {name!r}) does not "
                             f"divide over mesh axes {names} of sizes {tuple(mesh.shape[n] for n in names)}")
        used.update(names)
        spec.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES):
    """NamedShardings from each variable's `sharding_names` metadata, in a tree shaped like `state`."""

    def one(path, var):
        logical = var.get_metadata().get("out_sharding")
        where = jax.tree_util.keystr(path, simple=True, separator=".")
        if not logical and isinstance(var, nnx.Param) and len(var.value.shape):
            # A parameter created without names would be replicated on every device without anyone asking.
            raise ValueError(f"{where}: parameter of shape {tuple(var.value.shape)} has no logical axis names "
                             "(sharding_names); name each dimension where it is created (None for a replicated one)")
        spec = logical_to_spec(logical, var.value.shape, mesh, rules, where=where) if logical else PartitionSpec()
        return var.replace(value=NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def check_model_mesh(config, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> None:
    """Raises ValueError when the mesh axes that `rules` give the attention heads do not divide the model's head
    counts (a `tensor` axis of 4 for 2 key/value heads would cut heads apart); `config` a `Qwen2VLConfig`."""
    counts = (("q_heads", config.text_config.num_attention_heads, "text num_attention_heads"),
              ("kv_heads", config.text_config.num_key_value_heads, "text num_key_value_heads"),
              ("vis_heads", config.vision_config.num_heads, "vision num_heads"))
    for name, count, key in counts:
        axes = _mesh_axes(name, mesh, rules, where="model heads")
        shards = _axis_size(mesh, axes)
        if count % shards:
            sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
            raise ValueError(f"the model's {key}={count} does not divide over the mesh axes the sharding rules give "
                             f"{name!r} ({sizes}); choose a mesh whose {' x '.join(axes)} size divides {count}")


def batch_shardings(tree, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES):
    """NamedShardings for a tree of batch arrays (model inputs, labels): each split on its batch axis by the
    "batch" rule (`inputs.batch_axis`: axis 1 of `positions`, axis 0 elsewhere), the rest replicated."""

    def one(path, x):
        axis = batch_axis(path)
        logical = tuple("batch" if i == axis else None for i in range(x.ndim))
        where = jax.tree_util.keystr(path, simple=True, separator=".") or "batch"
        return NamedSharding(mesh, logical_to_spec(logical, x.shape, mesh, rules, where=where))

    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    """The whole array on every device of `mesh` (step counters, RNG keys, outputs every process reads)."""
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------- processes

# Seconds a process waits at `sync_processes` for the others: the longest a compile or a data build may take on
# one process beyond the rest.
SYNC_TIMEOUT_S = 3600
_SYNCS: collections.Counter[str] = collections.Counter()


def sync_processes(name: str, timeout_s: int = SYNC_TIMEOUT_S) -> None:
    """Returns when every JAX process has reached this point (called with `name` as often as this one has);
    raises after `timeout_s`. A no-op in a one-process run.

    It waits at the coordination service's barrier, not in a device collective: CPU collectives (gloo) give up
    after 30 s, and one process may compile a program, or build data, minutes after another. Call it after a
    program is compiled and before its first run, so that no process enters the program's collectives alone.
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    _SYNCS[name] += 1
    multihost.get_barrier_sync_fn()(key=f"btoks:{name}:{_SYNCS[name]}", timeout_ms=timeout_s * 1000)


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
    spec = logical_to_spec(logical, x.shape, mesh, rules, where=f"activation {tuple(logical)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ----------------------------------------------------------------------------- per-shard code (shard_map)


def _current() -> tuple[Any, Mapping[str, Any]]:
    """The mesh `jax.set_mesh` made current (empty outside one) and the rules of the enclosing
    `activation_sharding` (the default rules outside one)."""
    ctx = _CONTEXT.get()
    return jax.sharding.get_abstract_mesh(), DEFAULT_RULES if ctx is None else ctx[1]


def current_shards(name: str) -> int:
    """How many shards the current mesh and rules split logical axis `name` into (1 outside a mesh)."""
    mesh, rules = _current()
    return 1 if mesh.empty else _axis_size(mesh, _mesh_axes(name, mesh, rules, where="current mesh"))


def current_spec(logical: Sequence[str | None], shape: Sequence[int], *, where: str = "array") -> PartitionSpec | None:
    """`logical_to_spec` on the current mesh and rules, for code that names its shards itself (a `shard_map`
    inside `jit`, under `jax.set_mesh`); None outside a mesh."""
    mesh, rules = _current()
    return None if mesh.empty else logical_to_spec(logical, shape, mesh, rules, where=where)


def reshard_explicit(x: jax.Array, spec: PartitionSpec) -> jax.Array:
    """`x` resharded to `spec` on the current mesh's Explicit axes (shard_map requires an exact match
    there); Auto axes are left to shard_map and the compiler."""
    mesh = jax.sharding.get_abstract_mesh()
    explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Explicit}
    if not explicit:
        return x

    def keep(entry):
        names = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a in explicit)
        return names or None

    return jax.reshard(x, PartitionSpec(*(keep(entry) for entry in spec)))
