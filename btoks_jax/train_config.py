"""The trainer's configuration: the defaults every training config in `configs/` starts from (an ml_collections
ConfigDict, each field documented once; a config file overrides what its recipe changes), and the parsing of a
config's `get_config(arg)` string ("runlocal,objective=contrastive,steps=10").

The model's own configuration (Qwen2-VL sizes, presets, token ids) is `btoks_jax/model_config.py`.
"""

from __future__ import annotations

import os

import ml_collections

EMOJI_TASKS = {"emoji_i2t": "positive", "emoji_t2i": "query", "emoji_cls": "positive"}


def default_data_dir() -> str:
    """Where the embedded emoji data set is built on first use ($BTOKS_DATA_DIR overrides)."""
    return os.environ.get("BTOKS_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "btoks_jax",
                                                            "emoji")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 5000
    c.log_every = 10
    c.progress = True
    c.mesh = dict(data=-1, fsdp=1, tensor=1)  # data=-1: all devices left over
    c.sharding_rules = "default"  # see btoks_jax.sharding.RULE_SETS
    # JAX's persistent compilation cache: "" = $BTOKS_COMPILATION_CACHE or ~/.cache/btoks_jax/xla; "none" = off.
    c.compilation_cache_dir = ""

    # The architecture: a preset ("tiny", "qwen2-vl-2b", "qwen2-vl-7b") or the config.json of hf_dir,
    # whose weights are then imported. `overrides` changes preset sizes: {"text": {...}, "vision": {...}}.
    c.model = dict(preset="tiny", hf_dir="", overrides={}, dtype="float32", param_dtype="float32",
                   attention_impl="dense", remat=False, btok_init="im_end", head=None)
    # model.head: None (the BToks' mean) or dict(kind="attention", mlp_ratio=, dropout=, attention_scale=), the
    # authors' v2 learned pooling (btoks_jax.head).
    c.lora = dict(enabled=False, rank=16, alpha=32.0, dropout=0.05, dora=False, init="gaussian",
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    # train_step.StepConfig: objective contrastive | gic | joint; lambda = ntp_weight until ntp_until_step
    # (None: the whole run); chunk_size = GradCache chunk (0: whole batch in one pass). Defaults are the
    # authors' main preset: lambda 5 for the first 2000 of 5000 steps, GIC as a per-chunk token mean.
    c.step = dict(objective="joint", temperature=0.02, ntp_weight=5.0, ntp_until_step=2000,
                  ntp_reduction="chunk_token_mean", ntp_chunk_size=8, chunk_size=0, pooling="btoks",
                  mask_mode="condensation", symmetric=False, trainable="lora", cache_vision_features=True)
    c.optim = dict(learning_rate=5e-5, warmup_steps=100, weight_decay=0.01, clip_norm=1.0)
    # data.pipeline.PipelineConfig fields plus the mixture; `prepare="emoji"` builds the embedded data set.
    c.data = dict(
        datasets=[], prepare="", global_batch_size=1024, subbatch_size=512, num_btoks=4,
        buckets=((128, 512), (256, 1024), (512, 2048), (1024, 4096), (1536, 5120)), target_len=128,
        target_buckets=None, truncate_targets=False,
        prompt_style="btoks", rope_convention="legacy", image_min_pixels=28 * 28 * 4,
        image_max_pixels=28 * 28 * 1280, video_min_pixels=28 * 28 * 4, video_max_pixels=28 * 28 * 768,
        video_num_frames=8, video_frame_sampling="linspace", seed=0, num_threads=16, prefetch_batches=2,
        # A row that cannot be used (an undecodable image, a target over the budget): "fail" stops the run, as
        # the authors' code crashes on one (their behaviour, the default); "skip" logs it and reads the next row of
        # its data set instead, stopping once more than max_skip_fraction of the rows read were skipped (after the
        # first 100). The count is metrics.jsonl's `skipped_rows`. See PipelineConfig.
        on_bad_row="fail", max_skip_fraction=0.01)
    # save_initial: also save the weights as they are before the first step (step 0), e.g. to show what a run
    # started from; the keep-last-K rule drops it like any other step.
    c.checkpoint = dict(every=500, keep=3, async_save=True, save_initial=False)
    # A step with a non-finite loss or gradient is not applied (train_step.train_step); this many in a row stop the
    # run with an error, without saving.
    c.train = dict(max_nonfinite_steps=5)
    c.evals = []  # evaluate.hooks.RetrievalHook specs
    c.distributed = dict(enabled=False, coordinator_address="", num_processes=1, process_id=0)
    return c


def emoji_datasets(data_dir: str, tasks=tuple(EMOJI_TASKS)) -> list[dict]:
    """The mixture of the emoji data set's training files in `data_dir` (a local folder or a `gs://` URL)."""
    from btoks_jax import fs

    return [dict(name=t, path=fs.join(data_dir, f"{t}_train.jsonl"), image_root=data_dir, weight=1.0,
                 ntp_side=EMOJI_TASKS[t]) for t in tasks]


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Comma-separated flags and key=value pairs over typed defaults; unknown keys are an error."""
    out = ml_collections.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    return out
