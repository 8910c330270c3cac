"""Export of a BToksModel to a Hugging Face Qwen2-VL directory (local or `gs://`): adapters merged, BToks as
vocabulary rows, streamed."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from btoks_jax import fs
from btoks_jax.convert import names
from btoks_jax.convert.hf_import import abstract_model, path_str
from btoks_jax.lora import LoRAParam
from btoks_jax.model.layers import Linear
from btoks_jax.model_config import ENDOFTEXT_ID, IM_END_ID, Qwen2VLConfig
from btoks_jax.processing.image import ImageProcessor
from btoks_jax.processing.tokenizer import add_btok_tokens, btok_token, load_tokenizer, save_tokenizer
from btoks_jax.processing.video import VideoProcessor

# Export dtype name -> (array dtype, safetensors dtype tag).
DTYPES = {"float32": (jnp.float32, "F32"), "bfloat16": (jnp.bfloat16, "BF16"), "float16": (jnp.float16, "F16")}
EMBED_KEY = "model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class _Weight:
    """One checkpoint tensor: its key, final HF shape, and how to bring it to the host (HF layout, export dtype)."""

    key: str
    shape: tuple[int, ...]
    fetch: Callable[[], np.ndarray]


def _natural(key: str) -> list:
    # re.split with a group alternates text / digits, so element types line up between any two keys.
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", key))]


def _base_weights(backbone) -> list[tuple[str, str, str, nnx.Variable]]:
    """(checkpoint key, NNX path, layout, variable) of every base weight, adapters excluded, in natural key order."""
    state = nnx.state(backbone, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
    rows = []
    for p, variable in nnx.to_flat_state(state):
        path = path_str(p)
        key, layout = names.path_to_hf(path)
        rows.append((key, path, layout, variable))
    return sorted(rows, key=lambda r: _natural(r[0]))


def hf_state_dict_keys(config: Qwen2VLConfig) -> list[str]:
    """The checkpoint keys an export of a model with this config writes (`lm_head.weight` only when untied)."""
    return [key for key, *_ in _base_weights(abstract_model(config))]


def _conv_shape(config: Qwen2VLConfig) -> tuple[int, ...]:
    v = config.vision_config
    return (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


def _owner(root, path: str):
    """The module that holds the parameter at `path` (e.g. the Linear of `...q_proj.kernel`)."""
    module = root
    for part in path.split(".")[:-1]:
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _to_host(value: jax.Array, dtype) -> np.ndarray:
    """One tensor, cast on its device (round-to-nearest-even, as torch's `.to`) and gathered to the host."""
    if not value.is_fully_addressable:
        raise ValueError("export_hf gathers each tensor into this process; parameters spread over several "
                         "processes (multi-host) are not supported: export from a single-process restore")
    return np.asarray(jax.device_get(value.astype(dtype)))


def _device_value(backbone, path: str, variable: nnx.Variable) -> jax.Array:
    """The parameter as the model computes with it: LoRA / DoRA folded into a decoder kernel, on the device."""
    owner = _owner(backbone, path)
    if isinstance(owner, Linear) and path.endswith(".kernel") and owner.lora is not None:
        return owner.lora.merged_kernel(owner)
    return variable.get_value()


def _plan(model, dtype, btok_ids: list[int], vocab: int) -> list[_Weight]:
    """Every tensor to write, with its final shape; nothing is fetched yet."""
    backbone = model.backbone
    conv_shape = _conv_shape(backbone.config)
    plan = []
    for key, path, layout, variable in _base_weights(backbone):
        shape = tuple(names.expected_hf_shape(variable.get_value().shape, layout, conv_shape))
        if key in (EMBED_KEY, HEAD_KEY):
            # The BTok rows go into the input embedding; a tied head is that same matrix, so it follows.
            rows = (btok_ids, model.btoks.get_value()) if key == EMBED_KEY and btok_ids else None
            plan.append(_Weight(key, (vocab, shape[1]), _vocab_fetch(backbone, path, layout, variable, dtype,
                                                                     rows, vocab)))
        else:
            plan.append(_Weight(key, shape, _fetch(backbone, path, layout, variable, dtype, shape)))
    return plan


def _fetch(backbone, path, layout, variable, dtype, shape):
    def fetch():
        return names.to_hf_layout(_to_host(_device_value(backbone, path, variable), dtype), layout, shape)

    return fetch


def _vocab_fetch(backbone, path, layout, variable, dtype, rows, vocab):
    """A [V, D] table (embedding, or the head's transposed kernel) grown to `vocab` rows, BTok rows written in.

    New rows (only when the BTok ids lie past the vocabulary) start as the mean row, as transformers'
    `resize_token_embeddings` does by default.
    """

    def fetch():
        value = _device_value(backbone, path, variable)
        vocab_axis = 1 if layout == "linear" else 0  # the head kernel is [D, V], the embedding [V, D]
        table = names.to_hf_layout(_to_host(value, dtype), layout)
        if table.shape[0] < vocab:
            out = np.empty((vocab, table.shape[1]), table.dtype)
            out[: table.shape[0]] = table
            out[table.shape[0]:] = _to_host(value.astype(jnp.float32).mean(vocab_axis), dtype)
        else:
            # Never written in place: on CPU the fetched array may share memory with the model's parameter.
            out = np.array(table) if rows is not None else table
        if rows is not None:
            ids, vectors = rows
            out[np.asarray(ids)] = _to_host(vectors, dtype)
        return out

    return fetch


def _shards(plan: list[_Weight], itemsize: int, max_shard_size: int) -> list[list[_Weight]]:
    """Greedy, in key order; a tensor larger than the limit gets a shard of its own (as transformers does)."""
    shards, size = [[]], 0
    for w in plan:
        n = itemsize * int(np.prod(w.shape, dtype=np.int64))
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(w)
        size += n
    return shards


def _write_safetensors(path: str, weights: list[_Weight], dtype, tag: str, progress) -> None:
    """Header first (all offsets follow from the shapes), then one tensor at a time straight into the file (a local
    file, or an object in a bucket uploaded as it grows)."""
    itemsize = np.dtype(dtype).itemsize
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for w in weights:
        n = itemsize * int(np.prod(w.shape, dtype=np.int64))
        header[w.key] = {"dtype": tag, "shape": list(w.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the safetensors writer aligns the data section to 8 bytes
    with fs.open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for w in weights:
            array = w.fetch()
            if tuple(array.shape) != w.shape or array.dtype != np.dtype(dtype):
                raise ValueError(f"{w.key}: produced {array.dtype}{list(array.shape)}, planned {tag}{list(w.shape)}")
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
            del array
            progress.update(1)
        f.flush()
        if not fs.is_remote(path):
            os.fsync(f.fileno())


def _hf_config(config: Qwen2VLConfig, vocab: int, dtype: str) -> dict:
    out = config.to_hf_dict()
    out["text_config"]["vocab_size"] = vocab
    # What transformers 5.x writes for the vision tower; `from_hf_config` reads the theta back.
    out["vision_config"]["rope_parameters"] = {"rope_type": "axial", "rope_theta": config.vision_config.rope_theta}
    out["dtype"] = dtype
    return out


GENERATION_CONFIG = {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
                     "pad_token_id": ENDOFTEXT_ID}


def _check_processor(name: str, processor, config: Qwen2VLConfig) -> None:
    v = config.vision_config
    want = {"patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "merge_size": v.spatial_merge_size}
    got = {k: getattr(processor, k) for k in want}
    if got != want:
        raise ValueError(f"{name} patch geometry {got} does not match the vision config {want}")


CARD_PLACEHOLDER_DIR = "path/to/this/model"  # the snippet's model_dir; users put theirs

_CARD_SNIPPET_BTOKS = '''\
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

model_dir = "{model_dir}"
model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype="auto").eval()
processor = AutoProcessor.from_pretrained(model_dir)
K = {k}
BTOKS = "".join(f"<|btok_{{i}}|>" for i in range(K))  # {btoks_text}


@torch.no_grad()
def embed(texts, images=None, videos=None):
    """L2-normalised embeddings float32[B, {hidden}]: the mean of the K BToks' last hidden states."""
    batch = processor(text=[t + BTOKS for t in texts], images=images, videos=videos,
                      padding=True, padding_side="right", return_tensors="pt")
    hidden = model.model(**batch).last_hidden_state  # [B, T, D], after the final RMSNorm
    end = batch["attention_mask"].sum(1)  # right padding: each row's BToks end here
    cols = end[:, None] - torch.arange(K, 0, -1)  # [B, K] the BTok positions
    vectors = hidden[torch.arange(len(texts))[:, None], cols].float().mean(1)
    return F.normalize(vectors, dim=-1)
'''

_CARD_SNIPPET_LAST = '''\
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

model_dir = "{model_dir}"
model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype="auto").eval()
processor = AutoProcessor.from_pretrained(model_dir)


@torch.no_grad()
def embed(texts, images=None, videos=None):
    """L2-normalised embeddings float32[B, {hidden}]: the last real token's last hidden state."""
    batch = processor(text=list(texts), images=images, videos=videos,
                      padding=True, padding_side="right", return_tensors="pt")
    hidden = model.model(**batch).last_hidden_state  # [B, T, D], after the final RMSNorm
    last = batch["attention_mask"].sum(1) - 1  # right padding: each row's last real token
    vectors = hidden[torch.arange(len(texts)), last].float()
    return F.normalize(vectors, dim=-1)
'''

_CARD_USAGE = '''\
queries = embed(["<|vision_start|><|image_pad|><|vision_end|>Represent the given image.\\n"], images=[image])
docs = embed(["A photo of a dog.", "A photo of a cat."])
scores = queries @ docs.T  # cosine similarities
'''

def model_card(config: Qwen2VLConfig, num_btoks: int, btok_ids: list[int], dtype: str,
               source_note: str | None = None) -> str:
    """README.md: what the checkpoint is and how to embed with plain transformers (the first python block)."""
    hidden = config.text_config.hidden_size
    if num_btoks:
        snippet = _CARD_SNIPPET_BTOKS.format(model_dir=CARD_PLACEHOLDER_DIR, k=num_btoks, hidden=hidden,
                                             btoks_text=f"token ids {btok_ids[0]}..{btok_ids[-1]}")
        method = (f"Embeddings are read from **{num_btoks} bottleneck tokens** (BToks), `{btok_token(0)}`.."
                  f"`{btok_token(num_btoks - 1)}` (ids {btok_ids[0]}..{btok_ids[-1]}), whose learned vectors are "
                  "the embedding rows at those ids:\n\n"
                  "1. append the K BTok tokens right after the last real token of every input (no chat template, "
                  "no EOS), and pad on the **right** so that positions continue from the last real token;\n"
                  "2. run the model once and take the last hidden states (after the final RMSNorm) of the K BToks: "
                  "`model.model(...).last_hidden_state`;\n"
                  "3. average them and L2-normalise.")
    else:
        snippet = _CARD_SNIPPET_LAST.format(model_dir=CARD_PLACEHOLDER_DIR, hidden=hidden)
        method = ("This checkpoint has no bottleneck tokens (K = 0): embeddings are **last-token pooled**. Pad on "
                  "the **right** (no chat template, no EOS), take the last hidden state (after the final RMSNorm) "
                  "of each row's last real token, `model.model(...).last_hidden_state`, and L2-normalise.")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: feature-extraction",
        "tags: [qwen2_vl, embeddings, multimodal-retrieval, bottleneck-tokens, btoks-jax]",
        "---",
        "",
        "# Qwen2-VL multimodal embedding model" + (" with Bottleneck Tokens" if num_btoks else ""),
        "",
        ("A unified multimodal retrieval model (text, images, videos, visual documents) in the format of "
         "\"Bottleneck Tokens for Unified Multimodal Retrieval\", exported by btoks-jax as a plain "
         "`Qwen2VLForConditionalGeneration` checkpoint (LoRA / DoRA adapters merged into the weights, "
         f"tensors in {dtype}, embedding width {hidden})."),
        "",
    ]
    if source_note:
        lines += [f"Source: {source_note}", ""]
    lines += [
        "## Embedding with transformers",
        "",
        method,
        "",
        ("Where an image goes, write `<|vision_start|><|image_pad|><|vision_end|>`; for a video "
         "`<|vision_start|><|video_pad|><|vision_end|>`. Queries and candidates are embedded the same way and "
         "scored by cosine similarity (a dot product of the normalised vectors). `AutoProcessor` needs "
         "`torchvision` for its video processor."),
        "",
        "```python",
        snippet.rstrip("\n"),
        "```",
        "",
        "For example (`image` a PIL image):",
        "",
        "```python",
        _CARD_USAGE.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)


def _save_tokenizer_with_btoks(tokenizer, num_btoks: int, vocab_size: int, directory: str):
    """Saves the tokenizer with `<|btok_i|>` added; returns (their ids, the exported vocabulary size).

    The tokens are added to a copy read back from `directory`, so the caller's tokenizer is not changed (a
    deepcopy of a fast tokenizer costs seconds, the save and load a fraction of that).
    """
    save_tokenizer(tokenizer, directory)
    if not num_btoks:
        return [], vocab_size
    copy = load_tokenizer(directory)
    ids = add_btok_tokens(copy, num_btoks)
    if ids != list(range(ids[0], ids[0] + num_btoks)):
        raise ValueError(f"the tokenizer gives <|btok_i|> ids {ids}, which are not consecutive")
    save_tokenizer(copy, directory)
    return ids, max(vocab_size, ids[-1] + 1)


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if fs.exists(out_dir):
        if not fs.isdir(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if fs.listdir(out_dir) and not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace it")


# Written last when a directory in a bucket is published (loaders read it first): see `fs.publish_dir`.
PUBLISH_LAST = ("config.json",)


def export_hf(model, out_dir: str | os.PathLike, *, tokenizer, image_processor: ImageProcessor | None = None,
              video_processor: VideoProcessor | None = None, dtype: str = "float32", max_shard_size: int = 5 * 2**30,
              progress: bool = True, source_note: str | None = None, overwrite: bool = False,
              extra_files: Mapping[str, str] | None = None) -> str:
    """Writes `model` (a `BToksModel`) as a Hugging Face Qwen2-VL directory and returns its path.

    The directory holds config.json (vocabulary size updated), generation_config.json, preprocessor_config.json,
    video_preprocessor_config.json, the tokenizer with `<|btok_0|>`..`<|btok_{K-1}|>` added as special tokens,
    safetensors shards (each at most `max_shard_size` bytes unless one tensor is larger; an index when there are
    several) under the original on-disk key names, and a README.md model card. Adapters are merged into their
    kernels on the fly, so the model is not modified; nor is the tokenizer's vocabulary (the tokens are added to a
    copy). The K BTok vectors become the embedding rows at the `<|btok_i|>` ids; the vocabulary grows (new rows:
    the mean row) only if it cannot hold those ids. `video_processor` (default: transformers' class defaults) is
    written too, so that transformers and btoks_jax pick the same video pixel bounds.

    Tensors are cast on their device and fetched one at a time, then written straight into their shard, so the
    host holds about one tensor. Everything is written to a temporary directory next to `out_dir` and renamed at
    the end: a failure leaves `out_dir` as it was. A non-empty `out_dir` is refused unless `overwrite`.
    `extra_files` (name -> text) are written into the directory too, before it is published.

    `out_dir` may be a `gs://` URL: the shards are then uploaded as they are written, into a staging prefix next
    to `out_dir` (the small files are made in a local temporary folder and uploaded after them), and published
    with `fs.publish_dir`: copied server-side into `out_dir`, `config.json` last, the staging prefix removed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    out_dir = fs.absolute(os.fspath(out_dir))
    _check_out_dir(out_dir, overwrite)
    config = model.backbone.config
    image_processor = image_processor or ImageProcessor()
    video_processor = video_processor or VideoProcessor()
    _check_processor("image_processor", image_processor, config)
    _check_processor("video_processor", video_processor, config)
    array_dtype, tag = DTYPES[dtype]
    itemsize = np.dtype(array_dtype).itemsize

    stage = fs.staging_dir(out_dir)  # local: a new folder next to out_dir; a bucket: an unused prefix there
    remote = fs.is_remote(stage)
    # transformers' save_pretrained writes local folders only: in a bucket the small files are made here first.
    small = tempfile.mkdtemp(prefix="btoks-export-") if remote else stage
    try:
        btok_ids, vocab = _save_tokenizer_with_btoks(tokenizer, model.num_btoks, config.text_config.vocab_size,
                                                     small)
        if model.btok_ids is not None and list(model.btok_ids) != btok_ids:
            raise ValueError(f"the model's BToks are vocabulary rows {list(model.btok_ids)}, but the tokenizer gives "
                             f"<|btok_i|> the ids {btok_ids}: export with the tokenizer the model was trained with")
        plan = _plan(model, array_dtype, btok_ids, vocab)
        shards = _shards(plan, itemsize, max_shard_size)
        files = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        with tqdm(total=len(plan), desc="exporting weights", disable=not progress, unit="tensor") as bar:
            for name, shard in zip(files, shards):
                _write_safetensors(fs.join(stage, name), shard, array_dtype, tag, bar)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(itemsize * int(np.prod(w.shape)) for w in plan)},
                     "weight_map": {w.key: name for name, shard in zip(files, shards) for w in shard}}
            _write_json(os.path.join(small, INDEX_FILE), index)
        _write_json(os.path.join(small, "config.json"), _hf_config(config, vocab, dtype))
        _write_json(os.path.join(small, "generation_config.json"), GENERATION_CONFIG)
        image_processor.save_pretrained(small)
        video_processor.save_pretrained(small)
        card = model_card(config, model.num_btoks, btok_ids, dtype, source_note)
        if model.head is not None:
            _write_head(model.head, small)
            card += HEAD_CARD
        with open(os.path.join(small, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(small, name), "w", encoding="utf-8") as f:
                f.write(text)
        if remote:
            fs.copy_tree(small, stage)
        fs.publish_dir(stage, out_dir, last=PUBLISH_LAST)
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one to report
            fs.rmtree(stage)
        raise
    finally:
        if remote:
            shutil.rmtree(small, ignore_errors=True)
    return out_dir


HEAD_WEIGHTS = "btoks_head.safetensors"
HEAD_CONFIG = "btoks_head.json"
HEAD_CARD = f"""
## The pooling head (v2)

This model pools the BToks with a learned attention head instead of their mean: `{HEAD_WEIGHTS}` holds its
float32 weights under the names of `BToksAttentionPooling` (`attention`, `mlp.0`, `mlp.3`, `layer_norm`, torch
layout) and `{HEAD_CONFIG}` its settings. With `h` the K BToks' last hidden states, float[B, K, D]:
`a = softmax_K(attention(h) / sqrt(D))`, `x = sum_K a * h`, `e = layer_norm(x + mlp(x))` with
`mlp = Linear, GELU, Dropout, Linear, Dropout` (dropout off at inference), then L2-normalise `e`.
`btoks_jax.from_pretrained` loads the head with the model.
"""


def _write_head(head, directory: str) -> None:
    """The pooling head as float32 safetensors under the authors' module names, and its settings."""
    import dataclasses as dc

    from safetensors.numpy import save_file

    save_file({k: np.asarray(jax.device_get(v), np.float32) for k, v in head.torch_state_dict().items()},
              os.path.join(directory, HEAD_WEIGHTS))
    _write_json(os.path.join(directory, HEAD_CONFIG), {"kind": "attention", **dc.asdict(head.cfg)})


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


__all__ = ["CARD_PLACEHOLDER_DIR", "DTYPES", "HEAD_CONFIG", "HEAD_WEIGHTS", "export_hf", "hf_state_dict_keys",
           "model_card"]
