"""The trainer: `btoks train --config configs/<name>.py --workdir DIR [--config.key=value ...]`.

One top-to-bottom loop in phases: distributed set-up and mesh, model shapes and shardings, the
model (restored from the workdir, imported from Hugging Face weights, or freshly initialised),
data, the jitted update step, checkpoints, evaluation hooks, and the loop itself.

The workdir is a local folder or a `gs://` URL (a pod's workers share one): checkpoints (Orbax),
`metrics.jsonl` (training and evaluation rows, written by process 0 through `btoks_jax.fs.LineLog`)
and `tensorboard/` (tensorboardX, which writes `gs://` through google-cloud-storage) all go there.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from btoks_jax import build, checkpoint, fs, sharding, train_step
from btoks_jax.lora import LoRAConfig
from btoks_jax.mask import block_skip_fraction
from btoks_jax.model_config import Qwen2VLConfig

log = logging.getLogger("btoks.train")


# ============================================================================== configuration pieces


def _to_dict(cfg) -> dict:
    return cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)


def lora_config(config) -> LoRAConfig | None:
    return build.lora_config(_to_dict(config.lora))


def step_config(config) -> train_step.StepConfig:
    return train_step.StepConfig(**_to_dict(config.step))


def pipeline_config(config):
    """The data pipeline's settings: `config.data` without the mixture itself."""
    from btoks_jax.data.pipeline import PipelineConfig

    fields = {k: v for k, v in _to_dict(config.data).items() if k not in ("datasets", "prepare", "prepare_dir")}
    fields["buckets"] = tuple(tuple(b) for b in fields["buckets"])
    return PipelineConfig(**fields)


def optimizer(config):
    return train_step.make_optimizer(total_steps=config.total_steps, **_to_dict(config.optim))


def run_meta(config, model_cfg: Qwen2VLConfig) -> dict[str, Any]:
    """What a checkpoint must know to be rebuilt without the config file."""
    return {
        "model_config": model_cfg.to_hf_dict(),
        "runtime": {"dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype,
                    "attention_impl": model_cfg.attention_impl, "remat": model_cfg.remat},
        "num_btoks": config.data.num_btoks,
        # The vocabulary rows the BToks tie to (a Hugging Face directory's `<|btok_i|>` ids; None: the default).
        "btok_ids": build.btok_ids_of(config.model.get("hf_dir") or None, config.data.num_btoks),
        "head": _to_dict(config.model.get("head") or {}) or None,
        "lora": _to_dict(config.lora),
        "trainable": config.step.trainable,
        "optim": _to_dict(config.optim),
        "total_steps": config.total_steps,
        "tokenizer_dir": config.model.get("hf_dir") or None,
        "prompt_style": config.data.prompt_style,
        "rope_convention": config.data.rope_convention,
        "config": json.loads(config.to_json_best_effort()),
    }


# ============================================================================== config checks

# Keys that may change when a run resumes: they do not alter the batches or the math of the steps (where the files
# live, logging, checkpoint cadence, evaluation, the mesh and the kernels, which re-place the same values). Every
# other key must be what the checkpoint was written with; `resume_changes` names those that differ.
RESUME_MAY_CHANGE = ("log_every", "progress", "compilation_cache_dir", "evals", "distributed", "checkpoint", "mesh",
                     "sharding_rules", "model.hf_dir", "model.attention_impl", "model.remat", "data.num_threads",
                     "data.prefetch_batches", "data.prepare", "data.prepare_dir", "data.on_bad_row",
                     "data.max_skip_fraction", "train", "step.cache_vision_features")
# A data set may move (local -> gs://); its name, weight, sides stay.
_DATASET_LOCATION = ("path", "image_root", "media_roots")


def config_schema() -> dict[str, Any]:
    """The keys each section of a training config may hold: a set per fixed section (a nested dict for
    `model.overrides`), None for free-form values. From the defaults (`train_config.base_config`) and the
    dataclasses the sections become."""
    from btoks_jax import train_config
    from btoks_jax.data.mmeb_train import DatasetSpec
    from btoks_jax.data.pipeline import PipelineConfig
    from btoks_jax.model_config import TextConfig, VisionConfig

    base = train_config.base_config().to_dict()
    fields = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    schema: dict[str, Any] = {key: (set(value) if isinstance(value, dict) else None) for key, value in base.items()}
    schema["model"] = set(base["model"])
    schema["overrides"] = {"text": fields(TextConfig), "vision": fields(VisionConfig)}
    schema["lora"] = fields(LoRAConfig) | {"enabled"}
    schema["step"] = fields(train_step.StepConfig)
    schema["optim"] = set(inspect.signature(train_step.make_optimizer).parameters) - {"total_steps"}
    schema["data"] = fields(PipelineConfig) | {"datasets", "prepare", "prepare_dir"}
    schema["datasets"] = fields(DatasetSpec)
    return schema


def check_config_keys(config) -> None:
    """Raises ValueError naming every key of `config` that no part of the trainer reads (a typo, or a setting of
    another version), with the nearest known key. `--config.KEY=VALUE` overrides of unknown keys are already
    refused by ml_collections when the command line is parsed; this catches keys a config file sets."""
    schema = config_schema()
    unknown: list[str] = []

    def check(section: dict, known, where: str) -> None:
        for key in section:
            if key not in known:
                near = difflib.get_close_matches(key, sorted(known), n=1)
                unknown.append(f"{where}{key}" + (f" (did you mean {where}{near[0]}?)" if near else ""))

    tree = _to_dict(config)
    check(tree, {k for k in schema if k not in ("overrides", "datasets")}, "")
    for name, section in tree.items():
        if isinstance(schema.get(name), set) and isinstance(section, dict):
            check(section, schema[name], f"{name}.")
    overrides = (tree.get("model") or {}).get("overrides") or {}
    check(overrides, set(schema["overrides"]), "model.overrides.")
    for part, known in schema["overrides"].items():
        check(overrides.get(part) or {}, known, f"model.overrides.{part}.")
    for i, spec in enumerate((tree.get("data") or {}).get("datasets") or []):
        check(spec, schema["datasets"], f"data.datasets[{i}].")
    if unknown:
        raise ValueError(f"unknown config key(s): {'; '.join(unknown)}")


def check_config(config, model_cfg: Qwen2VLConfig, mesh, rules) -> None:
    """The checks that need no weights and no compilation: values the loop relies on, the mesh against the
    model's head counts, the buckets against the smallest image. Raises ValueError naming the config keys."""
    from btoks_jax.data.pipeline import check_budgets

    for key, value in (("log_every", config.log_every), ("checkpoint.every", config.checkpoint.every),
                       ("train.max_nonfinite_steps", max_nonfinite_steps(config))):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{key} must be an integer >= 1, got {value!r}")
    sharding.check_model_mesh(model_cfg, mesh, rules)
    check_budgets(pipeline_config(config), model_cfg)


def max_nonfinite_steps(config) -> int:
    """How many steps in a row may have a non-finite loss or gradient (their updates are skipped) before the run
    stops: `config.train.max_nonfinite_steps`."""
    return (config.get("train") or {}).get("max_nonfinite_steps", 5)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _comparable(config_json: dict) -> dict[str, Any]:
    """A config (as `to_json_best_effort` writes it) as dotted key -> value; the data sets with their defaults
    filled in and without their location."""
    from btoks_jax.data.mmeb_train import DatasetSpec

    defaults = {f.name: f.default for f in dataclasses.fields(DatasetSpec) if f.default is not dataclasses.MISSING}
    tree = copy.deepcopy(config_json)
    data = tree.get("data") or {}
    if isinstance(data.get("datasets"), list):
        data["datasets"] = [{k: v for k, v in {**defaults, **spec}.items() if k not in _DATASET_LOCATION}
                            if isinstance(spec, dict) else spec for spec in data["datasets"]]
    return _flat(tree)


def resume_changes(saved: dict, current: dict) -> list[str]:
    """"key: checkpoint value -> current value" for each key outside RESUME_MAY_CHANGE that differs between the
    config a checkpoint was written with and the current one (both as `to_json_best_effort` JSON)."""
    old, new = _comparable(saved), _comparable(current)
    missing = "(not set)"
    changes = []
    for key in sorted(set(old) | set(new)):
        if any(key == allowed or key.startswith(allowed + ".") for allowed in RESUME_MAY_CHANGE):
            continue
        if old.get(key, missing) != new.get(key, missing):
            show = lambda v: v if v is missing else json.dumps(v, sort_keys=True)  # noqa: E731
            changes.append(f"{key}: {show(old.get(key, missing))} -> {show(new.get(key, missing))}")
    return changes


def check_resume(workdir: str, step: int, saved_meta: dict[str, Any], meta: dict[str, Any]) -> None:
    """Refuses to resume a checkpoint written for another model or run: raises CheckpointError naming every
    setting that changed (checkpoint value -> current value) and which ones may change."""
    changes = []
    old_model, new_model = _flat(saved_meta.get("model_config") or {}), _flat(meta["model_config"])
    for key in sorted(set(old_model) | set(new_model)):
        if old_model.get(key) != new_model.get(key):
            changes.append(f"model_config.{key}: {json.dumps(old_model.get(key))} -> {json.dumps(new_model.get(key))}")
    if saved_meta.get("btok_ids", None) != meta["btok_ids"]:
        changes.append(f"btok_ids (from model.hf_dir): {saved_meta.get('btok_ids')} -> {meta['btok_ids']}")
    if "config" in saved_meta:
        changes += resume_changes(saved_meta["config"], meta["config"])
    if changes:
        listed = "\n  ".join(changes)
        raise checkpoint.CheckpointError(
            f"{workdir}: cannot resume from step {step}: the config differs from the one the checkpoint was written "
            f"with in settings that change the run's data or math (checkpoint -> now):\n  {listed}\nResume with the "
            f"checkpoint's values, or start the new run in another workdir. Settings that may change on resume: "
            f"{', '.join(RESUME_MAY_CHANGE)}; the data sets' {' and '.join(_DATASET_LOCATION)}.")


# ============================================================================== distributed set-up


def maybe_initialize_distributed(config) -> None:
    """`jax.distributed.initialize()` when asked (multi-host TPU pods auto-detect their peers)."""
    dist = config.get("distributed", None)
    wanted = os.environ.get("BTOKS_DISTRIBUTED") == "1" or (dist is not None and dist.get("enabled", False))
    if not wanted or jax.distributed.is_initialized():
        return
    kwargs = {}
    if dist is not None and dist.get("coordinator_address"):
        kwargs = dict(coordinator_address=dist.coordinator_address, num_processes=dist.num_processes,
                      process_id=dist.process_id)
    jax.distributed.initialize(**kwargs)


def enable_compilation_cache(config) -> str | None:
    """Turns on JAX's persistent compilation cache, so a restarted or resumed run (a preempted pod, a rerun)
    loads its step programs instead of compiling them again. `config.compilation_cache_dir`: a folder, "" for
    $BTOKS_COMPILATION_CACHE or ~/.cache/btoks_jax/xla, "none" to leave it off. Returns the folder used."""
    path = config.get("compilation_cache_dir", "") or os.environ.get("BTOKS_COMPILATION_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "btoks_jax", "xla")
    if path == "none":
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program that took more than a second to compile (the step programs take far longer).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


# ============================================================================== the training run


def prepare_data(config) -> None:
    """Builds the embedded data set on first use when the config asks for it (`data.prepare`)."""
    what = config.data.get("prepare", "")
    if not what:
        return
    if what != "emoji":
        raise ValueError(f"unknown data.prepare {what!r} (only 'emoji')")
    from btoks_jax.data.emoji_dataset import FORMAT_VERSION, build_emoji_dataset

    # A folder that already holds a data set of this format (whatever its other settings) is used as it is.
    directory = config.data.prepare_dir
    if fs.is_remote(directory):  # every process checks, so that none waits for a build that never comes
        if _emoji_format(directory) != FORMAT_VERSION:
            raise ValueError(f"{directory}: holds no emoji data set of format {FORMAT_VERSION}; the trainer builds "
                             "it only into a local folder: build it with `btoks data --out DIR` and copy it there "
                             f"(`gcloud storage cp -r 'DIR/*' {directory}/`)")
        return
    if jax.process_index() == 0 and _emoji_format(config.data.prepare_dir) != FORMAT_VERSION:
        build_emoji_dataset(config.data.prepare_dir)
    sharding.sync_processes("emoji data set built")  # however long the build takes on process 0


def _emoji_format(directory: str) -> int | None:
    try:
        return fs.read_json(fs.join(directory, "manifest.json"))["settings"]["format_version"]
    except (OSError, KeyError, ValueError):
        return None


class _Preemption:
    """SIGTERM (preemption notice) sets a flag; the loop saves at the next step boundary and stops."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _device_batch(tb, mesh, rules=sharding.DEFAULT_RULES):
    """Process-local NumPy rows -> global sharded arrays (each process contributes its slice)."""
    batch = {side: {"inputs": getattr(tb, side).inputs, "labels": getattr(tb, side).labels,
                    "label_mask": getattr(tb, side).label_mask} for side in ("query", "positive")}
    shardings = sharding.batch_shardings(batch, mesh, rules)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), batch, shardings)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) training in `workdir`; returns the last metrics."""
    from tqdm.auto import tqdm

    from btoks_jax.data.mmeb_train import DatasetSpec
    from btoks_jax.data.pipeline import TrainBatchIterator, side_shapes
    from btoks_jax.processing import load_tokenizer

    # ---------------------------------------------------------------- config checks, distributed + mesh
    # Config mistakes fail here, before any weight is read or any program compiles.
    check_config_keys(config)
    workdir = fs.absolute(workdir)  # Orbax writes to absolute paths (or gs:// URLs) only
    maybe_initialize_distributed(config)
    is_main = jax.process_index() == 0
    rule_set = config.get("sharding_rules", "default")
    if rule_set not in sharding.RULE_SETS:
        raise ValueError(f"config.sharding_rules={rule_set!r}: no such rule set; choose one of "
                         f"{sorted(sharding.RULE_SETS)}")
    rules = sharding.RULE_SETS[rule_set]
    try:
        mesh = sharding.make_mesh(**_to_dict(config.mesh))
    except ValueError as e:
        raise ValueError(f"config.mesh {_to_dict(config.mesh)}: {e}") from e
    model_cfg = build.model_config(_to_dict(config.model))
    lora = lora_config(config)
    step_cfg = step_config(config)
    check_config(config, model_cfg, mesh, rules)
    cache_dir = enable_compilation_cache(config)
    if is_main and cache_dir:
        log.info("persistent compilation cache: %s", cache_dir)
    if is_main:
        fs.makedirs(workdir)
        log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.devices.size, jax.process_count())

    # ---------------------------------------------------------------- model shapes, optimizer
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    chunk = step_cfg.chunk_size or config.data.global_batch_size
    if config.data.global_batch_size % chunk or chunk % batch_shards:
        raise ValueError(f"config.step.chunk_size={step_cfg.chunk_size} must divide data.global_batch_size="
                         f"{config.data.global_batch_size} and be a multiple of the data x fsdp = {batch_shards} "
                         "devices that split each chunk")
    tx, schedule = optimizer(config)
    meta = run_meta(config, model_cfg)
    mgr = checkpoint.manager(workdir, max_to_keep=config.checkpoint.keep, save_every=1,
                             async_save=config.checkpoint.get("async_save", True))

    # ---------------------------------------------------------------- model: resume, import or init
    data_state = None
    if mgr.latest_step() is not None:
        # The config comes first (the meta item alone), so that a changed run is refused before any array loads.
        saved_step, saved_meta = checkpoint.read_meta(workdir, mgr.latest_step())
        check_resume(workdir, saved_step, saved_meta, meta)
        graphdef, abs_state, abs_frozen = build.abstract_train_state(model_cfg, config.data.num_btoks, lora,
                                                                     step_cfg.trainable, tx, mesh, rules,
                                                                     btok_ids=meta["btok_ids"],
                                                                     head=build.head_config(config.model))
        start, state, frozen, data_state, saved_meta = checkpoint.restore(mgr, saved_step, abs_state, abs_frozen)
        if is_main:
            log.info("resumed from step %d", start)
    else:
        model = build.build(model_cfg, num_btoks=config.data.num_btoks, lora=lora,
                            hf_dir=config.model.get("hf_dir") or None,
                            btok_init=config.model.get("btok_init", "im_end"), seed=config.seed, mesh=mesh,
                            rules=rules, progress=is_main, head=build.head_config(config.model))
        graphdef, params, frozen = train_step.split_model(model, step_cfg.trainable)
        state = train_step.init_state(params, tx, config.seed)
        start = 0
    n_train = build.param_count(state.params)
    if is_main:
        log.info("trainable parameters: %s (mode %s), frozen: %s", f"{n_train:,}", step_cfg.trainable,
                 f"{build.param_count(frozen):,}")

    # ---------------------------------------------------------------- data
    tokenizer = load_tokenizer(config.model.get("hf_dir") or None)
    prepare_data(config)
    datasets = [DatasetSpec(**d) for d in _to_dict(config.data)["datasets"]]
    pipeline_cfg = pipeline_config(config)
    data = TrainBatchIterator(datasets, pipeline_cfg, model_cfg, tokenizer, process_index=jax.process_index(),
                              process_count=jax.process_count())
    if data_state is not None:
        data.set_state(data_state)
    elif start:
        raise checkpoint.CheckpointError(f"{workdir}: checkpoint has no data iterator state")

    # ---------------------------------------------------------------- update step (one jit per layout pair)
    compiled: dict[Any, Any] = {}
    objectives = 2 if step_cfg.objective == "joint" and step_cfg.ntp_until_step is not None else 1
    most_programs = side_shapes(pipeline_cfg) ** 2 * objectives
    if is_main:
        log.info("at most %d step programs: %d shapes per side (query buckets x {patches, none} x {target "
                 "regions, none}), squared, x %d objective(s)", most_programs, side_shapes(pipeline_cfg), objectives)

    def step_fn(batch, layouts, step):
        cfg = train_step.config_at(step_cfg, step)  # the lambda schedule picks the program
        patches = tuple(batch[side]["inputs"].pixel_values.shape[1] for side in ("query", "positive"))
        key = (layouts, patches, cfg.objective)
        if key not in compiled:
            if is_main:
                log.info("compiling step program %d (at most %d): layouts %s, patch budgets %s, objective %s",
                         len(compiled) + 1, most_programs, layouts, patches, cfg.objective)
                for side, lay in zip(("query", "positive"), layouts):
                    log.info("%s layout %s: the %s mask leaves %.1f%% of 512x512 attention tiles for the splash "
                             "kernel to skip (causal alone: %.1f%%)", side, lay, step_cfg.mask_mode,
                             100 * block_skip_fraction(lay, step_cfg.mask_mode), 100 * block_skip_fraction(lay, "full"))
            compiled[key] = train_step.compile_step(graphdef=graphdef, layouts=layouts, cfg=cfg, tx=tx,
                                                    schedule=schedule, state=state, frozen=frozen, batch=batch,
                                                    mesh=mesh, rules=rules)
            sharding.sync_processes("step program compiled")  # no process enters its collectives alone
        return compiled[key]

    # ---------------------------------------------------------------- evaluation hooks
    from btoks_jax.evaluate.hooks import make_hooks

    hooks = make_hooks(config.get("evals", []), tokenizer=tokenizer, meta=meta, mesh=mesh)

    # ---------------------------------------------------------------- loop
    writer = history = None
    if is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(fs.join(workdir, "tensorboard"))
        history = fs.LineLog(fs.join(workdir, "metrics.jsonl"))
    total = config.total_steps
    if start == 0 and config.checkpoint.get("save_initial", False) and mgr.latest_step() is None:
        checkpoint.save(mgr, 0, state, frozen, data.get_state(), meta, force=True)
    preempt = _Preemption()
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not is_main or not config.get(
        "progress", True), dynamic_ncols=True)
    guard = _NonFiniteGuard(max_nonfinite_steps(config), [spec.name for spec in datasets], workdir, mgr)
    last: dict[str, Any] = {}
    t0, tokens = time.perf_counter(), 0
    step = start
    failed = True
    sharding.sync_processes("training starts")  # the batches' first agreement on shapes is a collective
    try:
        while step < total:
            tb = next(data)
            layouts = (tb.query.layout, tb.positive.layout)
            tokens += int(tb.query.inputs.segment_ids.sum() + tb.positive.inputs.segment_ids.sum()) \
                * jax.process_count()
            batch = _device_batch(tb, mesh, rules)
            # set_mesh: the splash kernel runs per shard (shard_map), as the ahead-of-time compile lowers it.
            with jax.set_mesh(mesh), sharding.activation_sharding(mesh, rules):
                state, metrics = step_fn(batch, layouts, step)(state, frozen, batch)
            step += 1
            # The previous step's finite flag is read now, with this one in flight: no stall per step.
            guard.add(step, metrics["skipped_update"], tb)
            guard.settle(keep_last=True)
            log_due = step % config.log_every == 0 or step == total
            hooks_due = [hook for hook in hooks if hook.due(step, total)]
            save_due = step % config.checkpoint.every == 0 or step == total or preempt.requested
            if log_due:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                last.update(step=step, steps_per_s=config.log_every / dt if dt else 0.0,
                            tokens_per_s=tokens / dt if dt else 0.0, skipped_rows=data.row_counts()[1])
                t0, tokens = time.perf_counter(), 0
                if is_main:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", steps_s=f"{last['steps_per_s']:.2f}",
                                    tok_s=f"{last['tokens_per_s']:.0f}")
                    for k, v in last.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step)
                    history.append_json(last)
            if log_due or hooks_due or save_due:
                guard.settle(keep_last=False)  # too many non-finite steps in a row stop the run before a save
            bar.update(1)
            for hook in hooks_due:
                sharding.sync_processes("evaluation starts")
                scores = hook(nnx.merge(graphdef, state.params, frozen), step)
                if is_main:
                    for k, v in scores.items():
                        writer.add_scalar(f"eval/{hook.name}/{k}".replace("@", "_at_"), v, step)
                    history.append_json({"step": step, "eval": hook.name, **scores})
            if save_due:
                checkpoint.save(mgr, step, state, frozen, data.get_state(), meta, force=True)
            if preempt.requested:
                log.warning("SIGTERM: saved step %d, stopping", step)
                break
        guard.settle(keep_last=False)
        failed = False
    finally:
        try:
            checkpoint.wait(mgr)
        except checkpoint.CheckpointError:
            if not failed:
                raise
            log.exception("while stopping after an error, the last checkpoint save failed too")
        finally:
            mgr.close()  # its background threads end here, not at the interpreter's exit
            preempt.restore()
            bar.close()
            data.close()
            if writer is not None:
                writer.close()
    # Every process leaves together, with its saves finished, so that none is still working when the others shut
    # the distributed runtime down.
    sharding.sync_processes("training finished")
    return last


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient (`config.train.max_nonfinite_steps`)."""


class _NonFiniteGuard:
    """Reads each step's `skipped_update` flag (a step whose loss, gradient or update was not finite, so that the
    jitted step kept the parameters and optimizer state), logs such a step with the data sets and rows of its
    batch, and raises `NonFiniteError` after `limit` of them in a row. The flags are read one step late, so the
    host does not wait for every step to finish; `settle(keep_last=False)` reads them all (before a log row, an
    evaluation or a save). The run then stops without saving: the checkpoints hold the last applied update."""

    def __init__(self, limit: int, dataset_names: list[str], workdir: str, mgr):
        self.limit, self.names, self.workdir, self.mgr = limit, dataset_names, workdir, mgr
        self.pending: list[tuple[int, Any, np.ndarray, np.ndarray]] = []
        self.in_a_row = 0

    def add(self, step: int, flag, tb) -> None:
        self.pending.append((step, flag, tb.dataset_ids, tb.row_ids))

    def settle(self, keep_last: bool) -> None:
        while len(self.pending) > (1 if keep_last else 0):
            step, flag, dataset_ids, row_ids = self.pending.pop(0)
            if not float(jax.device_get(flag)):
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            rows = self.describe(dataset_ids, row_ids)
            log.warning("step %d: non-finite loss, gradient or update; the update was not applied (%d in a row, "
                        "the limit is %d). This process's rows of the batch: %s", step, self.in_a_row, self.limit,
                        rows)
            if self.in_a_row >= self.limit:
                try:
                    checkpoint.wait(self.mgr)  # a save still in flight holds an applied update: let it finish
                except checkpoint.CheckpointError:
                    log.exception("the last checkpoint save failed")
                kept = sorted(self.mgr.all_steps())
                raise NonFiniteError(
                    f"{self.workdir}: steps {step - self.in_a_row + 1}..{step} all had a non-finite loss, gradient or "
                    f"update (config.train.max_nonfinite_steps={self.limit}); none of their updates was applied, and "
                    f"the run stops without saving. The checkpoints (steps {kept}) hold the last applied update. "
                    f"The last batch's rows (this process): {rows}")

    def describe(self, dataset_ids: np.ndarray, row_ids: np.ndarray) -> str:
        """"name rows [..]; name rows [..]" of a batch, by data set, in batch order."""
        by_set: dict[str, list[int]] = {}
        for d, r in zip(dataset_ids.tolist(), row_ids.tolist()):
            by_set.setdefault(self.names[d], []).append(r)
        return "; ".join(f"{name} rows {rows}" for name, rows in by_set.items())
