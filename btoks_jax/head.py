"""The authors' v2 pooling head: learned attention over the K BToks, a residual MLP and a LayerNorm.

The main recipe embeds with the plain mean of the BToks' final states. The v2 variant (their
`btoks_qwen2vl_2b_v2` preset, `BToksAttentionPooling`) learns the pooling instead:

    a = softmax_K(score(h_k) / sqrt(D))        score: Linear(D -> 1), xavier-uniform weight, zero bias
    x = sum_k a_k h_k                          [B, D]
    e = LayerNorm(x + MLP(x))                  MLP: Linear(D -> r*D), GELU, dropout, Linear(r*D -> D), dropout

then L2-normalised like every embedding. The head trains in every mode (the authors save it with the
adapters). Its Linear layers start as torch's defaults (kaiming-uniform(a=sqrt(5)) weights, uniform
biases of bound 1/sqrt(fan_in)), the LayerNorm at weight 1, bias 0 (eps 1e-5).

Legend: B batch, K bottleneck tokens, D width, F = mlp_ratio * D.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


class HeadParam(nnx.Param):
    """Pooling-head weights: trained in every mode, LoRA included."""


@dataclasses.dataclass(frozen=True)
class AttentionPoolingConfig:
    mlp_ratio: float = 4.0  # the v2 model file's value (the class default is 2.0)
    dropout: float = 0.1
    attention_scale: bool = True
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default


def _uniform(key, shape, bound, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class AttentionPoolingHead(nnx.Module):
    def __init__(self, width: int, cfg: AttentionPoolingConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        hidden = int(width * cfg.mlp_ratio)
        self.cfg = cfg
        self.width = width

        def p(value, axes):
            return HeadParam(value, sharding_names=axes, eager_sharding=False)

        # Stored as [in, out] (torch's weight transposed), like every Linear of the model.
        xavier = math.sqrt(6.0 / (width + 1))
        self.score_kernel = p(_uniform(rngs.params(), (width, 1), xavier, param_dtype), (None, None))
        self.score_bias = p(jnp.zeros((1,), param_dtype), (None,))
        b_in, b_out = 1 / math.sqrt(width), 1 / math.sqrt(hidden)
        self.mlp_in_kernel = p(_uniform(rngs.params(), (width, hidden), b_in, param_dtype), (None, "mlp"))
        self.mlp_in_bias = p(_uniform(rngs.params(), (hidden,), b_in, param_dtype), ("mlp",))
        self.mlp_out_kernel = p(_uniform(rngs.params(), (hidden, width), b_out, param_dtype), ("mlp", None))
        self.mlp_out_bias = p(_uniform(rngs.params(), (width,), b_out, param_dtype), (None,))
        self.norm_weight = p(jnp.ones((width,), param_dtype), ("norm",))
        self.norm_bias = p(jnp.zeros((width,), param_dtype), ("norm",))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None

    def __call__(self, btoks: jax.Array) -> jax.Array:
        """btoks float[B, K, D] (the BToks' final states) -> float32[B, D], not normalised."""
        h = btoks.astype(jnp.float32)
        scores = h @ self.score_kernel.value.astype(jnp.float32) + self.score_bias.value  # [B, K, 1]
        if self.cfg.attention_scale:
            scores = scores / math.sqrt(self.width)
        x = jnp.sum(h * jax.nn.softmax(scores, axis=1), axis=1)  # [B, D]
        y = jax.nn.gelu(x @ self.mlp_in_kernel.value + self.mlp_in_bias.value, approximate=False)
        if self.dropout is not None:
            y = self.dropout(y)
        y = y @ self.mlp_out_kernel.value + self.mlp_out_bias.value
        if self.dropout is not None:
            y = self.dropout(y)
        z = x + y
        mean = z.mean(-1, keepdims=True)
        var = jnp.mean(jnp.square(z - mean), -1, keepdims=True)
        return (z - mean) * jax.lax.rsqrt(var + self.cfg.layer_norm_eps) * self.norm_weight.value + self.norm_bias.value

    def torch_state_dict(self) -> dict[str, jax.Array]:
        """The weights under the names of the authors' module (`attention`, `mlp.0`, `mlp.3`, `layer_norm`),
        torch's [out, in] layout."""
        return {"attention.weight": self.score_kernel.value.T, "attention.bias": self.score_bias.value,
                "mlp.0.weight": self.mlp_in_kernel.value.T, "mlp.0.bias": self.mlp_in_bias.value,
                "mlp.3.weight": self.mlp_out_kernel.value.T, "mlp.3.bias": self.mlp_out_bias.value,
                "layer_norm.weight": self.norm_weight.value, "layer_norm.bias": self.norm_bias.value}
