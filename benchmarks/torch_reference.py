"""The BToks joint training step in PyTorch with `transformers`, in the authors' two-pass formulation.

What btoks-jax computes in one masked pass over `[Q | B | T]`, the reference code computes in two: the query side
`[Q ; B]` is encoded with a KV cache, every layer's cache is cut to the K BTok entries, and the target T runs on that
K-entry cache at positions offset by the real tokens of `[Q ; B]`. The embedding of each side is the mean of its K
BToks' final states; the loss is InfoNCE (query -> positive over the batch) + lambda x the target's next-token loss;
then backward, gradient-norm clipping and `torch.optim.AdamW` with the linear warm-up / decay schedule.

The model is a Hugging Face `Qwen2VLForConditionalGeneration` with the K BTok vectors as a separate parameter that
replaces the BTok columns' input embeddings and, with tied embeddings, the `<|btok_i|>` rows of the output table (the
authors' BToks are rows of the tied vocabulary table; only those K rows train). LoRA adapters (`LoRALinear`,
`y = x W + b + s (x A) B`, A [in, r], B [r, out] as btoks-jax stores them) sit on the decoder projections; no
dropout, no DoRA. Inputs are the arrays of a batch packed by `btoks_jax.inputs.pack` (`from_packed`), so both
implementations read exactly the same tokens, padding and positions.

Legend: B batch, Q query region, K BToks, Lt target region, D width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn


def hf_model(config, *, seed: int = 0, attn_implementation: str = "sdpa"):
    """A float32 `Qwen2VLForConditionalGeneration` with random weights from a btoks-jax `Qwen2VLConfig`."""
    torch.manual_seed(seed)
    hf_config = transformers.Qwen2VLConfig(**config.to_hf_dict())
    for c in (hf_config, hf_config.text_config, hf_config.vision_config):
        c._attn_implementation = attn_implementation
    return transformers.Qwen2VLForConditionalGeneration(hf_config).eval()


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a LoRA adapter: y = base(x) + scale * (x @ A) @ B."""

    def __init__(self, base: nn.Linear, a: np.ndarray, b: np.ndarray, scale: float):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.from_numpy(np.array(a, np.float32)))
        self.b = nn.Parameter(torch.from_numpy(np.array(b, np.float32)))
        self.scale = scale

    def forward(self, x):
        return self.base(x) + ((x @ self.a) @ self.b) * self.scale


def attach_lora(hf, adapters: dict[str, tuple[np.ndarray, np.ndarray]], scale: float) -> list[nn.Parameter]:
    """Replaces the decoder projections named `model.layers.{i}.{self_attn|mlp}.{name}` in `adapters` by
    `LoRALinear`s holding the given (A, B); returns the adapter parameters."""
    layers = hf.model.language_model.layers
    params = []
    for path, (a, b) in adapters.items():
        _, _, i, block, name = path.split(".")
        owner = getattr(layers[int(i)], block)
        lora = LoRALinear(getattr(owner, name), a, b, scale)
        setattr(owner, name, lora)
        params += [lora.a, lora.b]
    return params


class BToksTorch(nn.Module):
    """The authors' formulation of the BToks model around a Hugging Face Qwen2-VL."""

    def __init__(self, hf, btoks: np.ndarray, btok_ids: Sequence[int] | None):
        super().__init__()
        self.hf = hf
        self.btoks = nn.Parameter(torch.from_numpy(np.array(btoks, np.float32)))  # [K, D]
        self.register_buffer("btok_ids", torch.tensor(list(btok_ids or []), dtype=torch.long), persistent=False)
        self.num_btoks = self.btoks.shape[0]

    @property
    def text(self):
        return self.hf.model.language_model

    def _embed(self, ids: torch.Tensor, btok_at: int | None) -> torch.Tensor:
        """Token embeddings [B, L, D], the K columns from `btok_at` on replaced by the BTok vectors."""
        embeds = self.text.embed_tokens(ids)
        if btok_at is None:
            return embeds
        k = self.num_btoks
        btoks = self.btoks[None].expand(ids.shape[0], k, -1)
        return torch.cat([embeds[:, :btok_at], btoks, embeds[:, btok_at + k:]], dim=1)

    def encode(self, ids, attention_mask, position_ids, *, use_cache: bool):
        """Pass 1 on a left-padded `[X ; B]`: (final hidden states [B, L, D], the KV cache or None)."""
        cache = transformers.DynamicCache(config=self.text.config) if use_cache else None
        out = self.text(inputs_embeds=self._embed(ids, ids.shape[1] - self.num_btoks), attention_mask=attention_mask,
                        position_ids=position_ids, cache=cache, use_cache=use_cache)
        return out.last_hidden_state, out.cache if use_cache else None

    def embedding(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32[B, D]: the mean of the K BToks' final states (the last K columns), L2-normalised."""
        return F.normalize(hidden[:, -self.num_btoks:].mean(1), dim=-1)

    def truncate(self, cache) -> transformers.DynamicCache:
        """Every layer's cache cut to its last K entries: the BToks (the authors' `generation_kv_mode`)."""
        kept = transformers.DynamicCache(config=self.text.config)
        k = self.num_btoks
        for i, layer in enumerate(cache.layers):
            kept.update(layer.keys[:, :, -k:], layer.values[:, :, -k:], i)
        return kept

    def output_table(self) -> torch.Tensor:
        """[V, D]: the tied head, its `<|btok_i|>` rows being the BTok vectors; or the untied lm_head."""
        if not self.hf.config.tie_word_embeddings:
            return self.hf.lm_head.weight
        table = self.text.embed_tokens.weight
        if len(self.btok_ids):
            table = table.index_copy(0, self.btok_ids, self.btoks.to(table.dtype))
        return table

    def target_logits(self, cache, target_ids, target_positions) -> torch.Tensor:
        """Pass 2: the target on the K-entry cache; float32 logits [B, Lt, V]."""
        out = self.text(inputs_embeds=self._embed(target_ids, None), position_ids=target_positions, cache=cache,
                        use_cache=True)
        return (out.last_hidden_state @ self.output_table().T).float()


def from_packed(query, positive) -> dict[str, torch.Tensor]:
    """The torch inputs of the two passes from a btoks-jax batch (`PackedBatch` of each side, text only): the
    left-padded `[X ; B]` tokens, their mask and M-RoPE positions; the query side's target tokens, positions,
    labels and label mask. The positive side must carry no target region (it generates nothing here)."""
    if positive.layout.target_len:
        raise ValueError("the reference step generates the positive's text from the query side only")

    def t(x, dtype=torch.long):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(x))).to(dtype)

    qb = query.layout.query_len + query.layout.num_btoks
    pb = positive.layout.query_len + positive.layout.num_btoks
    qi, pi = query.inputs, positive.inputs
    return {"q_ids": t(qi.input_ids[:, :qb]), "q_mask": t(qi.segment_ids[:, :qb]),
            "q_pos": t(qi.positions[:, :, :qb]), "t_ids": t(qi.input_ids[:, qb:]), "t_pos": t(qi.positions[:, :, qb:]),
            "labels": t(query.labels), "label_mask": t(query.label_mask, torch.bool),
            "p_ids": t(pi.input_ids[:, :pb]), "p_mask": t(pi.segment_ids[:, :pb]), "p_pos": t(pi.positions[:, :, :pb])}


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Query -> positive over the batch, every other positive a negative (inputs already normalised)."""
    logits = q @ p.T / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def ntp_loss(logits, labels, label_mask, *, reduction: str = "chunk_token_mean", chunk_size: int = 8):
    """The next-token loss over the scored target tokens. "chunk_token_mean": the authors' GradCache form, a token
    mean inside every chunk of `chunk_size` samples weighted by (generating samples in the chunk) / batch;
    "sample_mean": each generating sample's token mean, averaged over the generating samples."""
    b = logits.shape[0]
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    mask = label_mask.float()
    if reduction == "sample_mean":
        per = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
        gen = (mask.sum(1) > 0).float()
        return (per * gen).sum() / gen.sum().clamp(min=1)
    if reduction != "chunk_token_mean":
        raise ValueError(f"unknown reduction {reduction!r}")
    total = logits.new_zeros(())
    for c in range(0, b, chunk_size):
        m = mask[c:c + chunk_size]
        gen = (m.sum(1) > 0).sum()
        total = total + (nll[c:c + chunk_size] * m).sum() / m.sum().clamp(min=1) * gen / b
    return total


def joint_loss(model: BToksTorch, batch, *, temperature: float = 0.02, ntp_weight: float = 5.0,
               reduction: str = "chunk_token_mean", chunk_size: int = 8):
    """(loss, InfoNCE, NTP) of one batch: the query side in two passes (cache, cut to the BToks, target), the
    positive side in one."""
    q_hidden, cache = model.encode(batch["q_ids"], batch["q_mask"], batch["q_pos"], use_cache=True)
    p_hidden, _ = model.encode(batch["p_ids"], batch["p_mask"], batch["p_pos"], use_cache=False)
    nce = info_nce(model.embedding(q_hidden), model.embedding(p_hidden), temperature)
    logits = model.target_logits(model.truncate(cache), batch["t_ids"], batch["t_pos"])
    ntp = ntp_loss(logits, batch["labels"], batch["label_mask"], reduction=reduction, chunk_size=chunk_size)
    return nce + ntp_weight * ntp, nce, ntp


def make_optimizer(params, *, learning_rate: float = 5e-5, warmup_steps: int = 100, total_steps: int = 5000,
                   weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """AdamW with linear warm-up from 0 then linear decay to 0 (what `btoks_jax.train_step.make_optimizer` builds).
    Every parameter given decays (adapters and BToks do under the Hugging Face Trainer's rule)."""
    opt = torch.optim.AdamW(params, lr=learning_rate, betas=(b1, b2), eps=eps, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(warmup_steps, 1)
        return max(0.0, 1.0 - (step - warmup_steps) / max(total_steps - warmup_steps, 1))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_step(model: BToksTorch, batch, params, opt, schedule, *, clip_norm: float = 1.0, **loss_kw) -> dict:
    """One optimizer step: the joint loss, backward, global-norm clipping, AdamW, the schedule. Returns the
    metrics as floats (the loss is the one before the update)."""
    opt.zero_grad(set_to_none=True)
    loss, nce, ntp = joint_loss(model, batch, **loss_kw)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
    opt.step()
    schedule.step()
    return {"loss": loss.item(), "info_nce": nce.item(), "ntp": ntp.item(), "grad_norm": norm.item()}


__all__ = ["BToksTorch", "LoRALinear", "attach_lora", "from_packed", "hf_model", "joint_loss", "make_optimizer",
           "ntp_loss", "train_step", "info_nce"]
