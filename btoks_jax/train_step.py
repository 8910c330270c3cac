"""Pure training steps for the three objectives (contrastive, GIC, joint), with GradCache.

A step sees the global batch: both sides of every pair packed as `[X | B | T]`. With
`chunk_size` smaller than the batch, the contrastive loss is computed GradCache-style: embeddings
of the whole batch first (no gradients kept), the loss and its gradient w.r.t. the embeddings,
then each chunk's forward/backward against those cached gradients. The generative term is linear
in the token losses (see `losses.ntp_token_weights`), so it splits over chunks exactly. Every
negative stays global; memory grows with the chunk, not the batch.

Legend: B global batch, C chunk, N = B // C chunks, D embedding width.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from btoks_jax import losses, sharding
from btoks_jax.btoks import BTokParam
from btoks_jax.head import HeadParam
from btoks_jax.inputs import batch_axis
from btoks_jax.lora import LoRAParam
from btoks_jax.mask import Layout

OBJECTIVES = ("contrastive", "gic", "joint")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    objective: str = "joint"
    temperature: float = 0.02
    ntp_weight: float = 5.0
    ntp_until_step: int | None = None  # None: lambda applies for the whole run (applied by `config_at`)
    ntp_reduction: str = "sample_mean"
    ntp_chunk_size: int = 8  # group size of the "chunk_token_mean" reduction
    chunk_size: int = 0  # GradCache / accumulation chunk; 0 = the whole batch in one pass
    pooling: str = "btoks"
    mask_mode: str = "condensation"
    symmetric: bool = False
    trainable: str = "lora"  # "lora" (adapters + BToks) or "full"
    # Target positions per row in a chunk of the fused vocabulary projection + NTP loss (`losses.fused_token_nll_sum`):
    # the [B, Lt, V] logits are never held at once, and each batch shard's scored positions are gathered first, so
    # only the chunks holding scored positions are projected. 0: the whole target region's logits at once (every
    # position projected). Same loss either way; which is faster depends on the hardware (benchmarks/README.md).
    ntp_logits_chunk: int = 0
    # GradCache (chunk_size > 0) with a frozen vision tower (trainable "lora"): the embedding pass keeps each chunk's
    # merged vision features and the gradient pass reads them instead of running the tower again, which gets no
    # gradient (the same values; memory: [B, M, D] features of the local batch). False runs the tower in both passes.
    cache_vision_features: bool = True

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")


def config_at(cfg: StepConfig, step: int) -> StepConfig:
    """The lambda schedule, on the host: the step program that trains step `step`. A joint run turns
    contrastive once lambda drops to 0 (`ntp_until_step`): the same gradients, without the vocabulary logits."""
    if cfg.objective == "joint" and losses.ntp_weight(step, weight=cfg.ntp_weight,
                                                      until_step=cfg.ntp_until_step) == 0.0:
        return dataclasses.replace(cfg, objective="contrastive")
    return cfg


def trainable_filter(mode: str):
    """Which variables train: adapters, BToks and a pooling head (LoRA mode) or every parameter (full)."""
    if mode == "lora":
        return nnx.Any(LoRAParam, BTokParam, HeadParam)
    if mode == "full":
        return nnx.Param
    raise ValueError(f"trainable must be 'lora' or 'full', got {mode!r}")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # the trainable nnx.State
    opt_state: Any
    rng: jax.Array


def split_model(model: nnx.Module, mode: str):
    """(graphdef, trainable state, frozen state)."""
    graphdef, params, frozen = nnx.split(model, trainable_filter(mode), ...)
    return graphdef, params, frozen


def _vision_trains(params) -> bool:
    """Whether any trainable parameter lies in the vision tower (`backbone.visual`)."""
    paths = (jax.tree_util.keystr(path, simple=True, separator=".")
             for path, _ in jax.tree_util.tree_leaves_with_path(params))
    return any(".visual." in f".{path}." for path in paths)


def _has_dropout(model) -> bool:
    return any(isinstance(m, nnx.Dropout) for _, m in nnx.iter_graph(model))


def _merge(graphdef, params, frozen, key):
    """The model rebuilt inside the current trace.

    `copy=True` gives it fresh Variables: the closed-over frozen state belongs to the outer `jit`
    trace, and `nnx.remat` (block state) and `nnx.reseed` (dropout keys) write to the model's
    Variables from inside the GradCache scan and `value_and_grad`, which flax only allows for
    Variables created at that trace level.
    """
    model = nnx.merge(graphdef, params, frozen, copy=True)
    if key is not None and _has_dropout(model):
        nnx.reseed(model, dropout=key)
    return model


def _side(model, side, layout: Layout, cfg: StepConfig, logits: bool, features=None):
    """(embeddings, the target region's logits), or with `ntp_logits_chunk` its final hidden states instead:
    `_ntp_sum` then projects them chunk by chunk. `features`: the side's vision features, computed before."""
    if not cfg.ntp_logits_chunk:
        return model(side["inputs"], layout, pooling=cfg.pooling, mask_mode=cfg.mask_mode, target_logits=logits,
                     vision_features=features)
    emb, target = model.embed_and_target(side["inputs"], layout, pooling=cfg.pooling, mask_mode=cfg.mask_mode,
                                         vision_features=features)
    return emb, (target if logits and layout.target_len else None)


def _ntp_sum(model, out, side, weights, cfg: StepConfig):
    if out is None:  # a side packed without a target region generates nothing
        return jnp.float32(0.0)
    if cfg.ntp_logits_chunk:
        return losses.fused_token_nll_sum(model.target_logits, out, side["labels"], weights,
                                          chunk=cfg.ntp_logits_chunk)
    return jnp.sum(weights * losses.token_nll(out, side["labels"]))


def _lambda(cfg: StepConfig) -> jax.Array:
    """A compiled step's constant lambda; its schedule over steps is `config_at`'s choice of program."""
    return jnp.float32({"contrastive": 0.0, "gic": 1.0, "joint": cfg.ntp_weight}[cfg.objective])


def _chunk(tree, i, n):
    """Chunk i of N: rows i, i+N, i+2N, ... so every chunk spreads over all batch shards."""

    def take(path, x):
        axis = batch_axis(path)
        shape = x.shape[:axis] + (x.shape[axis] // n, n) + x.shape[axis + 1:]
        return jax.lax.dynamic_index_in_dim(x.reshape(shape), i, axis=axis + 1, keepdims=False)

    return jax.tree_util.tree_map_with_path(take, tree)


def loss_and_grads(graphdef, params, frozen, batch, layouts: tuple[Layout, Layout], key, cfg: StepConfig):
    """(loss, metrics, grads) of one global batch; exact whatever the chunking."""
    q_layout, p_layout = layouts
    need_ntp = cfg.objective != "contrastive"
    need_nce = cfg.objective != "gic"
    lam = _lambda(cfg)
    w_q, w_p = losses.ntp_token_weights([batch["query"]["label_mask"], batch["positive"]["label_mask"]],
                                        reduction=cfg.ntp_reduction, chunk_size=cfg.ntp_chunk_size)
    b = batch["query"]["labels"].shape[0]
    chunk = cfg.chunk_size or b
    if b % chunk:
        raise ValueError(f"global batch {b} is not a multiple of the chunk size {chunk}")
    n = b // chunk

    def sides_forward(p, sub, key_i, logits, features=None, keep_features=False):
        """(query embeddings, positive embeddings, (model, NTP outputs), vision features by side): the vision
        tower runs here unless `features` holds the sides' features; `keep_features` returns them."""
        model = _merge(graphdef, p, frozen, key_i)
        if keep_features:
            features = {s: model.backbone.vision_features(sub[s]["inputs"]) for s in ("query", "positive")}
            features = {s: f for s, f in features.items() if f is not None}
        features = features or {}
        q_emb, q_out = _side(model, sub["query"], q_layout, cfg, logits, features.get("query"))
        p_emb, p_out = _side(model, sub["positive"], p_layout, cfg, logits, features.get("positive"))
        return q_emb, p_emb, (model, q_out, p_out), features

    def ntp_part(sub, out, wq, wp):
        if not need_ntp:
            return jnp.float32(0.0)
        model, q_out, p_out = out
        return _ntp_sum(model, q_out, sub["query"], wq, cfg) + _ntp_sum(model, p_out, sub["positive"], wp, cfg)

    if n == 1:
        def full_loss(p):
            q_emb, p_emb, out, _ = sides_forward(p, batch, key, need_ntp)
            nce = losses.info_nce(q_emb, p_emb, temperature=cfg.temperature, symmetric=cfg.symmetric) \
                if need_nce else jnp.float32(0.0)
            ntp = ntp_part(batch, out, w_q, w_p)
            return nce + lam * ntp, (nce, ntp)

        (loss, (nce, ntp)), grads = jax.value_and_grad(full_loss, has_aux=True)(params)
    else:
        keys = jax.random.split(key, n)
        nce, g_q, g_p, vision = jnp.float32(0.0), None, None, None
        # The gradient pass may reuse the embedding pass's vision features when no parameter of the tower trains.
        keep_vision = need_nce and cfg.cache_vision_features and not _vision_trains(params)
        if need_nce:
            def embed_chunk(_, i):
                q_emb, p_emb, _, features = sides_forward(params, _chunk(batch, i, n), keys[i], False,
                                                          keep_features=keep_vision)
                return None, (q_emb, p_emb, features)

            _, (q_embs, p_embs, vision) = jax.lax.scan(embed_chunk, None, jnp.arange(n))  # [N, C, D]
            unchunk = lambda e: e.transpose(1, 0, 2).reshape(b, -1)  # row j*N+i <- chunk i, row j  # noqa: E731
            q_all, p_all = jax.lax.stop_gradient(unchunk(q_embs)), jax.lax.stop_gradient(unchunk(p_embs))
            nce, (g_q, g_p) = jax.value_and_grad(
                lambda q, p: losses.info_nce(q, p, temperature=cfg.temperature, symmetric=cfg.symmetric),
                argnums=(0, 1))(q_all, p_all)
        weights = {"q": w_q, "p": w_p, "gq": g_q, "gp": g_p}

        def grad_chunk(acc, i):
            sub = _chunk(batch, i, n)
            w = _chunk({k: v for k, v in weights.items() if v is not None}, i, n)
            features = jax.tree.map(lambda f: f[i], vision) if vision else None  # [N, C, M, D] -> chunk i

            def surrogate(p):
                q_emb, p_emb, out, _ = sides_forward(p, sub, keys[i], need_ntp, features)
                s = jnp.float32(0.0)
                if need_nce:
                    s = jnp.sum(q_emb * w["gq"]) + jnp.sum(p_emb * w["gp"])
                ntp = ntp_part(sub, out, w["q"], w["p"])
                return s + lam * ntp, ntp

            (_, ntp_i), g = jax.value_and_grad(surrogate, has_aux=True)(params)
            grads, ntp = acc
            return (jax.tree.map(jnp.add, grads, g), ntp + ntp_i), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
        (grads, ntp), _ = jax.lax.scan(grad_chunk, (zeros, jnp.float32(0.0)), jnp.arange(n))
        loss = nce + lam * ntp
    metrics = {"loss": loss, "info_nce": nce, "ntp": ntp, "ntp_weight": lam}
    return loss, metrics, grads


# The Hugging Face Trainer's `get_decay_parameter_names`: no decay for parameters of `nn.LayerNorm` modules
# (the vision tower's norm1 / norm2, the merger's ln_q, the v2 head's layer_norm) nor for names matching
# these patterns.
_NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
_LAYERNORM_MODULES = re.compile(r"(?:^|\.)(?:visual\.(?:blocks\.\d+\.norm[12]|merger\.ln_q)\.|head\.norm_)")


def decays(path: str) -> bool:
    """Whether AdamW decays the parameter at a dotted NNX path, by the Trainer's rule: everything but biases
    and norm weights, so DoRA magnitudes, LoRA matrices and the BToks all decay."""
    return not (_NO_DECAY_NAMES.search(path) or _LAYERNORM_MODULES.search(path))


def weight_decay_mask(params):
    """bool per leaf of a parameter tree: `decays` of its path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decays(jax.tree_util.keystr(path, simple=True, separator=".")), params)


def make_optimizer(*, learning_rate: float = 5e-5, warmup_steps: int = 100, total_steps: int = 5000,
                   weight_decay: float = 0.01, clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8):
    """AdamW with linear warm-up then linear decay to 0 (the authors' schedule), global-norm clipping.
    Weight decay as the Hugging Face Trainer applies it (`weight_decay_mask`)."""
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
         optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1))], [warmup_steps])
    tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask))
    return tx, schedule


def train_step(state: TrainState, frozen, batch, *, graphdef, layouts, cfg: StepConfig, tx, schedule: Callable):
    """One optimizer step. Returns (new state, metrics).

    A step whose loss, gradient or update is not finite (NaN or inf anywhere: the global norms are) is not
    applied: the parameters and the optimizer state (its step count, hence the schedule's position, included,
    as `optax.apply_if_finite` does) stay as they were, and `metrics["skipped_update"]` is 1. `state.step`, the
    count of batches seen, advances either way, so the RNG keys stay those of the data's steps. The choice is a
    `jnp.where` on one finite flag rather than `optax.apply_if_finite` (whose extra optimizer state would change
    the checkpoint layout) or a `lax.cond`: one compiled program, no branch, and an exact pass-through of the
    update when it is finite.
    """
    key = jax.random.fold_in(state.rng, state.step)
    _, metrics, grads = loss_and_grads(graphdef, state.params, frozen, batch, layouts, key, cfg)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   skipped_update=jnp.where(finite, 0.0, 1.0).astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def init_state(params, tx, seed: int) -> TrainState:
    """Optimizer state is created under jit so it inherits the parameters' shardings."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    replicated = sharding.replicated(mesh)
    # jit, not device_put: in a multi-process run the mesh spans devices this process cannot address.
    opt_state = jax.jit(tx.init)(params)
    opt_state = jax.tree.map(lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
                             else jax.jit(lambda y: y, out_shardings=replicated)(x), opt_state)
    step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32), jax.random.key(seed)), out_shardings=replicated)()
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def compile_step(*, graphdef, layouts, cfg: StepConfig, tx, schedule, state: TrainState, frozen, batch, mesh,
                 rules=sharding.DEFAULT_RULES):
    """The jitted step with explicit in/out shardings (the batch's from `rules`, as the trainer places it) and
    the state donated."""
    from functools import partial

    state_sh = jax.tree.map(lambda x: x.sharding, state)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    step = partial(train_step, graphdef=graphdef, layouts=layouts, cfg=cfg, tx=tx, schedule=schedule)
    return jax.jit(step, in_shardings=(state_sh, frozen_sh, sharding.batch_shardings(batch, mesh, rules)),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
