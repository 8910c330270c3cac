"""The Python entry points: `from_pretrained` and an `Embedder` that embeds texts, images and videos.

    import btoks_jax
    model = btoks_jax.from_pretrained("path/to/hf_or_checkpoint_dir")
    out = model(**hf_processor_outputs_as_numpy)       # hidden_states, logits (the Qwen2-VL port)
    vectors = model.embed(["a cat"], images=[None])    # L2-normalised BToks embeddings

A directory is either a Hugging Face-format Qwen2-VL directory (with or without `<|btok_i|>`
rows, the authors' format) or a btoks-jax training workdir / checkpoint directory, local or in a
bucket (`gs://BUCKET/PATH`: weights are streamed from there, small tokenizer and processor files copied
to a temporary folder).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from btoks_jax import build, checkpoint, fs, sharding
from btoks_jax.btoks import BToksModel
from btoks_jax.convert.hf_import import hf_config
from btoks_jax.evaluate.mmeb import Item, ItemError
from btoks_jax.inputs import encode_target, pack, pack_hf_inputs
from btoks_jax.mask import Layout
from btoks_jax.model_config import IM_END_ID, Qwen2VLConfig
from btoks_jax.processing import (
    ImageProcessor,
    Processor,
    convert_mmeb_placeholders,
    load_tokenizer,
    sample_frame_indices,
)
from btoks_jax.processing.image import MediaError

log = logging.getLogger(__name__)

# Text tokens an item keeps (`Embedder.max_text_tokens`): vision pads, their <|vision_start|>/<|vision_end|>
# wrappers and every other special token are not counted and never cut. Neither reference bounds texts by
# default: the authors' Qwen2VLProcessorWrapper (src/vlm2emb/data/processors/qwen2_vl.py) has max_length=None and
# then truncates nothing (their VLM2VecTrainingArguments.max_length=512 is stored, never applied); VLM2Vec's
# Qwen2_VL_process_fn (src/model/processor.py) passes DataArguments.max_len=None, which truncates text-only
# inputs at the tokenizer's model_max_length (32768 for Qwen2-VL) and inputs with media not at all. An unbounded
# default lets one long text take any amount of memory and time, so the default is a bound: 8192, far above
# ordinary inputs (captions, questions, passages), which are embedded exactly as both references embed them.
DEFAULT_MAX_TEXT_TOKENS = 8192


def item_prompt(item: Item, style: str = "vlm2vec") -> str:
    """The text fed for one item, with its MMEB placeholders turned into Qwen2-VL pads.

    An item with an instruction is composed: instruction then text, with the vision placeholder first when the
    item has an image or video and the text names none. An item without one is a finished prompt (the MMEB-V2
    readers build them in their prompt style's exact surface form) and is kept character for character, but for
    the placeholder added in front when it has media and names none, or removed when it has no media. VLM2Vec
    style leaves pads bare; BToks style wraps them in <|vision_start|>..<|vision_end|>."""
    if item.instruction:
        text = " ".join(p for p in (item.instruction.strip(), item.text.strip()) if p)
    else:
        text = item.text
    if item.video and "<|video_" not in text:
        text = "<|video_1|>\n" + text.replace("<|image_1|>", "").strip()
    elif item.image and "<|image_" not in text:
        text = "<|image_1|>\n" + text
    if not item.image and not item.video and "<|image_1|>" in text:
        text = text.replace("<|image_1|>", "").strip()
    return convert_mmeb_placeholders(text, wrap_vision=style == "btoks")


def _bucket(n: int, minimum: int = 16) -> int:
    """Next power of two: few distinct shapes, so few compilations."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def query_width(tokens: int, num_btoks: int) -> int:
    """Columns of the query region for inputs of at most `tokens` tokens: the power-of-two bucket less the K
    BToks when the input leaves room for them, so `[Q ; B]` fills the bucket; only an input within K tokens of
    its bucket's end gets the BToks after the bucket. The shape stays a power of two for nearly every batch (on
    CPU, XLA's code for 4096 + 4 columns ran 8 to 13% slower than for 4096; benchmarks/embed_overhead.py) and the
    programs compiled stay at most two per bucket."""
    bucket = _bucket(tokens)
    return bucket - num_btoks if tokens + num_btoks <= bucket else bucket


@dataclasses.dataclass
class Embedder:
    model: BToksModel
    processor: Processor
    config: Qwen2VLConfig
    num_btoks: int
    rope_convention: str = "mm_token_type_ids"
    prompt_style: str = "vlm2vec"
    max_frames: int = 8
    mesh: jax.sharding.Mesh | None = None
    # Text tokens kept per item (DEFAULT_MAX_TEXT_TOKENS); longer texts are cut at the end, with one warning per
    # call counting the items cut. None: no budget (memory then grows with the longest text).
    max_text_tokens: int | None = DEFAULT_MAX_TEXT_TOKENS

    def __post_init__(self):
        self._embed_fns = {}
        self._compiled = {}  # multi-process runs: (function, argument shapes) -> program, compiled ahead of time
        self._forward = jax.jit(lambda m, x: m.backbone(x))

    @classmethod
    def for_model(cls, model: BToksModel, tokenizer=None, **kwargs) -> Embedder:
        """Wraps an in-memory model (e.g. freshly built or being trained) with the packaged tokenizer."""
        kwargs.setdefault("processor", Processor(tokenizer or load_tokenizer()))
        return cls(model=model, config=model.config, num_btoks=model.num_btoks, **kwargs)

    # ------------------------------------------------------------------ the Qwen2-VL port itself

    def __call__(self, **hf_inputs) -> dict[str, np.ndarray]:
        """The plain Qwen2-VL forward on exactly what Hugging Face's processor returns (NumPy arrays):
        input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw, pixel_values_videos,
        video_grid_thw. Returns final (post-norm) hidden states and logits."""
        inputs = pack_hf_inputs(hf_inputs, self.config, rope_convention=self.rope_convention)
        hidden, logits = self._forward(self.model, inputs)
        return {"hidden_states": np.asarray(hidden), "logits": np.asarray(logits)}

    # ------------------------------------------------------------------ embeddings

    def _embed_fn(self, layout: Layout, pooling: str):
        key = (layout, pooling)
        if key not in self._embed_fns:
            # Replicated output: in a multi-process run every process can then read all the embeddings.
            out = None if self.mesh is None else sharding.replicated(self.mesh)
            self._embed_fns[key] = jax.jit(lambda m, x: m(x, layout, pooling=pooling)[0], out_shardings=out)
        return self._embed_fns[key]

    def _load_video(self, frames: Sequence[str]):
        frames = list(frames)
        if len(frames) > self.max_frames:
            frames = [frames[i] for i in sample_frame_indices(len(frames), self.max_frames)]
        if len(frames) % 2:
            frames = frames + frames[-1:]  # temporal patches hold two frames
        return frames

    def _pack_items(self, items: Sequence[Item], targets=None, target_len: int = 0):
        """(packed batch, number of real rows): the items' prompts through the processor, rows padded (copies of
        the last row) to a power of two that splits over the devices; `targets` as `inputs.pack` takes them."""
        texts = [item_prompt(it, self.prompt_style) for it in items]
        images = [it.image for it in items if it.image and not it.video]
        videos = [self._load_video(it.video) for it in items if it.video]
        hf = self.processor(texts, images=images or None, videos=videos or None, padding_side="left")
        real = hf["attention_mask"].sum(-1)
        per_item = np.zeros(len(items), np.int64)
        for key, has in (("image_grid_thw", lambda it: it.image and not it.video), ("video_grid_thw",
                                                                                 lambda it: it.video)):
            if key in hf:
                owners = [i for i, it in enumerate(items) if has(it)]
                np.add.at(per_item, owners, hf[key].prod(-1))
        patches = int(per_item.max())
        n = len(items)
        shards = self.mesh.devices.size if self.mesh is not None else 1
        # A run over many data sets, whose last batches have every size, then compiles a few programs, not one
        # per remainder.
        rows = -(-_bucket(n, minimum=1) // shards) * shards
        if rows != n:
            hf = _repeat_last(hf, rows - n)
            if targets is not None:
                targets = list(targets) + [targets[-1]] * (rows - n)
        packed = pack(hf, self.config, num_btoks=self.num_btoks,
                      query_len=query_width(int(real.max()), self.num_btoks),
                      rope_convention=self.rope_convention, patch_budget=_bucket(patches, 16) if patches else 0,
                      targets=targets, target_len=target_len)
        return packed, n

    def _run(self, fn, inputs):
        if self.mesh is None:
            return np.asarray(fn(self.model, inputs))
        inputs = jax.device_put(inputs, sharding.batch_shardings(inputs, self.mesh))
        with jax.set_mesh(self.mesh):  # the splash kernel runs per shard (shard_map), as in training
            if jax.process_count() > 1:
                fn = self._compiled_everywhere(fn, inputs)
            return np.asarray(fn(self.model, inputs))

    def _compiled_everywhere(self, fn, inputs):
        """`fn` compiled for the model and these inputs, returned once every process has compiled it
        (`sharding.sync_processes`): a process that compiles faster does not wait alone in the collectives."""
        args = (self.model, inputs)
        key = (fn, jax.tree.structure(args), tuple((x.shape, x.dtype) for x in jax.tree.leaves(args)))
        if key not in self._compiled:
            self._compiled[key] = fn.lower(*args).compile()
            sharding.sync_processes("embedding program compiled")
        return self._compiled[key]

    def embed_batch(self, items: Sequence[Item], pooling: str = "btoks") -> np.ndarray:
        """float32[len(items), D], L2-normalised. Texts over `max_text_tokens` are cut (`apply_text_budget`, one
        warning); an item whose media cannot be read raises ItemError (a ValueError) with its index in `items`."""
        items, cut = self.apply_text_budget(items)
        self._warn_cut(cut, len(items))
        return self._embed_batch(items, pooling)

    def _embed_batch(self, items: Sequence[Item], pooling: str) -> np.ndarray:
        if pooling == "btoks" and self.num_btoks == 0:
            raise ValueError("this model has no BToks (K = 0): use pooling='last'")
        try:
            packed, n = self._pack_items(items)
        except ValueError:
            bad = self.find_unreadable(items)
            if bad is None:
                raise
            raise bad from None
        return self._run(self._embed_fn(packed.layout, pooling), packed.inputs)[:n]

    def find_unreadable(self, items: Sequence[Item]) -> ItemError | None:
        """The ItemError of the first item whose image or video the processor cannot take on its own (a file that
        is missing, empty, not an image, truncated or over Pillow's size limit; frames of different sizes; an
        aspect ratio over 200), or None. Host side only: what `_pack_items` runs before the model."""
        for index, item in enumerate(items):
            try:
                if item.video:
                    self.processor.video_processor([self._load_video(item.video)])
                elif item.image:
                    self.processor.image_processor([item.image])
            except ValueError as err:
                field = "video" if item.video else "image"
                if isinstance(err, MediaError):
                    message = f"cannot read {'frame' if item.video else 'image'} {err.path}: {err.reason}"
                else:
                    message = f"{item.video[0] if item.video else item.image}: {err}"
                return ItemError(field, message, index=index, item=item)
        return None

    def apply_text_budget(self, items: Sequence[Item]) -> tuple[list[Item], int]:
        """(the items, each with at most `max_text_tokens` text tokens, and how many were cut). An item over the
        budget becomes its finished prompt (`item_prompt`) cut by `truncate_text_tokens`, which keeps every
        vision pad and special token and drops text tokens from the end; the others are returned as they are."""
        budget = self.max_text_tokens
        if budget is None:
            return list(items), 0
        if budget < 1:
            raise ValueError(f"max_text_tokens must be at least 1 (or None for no budget), got {budget}")
        out, cut = [], 0
        for item in items:
            prompt = item_prompt(item, self.prompt_style)
            # A token holds at least one UTF-8 byte, so a prompt of at most `budget` bytes is within the budget.
            if len(prompt) <= budget // 4 or (len(prompt) <= budget and len(prompt.encode("utf-8")) <= budget):
                out.append(item)
                continue
            text, was_cut = truncate_text_tokens(self.processor.tokenizer, prompt, budget)
            if was_cut:
                # A prompt without an instruction is fed verbatim (`item_prompt`), its pads already in place.
                out.append(Item(text=text, image=item.image, video=item.video))
                cut += 1
            else:
                out.append(item)
        return out, cut

    def _warn_cut(self, cut: int, total: int) -> None:
        if cut:
            log.warning("%d of %d item(s) have more than %d text tokens: their text was cut to the first %d "
                        "(Embedder.max_text_tokens; btoks embed --max-text-tokens)", cut, total,
                        self.max_text_tokens, self.max_text_tokens)

    def generate_from_btoks(self, items: Sequence[Item], *, max_new_tokens: int = 16,
                            mask_mode: str = "condensation", batch_size: int = 16) -> list[str]:
        """Greedy text generated by each item's BToks, as the generative objective trains them to: the answer
        `<|im_start|>assistant\n...` decoded under the condensation mask, which lets it see the K BToks'
        states and nothing else of the input (`mask_mode="full"`: the whole input, as a plain MLLM would).
        Stops at `<|im_end|>` or after `max_new_tokens`; returns the decoded texts (special tokens dropped).

        Each new token is one forward pass over the fixed-size `[Q | B | T]` batch (one compiled program):
        causality makes the positions after the one read irrelevant, so no KV cache is needed at this size.
        """
        if self.num_btoks == 0 and mask_mode == "condensation":
            raise ValueError("this model has no BToks (K = 0): nothing to generate from under the condensation "
                             "mask; use mask_mode='full'")
        tok = self.processor.tokenizer
        prefix, _ = encode_target(tok, "")
        prefix = prefix[:-1]  # `<|im_start|>assistant\n`, without the closing <|im_end|>
        width = len(prefix) + max_new_tokens
        out: list[str] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            targets = [(prefix + [IM_END_ID] * max_new_tokens, len(prefix))] * len(chunk)
            packed, n = self._pack_items(chunk, targets=targets, target_len=width)
            layout = packed.layout
            key = ("generate", layout, mask_mode)
            if key not in self._embed_fns:
                self._embed_fns[key] = jax.jit(lambda m, x: jnp.argmax(m.target_logits(
                    m.forward(x, layout, mask_mode=mask_mode, start=layout.target_slice.start)), axis=-1))
            ids = np.array(packed.inputs.input_ids)
            t0 = layout.query_len + layout.num_btoks
            generated = np.full((ids.shape[0], max_new_tokens), IM_END_ID, ids.dtype)
            done = np.zeros(ids.shape[0], bool)
            for i in range(max_new_tokens):
                inputs = dataclasses.replace(packed.inputs, input_ids=jnp.asarray(ids))
                nxt = self._run(self._embed_fns[key], inputs)[:, len(prefix) - 1 + i]
                nxt = np.where(done, IM_END_ID, nxt)
                generated[:, i] = nxt
                done |= nxt == IM_END_ID
                if i + 1 < max_new_tokens:
                    ids[:, t0 + len(prefix) + i] = nxt
                if done[:n].all():
                    break
            for row in generated[:n]:
                stop = np.flatnonzero(row == IM_END_ID)
                out.append(tok.decode(row[: stop[0] if stop.size else len(row)].tolist(), skip_special_tokens=True))
        return out

    def embed_items(self, items: Sequence[Item], *, pooling: str = "btoks", batch_size: int = 16,
                    progress: bool = True) -> np.ndarray:
        """Embeds items in batches, grouped by kind so image and text items do not share padding. Texts over
        `max_text_tokens` are cut (one warning counting them); an item whose media cannot be read raises ItemError
        (a ValueError) with its index in `items`."""
        items, cut = self.apply_text_budget(items)
        self._warn_cut(cut, len(items))
        out = np.zeros((len(items), self.config.text_config.hidden_size), np.float32)
        order = sorted(range(len(items)), key=lambda i: (items[i].kind, len(items[i].text)))
        bar = tqdm(total=len(items), desc="embedding", unit="item", disable=not progress)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            try:
                out[idx] = self._embed_batch([items[i] for i in idx], pooling)
            except ItemError as err:
                err.index = idx[err.index]
                raise
            bar.update(len(idx))
        bar.close()
        return out

    def fingerprint(self, pooling: str = "btoks") -> str:
        """A digest of everything that decides an embedding: the weights (per array: name, shape, dtype, sum and
        sum of squares), the pooling, the prompt style, the M-RoPE convention and the pixel / frame budgets. Keys
        the on-disk embedding store (`btoks_jax.evaluate.store`)."""
        import hashlib

        import flax.nnx as nnx

        digest = hashlib.sha256()
        state = nnx.state(self.model)
        leaves = jax.tree_util.tree_leaves_with_path(state)
        sums = jax.jit(lambda xs: [(jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32))))
                                   for x in xs])([leaf for _, leaf in leaves])
        for (path, leaf), (total, squares) in zip(leaves, sums):
            digest.update(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}|{float(total)!r}|"
                          f"{float(squares)!r}\n".encode())
        image = self.processor.image_processor
        digest.update(f"{pooling}|{self.prompt_style}|{self.rope_convention}|{self.num_btoks}|{self.max_frames}|"
                      f"{image.min_pixels}|{image.max_pixels}|{self.max_text_tokens}".encode())
        return digest.hexdigest()

    def embed(self, texts: Sequence[str], images: Sequence[str | None] | None = None, *,
              instructions: Sequence[str] | None = None, pooling: str = "btoks", batch_size: int = 16) -> np.ndarray:
        """Convenience: parallel lists of texts, optional image paths and instructions."""
        images = images or [None] * len(texts)
        instructions = instructions or [""] * len(texts)
        items = [Item(text=t, image=i, instruction=s) for t, i, s in zip(texts, images, instructions)]
        return self.embed_items(items, pooling=pooling, batch_size=batch_size, progress=False)


@functools.lru_cache(maxsize=8)
def _max_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes one token of the vocabulary stands for (byte-level BPE: one character per byte)."""
    return max(map(len, tokenizer.get_vocab()))


def _split_added_tokens(tokenizer, text: str) -> list[str]:
    """`text` split around the tokenizer's added tokens: [text, added token, text, ..., text]."""
    tokens = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
    if not tokens:
        return [text]
    return re.split("(" + "|".join(map(re.escape, tokens)) + ")", text)


def _count_text_tokens(tokenizer, pieces: Sequence[str]) -> int:
    texts = [piece for i, piece in enumerate(pieces) if i % 2 == 0 and piece]
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0


def truncate_text_tokens(tokenizer, text: str, max_tokens: int) -> tuple[str, bool]:
    """(`text` with at most `max_tokens` text tokens, whether anything was cut).

    Added tokens (the vision pads and their <|vision_start|>/<|vision_end|> wrappers, <|im_start|> and the
    other special tokens, the BToks) are not counted and are all kept, in place; text tokens are kept from the
    start and the rest dropped, as right-side truncation does. The tokenizer only ever sees a bounded prefix of
    each stretch of text (a few characters per kept token, grown as needed up to `max_tokens` times the longest
    token's bytes), so a text of any length costs about what one at the budget does; the result is checked once
    more after the cut, since a cut inside a word can re-tokenize one token longer."""
    widest = _max_token_bytes(tokenizer)
    pieces = _split_added_tokens(tokenizer, text)
    limit, cut = max_tokens, False
    for _ in range(4):
        kept, left = [], limit
        for i, piece in enumerate(pieces):
            if i % 2 or not piece:
                kept.append(piece)
                continue
            if left == 0:
                kept.append("")
                cut = True
                continue
            # A prefix of a few characters per token first, doubled until it holds more than `left` tokens (or is
            # the whole piece, or reaches the bound above): a long text costs about twice its kept part.
            size = min(left * 8, left * widest)
            while True:
                head = piece[:size]
                offsets = tokenizer(head, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                if len(head) == len(piece) or len(offsets) > left or size >= left * widest:
                    break
                size = min(2 * size, left * widest)
            if len(head) == len(piece) and len(offsets) <= left:
                kept.append(piece)
                left -= len(offsets)
                continue
            keep = min(left, len(offsets))
            # Byte-level tokens may split a character: back off to a token that ends where the next one starts.
            while keep and keep < len(offsets) and offsets[keep][0] < offsets[keep - 1][1]:
                keep -= 1
            kept.append(piece[: offsets[keep - 1][1]] if keep else "")
            left, cut = 0, True
        over = _count_text_tokens(tokenizer, kept) - max_tokens
        if over <= 0:
            return "".join(kept), cut
        limit -= over
    raise ValueError(f"cannot cut a text to {max_tokens} tokens")  # not reached with a BPE tokenizer


def _repeat_last(hf: dict, extra: int) -> dict:
    out = dict(hf)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        out[key] = np.concatenate([hf[key], np.repeat(hf[key][-1:], extra, 0)])
    last = hf["input_ids"][-1]
    for kind, pix, grid in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos",
                                                                         "video_grid_thw")):
        token = 151655 if kind == "image" else 151656
        if grid in hf and (last == token).any():
            # The repeated row re-uses the last item's pixels.
            g = hf[grid][-1]
            n = int(np.prod(g))
            out[grid] = np.concatenate([hf[grid]] + [hf[grid][-1:]] * extra)
            out[pix] = np.concatenate([hf[pix]] + [hf[pix][-n:]] * extra)
    return out


def is_checkpoint_dir(path: str) -> bool:
    return fs.isdir(checkpoint.checkpoints_dir(path))


def from_pretrained(directory: str | os.PathLike, *, num_btoks: int | None = None, step: int | None = None,
                    dtype: str = "float32", rope_convention: str = "mm_token_type_ids", prompt_style: str | None = None,
                    btok_init: str = "im_end", shard: bool = True) -> Embedder:
    """Loads a model, its tokenizer and processor settings from a Hugging Face-format directory or a
    btoks-jax checkpoint. `num_btoks` defaults to the number of `<|btok_i|>` tokens in the directory's
    tokenizer (the checkpoint's setting for a checkpoint), else 4."""
    directory = os.fspath(directory)
    if not fs.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such directory")
    mesh = sharding.make_mesh(devices=jax.devices()) if shard else sharding.make_mesh(devices=jax.devices()[:1])
    if is_checkpoint_dir(directory):
        model, meta = build.restore_model(directory, step=step, mesh=mesh, merge=True)
        cfg = model.config
        data = meta["config"]["data"]
        processor = Processor(load_tokenizer(meta.get("tokenizer_dir")),
                              ImageProcessor(min_pixels=data["image_min_pixels"], max_pixels=data["image_max_pixels"]))
        k = model.num_btoks
        style = prompt_style or meta.get("prompt_style", "vlm2vec")
        conv = meta.get("rope_convention", rope_convention)
    else:
        if not fs.exists(fs.join(directory, "config.json")):
            raise FileNotFoundError(f"{directory}: neither a Hugging Face model directory (no config.json) nor a "
                                    "btoks-jax checkpoint (no checkpoints/)")
        cfg = hf_config(directory, dtype=dtype)
        recorded = read_export_settings(directory)
        k = num_btoks if num_btoks is not None else (_count_btoks(directory) or 4)
        head = _read_head_config(directory)
        model = build.build(cfg, num_btoks=k, hf_dir=directory, btok_init=btok_init, mesh=mesh, head=head)
        if head is not None:
            _load_head(model.head, directory)
        processor = _processor_of(directory) if _has_tokenizer(directory) else Processor(load_tokenizer())
        style = prompt_style or recorded.get("prompt_style", "vlm2vec")
        conv = recorded.get("rope_convention", rope_convention)
    model.eval()
    return Embedder(model=model, processor=processor, config=cfg, num_btoks=k, rope_convention=conv,
                    prompt_style=style, mesh=mesh if mesh.devices.size > 1 else None)


EXPORT_SETTINGS = "btoks_jax.json"


def read_export_settings(directory: str) -> dict:
    """How an exported model was trained (prompt style, M-RoPE convention), if btoks-jax exported it."""
    path = fs.join(directory, EXPORT_SETTINGS)
    if not fs.exists(path):
        return {}
    return fs.read_json(path)


def _read_head_config(directory: str):
    """The pooling head an exported directory carries (`btoks_head.json`), or None."""
    from btoks_jax.convert.hf_export import HEAD_CONFIG

    path = fs.join(directory, HEAD_CONFIG)
    if not fs.exists(path):
        return None
    return build.head_config({"head": fs.read_json(path)})


def _load_head(head, directory: str) -> None:
    """Fills the head's weights from `btoks_head.safetensors` (torch names and layout)."""
    from safetensors.numpy import load

    from btoks_jax.convert.hf_export import HEAD_WEIGHTS

    weights = load(fs.read_bytes(fs.join(directory, HEAD_WEIGHTS)))  # a few megabytes: read whole
    expected = head.torch_state_dict()
    if set(weights) != set(expected):
        raise ValueError(f"{directory}/{HEAD_WEIGHTS}: tensors {sorted(weights)}, expected {sorted(expected)}")
    for name, value in expected.items():
        if weights[name].shape != value.shape:
            raise ValueError(f"{directory}/{HEAD_WEIGHTS}: {name} has shape {weights[name].shape}, "
                             f"expected {value.shape}")
    head.score_kernel.value = jnp.asarray(weights["attention.weight"].T)
    head.score_bias.value = jnp.asarray(weights["attention.bias"])
    head.mlp_in_kernel.value = jnp.asarray(weights["mlp.0.weight"].T)
    head.mlp_in_bias.value = jnp.asarray(weights["mlp.0.bias"])
    head.mlp_out_kernel.value = jnp.asarray(weights["mlp.3.weight"].T)
    head.mlp_out_bias.value = jnp.asarray(weights["mlp.3.bias"])
    head.norm_weight.value = jnp.asarray(weights["layer_norm.weight"])
    head.norm_bias.value = jnp.asarray(weights["layer_norm.bias"])


def _has_tokenizer(directory: str) -> bool:
    return any(fs.exists(fs.join(directory, f)) for f in ("tokenizer.json", "vocab.json"))


def _processor_of(directory: str) -> Processor:
    """`Processor.from_pretrained` of a directory; one in a bucket has its small files copied locally first."""
    from btoks_jax.processing.tokenizer import PROCESSOR_FILES

    with fs.local_copy(directory, PROCESSOR_FILES) as local:
        return Processor.from_pretrained(local)


def _count_btoks(directory: str) -> int:
    added = build.hf_added_tokens(directory)  # read once (a bucket's tokenizer.json is megabytes)
    if added is None:
        return 0
    k = 0
    while build.hf_btok_ids(directory, k + 1, added) is not None:
        k += 1
    return k


__all__ = ["DEFAULT_MAX_TEXT_TOKENS", "Embedder", "ItemError", "from_pretrained", "item_prompt",
           "truncate_text_tokens"]
