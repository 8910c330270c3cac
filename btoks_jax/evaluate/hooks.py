"""Evaluation hooks declared in the training config (`config.evals`), run every N steps.

    config.evals = [dict(name="emoji", data_dir=..., every=100, datasets=None, pooling="btoks",
                         batch_size=32, max_rows=None),
                    dict(name="train_pairs", kind="train_pairs", train_files=[...], image_root=..., every=100,
                         max_rows=128)]
Each hook embeds with the current weights (dropout off) through the same code as `btoks eval`. A
`train_pairs` hook ranks the positives of the first rows of training files among each other (global
ranking), which shows whether the model fits what it trains on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from btoks_jax.evaluate.run import evaluate_folder


@dataclasses.dataclass
class RetrievalHook:
    name: str
    data_dir: str
    every: int
    processor: Any
    meta: dict
    mesh: Any
    datasets: Sequence[str] | None = None
    pooling: str = "btoks"
    batch_size: int = 32
    max_rows: int | None = None
    at_end: bool = True

    def due(self, step: int, total: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or (self.at_end and step == total)

    def embed_fn(self, model):
        """Embeds with `model`'s current weights. One Embedder serves every call: its jitted functions take
        the model as an argument, so a later call with new weights of the same structure reuses them."""
        from btoks_jax.api import Embedder

        model.eval()
        if getattr(self, "_embedder", None) is None:
            self._embedder = Embedder.for_model(model, processor=self.processor,
                                                rope_convention=self.meta["rope_convention"],
                                                prompt_style=self.meta["prompt_style"],
                                                mesh=self.mesh if self.mesh.devices.size > 1 else None)
        embedder = self._embedder
        embedder.model = model
        return lambda items: embedder.embed_items(items, pooling=self.pooling, batch_size=self.batch_size,
                                                  progress=False)

    def __call__(self, model, step: int) -> dict[str, float]:
        summary = evaluate_folder(self.embed_fn(model), self.data_dir, datasets=self.datasets,
                                  batch_size=self.batch_size, progress=False, max_rows=self.max_rows)
        out = {f"{name}/hit@1": s["hit@1"] for name, s in summary["datasets"].items()}
        out["mean_hit@1"] = sum(out.values()) / len(out)
        return out


@dataclasses.dataclass
class TrainPairsHook(RetrievalHook):
    train_files: Sequence[str] = ()
    image_root: str | None = None

    def __post_init__(self):
        from btoks_jax.data.mmeb_train import read_mmeb_train
        from btoks_jax.evaluate.mmeb import EvalRow, Item

        def item(side):
            return Item(text=side.text, image=side.image, video=side.video)

        self.rows = {}
        for path in self.train_files:
            rows = read_mmeb_train(path, self.image_root, prompt_style="mmeb")[: self.max_rows or None]
            name = os.path.splitext(os.path.basename(path))[0]
            self.rows[name] = [EvalRow(query=item(r.query), candidates=(item(r.positive),), relevance=(1.0,))
                               for r in rows]

    def __call__(self, model, step: int) -> dict[str, float]:
        from btoks_jax.evaluate.mmeb import evaluate_dataset

        fn = self.embed_fn(model)
        out = {f"{name}/hit@1": evaluate_dataset(rows, fn, "global", self.batch_size, progress=False)["hit@1"]
               for name, rows in self.rows.items()}
        out["mean_hit@1"] = sum(out.values()) / len(out)
        return out


def make_hooks(evals, *, tokenizer, meta: dict, mesh) -> list[RetrievalHook]:
    from btoks_jax.processing import ImageProcessor, Processor

    hooks = []
    data_cfg = meta["config"]["data"]
    processor = Processor(tokenizer, ImageProcessor(min_pixels=data_cfg["image_min_pixels"],
                                                    max_pixels=data_cfg["image_max_pixels"]))
    for spec in evals or []:
        spec = dict(spec)
        kind = spec.pop("kind", "retrieval")
        if kind not in ("retrieval", "train_pairs"):
            raise ValueError(f"unknown evaluation kind {kind!r} in config.evals")
        cls = TrainPairsHook if kind == "train_pairs" else RetrievalHook
        hooks.append(cls(name=spec.pop("name"), data_dir=spec.pop("data_dir", ""), every=spec.pop("every"),
                         processor=processor, meta=meta, mesh=mesh, **spec))
    return hooks
