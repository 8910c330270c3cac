"""LoRA and DoRA adapters on the decoder's linear layers, and their merge into the base weights.

The authors' set: rank 16, alpha 32, dropout 0.05 on the language model's q/k/v/o and down
projections; the vision tower gets none. DoRA follows PEFT's formulation (the column norm of the
adapted weight is treated as a constant in the backward pass), so merged weights are
m * (W + s*A@B) / ||W + s*A@B||.

Legend: I input features, O output features, R rank.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from btoks_jax.model.layers import Linear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


class LoRAParam(nnx.Param):
    """Adapter weights: the only backbone parameters that train in LoRA mode."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    dora: bool = False
    targets: tuple[str, ...] = DEFAULT_TARGETS
    # How A starts (B is always 0, so the adapted layer starts as the base): "gaussian", N(0, 1/rank^2), what the
    # authors' PEFT config asks for (init_lora_weights="gaussian"); "kaiming", PEFT's default
    # kaiming-uniform(a=sqrt(5)).
    init: str = "gaussian"

    def __post_init__(self):
        if self.init not in ("gaussian", "kaiming"):
            raise ValueError(f"LoRA init must be 'gaussian' or 'kaiming', got {self.init!r}")


class LoRAAdapter(nnx.Module):
    def __init__(self, base: Linear, cfg: LoRAConfig, *, rngs: nnx.Rngs):
        i, o = base.kernel.shape
        dtype = base.kernel.value.dtype
        if cfg.init == "gaussian":  # PEFT: normal_(lora_A.weight, std=1 / r)
            a = jax.random.normal(rngs.params(), (i, cfg.rank), dtype) / cfg.rank
        else:  # PEFT's kaiming_uniform_(lora_A.weight, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(i)
            a = jax.random.uniform(rngs.params(), (i, cfg.rank), dtype, -bound, bound)
        self.a = LoRAParam(a,
                           sharding_names=(base.axes[0], "lora_rank"), eager_sharding=False)
        self.b = LoRAParam(jnp.zeros((cfg.rank, o), dtype), sharding_names=("lora_rank", base.axes[1]),
                           eager_sharding=False)
        self.scale = cfg.alpha / cfg.rank
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None
        self.magnitude = nnx.data(None)
        if cfg.dora:
            self.magnitude = LoRAParam(jnp.linalg.norm(base.kernel.value.astype(jnp.float32), axis=0).astype(dtype),
                                       sharding_names=(base.axes[1],), eager_sharding=False)

    def delta(self) -> jax.Array:
        """s * A @ B, float[I, O]."""
        return self.scale * (self.a.value @ self.b.value)

    def __call__(self, base: Linear, x: jax.Array) -> jax.Array:
        dt = base.dtype
        kernel = base.kernel.value.astype(dt)
        xd = self.dropout(x) if self.dropout is not None else x
        lora = jnp.einsum("...i,ir,ro->...o", xd.astype(dt), self.a.value.astype(dt), self.b.value.astype(dt))
        lora = lora * self.scale
        if self.magnitude is None:
            y = jnp.einsum("...i,io->...o", x.astype(dt), kernel) + lora
        else:
            adapted = base.kernel.value.astype(jnp.float32) + self.delta().astype(jnp.float32)
            norm = jax.lax.stop_gradient(jnp.linalg.norm(adapted, axis=0))
            m_scale = (self.magnitude.value.astype(jnp.float32) / norm).astype(dt)  # [O]
            base_y = jnp.einsum("...i,io->...o", x.astype(dt), kernel)
            # PEFT: x W + (m/|W'| - 1) * (dropout(x) W) + m/|W'| * lora; with no dropout, m/|W'| (x W + lora).
            dropped_y = base_y if xd is x else jnp.einsum("...i,io->...o", xd.astype(dt), kernel)
            y = base_y + (m_scale - 1) * dropped_y + m_scale * lora
        if base.bias is not None:
            y = y + base.bias.value.astype(dt)
        return y

    def merged_kernel(self, base: Linear) -> jax.Array:
        """The base kernel with the adapter folded in (same dtype as the base)."""
        adapted = base.kernel.value.astype(jnp.float32) + self.delta().astype(jnp.float32)
        if self.magnitude is not None:
            adapted = adapted * (self.magnitude.value.astype(jnp.float32) / jnp.linalg.norm(adapted, axis=0))
        return adapted.astype(base.kernel.value.dtype)


def _target_linears(backbone, targets):
    for i, layer in enumerate(backbone.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if name in targets:
                yield f"model.layers.{i}.self_attn.{name}", getattr(layer.self_attn, name)
        for name in ("gate_proj", "up_proj", "down_proj"):
            if name in targets:
                yield f"model.layers.{i}.mlp.{name}", getattr(layer.mlp, name)


def apply_lora(backbone, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> int:
    """Attaches adapters in place to the language model's target projections; returns how many."""
    n = 0
    for _, linear in _target_linears(backbone, cfg.targets):
        linear.lora = LoRAAdapter(linear, cfg, rngs=rngs)
        n += 1
    if not n:
        raise ValueError(f"no LoRA target found among {cfg.targets}")
    return n


def merge_lora(backbone) -> int:
    """Folds every adapter into its base kernel and detaches it (in place); returns how many."""
    n = 0
    for _, linear in _target_linears(backbone, DEFAULT_TARGETS + ("gate_proj", "up_proj")):
        if linear.lora is not None:
            linear.kernel.value = linear.lora.merged_kernel(linear)
            linear.lora = None
            n += 1
    return n
