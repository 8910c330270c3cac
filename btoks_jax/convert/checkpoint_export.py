"""`btoks export`: a btoks-jax checkpoint -> a Hugging Face directory that plain `transformers` loads.

Both may be local or `gs://` (e.g. `btoks export --checkpoint gs://B/run --out gs://B/export`)."""

from __future__ import annotations

import json

from btoks_jax import build, checkpoint, fs


def export_from_checkpoint(checkpoint_dir: str, out_dir: str, *, step: int | None = None, dtype: str = "float32",
                           max_shard_size: int = 5 * 2**30, overwrite: bool = False, progress: bool = True) -> str:
    """Restores `step` (default: the latest complete one) and exports it. Every check that can fail runs
    before anything is written, and the export itself is published atomically, so a missing, half-written
    or mismatched checkpoint leaves `out_dir` untouched."""
    from btoks_jax.convert.hf_export import export_hf
    from btoks_jax.processing import ImageProcessor, load_tokenizer

    if not fs.isdir(checkpoint_dir):
        raise checkpoint.CheckpointError(f"{checkpoint_dir}: no such checkpoint directory")
    if fs.exists(out_dir) and fs.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty (use --overwrite)")
    step, _ = checkpoint.read_meta(checkpoint_dir, step)  # clear errors for missing / incomplete steps
    model, meta = build.restore_model(checkpoint_dir, step=step)
    data = meta["config"]["data"]
    image_processor = ImageProcessor(min_pixels=data["image_min_pixels"], max_pixels=data["image_max_pixels"])
    tokenizer = load_tokenizer(meta.get("tokenizer_dir"))
    # transformers ignores this file; btoks_jax.from_pretrained reads it to prompt the way training did.
    from btoks_jax.api import EXPORT_SETTINGS

    settings = {"num_btoks": meta["num_btoks"], "prompt_style": meta["prompt_style"],
                "rope_convention": meta["rope_convention"], "pooling": "btoks" if meta["num_btoks"] else "last"}
    return export_hf(model, out_dir, tokenizer=tokenizer, image_processor=image_processor, dtype=dtype,
                     max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                     source_note=f"btoks-jax checkpoint, step {step}",
                     extra_files={EXPORT_SETTINGS: json.dumps(settings, indent=1)})
