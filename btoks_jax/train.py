"""The trainer: `btoks train --config configs/<name>.py --workdir DIR [--config.key=value ...]`.

One top-to-bottom loop in phases: distributed set-up and mesh, model shapes and shardings, the
model (restored from the workdir, imported from Hugging Face weights, or freshly initialised),
data, the jitted update step, checkpoints, evaluation hooks, and the loop itself.

The workdir is a local folder or a `gs://` URL (a pod's workers share one): checkpoints (Orbax),
`metrics.jsonl` (training and evaluation rows, written by process 0 through `btoks_jax.fs.LineLog`)
and `tensorboard/` (tensorboardX, which writes `gs://` through google-cloud-storage) all go there.
"""

from __future__ import annotations

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
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("emoji data set built")


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

    # ---------------------------------------------------------------- distributed + mesh
    workdir = fs.absolute(workdir)  # Orbax writes to absolute paths (or gs:// URLs) only
    maybe_initialize_distributed(config)
    is_main = jax.process_index() == 0
    cache_dir = enable_compilation_cache(config)
    if is_main and cache_dir:
        log.info("persistent compilation cache: %s", cache_dir)
    mesh = sharding.make_mesh(**_to_dict(config.mesh))
    rules = sharding.RULE_SETS[config.get("sharding_rules", "default")]
    if is_main:
        fs.makedirs(workdir)
        log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.devices.size, jax.process_count())

    # ---------------------------------------------------------------- model shapes, optimizer
    model_cfg = build.model_config(_to_dict(config.model))
    lora = lora_config(config)
    step_cfg = step_config(config)
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
        graphdef, abs_state, abs_frozen = build.abstract_train_state(model_cfg, config.data.num_btoks, lora,
                                                                     step_cfg.trainable, tx, mesh, rules,
                                                                     btok_ids=meta["btok_ids"],
                                                                     head=build.head_config(config.model))
        start, state, frozen, data_state, saved_meta = checkpoint.restore(mgr, None, abs_state, abs_frozen)
        if saved_meta.get("model_config") != meta["model_config"]:
            raise checkpoint.CheckpointError(f"{workdir}: the checkpoint was written for another model config")
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
    last: dict[str, Any] = {}
    t0, tokens = time.perf_counter(), 0
    step = start
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
            if step % config.log_every == 0 or step == total:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                last.update(step=step, steps_per_s=config.log_every / dt if dt else 0.0,
                            tokens_per_s=tokens / dt if dt else 0.0)
                t0, tokens = time.perf_counter(), 0
                if is_main:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", steps_s=f"{last['steps_per_s']:.2f}",
                                    tok_s=f"{last['tokens_per_s']:.0f}")
                    for k, v in last.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step)
                    history.append_json(last)
            bar.update(1)
            for hook in hooks:
                if hook.due(step, total):
                    scores = hook(nnx.merge(graphdef, state.params, frozen), step)
                    if is_main:
                        for k, v in scores.items():
                            writer.add_scalar(f"eval/{hook.name}/{k}".replace("@", "_at_"), v, step)
                        history.append_json({"step": step, "eval": hook.name, **scores})
            if step % config.checkpoint.every == 0 or step == total or preempt.requested:
                checkpoint.save(mgr, step, state, frozen, data.get_state(), meta, force=True)
            if preempt.requested:
                log.warning("SIGTERM: saved step %d, stopping", step)
                break
    finally:
        mgr.wait_until_finished()
        preempt.restore()
        bar.close()
        data.close()
        if writer is not None:
            writer.close()
    return last
