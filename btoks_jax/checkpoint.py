"""Orbax checkpoints: asynchronous atomic saves, keep-last-K, restore straight into shardings.

A checkpoint step holds four items: `state` (step, trainable parameters, optimizer state, RNG),
`frozen` (the parameters that do not train, so a checkpoint is self-contained for export),
`data` (the input pipeline's iterator state, JSON) and `meta` (the run's config, JSON). Orbax
writes each step into a temporary directory and renames it when complete, so a killed run never
leaves a half-written step behind as the latest. On `gs://` Orbax writes the arrays with tensorstore
and marks a step complete with a commit file instead of the rename; the directory reads here go
through `btoks_jax.fs`, so every function takes a local path or a `gs://` URL.

A save that fails (a full disk, a folder that refuses writes) never replaces the steps saved before: the
unfinished step stays a temporary directory, which the next manager on that folder removes, and the step is
not counted. An asynchronous save's error comes out of the next `save` or `wait` as a `CheckpointError` that
names the folder, the error and the complete steps that are kept.
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
import orbax.checkpoint as ocp

from btoks_jax import fs

ITEMS = ("state", "frozen", "data", "meta")
_LAST_SAVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # manager -> the step `save` started last


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or written by another configuration."""


def manager(workdir: str, *, max_to_keep: int = 3, save_every: int = 1, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: a step whose save was cut short (a killed run, a full disk) is removed when the
    # next run opens the folder, so the leftovers of repeated preemptions do not fill the disk.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_every, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(checkpoints_dir(workdir), options=options, item_names=ITEMS)


def checkpoints_dir(workdir: str) -> str:
    """The folder the manager keeps a run's steps in: `workdir/checkpoints`, or `workdir` when it is that folder."""
    workdir = fs.absolute(workdir)  # Orbax writes to absolute paths (or gs:// URLs) only
    if fs.basename(workdir) == "checkpoints":
        return workdir
    return fs.join(workdir, "checkpoints")


def save(mgr: ocp.CheckpointManager, step: int, state, frozen, data_state: dict, meta: dict, *,
         force: bool = False) -> bool:
    """Starts saving `step` (asynchronously when the manager is). Raises `CheckpointError` when this save, or an
    earlier asynchronous one that had not finished, failed; the complete steps before it are kept."""
    items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                 meta=ocp.args.JsonSave(meta))
    if jax.tree.leaves(frozen):  # full fine-tuning leaves nothing frozen, and Orbax refuses empty items
        items["frozen"] = ocp.args.StandardSave(frozen)
    previous = _LAST_SAVE.get(mgr)
    _LAST_SAVE[mgr] = step
    try:
        return mgr.save(step, args=ocp.args.Composite(**items), force=force)
    # This save or the asynchronous one before it, which this one waits for: OSError from Python's writes,
    # ValueError (RESOURCE_EXHAUSTED, ...) from tensorstore's.
    except Exception as e:  # noqa: BLE001 - every failure of a save is reported the same way
        what = f"saving step {step}" if previous is None else f"saving step {previous} or step {step}"
        raise _save_failed(mgr, what, e) from e


def wait(mgr: ocp.CheckpointManager) -> None:
    """Blocks until the manager's saves are finished; `CheckpointError` when one failed."""
    try:
        mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - as in `save`
        step = _LAST_SAVE.get(mgr)
        raise _save_failed(mgr, "saving" + (f" step {step}" if step is not None else ""), e) from e


def _save_failed(mgr: ocp.CheckpointManager, what: str, error: OSError) -> CheckpointError:
    try:
        kept = sorted(mgr.all_steps(read=True))
    except Exception:  # noqa: BLE001 - the folder itself may be what fails; the first error is the one to report
        kept = sorted(mgr.all_steps())
    resume = f"a rerun resumes from step {kept[-1]}" if kept else "there is no complete step to resume from"
    return CheckpointError(f"{mgr.directory}: {what} failed: {error}. The complete checkpoints before it are kept "
                           f"(steps {kept}); {resume}. Free space or fix the folder before rerunning.")


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
