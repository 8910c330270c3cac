"""Orbax checkpoints: asynchronous atomic saves, keep-last-K, restore straight into shardings.

A checkpoint step holds four items: `state` (step, trainable parameters, optimizer state, RNG),
`frozen` (the parameters that do not train, so a checkpoint is self-contained for export),
`data` (the input pipeline's iterator state, JSON) and `meta` (the run's config, JSON). Orbax
writes each step into a temporary directory and renames it when complete, so a killed run never
leaves a half-written step behind as the latest. On `gs://` Orbax writes the arrays with tensorstore
and marks a step complete with a commit file instead of the rename; the directory reads here go
through `btoks_jax.fs`, so every function takes a local path or a `gs://` URL.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from btoks_jax import fs

ITEMS = ("state", "frozen", "data", "meta")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or written by another configuration."""


def manager(workdir: str, *, max_to_keep: int = 3, save_every: int = 1, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_every, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(checkpoints_dir(workdir), options=options, item_names=ITEMS)


def checkpoints_dir(workdir: str) -> str:
    """The folder the manager keeps a run's steps in: `workdir/checkpoints`, or `workdir` when it is that folder."""
    workdir = fs.absolute(workdir)  # Orbax writes to absolute paths (or gs:// URLs) only
    if fs.basename(workdir) == "checkpoints":
        return workdir
    return fs.join(workdir, "checkpoints")


def save(mgr: ocp.CheckpointManager, step: int, state, frozen, data_state: dict, meta: dict, *,
         force: bool = False) -> bool:
    items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                 meta=ocp.args.JsonSave(meta))
    if jax.tree.leaves(frozen):  # full fine-tuning leaves nothing frozen, and Orbax refuses empty items
        items["frozen"] = ocp.args.StandardSave(frozen)
    return mgr.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: Orbax restores directly into them."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _complete_step(mgr: ocp.CheckpointManager, step: int | None, where) -> int:
    """`step`, or the latest when None, checked to be a complete checkpoint of `mgr`."""
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{where}: holds no complete checkpoint")
    if step not in mgr.all_steps():
        raise CheckpointError(f"{where}: step {step} is missing or incomplete (have {sorted(mgr.all_steps())})")
    return step


def restore(mgr: ocp.CheckpointManager, step: int | None, abstract_state, abstract_frozen):
    """(step, state, frozen, data_state, meta) of `step` (default: the latest)."""
    step = _complete_step(mgr, step, mgr.directory)
    try:
        items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                     meta=ocp.args.JsonRestore())
        if jax.tree.leaves(abstract_frozen):
            items["frozen"] = ocp.args.StandardRestore(abstract_frozen)
        out = mgr.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        raise CheckpointError(f"{mgr.directory}: step {step} cannot be restored into this model "
                              f"(written by another config, or incomplete): {e}") from e
    frozen = out.frozen if "frozen" in items else abstract_frozen
    return step, out.state, frozen, out.data, out.meta


def read_meta(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, the config stored with it) of `step` (default: the latest), without restoring any array."""
    root = checkpoints_dir(workdir)
    if not fs.isdir(root):
        raise CheckpointError(f"{workdir}: not a btoks-jax checkpoint directory (no checkpoints/ inside)")
    mgr = manager(workdir, read_only=True, async_save=False)
    step = _complete_step(mgr, step, root)
    try:
        return step, mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except (KeyError, FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{root}: step {step} is missing or incomplete (no meta item): {e}") from e
