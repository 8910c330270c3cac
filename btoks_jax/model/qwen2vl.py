"""The composed Qwen2-VL model: vision features placed into the pad slots of the decoder input.

Mirrors `Qwen2VLForConditionalGeneration` (attribute names follow the on-disk checkpoint keys:
`visual`, `model`, `lm_head`). All shapes are static: tokens and patches are padded to budgets.

Legend: B batch, T sequence, D width, V vocab, M merged vision tokens per sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from btoks_jax.inputs import ModelInputs
from btoks_jax.model.layers import Linear
from btoks_jax.model.text import TextModel
from btoks_jax.model.vision import VisionTransformer
from btoks_jax.model_config import Qwen2VLConfig


class Qwen2VL(nnx.Module):
    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, remat=config.remat, rngs=rngs)
        self.visual = VisionTransformer(config.vision_config, **kw)
        self.model = TextModel(config.text_config, attention_impl=config.attention_impl, **kw)
        t = config.text_config
        self.lm_head = nnx.data(None if config.tie_word_embeddings else Linear(
            t.hidden_size, t.vocab_size, use_bias=False, axes=("embed", "vocab"), dtype=dtype,
            param_dtype=param_dtype, rngs=rngs))

    def vision_features(self, inputs: ModelInputs) -> jax.Array | None:
        """The merged vision features [B, M, D] of the batch's patches (the vision tower), None without patches."""
        if inputs.pixel_values is None or inputs.pixel_values.shape[1] == 0:
            return None
        return self.visual(inputs.pixel_values, inputs.patch_positions, inputs.patch_segment_ids)

    def embed_inputs(self, inputs: ModelInputs, features: jax.Array | None = None) -> jax.Array:
        """Token embeddings with the merged vision features scattered into the pad slots. [B, T, D].

        `features`: the batch's `vision_features`, computed before (the GradCache passes share them when the
        vision tower is frozen); by default the vision tower runs here."""
        embeds = self.model.embed(inputs.input_ids)  # [B, T, D]
        if features is None:
            features = self.vision_features(inputs)
        if features is None:
            return embeds
        index = jnp.clip(inputs.vision_index, 0, features.shape[1] - 1)
        placed = jnp.take_along_axis(features, index[..., None], axis=1)  # [B, T, D]
        return jnp.where((inputs.vision_index >= 0)[..., None], placed.astype(embeds.dtype), embeds)

    def decode(self, inputs_embeds: jax.Array, inputs: ModelInputs, static_mask: np.ndarray | None = None,
               start: int = 0):
        """Final (post-norm) hidden states float[B, T - start, D] of columns `start..` for given input embeddings
        (`TextModel.__call__`)."""
        return self.model(inputs_embeds, inputs.positions, inputs.segment_ids, static_mask, start)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float[B, T, V]; with tied embeddings the head is the embedding matrix."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        table = self.model.embed_tokens.value.astype(hidden.dtype)
        return jnp.einsum("btd,vd->btv", hidden, table)

    def __call__(self, inputs: ModelInputs, *, static_mask: np.ndarray | None = None, return_logits: bool = True):
        """Returns (hidden float[B, T, D], logits float[B, T, V] or None)."""
        hidden = self.decode(self.embed_inputs(inputs), inputs, static_mask)
        return hidden, (self.logits(hidden) if return_logits else None)
