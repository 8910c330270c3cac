"""Model construction for training and inference: shapes first, then straight into shardings.

Sources of weights: a random init of a preset (tests, the embedded demo), a Hugging Face
directory (Qwen2-VL weights, optionally with the authors' `<|btok_i|>` rows), or a btoks-jax
checkpoint (`restore_model`, rebuilt from the config stored with it). The trainer's resume restores
into the same `abstract_train_state`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from btoks_jax import checkpoint, fs, sharding, train_step
from btoks_jax.btoks import BToksModel
from btoks_jax.convert.hf_import import hf_config, load_hf_weights, path_str
from btoks_jax.head import AttentionPoolingConfig
from btoks_jax.lora import LoRAConfig, apply_lora, merge_lora
from btoks_jax.model_config import BTOK_FIRST_ID, PRESETS, Qwen2VLConfig, from_hf_config


def model_config(model_cfg: Mapping[str, Any]) -> Qwen2VLConfig:
    """The architecture from `model.preset` or the `config.json` of `model.hf_dir` (local or gs://), plus runtime
    fields."""
    runtime = {k: model_cfg[k] for k in ("dtype", "param_dtype", "attention_impl", "remat") if k in model_cfg}
    if model_cfg.get("hf_dir"):
        return hf_config(model_cfg["hf_dir"], **runtime)
    preset = model_cfg.get("preset", "tiny")
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    overrides = dict(model_cfg.get("overrides", {}) or {})
    cfg = PRESETS[preset].replace(**runtime)
    if overrides:
        cfg = cfg.replace(text_config=cfg.text_config.__class__(**{**cfg.text_config.__dict__,
                                                                   **overrides.get("text", {})}),
                          vision_config=cfg.vision_config.__class__(**{**cfg.vision_config.__dict__,
                                                                       **overrides.get("vision", {})}))
    return cfg


def hf_added_tokens(directory: str) -> dict[str, int] | None:
    """content -> id of the added tokens in a directory's `tokenizer.json` (local or gs://), or None without one."""
    path = fs.join(directory, "tokenizer.json")
    if not fs.exists(path):
        return None
    return {t["content"]: t["id"] for t in fs.read_json(path).get("added_tokens", [])}


def hf_btok_ids(directory: str, num_btoks: int, added: dict[str, int] | None = None) -> list[int] | None:
    """The ids of `<|btok_0|>`..`<|btok_{K-1}|>` in a directory's tokenizer (the authors' format), or None.
    `added`: the directory's `hf_added_tokens`, when already read."""
    added = hf_added_tokens(directory) if added is None else added
    if added is None:
        return None
    ids = [added.get(f"<|btok_{i}|>") for i in range(num_btoks)]
    if not num_btoks or any(i is None for i in ids):
        return None
    if ids != list(range(ids[0], ids[0] + num_btoks)):
        raise ValueError(f"{directory}: <|btok_i|> ids {ids} are not consecutive")
    return ids


def head_config(model_cfg: Mapping[str, Any]) -> AttentionPoolingConfig | None:
    """The pooling head of `model.head` (None: mean pooling, the main recipe). Kinds: "attention" (v2)."""
    spec = dict(model_cfg.get("head") or {})
    if not spec:
        return None
    kind = spec.pop("kind", "attention")
    if kind != "attention":
        raise ValueError(f"unknown model.head kind {kind!r}; the only one is 'attention'")
    return AttentionPoolingConfig(**spec)


def lora_config(spec: Mapping[str, Any]) -> LoRAConfig | None:
    """The adapters of a `lora` block (the config's, or the copy a checkpoint stores); None unless `enabled`."""
    settings = dict(spec)
    if not settings.pop("enabled", False):
        return None
    if "targets" in settings:
        settings["targets"] = tuple(settings["targets"])
    return LoRAConfig(**settings)


def _create(cfg: Qwen2VLConfig, num_btoks: int, lora: LoRAConfig | None, seed: int,
            btok_ids: list[int] | None = None, head: AttentionPoolingConfig | None = None) -> BToksModel:
    model = BToksModel(cfg, num_btoks, rngs=nnx.Rngs(seed), btok_ids=btok_ids, head=head)
    if lora is not None:
        apply_lora(model.backbone, lora, rngs=nnx.Rngs(params=seed + 1, dropout=seed + 2))
    return model


def abstract(cfg: Qwen2VLConfig, num_btoks: int, lora: LoRAConfig | None,
             btok_ids: list[int] | None = None, head: AttentionPoolingConfig | None = None) -> BToksModel:
    """The model's structure and shapes, no arrays. `btok_ids` and `head` as for `BToksModel`."""
    return nnx.eval_shape(lambda: _create(cfg, num_btoks, lora, 0, btok_ids, head))


def btok_ids_of(hf_dir: str | None, num_btoks: int) -> list[int] | None:
    """The BTok ids a model built from `hf_dir` carries: its tokenizer's `<|btok_i|>` ids, or None (default)."""
    return hf_btok_ids(hf_dir, num_btoks) if hf_dir else None


def build(cfg: Qwen2VLConfig, *, num_btoks: int, lora: LoRAConfig | None = None, hf_dir: str | None = None,
          btok_init: str = "im_end", seed: int = 0, mesh: Mesh | None = None,
          rules: Mapping[str, Any] = sharding.DEFAULT_RULES, progress: bool = True,
          head: AttentionPoolingConfig | None = None) -> BToksModel:
    """A concrete BToksModel whose parameters already live in their shardings (no full copy anywhere).

    `btok_init`: "im_end" (every BTok starts as the `<|im_end|>` row, the authors' stated intent) or
    "vocab_rows" (the rows at ids 151657.. as the checkpoint holds them, what the authors' code did
    when the vocabulary needed no resizing). A directory whose tokenizer already has `<|btok_i|>`
    tokens always loads those rows.
    """
    mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
    ids = btok_ids_of(hf_dir, num_btoks)
    graphdef, abs_state = nnx.split(abstract(cfg, num_btoks, lora, ids, head))
    shardings = sharding.state_shardings(abs_state, mesh, rules)
    if hf_dir is None:
        state = jax.jit(lambda: nnx.split(_create(cfg, num_btoks, lora, seed, None, head))[1],
                        out_shardings=shardings)()
        return nnx.merge(graphdef, state)

    flat = {path_str(p): s for p, s in nnx.to_flat_state(shardings)}
    backbone, _ = load_hf_weights(hf_dir, cfg, sharding_for=lambda path, shape: flat["backbone." + path].get_value(),
                                  progress=progress)
    model = BToksModel(cfg, num_btoks, rngs=nnx.Rngs(seed), backbone=backbone, btok_ids=ids, head=head)
    if ids is not None or (btok_init == "vocab_rows" and num_btoks):
        start = ids[0] if ids is not None else BTOK_FIRST_ID
        model.btoks.value = jax.lax.dynamic_slice_in_dim(backbone.model.embed_tokens.value, start, num_btoks)
    elif btok_init != "im_end":
        raise ValueError(f"btok_init must be 'im_end' or 'vocab_rows', got {btok_init!r}")
    if lora is not None:
        apply_lora(model.backbone, lora, rngs=nnx.Rngs(params=seed + 1, dropout=seed + 2))
    _, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, shardings))


# ============================================================================== from a btoks-jax checkpoint


def abstract_train_state(cfg: Qwen2VLConfig, num_btoks: int, lora: LoRAConfig | None, trainable: str, tx, mesh: Mesh,
                         rules: Mapping[str, Any] = sharding.DEFAULT_RULES, btok_ids: list[int] | None = None,
                         head: AttentionPoolingConfig | None = None):
    """(graphdef, TrainState, frozen) as ShapeDtypeStructs in their shardings: what a checkpoint restores into."""
    graphdef, params, frozen = train_step.split_model(abstract(cfg, num_btoks, lora, btok_ids, head), trainable)
    p_sh = sharding.state_shardings(params, mesh, rules)
    f_sh = sharding.state_shardings(frozen, mesh, rules)
    replicated = sharding.replicated(mesh)
    opt = jax.eval_shape(tx.init, params)
    opt_sh = _opt_shardings(tx, opt, p_sh, replicated)
    state = train_step.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                          params=checkpoint.abstract_like(params, p_sh),
                          opt_state=checkpoint.abstract_like(opt, opt_sh),
                          rng=jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated))
    return graphdef, state, checkpoint.abstract_like(frozen, f_sh)


def _opt_shardings(tx, opt, param_shardings, replicated):
    """Optimizer moments take their parameter's sharding; counters and the like are replicated."""
    return optax.tree_map_params(tx, lambda _, s: s, opt, param_shardings,
                                 transform_non_params=lambda _: replicated)


def restore_model(workdir: str, *, step: int | None = None, mesh: Mesh | None = None,
                  merge: bool = False) -> tuple[BToksModel, dict[str, Any]]:
    """(BToksModel, meta) of `step` (default: the latest) of a training workdir or its `checkpoints/`
    folder, rebuilt from the config stored with it; `merge` folds LoRA adapters into the base weights."""
    step, meta = checkpoint.read_meta(workdir, step)
    mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
    cfg = from_hf_config(meta["model_config"], **meta["runtime"])
    tx, _ = train_step.make_optimizer(total_steps=meta["total_steps"], **meta["optim"])
    graphdef, abs_state, abs_frozen = abstract_train_state(
        cfg, meta["num_btoks"], lora_config(meta["lora"]), meta["trainable"], tx, mesh,
        btok_ids=meta.get("btok_ids"), head=head_config({"head": meta.get("head")}))
    mgr = checkpoint.manager(workdir, read_only=True, async_save=False)
    _, state, frozen, _, _ = checkpoint.restore(mgr, step, abs_state, abs_frozen)
    model = nnx.merge(graphdef, state.params, frozen)
    if merge:
        merge_lora(model.backbone)
    return model, meta


def param_count(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree) if hasattr(x, "size") and x.dtype != jax.dtypes.prng_key
               and jnp.issubdtype(x.dtype, jnp.number))
